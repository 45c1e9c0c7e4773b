r"""The first-order update of ``LimeConfig(mode="incremental", second_order="frozen")``.

In incremental mode the relevance of an earlier position :math:`j` is what the rule-modified backward of
the explained scalar :math:`z^*` carries into the keys and values the current query reads from it
(:mod:`lime_attr.mitigation.incremental`). With ``second_order="frozen"`` that relevance is taken as the
one of the *perturbed* entries, at the point where :math:`\Delta` is added (before the attention rule,
after the grouped-query repeat when :math:`\Delta` has one slice per query head):

.. math:: R_j(\Delta) = \sum_{l,h,d} \big(K^l_j + \Delta^l_{K,j}\big) \odot g^l_{K,j}
          + \big(V^l_j + \Delta^l_{V,j}\big) \odot g^l_{V,j},
          \qquad g = \frac{\partial^{\mathrm{LRP}} z^*}{\partial (K, V)},

which equals the ``"autograd"`` mode's relevance at :math:`\Delta = 0`. Its gradient with the rule
gradient :math:`g` *held constant* is

.. math:: \frac{\partial L}{\partial \Delta^l_{K,j}} = \frac{\partial L}{\partial R_j}\, g^l_{K,j}
          \quad (j < t;\ 0 \text{ at the current position } t, \text{ whose relevance is } x_t \cdot g_{x_t}),

and the same for :math:`V`. The full derivative of :math:`R_j(\Delta)` would add
:math:`(K_j + \Delta_j)\, \partial g_j / \partial \Delta`, the term autograd's double backward computes
(``second_order="autograd"`` computes *only* that term, since its relevance multiplies the unperturbed
:math:`K_j`): at :math:`\Delta = 0` the two modes' gradients add up to the full derivative. The KL term's
gradient is exactly 0 at :math:`\Delta = 0` (the KL is minimal there), so one update from
:math:`\Delta = 0` needs nothing but the first-order relevance backward. Adam's first step from zero
moments is :math:`-\mathrm{lr}\; G / (|G| + \epsilon)` elementwise (bias correction included); SGD's is
:math:`-\mathrm{lr}\; G`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["ADAM_EPS", "first_step", "frozen_gradient"]

#: ``torch.optim.Adam``'s default epsilon, the one the other LIME modes' optimiser uses
ADAM_EPS = 1e-8


def first_step(grad: Tensor, lr: float, optimizer: str) -> Tensor:
    r"""The parameter after one step of ``optimizer`` from zero (zero moments for Adam).

    Adam (defaults :math:`\beta = (0.9, 0.999)`, :math:`\epsilon = 10^{-8}`): the bias-corrected moments of
    the first step are :math:`g` and :math:`g^2`, so the step is :math:`-\mathrm{lr}\, g / (|g| + \epsilon)`.
    SGD: :math:`-\mathrm{lr}\, g`.
    """
    if optimizer == "adam":
        return -lr * grad / (grad.abs() + ADAM_EPS)
    if optimizer == "sgd":
        return -lr * grad
    raise ValueError(f"unknown optimizer {optimizer!r}; use 'adam' or 'sgd'")


def frozen_gradient(dl_dr: Tensor, grad: Optional[Tensor], mask: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    r""":math:`\partial L / \partial \Delta` at frozen :math:`g` for one probed tensor.

    Parameters
    ----------
    dl_dr : Tensor
        ``[batch, t + 1]``: :math:`\partial L / \partial R_j` (the current position's column is ignored: its
        relevance comes from the input embedding, not from its own keys and values).
    grad : Tensor or None
        ``[batch, heads, t + 1, head_dim]``: the probe's gradient :math:`g` (None: no gradient reached it).
    mask : Tensor or None
        ``[batch, 1, t + 1, 1]``: the positions :math:`\Delta` acts on (``positions="modality"``), or None.
    dtype : torch.dtype
        The dtype of :math:`\Delta`.
    """
    if grad is None:
        raise RuntimeError("the relevance backward reached no perturbed key / value: is the layer's attention "
                           "inside the scope's attention bridge?")
    weight = dl_dr.to(dtype).clone()
    weight[:, -1] = 0  # position t: its relevance is x_t . g_x, not a function of its own keys / values
    out = weight[:, None, :, None] * grad.to(dtype)
    return out * mask if mask is not None else out

