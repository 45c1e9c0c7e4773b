"""Gemma 2: Gemma plus logit soft-capping and sandwich norms.

* Final logits ``c * tanh(z / c)``: a functional ``tanh`` on the input path, ruled by the op mode with the
  activation rule (identity under AttnLRP / CP-LRP, so the relevance stays conservative).
* Attention soft-capping happens inside ``eager_attention_forward`` (Gemma 2 supports only eager
  attention in transformers, since SDPA has no soft-capping): the attention rule acts on the kernel's
  q, k, v, so the ``tanh`` between ``q k^T`` and the softmax keeps its true Jacobian (documented
  approximation of AttnLRP, whose softmax/bilinear rules assume no cap).
"""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("gemma2")
class Gemma2Canonizer(HFCanonizer):
    """``Gemma2ForCausalLM`` / ``Gemma2Model`` / ``Gemma2ForSequenceClassification``."""

    attention = ("Gemma2Attention",)
    norms = {"Gemma2RMSNorm": dict(kind="rmsnorm", weight_offset=1.0)}
    gated_mlps = {"Gemma2MLP": GatedMLP()}
    passthrough = ("Gemma2RotaryEmbedding", "Gemma2TextScaledWordEmbedding")
