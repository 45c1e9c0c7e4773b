"""LLaVA-NeXT (any-resolution LLaVA): CLIP/SigLIP vision tower over image crops, MLP projector,
language model, and a learned ``image_newline`` vector appended to each row of image features.

The towers come from the canonizers of ``vision_config`` / ``text_config``. ``LlavaNextModel`` holds
``image_newline`` as a parameter (a constant added to the sequence, like a bias): it is declared
passthrough, so its own ops (crop unpadding, ``cat``, ``masked_scatter``) are checked by the op mode.
Explained as for :mod:`~lime_attr.canonizers.llava`; pass ``image_sizes`` with ``pixel_values``.
"""
from .base import HFCanonizer, register_canonizer
from .facts import FamilyFacts


@register_canonizer("llava_next")
class LlavaNextCanonizer(HFCanonizer):
    """``LlavaNextForConditionalGeneration`` / ``LlavaNextModel``."""

    components = ("vision_config", "text_config")
    passthrough = ("LlavaNextModel",)
    #: any-resolution tiles ``[batch, tiles, C, H, W]``
    facts = FamilyFacts(pixel_layout="tiles", language_model=("model.language_model", "language_model"),
                        decoder=("model.language_model", "language_model"), rope="1d")
