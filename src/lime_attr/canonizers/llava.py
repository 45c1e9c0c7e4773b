"""LLaVA: a vision tower (CLIP / SigLIP), an MLP projector with GELU, a language model (Llama, Qwen2...).

The towers' declarations come from the canonizers registered for ``config.vision_config.model_type``
and ``config.text_config.model_type`` (see :attr:`HFCanonizer.components`); the projector is two linear
layers around an activation module, covered by default. The image features replace the image-token
positions of ``inputs_embeds`` with ``masked_scatter`` (linear: a selection).

Explained: ``LRP(model).attribute(inputs_embeds, target=token, input_ids=None, pixel_values=pixels)``
gives the relevance of the text embeddings (the image-token positions get 0: their embeddings are
replaced); ``LRP(model).attribute(pixels, target=token, input_name="pixel_values", inputs_embeds=emb)``
gives the image's relevance for the same output. ``inputs_embeds`` must hold the image token's embedding
at the image positions (``model.get_input_embeddings()(input_ids)``).
"""
from .base import HFCanonizer, register_canonizer
from .facts import FamilyFacts


@register_canonizer("llava")
class LlavaCanonizer(HFCanonizer):
    """``LlavaForConditionalGeneration`` / ``LlavaModel``."""

    components = ("vision_config", "text_config")
    #: image placeholders replaced by ``[images, C, H, W]`` pixel features; the language model takes inputs_embeds
    facts = FamilyFacts(pixel_layout="images", language_model=("model.language_model", "language_model"),
                        decoder=("model.language_model", "language_model"), rope="1d")
