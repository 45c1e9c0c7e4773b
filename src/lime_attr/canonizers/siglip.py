"""SigLIP (joint model, vision tower, text tower).

Attention goes through the interface; the vision embeddings (patch ``Conv2d`` + added position
embeddings) and text embeddings are passthrough (their ``add`` is checked by the op mode). The vision
tower's attention-pooling head (``SiglipMultiheadAttentionPoolingHead``) runs a ``torch.nn.MultiheadAttention``
on a learned probe: its kernel ``multi_head_attention_forward`` is an attention op site in the op mode
(the composite's attention rule acts on its query/key/value inputs; the in/out projections are linear and
get the plain gradient, i.e. epsilon with eps = 0, whatever layer rule the composite names).

Explained: ``pixel_values`` (``SiglipForImageClassification`` -> the class logit; for ``SiglipVisionModel``
wrap it to return ``pooler_output`` and pass ``canonizer="siglip"``). The text tower accepts only
``input_ids``; inside a scope a call with ``inputs_embeds`` *and* ``input_ids`` runs on the embeddings
(:func:`~lime_attr.canonizers.base.route_inputs_embeds`). ``SiglipModel``'s similarity logits normalise
with ``pow``/``sum`` and are not covered (the op mode says so).
"""


from .base import HFCanonizer, register_canonizer


@register_canonizer("siglip", "siglip_vision_model", "siglip_text_model")
class SiglipCanonizer(HFCanonizer):
    """``SiglipModel`` / ``SiglipVisionModel`` / ``SiglipTextModel`` / ``SiglipForImageClassification``."""

    attention = ("SiglipAttention",)
    # SiglipModel holds logit_scale / logit_bias (constants): its own ops are checked by the op mode
    passthrough = ("SiglipVisionEmbeddings", "SiglipTextEmbeddings", "SiglipMultiheadAttentionPoolingHead",
                   "SiglipModel")
    op_modules = ("MultiheadAttention",)
    route_embeds = {"SiglipTextModel": ()}
