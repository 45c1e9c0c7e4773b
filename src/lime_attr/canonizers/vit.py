"""ViT: attention via the interface, LayerNorm, GELU MLP; the patch/CLS/position embeddings.

``ViTEmbeddings`` holds the CLS token and the position embeddings as parameters: they are added
constants (they absorb relevance like a bias), the patch projection inside it is a ``Conv2d`` layer.
It is declared passthrough, so its own ops (``cat``, ``add``) are still checked by the op mode.
"""
from .base import HFCanonizer, register_canonizer


@register_canonizer("vit")
class ViTCanonizer(HFCanonizer):
    """``ViTForImageClassification`` / ``ViTModel``: explained w.r.t. ``pixel_values``."""

    attention = ("ViTAttention",)
    passthrough = ("ViTEmbeddings",)
