"""A layer rule's formula, and the kernels that evaluate it.

A layer rule for ``y = x W^T + b`` (or a convolution) is written as a :class:`LayerFormula`: one or more
*branches* ``k``, each a modified forward pass that pairs the input's signed parts with modified weights,

``z^k_j = sum_i x^+_i (A^k)_ji + x^-_i (B^k)_ji + c^k_j``,  with
``A^k = a^k_+ W^+ + a^k_- W^-``, ``B^k = b^k_+ W^+ + b^k_- W^-``, ``c^k = d^k_+ b^+ + d^k_- b^-``

(``x^+ = max(x, 0)``, ``x^- = min(x, 0)``, the same for ``W`` and ``b``), and spreads the relevance of the
outputs in its support (all outputs, those with ``y > 0`` or those with ``y < 0``) in proportion:

``R_i = sum_k s^k sum_{j in support k} z^k_ij / (z^k_j + eps sign(z^k_j)) R_j``.

In gradient form (``R = x * g``, ``R_out = y * g``) this is one modified backward pass,
``g_in = sum_k (x^+)' (A^k)^T h^k + (x^-)' (B^k)^T h^k`` with ``h^k = s^k [support] y / stab(z^k) * g``.

:func:`evaluate` picks how to compute it: the *reference* evaluation (autograd through the modified
forward passes, for any layer with a functional forward) or, where the layer's transpose is known
(``rules._layer.layer_vjp``), a fast kernel whose backward is exactly the transposed layers
the formula needs, with the ratios kept from the forward pass:

- ``x >= 0`` (after a ReLU): the ``x^-`` terms vanish; all branches are one *stacked* layer evaluation
  (weights stacked on the output axis) and one stacked transposed evaluation;
- mixed-sign ``x``: ``[x^+, x^-]`` stacked on the input axis, each branch's ``[A^k, B^k]`` one block row;
- *sign-split* formulas (a branch for ``y > 0`` that adds only non-negative products to ``base * y`` and one
  for ``y < 0`` that adds only non-positive ones, as LRP-gamma): ``|z^k| >= base |y|``, so the
  denominators are formed from ``y`` and the added products alone (one layer evaluation with the weights
  ``W^+`` where ``x >= 0``), need no selection by sign, and the ``y < 0`` transpose is skipped where its
  incoming gradient is zero (a ReLU after the layer).

The fast kernels can be switched off with :func:`use_fast_kernels` (tests compare both evaluations); both
give the same relevance and the same second derivatives.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from ._grad import modified_grad, nonnegative, replace_grad, stabilize, stabilize_
from ._layer import channel_dim, layer_forward, layer_params, layer_vjp

__all__ = ["Branch", "LayerFormula", "evaluate", "reference", "spread", "use_fast_kernels", "fast_kernels_enabled"]

Pair = tuple[float, float]
_SUPPORTS = ("all", "pos", "neg")
_FAST: ContextVar[bool] = ContextVar("lime_attr_fast_kernels", default=True)


@contextmanager
def use_fast_kernels(enabled: bool = True) -> Iterator[None]:
    """Switch the layer rules' fast kernels on or off inside a ``with`` block.

    ``with use_fast_kernels(False):`` makes every layer rule evaluated in the block (gamma, z+, alpha-beta)
    take the reference evaluation: autograd through its modified forward passes. Meant for tests and for
    checking a custom formula; the relevance is the same either way, the fast kernels are faster and keep
    less memory. The setting is a context variable: it holds for the current thread or task only, and is
    restored when the block exits. It is read when the layer runs (in the forward pass).

    Parameters
    ----------
    enabled : bool
        ``True`` (the default outside any block): fast kernels where they apply.
    """
    token = _FAST.set(bool(enabled))
    try:
        yield
    finally:
        _FAST.reset(token)


def fast_kernels_enabled() -> bool:
    """Whether layer rules use their fast kernels here (see :func:`use_fast_kernels`)."""
    return _FAST.get()


def _combo(c: Pair, w: Tensor, wp: Tensor, wn: Tensor) -> Optional[Tensor]:
    """``c[0] W^+ + c[1] W^-`` (``None`` for zero), written as ``W + g W^+`` or ``W + g W^-`` where it is."""
    a, b = c
    if a == 0 and b == 0:
        return None
    if b == 0:
        return wp if a == 1 else wp * a
    if a == 0:
        return wn if b == 1 else wn * b
    if a >= b:  # b W + (a - b) W^+
        base = w if b == 1 else w * b
        return base if a == b else base + (a - b) * wp
    return (w if a == 1 else w * a) + (b - a) * wn


@dataclass(frozen=True)
class Branch:
    """One modified forward pass ``z = x^+ A + x^- B + c`` of a :class:`LayerFormula`.

    Parameters
    ----------
    x_plus : tuple of float
        ``A = x_plus[0] W^+ + x_plus[1] W^-``, the weight that ``x^+`` meets (``(1, 1)`` is ``W``).
    x_minus : tuple of float
        ``B``, the weight that ``x^-`` meets, likewise.
    bias : tuple of float
        ``c = bias[0] b^+ + bias[1] b^-``.
    where : {"all", "pos", "neg"}
        The outputs whose relevance the branch spreads: all, those with ``y > 0``, those with ``y < 0``.
    scale : float
        The branch's share ``s`` (``alpha`` and ``-beta`` in LRP-alpha-beta).
    """

    x_plus: Pair = (1.0, 1.0)
    x_minus: Pair = (1.0, 1.0)
    bias: Pair = (1.0, 1.0)
    where: str = "all"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.where not in _SUPPORTS:
            raise ValueError(f"Branch.where must be one of {_SUPPORTS}, got {self.where!r}")
        if any(len(p) != 2 for p in (self.x_plus, self.x_minus, self.bias)):
            raise ValueError("Branch: x_plus, x_minus and bias are pairs (coefficient of W^+, of W^-)")

    def weights(self, w: Tensor, wp: Tensor, wn: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """``(A, B)`` for the layer weight ``w`` and its parts ``wp = W^+``, ``wn = W^-`` (``None``: zero)."""
        return _combo(self.x_plus, w, wp, wn), _combo(self.x_minus, w, wp, wn)

    def bias_of(self, b: Optional[Tensor]) -> Optional[Tensor]:
        """``c`` for the layer bias ``b`` (``None`` for no bias or a zero combination)."""
        return None if b is None else _combo(self.bias, b, b.clamp(min=0), b.clamp(max=0))

    def coefficients(self) -> tuple[float, ...]:
        return (*self.x_plus, *self.x_minus, *self.bias)

    def shifted(self, base: float) -> "Branch":
        """The branch less ``base`` times the plain layer (``z - base * y``)."""
        sub = lambda p: (p[0] - base, p[1] - base)  # noqa: E731
        return Branch(sub(self.x_plus), sub(self.x_minus), sub(self.bias), self.where, self.scale)

    def adds_only(self, sign: int) -> bool:
        """Whether every product in ``z`` is ``>= 0`` (``sign=1``) or ``<= 0`` (``sign=-1``) for any input."""
        same = (self.x_plus[0], self.x_minus[1], self.bias[0])  # x^+ W^+, x^- W^-, b^+: non-negative
        cross = (self.x_plus[1], self.x_minus[0], self.bias[1])  # x^+ W^-, x^- W^+, b^-: non-positive
        keep, drop = (same, cross) if sign > 0 else (cross, same)
        return all(c >= 0 for c in keep) and all(c == 0 for c in drop)


@dataclass(frozen=True)
class LayerFormula:
    """A layer rule as a formula: its branches and the stabiliser ``eps`` of the denominators.

    Parameters
    ----------
    branches : tuple of Branch
        The modified forward passes; the input relevance is the sum of theirs.
    stabilizer : float
        Added to each denominator with its sign (``sign(0) = +1``).
    """

    branches: tuple[Branch, ...]
    stabilizer: float = 1e-6


# ------------------------------------------------------------------------------------ the dispatcher


def evaluate(formula: LayerFormula, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``y`` in the forward pass; in the backward pass the gradient of ``formula`` (see the module docstring).

    Picks a fast kernel where one applies (the layer's transpose is known, the fast kernels are on) and the
    :func:`reference` evaluation otherwise.

    Parameters
    ----------
    formula : LayerFormula
        The rule's formula.
    module : nn.Module
        The layer (``nn.Linear``, ``nn.Conv1d/2d/3d`` or transformers' ``Conv1D``).
    x, y : Tensor
        The layer's input and output.
    """
    if _FAST.get():
        vjp = layer_vjp(module, x)
        if vjp is not None:
            out = _fast(formula, module, x, y, vjp)
            if out is not None:
                return out
    return reference(formula, module, x, y)


