"""Qwen2.5-VL: vision transformer with window attention (token reordering by index: linear), RMSNorm,
SwiGLU vision MLPs and an RMSNorm patch merger; a Qwen2-style language model with M-RoPE.

Everything is declared here (the vision and text towers are this family's own classes). How LRP is
called is the same as for :mod:`~lime_attr.canonizers.qwen2_vl`.
"""
from .base import GatedMLP, HFCanonizer, register_canonizer
from .facts import FamilyFacts


@register_canonizer("qwen2_5_vl", "qwen2_5_vl_text", "qwen2_5_vl_vision")
class Qwen2_5_VLCanonizer(HFCanonizer):
    """``Qwen2_5_VLForConditionalGeneration`` / ``Qwen2_5_VLModel`` / the vision tower."""

    attention = ("Qwen2_5_VLVisionAttention", "Qwen2_5_VLAttention")
    gated_mlps = {"Qwen2_5_VLMLP": GatedMLP(), "Qwen2MLP": GatedMLP()}
    passthrough = ("Qwen2_5_VLRotaryEmbedding", "Qwen2_5_VLVisionRotaryEmbedding")
    #: ``<|vision_start|>`` .. ``<|vision_end|>`` spans, flattened ``[patches, C*T*P*P]`` pixels with a grid,
    #: multimodal rotary positions computed by the model (``get_rope_index``)
    facts = FamilyFacts(pixel_layout="flattened_patches", language_model=("model.language_model",),
                        decoder=("model.language_model",), rope="mrope")
