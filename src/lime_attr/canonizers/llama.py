"""Llama (and Llama-shaped families): attention via the interface, RMSNorm, SwiGLU MLP."""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("llama")
class LlamaCanonizer(HFCanonizer):
    """``LlamaForCausalLM`` / ``LlamaModel`` / ``LlamaForSequenceClassification``."""

    attention = ("LlamaAttention",)
    gated_mlps = {"LlamaMLP": GatedMLP()}
    passthrough = ("LlamaRotaryEmbedding",)