def _sign_split(formula: LayerFormula) -> Optional[tuple[float, Branch, Branch]]:
    """``(base, pos - base, neg - base)`` for a sign-split formula (see the module docstring), else None."""
    if len(formula.branches) != 2:
        return None
    pos, neg = formula.branches
    if (pos.where, neg.where) != ("pos", "neg") or pos.scale != 1 or neg.scale != 1:
        return None
    base = min(*pos.coefficients(), *neg.coefficients())
    dp, dn = pos.shifted(base), neg.shifted(base)
    if base < 0 or not (dp.adds_only(1) and dn.adds_only(-1)):
        return None
    return base, dp, dn


def _fast(formula: LayerFormula, module: nn.Module, x: Tensor, y: Tensor, vjp: Callable) -> Optional[Tensor]:
    split = _sign_split(formula)
    if nonnegative(x):
        if split is not None:
            out = _signed_nonneg(formula, split, module, x, y, vjp)
            if out is not None:
                return out
        return _stacked_nonneg(formula, module, x, y, vjp)
    stacked_input = _split_input(module, x)
    if stacked_input is None:
        return None
    if split is not None:
        return _signed_mixed(formula, split, module, x, y, stacked_input)
    return _stacked_mixed(formula, module, x, y, stacked_input)


# ------------------------------------------------------------------------------ the reference evaluation


