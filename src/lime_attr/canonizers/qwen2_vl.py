"""Qwen2-VL: its own vision transformer (Conv3d patch embedding, 2D rotary, LayerNorm blocks, patch merger
with GELU MLP) and its own Qwen2-style language model (RMSNorm, SwiGLU MLP, 3D / M-RoPE rotary).

All attention (vision blocks and decoder layers) goes through the attention interface; the patch merger's
``LayerNorm`` and ``GELU`` are covered by default; rotary embeddings are computed without gradient
(passthrough). The image features replace the image-token positions with ``masked_scatter`` (linear).

Explained: ``LRP(model).attribute(inputs_embeds, target=token, input_ids=ids, mm_token_type_ids=types,
pixel_values=pixels, image_grid_thw=thw)``. Qwen2-VL takes ``input_ids`` *and* ``inputs_embeds``
together: ``input_ids`` then only locate the image tokens and give the 3D (M-RoPE) positions, the
explained embeddings are what the model runs on. The image's relevance: the same call with
``pixels`` as the explained input and ``input_name="pixel_values", inputs_embeds=emb``.
"""
from .base import GatedMLP, HFCanonizer, register_canonizer
from .facts import FamilyFacts


@register_canonizer("qwen2_vl", "qwen2_vl_text", "qwen2_vl_vision")
class Qwen2VLCanonizer(HFCanonizer):
    """``Qwen2VLForConditionalGeneration`` / ``Qwen2VLModel`` / ``Qwen2VLTextModel`` / the vision tower."""

    attention = ("VisionAttention", "Qwen2VLAttention")
    gated_mlps = {"Qwen2MLP": GatedMLP()}
    passthrough = ("Qwen2VLRotaryEmbedding", "Qwen2VLVisionRotaryEmbedding")
    #: ``<|vision_start|>`` .. ``<|vision_end|>`` spans, flattened ``[patches, C*T*P*P]`` pixels with a grid,
    #: multimodal rotary positions computed by the model (``get_rope_index``)
    facts = FamilyFacts(pixel_layout="flattened_patches", language_model=("model.language_model",),
                        decoder=("model.language_model",), rope="mrope")
