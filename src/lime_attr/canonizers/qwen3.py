"""Qwen3: Llama-shaped plus per-head RMSNorm on q and k (``q_norm`` / ``k_norm``, found as norms)."""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("qwen3")
class Qwen3Canonizer(HFCanonizer):
    """``Qwen3ForCausalLM`` / ``Qwen3Model`` / ``Qwen3ForSequenceClassification``."""

    attention = ("Qwen3Attention",)
    gated_mlps = {"Qwen3MLP": GatedMLP()}
    passthrough = ("Qwen3RotaryEmbedding",)