def reference(formula: LayerFormula, module: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The obvious evaluation: autograd through each branch's modified forward pass.

    ``z^k = f(x^+; A^k, c^k) + f(x^-; B^k)`` re-evaluated with autograd, and the surrogate
    ``sum_k z^k * (s^k [support] y / stab(z^k))`` (the ratio a constant) carries the gradient. For every
    layer with a functional forward (``rules._layer.layer_forward``).
    """
    w, b = layer_params(module)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    surrogate = None
    for br in formula.branches:
        a, bb = br.weights(w, wp, wn)
        z = layer_forward(module, xp, torch.zeros_like(w) if a is None else a, br.bias_of(b))
        if bb is not None:
            z = z + layer_forward(module, xn, bb, None)
        m = y / stabilize(z, formula.stabilizer)
        if br.where != "all":
            m = m * (y > 0 if br.where == "pos" else y < 0)
        if br.scale != 1:
            m = m * br.scale
        term = z * m.detach()
        surrogate = term if surrogate is None else surrogate + term
    return replace_grad(y, surrogate)


def spread(y: Tensor, z: Tensor, stabilizer: float) -> Tensor:
    """``y`` with the gradient of ``R_i = z_ij / stab(z_j) R_j``: autograd through one modified forward ``z``.

    For the first-layer rules, whose ``z`` is built from auxiliary inputs (ones, box bounds).
    """
    m = (y / stabilize(z.detach(), stabilizer)).detach()
    return replace_grad(y, z * m)


# ----------------------------------------------------------------------------------- stacking helpers


def _stackable(module: nn.Module) -> bool:
    """Whether weight variants stack on the layer's output axis (not grouped convolutions, not HF Conv1D)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups == 1 and not module.transposed


def _pair_axis(module: nn.Module) -> int:
    """Where :func:`_blocks` puts the axis that separates stacked output blocks."""
    return 1 if channel_dim(module) == 1 else -2


def _blocks(t: Tensor, k: int, n: int) -> Tensor:
    """View a layer output with ``n`` stacked output-channel blocks as ``[..., n, C, ...]`` (axis ``k``)."""
    if k >= 0:
        return t.view(*t.shape[:k], n, t.shape[k] // n, *t.shape[k + 1:])
    return t.view(*t.shape[:-1], n, t.shape[-1] // n)


def _unblock(t: Tensor, k: int) -> Tensor:
    return t.flatten(k, k + 1) if k >= 0 else t.flatten(-2, -1)


def _split_input(module: nn.Module, x: Tensor) -> Optional[tuple]:
    """For a mixed-sign input: ``(xs, vjp, combine)`` with ``xs = [x^+, x^-]`` stacked on the input-channel
    axis (so that ``x^+ A + x^- B`` is one layer evaluation with the weights ``[A, B]`` stacked on the
    weights' input axis), the transpose of that stacked layer, and ``combine`` mapping its input gradient
    back to ``x`` (``x^+``'s part where ``x >= 0``, ``x^-``'s part where ``x <= 0``, as ``clamp``'s
    gradient). ``None`` for layers where this stacking does not apply (grouped convolutions, HF Conv1D).
    """
    if not _stackable(module):
        return None
    dim = -1 if isinstance(module, nn.Linear) else 1
    xd = x.detach()
    xs = torch.cat([xd.clamp(min=0), xd.clamp(max=0)], dim)
    vjp = layer_vjp(module, xs)
    if vjp is None:
        return None
    pos, neg = xd >= 0, xd <= 0

    def combine(gs: Tensor) -> Tensor:
        g_pos, g_neg = gs.chunk(2, dim)
        return g_pos * pos + g_neg * neg

    return xs, vjp, combine


def _or_zeros(t: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if t is None else t


def _row(br: Branch, w: Tensor, wp: Tensor, wn: Tensor) -> Tensor:
    """``[A, B]`` on the weights' input axis: the branch as one layer on ``[x^+, x^-]``."""
    a, b = br.weights(w, wp, wn)
    return torch.cat([_or_zeros(a, w), _or_zeros(b, w)], 1)


def _stack(ws: list[Tensor], bs: list[Optional[Tensor]]) -> tuple[Tensor, Optional[Tensor]]:
    """Weights and biases of several branches stacked on the output axis (one layer evaluation)."""
    if len(ws) == 1:
        return ws[0], bs[0]
    bias = None
    if any(b is not None for b in bs):
        bias = torch.cat([w.new_zeros(w.shape[0]) if b is None else b for w, b in zip(ws, bs)])
    return torch.cat(ws), bias


def _block_coef(values: list[float], yd: Tensor, k: int) -> Tensor:
    """``values`` shaped to scale the blocks of a ``[..., n, C, ...]`` tensor (block axis ``k``)."""
    trailing = yd.dim() - (k % (yd.dim() + 1))
    return yd.new_tensor(values).view(len(values), *([1] * trailing))


def _ratios(formula: LayerFormula, y: Tensor, z: Tensor, k: int) -> Tensor:
    """``s^k [support] y / z^k`` in place on the stabilised ``z`` (one block per branch, axis ``k``)."""
    brs = formula.branches
    yd = y.detach()
    if len(brs) == 1:
        s = torch.div(yd, z, out=z)
        zs = s.unsqueeze(k)
    else:
        zs = _blocks(z, k, len(brs))
        torch.div(yd.unsqueeze(k), zs, out=zs)
    if any(br.scale != 1 for br in brs):
        zs.mul_(_block_coef([br.scale for br in brs], yd, k))
    for i, br in enumerate(brs):
        if br.where != "all":
            zs.select(k, i).mul_(yd > 0 if br.where == "pos" else yd < 0)
    return z if len(brs) == 1 else zs


# ------------------------------------------------------------------------------------- stacked kernels


def _stacked_nonneg(formula: LayerFormula, module: nn.Module, x: Tensor, y: Tensor, vjp: Callable) -> Optional[Tensor]:
    """``x >= 0``: ``z^k = x A^k + c^k`` for all branches in one layer evaluation, the backward in one
    transposed evaluation of the same stacked layer."""
    brs = formula.branches
    if len(brs) > 1 and not _stackable(module):
        return None
    w, b = layer_params(module)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    w_st, b_st = _stack([_or_zeros(br.weights(w, wp, wn)[0], w) for br in brs], [br.bias_of(b) for br in brs])
    z = layer_forward(module, x.detach(), w_st, b_st)
    if all(br.adds_only(1) for br in brs):  # z >= 0 (a -0.0 sum too): a plain + eps is stabilize_, bit for bit
        z.add_(formula.stabilizer)
    else:
        stabilize_(z, formula.stabilizer)
    k = _pair_axis(module)
    s = _ratios(formula, y, z, k)
    if len(brs) == 1:
        return modified_grad(x, y, lambda grad: vjp(grad * s, w_st))
    return modified_grad(x, y, lambda grad: vjp(_unblock(grad.unsqueeze(k) * s, k), w_st))


def _stacked_mixed(formula: LayerFormula, module: nn.Module, x: Tensor, y: Tensor, split: tuple) -> Tensor:
    """Mixed-sign ``x``: ``z^k = [x^+, x^-] [A^k, B^k] + c^k``, all branches in one evaluation each way."""
    xs, vjp2, combine = split
    brs = formula.branches
    w, b = layer_params(module)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    w_st, b_st = _stack([_row(br, w, wp, wn) for br in brs], [br.bias_of(b) for br in brs])
    z = stabilize_(layer_forward(module, xs, w_st, b_st), formula.stabilizer)
    k = _pair_axis(module)
    s = _ratios(formula, y, z, k)
    if len(brs) == 1:
        return modified_grad(x, y, lambda grad: combine(vjp2(grad * s, w_st)))
    return modified_grad(x, y, lambda grad: combine(vjp2(_unblock(grad.unsqueeze(k) * s, k), w_st)))


# -------------------------------------------------------------------------------- sign-split kernels


def _signed_nonneg(formula: LayerFormula, split: tuple, module: nn.Module, x: Tensor, y: Tensor,
                   vjp: Callable) -> Optional[Tensor]:
    """``x >= 0``, sign-split: one probe ``Q = x W^+ + b^+`` gives both denominators.

    With ``x^- = 0`` and ``x W^- + b^- = y - Q``: ``z^> = a_> y + e Q`` (``y > 0``) and ``z^< = a_< y - e Q``
    (``y < 0``), so ``|z| = max(a_> y, -a_< y) + e Q`` on both supports and ``t = y / (|z| + eps)`` needs no
    selection by sign. The gradient is ``A_>^T (t^+ g) - A_<^T (t^- g)``; the second transposed layer is
    skipped when its input is all zero (a ReLU after the layer zeroes the gradient wherever ``y <= 0``).
    ``None`` where the branches do not have this form.
    """
    base, dp, dn = split
    (u1, v1), (_, v2) = dp.x_plus, dn.x_plus
    if dp.x_plus != dp.bias or dn.x_plus != dn.bias or u1 != v2:
        return None
    a_pos, a_neg, e = base + v1, base + v2, u1
    w, b = layer_params(module)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    yd = y.detach()
    den = torch.mul(yd, -a_neg)
    torch.maximum(yd if a_pos == 1 else yd * a_pos, den, out=den)
    if e != 0:
        den.add_(layer_forward(module, x.detach(), wp, None if b is None else b.clamp(min=0)), alpha=e)
    t = torch.div(yd, den.add_(formula.stabilizer), out=den)
    pos, neg = formula.branches
    w_up, w_dn = _or_zeros(pos.weights(w, wp, wn)[0], w), _or_zeros(neg.weights(w, wp, wn)[0], w)

    def signed_vjp(grad: Tensor) -> Tensor:
        g_neg = t.clamp(max=0).mul_(grad)  # -t g where y < 0 (in place on fresh tensors: fewer allocations)
        if bool(g_neg.any()):  # one reduction; NaN counts as nonzero
            return vjp(t.clamp(min=0).mul_(grad), w_up) - vjp(g_neg, w_dn)
        if grad.requires_grad:  # create_graph: no out= into a tensor of the graph
            return vjp(t.clamp(min=0).mul_(grad), w_up)
        # the usual case (a ReLU after the layer): the zero buffer is reused, one allocation fewer
        return vjp(torch.clamp(t, min=0, out=g_neg).mul_(grad), w_up)

    return modified_grad(x, y, signed_vjp)


def _signed_mixed(formula: LayerFormula, split: tuple, module: nn.Module, x: Tensor, y: Tensor,
                  stacked_input: tuple) -> Tensor:
    """Mixed-sign ``x``, sign-split: the added products ``P >= 0`` (``y > 0``) and ``N <= 0`` (``y < 0``)
    in one evaluation of the stacked layer on ``[x^+, x^-]``; ``z^> = base y + P``, ``z^< = base y + N``, so
    ``s^> = y^+ / (base |y| + P + eps)`` and ``s^< = -y^- / (base |y| - N + eps)`` need no selection by sign.
    The backward is one transposed evaluation (only the ``y > 0`` block row where the other gets no gradient).
    """
    base, dp, dn = split
    xs, vjp2, combine = stacked_input
    w, b = layer_params(module)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    k = _pair_axis(module)
    d_st, d_bias = _stack([_row(dp, w, wp, wn), _row(dn, w, wp, wn)], [dp.bias_of(b), dn.bias_of(b)])
    zz = _blocks(layer_forward(module, xs, d_st, d_bias), k, 2)
    zz.select(k, 1).neg_()
    yd = y.detach()
    y_abs = yd.abs() if base == 1 else yd.abs().mul_(base)
    den = zz.add_(y_abs.unsqueeze(k)).add_(formula.stabilizer)
    c = torch.stack([yd.clamp(min=0), yd.clamp(max=0).neg_()], k).div_(den)  # [s^>, s^<] >= 0
    del zz, den, d_st, d_bias
    pos, neg = formula.branches
    w_half = _row(pos, w, wp, wn)
    w_full = torch.cat([w_half, _row(neg, w, wp, wn)])

    def signed_mixed_vjp(grad: Tensor) -> Tensor:
        h = grad.unsqueeze(k) * c
        if bool(h.select(k, 1).any()):
            return combine(vjp2(_unblock(h, k), w_full))
        return combine(vjp2(h.select(k, 0), w_half))

    return modified_grad(x, y, signed_mixed_vjp)
