"""Gemma 3 (text): Gemma 2 plus q/k RMSNorms and per-layer-type (sliding / full) rotary embeddings.

The final-logit soft-cap is handled as in :mod:`.gemma2`; transformers' Gemma 3 attention passes no
soft-cap to its kernel, so eager and SDPA compute the same attention.
"""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("gemma3_text")
class Gemma3TextCanonizer(HFCanonizer):
    """``Gemma3ForCausalLM`` / ``Gemma3TextModel`` / ``Gemma3TextForSequenceClassification``."""

    attention = ("Gemma3Attention",)
    norms = {"Gemma3RMSNorm": dict(kind="rmsnorm", weight_offset=1.0)}
    gated_mlps = {"Gemma3MLP": GatedMLP()}
    passthrough = ("Gemma3RotaryEmbedding", "Gemma3TextScaledWordEmbedding")
