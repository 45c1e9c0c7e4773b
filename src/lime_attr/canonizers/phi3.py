"""Phi-3: fused ``gate_up_proj``; the MLP computes ``down_proj(up * act(gate))`` from its two halves.

The product's gate factor is the activation module's output and the other factor is a slice of the
fused projection, so the declaration names the activation and the consumer only (``up=None``).
"""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("phi3")
class Phi3Canonizer(HFCanonizer):
    """``Phi3ForCausalLM`` / ``Phi3Model`` / ``Phi3ForSequenceClassification``."""

    attention = ("Phi3Attention",)
    gated_mlps = {"Phi3MLP": GatedMLP(act="activation_fn", consumer="down_proj", up=None)}
    passthrough = ("Phi3RotaryEmbedding",)
