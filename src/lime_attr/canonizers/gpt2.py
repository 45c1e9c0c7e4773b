"""GPT-2: LayerNorm, GELU MLP, absolute position embeddings, ``Conv1D`` layers (layer rules apply).

Inside a scope the attention implementation is the ``lime_attr:<impl>`` wrapper, so GPT-2's
``reorder_and_upcast_attn`` path (taken only when the implementation is literally ``"eager"``) is not
used; the plain eager function computes the same attention.
"""
from .base import HFCanonizer, register_canonizer


@register_canonizer("gpt2")
class GPT2Canonizer(HFCanonizer):
    """``GPT2LMHeadModel`` / ``GPT2Model`` / ``GPT2ForSequenceClassification``."""

    attention = ("GPT2Attention",)
