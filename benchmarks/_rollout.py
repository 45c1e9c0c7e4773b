"""Attention rollout (Abnar & Zuidema, "Quantifying Attention Flow in Transformers", ACL 2020).

Per layer l the attention weights are averaged over heads and mixed with the identity to account
for the residual connection, ``A_l = (1 - w) * mean_h(attn_l) + w * I`` (w = 0.5 in the paper), and
rows are renormalised to sum to one. The rollout is the product ``A_L @ ... @ A_1``; its row for the
explained position (CLS for a ViT, the last token for a causal LM) says how much each input token
flows into that position. It is non-negative and has no notion of the explained class.
"""

from __future__ import annotations

from typing import Sequence

import torch


def attention_rollout(attentions: Sequence[torch.Tensor], residual_weight: float = 0.5) -> torch.Tensor:
    """Roll attention weights out through the layers.

    Parameters
    ----------
    attentions : sequence of torch.Tensor
        One ``[B, H, T, T]`` tensor of attention probabilities per layer, first layer first.
    residual_weight : float
        Weight w of the identity (residual) term.

    Returns
    -------
    torch.Tensor
        ``[B, T, T]`` rollout; row i is the share of each input token in position i's output.
    """
    if not attentions:
        raise ValueError("attention rollout needs the attention weights of at least one layer")
    rollout = None
    for attn in attentions:
        a = attn.detach().to(torch.float64).mean(dim=1)
        eye = torch.eye(a.shape[-1], dtype=a.dtype).expand_as(a)
        a = (1.0 - residual_weight) * a + residual_weight * eye
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout
