"""BERT: post-LN encoder (LayerNorm with bias), GELU, absolute position and token-type embeddings.

Position / token-type embeddings are added to ``inputs_embeds`` (constants with respect to the input:
they act as biases). ``BertForSequenceClassification``'s pooler (dense + ``nn.Tanh``) gets the layer and
activation rules, so the class logit is explained through it.
"""
from .base import HFCanonizer, register_canonizer


@register_canonizer("bert")
class BertCanonizer(HFCanonizer):
    """``BertModel`` / ``BertForSequenceClassification`` / ``BertForMaskedLM`` / ``BertLMHeadModel``."""

    attention = ("BertSelfAttention", "BertCrossAttention")
