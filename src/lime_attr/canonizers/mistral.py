"""Mistral: Llama-shaped (attention via the interface, RMSNorm, SwiGLU MLP, RoPE)."""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("mistral")
class MistralCanonizer(HFCanonizer):
    """``MistralForCausalLM`` / ``MistralModel`` / ``MistralForSequenceClassification``."""

    attention = ("MistralAttention",)
    gated_mlps = {"MistralMLP": GatedMLP()}
    passthrough = ("MistralRotaryEmbedding",)
