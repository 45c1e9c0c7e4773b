"""CLIP (joint model, vision tower, text tower): attention via the interface, LayerNorm, quick-GELU MLP.

The vision embeddings hold the class embedding as a parameter and add position embeddings (constants,
like biases); the patch embedding is a bias-free ``Conv2d`` layer. The text embeddings add position
embeddings to the token embeddings. Both are declared passthrough: their ops (``cat``, ``add``) are
checked by the op mode.

What is explained (see ``docs/canonizers_multimodal.rst``):

* vision: ``pixel_values``. ``CLIPForImageClassification`` -> the class logit. For the embedding towers
  explain the projected image embedding (``image_embeds``, the CLIP space): wrap the model in a module
  returning ``model(pixel_values=x).image_embeds`` and pass ``canonizer="clip"``; a target ``j`` is one
  component, or return ``image_embeds @ text_direction`` to explain the similarity to a (constant) text.
* text: CLIP's text tower accepts only ``input_ids``; inside a scope a call with ``inputs_embeds`` *and*
  ``input_ids`` runs on the given embeddings (:func:`~lime_attr.canonizers.base.route_inputs_embeds`):
  ``LRP(text_model).attribute(emb, target=(eos_position, j), input_ids=ids)``.
* ``CLIPModel.forward`` (the cosine-similarity logits) divides by a norm built from ``pow``/``sum``:
  not covered (the op mode names ``pow``); explain the towers' embeddings instead.
"""


from .base import HFCanonizer, register_canonizer


@register_canonizer("clip", "clip_vision_model", "clip_text_model")
class CLIPCanonizer(HFCanonizer):
    """``CLIPModel`` / ``CLIPVisionModel(WithProjection)`` / ``CLIPTextModel(WithProjection)`` /
    ``CLIPForImageClassification``."""

    attention = ("CLIPAttention",)
    # CLIPModel holds logit_scale (a constant factor): its own ops (the similarity) are checked by the op mode
    passthrough = ("CLIPVisionEmbeddings", "CLIPTextEmbeddings", "CLIPModel")
    route_embeds = {"CLIPTextModel": ()}
