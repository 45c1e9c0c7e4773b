"""Gemma: RMSNorm scaled by ``1 + weight``, GeGLU MLP, embeddings scaled by ``sqrt(hidden_size)``.

The embedding scale is a constant factor inside ``GemmaTextScaledWordEmbedding``; the model is explained
with respect to ``inputs_embeds``, so pass ``model.get_input_embeddings()(input_ids)`` (already scaled).
"""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("gemma")
class GemmaCanonizer(HFCanonizer):
    """``GemmaForCausalLM`` / ``GemmaModel`` / ``GemmaForSequenceClassification``."""

    attention = ("GemmaAttention",)
    norms = {"GemmaRMSNorm": dict(kind="rmsnorm", weight_offset=1.0)}
    gated_mlps = {"GemmaMLP": GatedMLP()}
    passthrough = ("GemmaRotaryEmbedding", "GemmaTextScaledWordEmbedding")
