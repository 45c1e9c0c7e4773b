"""The built-in rules.

Module rules follow Montavon et al., "Layer-wise relevance propagation: an overview" (2019) and zennit's
conventions (Anders et al., 2021); transformer rules follow AttnLRP (Achtibat et al., ICML 2024,
arXiv:2402.05602) and CP-LRP (Ali et al., ICML 2022). Everything is in *gradient form*: relevance of a
tensor ``x`` is ``x * g`` with ``g`` the rule-modified gradient of one backward pass seeded with 1 at the
explained output, so relevance at the output equals the explained logit.

For a layer ``y = f(x; W, b)`` with incoming gradient ``g`` (so ``R_out = y * g``), the layer rules
compute ``g_in = sum_k J_k^T (y * g / z_k)`` with the rule's modified forward passes ``z_k``; each
modified forward is evaluated once, in the forward pass. Where the layer's transpose is known (Linear,
Conv1d/2d/3d, HF Conv1D) the backward is exactly the transposed layers the formula needs, with the ratios
``y / z_k`` kept from the forward pass (:func:`~lime_attr.rules._grad.modified_grad`), so the layer's own
backward never runs; other layers go through autograd on the re-evaluated layers. Both give the same
relevance and the same second derivatives (``tests/test_rules.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..context import add_carrier
from ..errors import RuleParameterError
from ..specs import NormSpec
from . import _tangent
from ._grad import Frozen, GradScale, epsilon_factor, epsilon_grad_hook, is_kept, modified_grad, mul_grad_hook, nonnegative, replace_grad, scale_grad, stabilize, stabilize_
from ._layer import channel_dim, layer_forward, layer_forward_multi, layer_params, layer_vjp
from .registry import Rule, register_rule

__all__ = [
    "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox", "Identity", "Pass",
    "Uniform", "Softmax", "Bilinear", "Norm", "CPAttention", "Gradient", "NormSpec", "FirstLayerRule",
]


def _check_nonneg(name: str, value: float, rule: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise RuleParameterError(f"{rule}: {name} must be a finite number >= 0, got {value!r}")


def _plus(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(min=0)


def _minus(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.clamp(max=0)


def _is_hf_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _pair_axis(module: Any) -> int:
    """Where ``_pairs`` puts the axis of length 2 that separates two stacked output blocks."""
    return 1 if channel_dim(module) == 1 else -2


def _pairs(t: Tensor, k: int) -> Tensor:
    """View a layer output with two stacked output-channel blocks as ``[..., 2, C, ...]`` (axis ``k``)."""
    if k >= 0:
        return t.view(*t.shape[:k], 2, t.shape[k] // 2, *t.shape[k + 1:])
    return t.view(*t.shape[:-1], 2, t.shape[-1] // 2)


def _unpair(t: Tensor, k: int) -> Tensor:
    return t.flatten(k, k + 1) if k >= 0 else t.flatten(-2, -1)


def _split_input(module: Any, x: Tensor) -> Optional[tuple]:
    """For a mixed-sign input: ``(xs, vjp, combine)`` with ``xs = [x^+, x^-]`` stacked on the input-channel
    axis (so that ``x^+ A + x^- B`` is one layer evaluation with the weights ``[A, B]`` stacked on the
    weights' input axis), the transpose of that stacked layer, and ``combine`` mapping its input gradient
    back to ``x`` (``x^+``'s part where ``x >= 0``, ``x^-``'s part where ``x <= 0``, as ``clamp``'s
    gradient). ``None`` for layers where this stacking does not apply (grouped convolutions, HF Conv1D).
    """
    if isinstance(module, torch.nn.Linear):
        dim = -1
    elif isinstance(module, torch.nn.modules.conv._ConvNd) and module.groups == 1:
        dim = 1
    else:
        return None
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


def _cross(a: Tensor, b: Tensor) -> Tensor:
    """The block weight ``[[a, b], [b, a]]`` (output blocks on dim 0, input blocks on dim 1)."""
    return torch.cat([torch.cat([a, b], 1), torch.cat([b, a], 1)], 0)


def _cat_bias(b: Optional[Tensor], first, second) -> Optional[Tensor]:
    return None if b is None else torch.cat([first(b), second(b)])


# --------------------------------------------------------------------------------------------- layers


@register_rule("epsilon")
@dataclass(frozen=True)
class Epsilon(Rule):
    """LRP-epsilon (Bach et al., 2015).

    ``R_i = sum_j x_i W_ji / (z_j + eps * sign(z_j)) * R_j`` with ``z_j = sum_i x_i W_ji + b_j`` and
    ``sign(0) = +1``. ``eps = 0`` is LRP-0, which in gradient form is the plain gradient: the rule then
    adds no work at all. Also applies to elementwise affine modules (BatchNorm in eval mode).

    Parameters
    ----------
    epsilon : float
        Stabiliser, >= 0 (default 1e-6, as zennit). The bias and the stabiliser absorb relevance.
    """

    epsilon: float = 1e-6

    def __post_init__(self) -> None:
        _check_nonneg("epsilon", self.epsilon, "epsilon")

    def is_plain_jacobian(self, kind: str) -> bool:
        return self.epsilon == 0 and kind in ("layer", "affine")

    def fusable_epsilon(self) -> Optional[float]:
        # exact type only: a subclass may change what the layer does
        return self.epsilon if type(self) is Epsilon and self.epsilon != 0 else None

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        # z / (z + eps sign(z)) = |z| / (|z| + eps) (sign(0) = +1 gives 0 either way), applied by a hook on
        # y's gradient and computed from y in the backward pass (no copy of y; a later in-place write into
        # y is caught there)
        return epsilon_grad_hook(y, self.epsilon)

    def apply_affine(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        if self.epsilon == 0:
            return y
        # elementwise affine modules (BatchNorm) are often followed by an in-place residual addition
        # (``out += identity`` in ResNets): the factor is computed now, from the value the rule saw
        return mul_grad_hook(y, epsilon_factor(y, self.epsilon))


@register_rule("gradient")
@dataclass(frozen=True)
class Gradient(Rule):
    """The op's own Jacobian (LRP-0 for linear maps): ``g_in = J^T g``. Marks a place as covered."""

    def is_plain_jacobian(self, kind: str) -> bool:
        return True

    def is_relu_jacobian(self) -> bool:
        return True

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        return y

    apply_affine = apply_layer

    def apply_activation(self, x: Tensor, y: Tensor) -> Tensor:
        return y


def _check_stabilizer(stabilizer: float, rule: str) -> None:
    _check_nonneg("stabilizer", stabilizer, rule)


@register_rule("gamma")
@dataclass(frozen=True)
class Gamma(Rule):
    """Generalised LRP-gamma (Montavon et al., 2019; Andéol et al., 2021), valid for negative inputs.

    For ``z_j > 0``: ``R_i = [x_i^+ (W + g W^+)_ji + x_i^- (W + g W^-)_ji] / z^>_j * R_j`` with
    ``z^>_j = sum_i x_i^+ (W + g W^+)_ji + x_i^- (W + g W^-)_ji + (b + g b^+)_j``;
    for ``z_j < 0`` the pairings swap (``x^+`` with ``W + g W^-``, ``x^-`` with ``W + g W^+``, bias
    ``b + g b^-``). Identical to zennit's ``Gamma``; where the input is non-negative (after a ReLU) the
    ``x^-`` passes are skipped, and the ``z < 0`` transpose is skipped when its incoming gradient is
    zero (a ReLU after the layer).

    Parameters
    ----------
    gamma : float
        >= 0 (default 0.25). ``gamma = 0`` is LRP-0.
    stabilizer : float
        Added with the denominator's sign (default 1e-6).
    """

    gamma: float = 0.25
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_nonneg("gamma", self.gamma, "gamma")
        _check_stabilizer(self.stabilizer, "gamma")

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, b = layer_params(module)
        g = self.gamma
        vjp = layer_vjp(module, x)
        if vjp is not None and nonnegative(x):
            # x >= 0 (e.g. after a ReLU). One extra layer evaluation Q = x W^+ + b^+ gives both denominators:
            # z^> = y + g Q (used where y > 0) and z^< = (1 + g) y - g Q (where y < 0); sign(z) = sign(y) and
            # |z| = max(y, -(1 + g) y) + g Q in both cases. With t = y / (|z| + eps) (= y / stabilize(z), no
            # selection by sign needed) the modified gradient is (W + g W^+)^T (t^+ g) - (W + g W^-)^T (t^- g);
            # the second transposed layer is skipped when its input is all zero (a ReLU after the layer zeroes
            # the gradient wherever y <= 0).
            yd = y.detach()
            den = torch.mul(yd, -(1.0 + g))
            torch.maximum(yd, den, out=den)
            den.add_(layer_forward(module, x.detach(), w.clamp(min=0), _plus(b)), alpha=g).add_(self.stabilizer)
            t = torch.div(yd, den, out=den)
            w_up, w_dn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)

            def gamma_vjp(grad: Tensor) -> Tensor:
                neg = t.clamp(max=0).mul_(grad)  # -t g where y < 0 (in place on fresh tensors: fewer allocations)
                if bool(neg.any()):  # one reduction; NaN counts as nonzero
                    return vjp(t.clamp(min=0).mul_(grad), w_up) - vjp(neg, w_dn)
                if grad.requires_grad:  # create_graph: no out= into a tensor of the graph
                    return vjp(t.clamp(min=0).mul_(grad), w_up)
                # the usual case (a ReLU after the layer): the zero buffer is reused, one allocation fewer
                return vjp(torch.clamp(t, min=0, out=neg).mul_(grad), w_up)

            return modified_grad(x, y, gamma_vjp)
        split = _split_input(module, x) if vjp is not None else None
        if split is not None:
            # mixed-sign x (e.g. the first layer): P = x^+ W^+ + x^- W^- + b^+ >= 0 and N = x^+ W^- + x^- W^+ + b^- <= 0
            # in one evaluation of the stacked layer; z^> = y + g P > 0 where y > 0, z^< = y + g N < 0 where y < 0,
            # so s^> = y^+ / (|y| + g P + eps) and s^< = y^- / (|y| - g N + eps) need no selection by sign.
            # Gradient: x^+ gets W_up^T (s^> g) + W_dn^T (s^< g), x^- gets W_dn^T (s^> g) + W_up^T (s^< g).
            xs, vjp2, combine = split
            k = _pair_axis(module)
            zz = _pairs(layer_forward(module, xs, _cross(w.clamp(min=0), w.clamp(max=0)),
                                      _cat_bias(b, _plus, _minus)), k)
            zz.select(k, 1).neg_()
            yd = y.detach()
            den = zz.mul_(g).add_(yd.abs().unsqueeze(k)).add_(self.stabilizer)
            c = torch.stack([yd.clamp(min=0), yd.clamp(max=0).neg_()], k).div_(den)  # [s^>, s^<] >= 0
            del zz, den
            w_up, w_dn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
            w_half, w_full = torch.cat([w_up, w_dn], 1), _cross(w_up, w_dn)

            def gamma_mixed_vjp(grad: Tensor) -> Tensor:
                h = grad.unsqueeze(k) * c
                h_neg = h.select(k, 1)
                if bool(h_neg.any()):
                    return combine(vjp2(_unpair(h, k), w_full))
                return combine(vjp2(h.select(k, 0), w_half))

            return modified_grad(x, y, gamma_mixed_vjp)
        if nonnegative(x):
            # the same for layers without a known transpose: autograd through the layer and through Q
            q = layer_forward(module, x, w.clamp(min=0), _plus(b))
            pos = y > 0
            s = (y / stabilize(y + g * torch.where(pos, q, y - q), self.stabilizer)).detach()
            c_q = s * torch.where(pos, s.new_tensor(g), s.new_tensor(-g))
            qc = q * c_q
            return mul_grad_hook(y, s * torch.where(pos, s.new_tensor(1.0), s.new_tensor(1.0 + g))) + (qc - qc.detach())
        w_up, w_dn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_dn = None if b is None else b + g * b.clamp(max=0)
        z_pos, z_neg = layer_forward_multi(module, x.clamp(min=0), [w_up, w_dn], [b_up, b_dn])
        zn_pos, zn_neg = layer_forward_multi(module, x.clamp(max=0), [w_dn, w_up], [None, None])
        z_pos, z_neg = z_pos + zn_pos, z_neg + zn_neg
        m_pos = ((y > 0) * y / stabilize(z_pos, self.stabilizer)).detach()
        m_neg = ((y < 0) * y / stabilize(z_neg, self.stabilizer)).detach()
        return replace_grad(y, z_pos * m_pos + z_neg * m_neg)


@register_rule("zplus")
@dataclass(frozen=True)
class ZPlus(Rule):
    """LRP-z+ (Bach et al., 2015; Montavon et al., 2017), as zennit's ``ZPlus``.

    ``z^+_j = sum_i x_i^+ W_ji^+ + x_i^- W_ji^- + b_j^+``;
    ``R_i = (x_i^+ W_ji^+ + x_i^- W_ji^-) / z^+_j * R_j``.

    Parameters
    ----------
    stabilizer : float
        Added with the denominator's sign (default 1e-6).
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_stabilizer(self.stabilizer, "zplus")

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, b = layer_params(module)
        vjp = layer_vjp(module, x)
        nonneg = nonnegative(x)
        if vjp is not None and nonneg:
            # x >= 0 (e.g. after a ReLU): z^+ = x W^+ + b^+ (one extra layer evaluation), and the modified
            # gradient is one transposed layer, W^+^T (s g) with s = y / z^+ (the layer's own backward never runs)
            wp = w.clamp(min=0)
            # z^+ >= 0 here (x >= 0, W^+ >= 0, b^+ >= 0; a -0.0 sum gives eps as well), so the stabiliser is
            # a plain + eps: one pass instead of stabilize_'s copysign, bit for bit the same
            z = layer_forward(module, x.detach(), wp, _plus(b)).add_(self.stabilizer)
            s = torch.div(y.detach(), z, out=z)  # in place: one output-sized tensor
            return modified_grad(x, y, lambda grad: vjp(grad * s, wp))
        split = _split_input(module, x) if vjp is not None and not nonneg else None
        if split is not None:  # mixed-sign x: z^+ = [x^+, x^-] [W^+, W^-] + b^+, one stacked evaluation each way
            xs, vjp2, combine = split
            ws = torch.cat([w.clamp(min=0), w.clamp(max=0)], 1)
            z = stabilize_(layer_forward(module, xs, ws, _plus(b)), self.stabilizer)
            s = torch.div(y.detach(), z, out=z)
            return modified_grad(x, y, lambda grad: combine(vjp2(grad * s, ws)))
        if nonneg:  # no known transpose: autograd through z^+
            z = layer_forward(module, x, w.clamp(min=0), _plus(b))
        else:
            z = layer_forward(module, x.clamp(min=0), w.clamp(min=0), _plus(b))
            z = z + layer_forward(module, x.clamp(max=0), w.clamp(max=0), None)
        m = (y / stabilize(z, self.stabilizer)).detach()
        return replace_grad(y, z * m)


@register_rule("alpha_beta")
@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al., 2015), as zennit's ``AlphaBeta``.

    ``R_i = alpha * (x_i^+ W^+ + x_i^- W^-)_ij / z^+_j R_j - beta * (x_i^+ W^- + x_i^- W^+)_ij / z^-_j R_j``
    with ``z^+ = x^+ W^+ + x^- W^- + b^+`` and ``z^- = x^+ W^- + x^- W^+ + b^-``.

    Parameters
    ----------
    alpha, beta : float
        Both >= 0 with ``alpha - beta = 1`` (conservation); anything else is rejected.
    stabilizer : float
        Added with the denominator's sign (default 1e-6).
    """

    alpha: float = 2.0
    beta: float = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_nonneg("alpha", self.alpha, "alpha_beta")
        _check_nonneg("beta", self.beta, "alpha_beta")
        _check_stabilizer(self.stabilizer, "alpha_beta")
        if abs(self.alpha - self.beta - 1.0) > 1e-12:
            raise RuleParameterError(
                f"alpha_beta: alpha - beta must equal 1 (got alpha={self.alpha}, beta={self.beta}); "
                "common choices are (1, 0) and (2, 1)"
            )

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, b = layer_params(module)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        # (z^- is evaluated directly, not as y - z^+: where z^- is exactly 0 the stabilised 1 / z^- is huge,
        # and the difference form would cancel it against the other path in floating point)
        vjp = layer_vjp(module, x)
        nonneg = nonnegative(x)
        split = None
        if vjp is not None and not nonneg:
            split = _split_input(module, x)
        if vjp is not None and not _is_hf_conv1d(module) and (nonneg or split is not None):
            # z^+ and z^- in one evaluation of a stacked layer: x >= 0: weights [W^+; W^-] (output blocks);
            # mixed-sign x: inputs [x^+, x^-] and weights [[W^+, W^-], [W^-, W^+]]. The modified gradient
            # W'^T [alpha s^+ g, -beta s^- g] is one transposed evaluation of the same stacked layer.
            k = _pair_axis(module)
            if nonneg:
                xs, vjp2, combine, w_st = x.detach(), vjp, None, torch.cat([wp, wn])
            else:
                (xs, vjp2, combine), w_st = split, _cross(wp, wn)
            z = stabilize_(layer_forward(module, xs, w_st, _cat_bias(b, _plus, _minus)), self.stabilizer)
            yd = y.detach()
            coef = yd.new_tensor([self.alpha, -self.beta]).view(2, *([1] * (yd.dim() - (k % (yd.dim() + 1)))))
            zp = _pairs(z, k)
            s = torch.div(yd.unsqueeze(k), zp, out=zp).mul_(coef)  # [alpha s^+, -beta s^-], in place
            del z, zp

            def ab_vjp(grad: Tensor) -> Tensor:
                g_in = vjp2(_unpair(grad.unsqueeze(k) * s, k), w_st)
                return g_in if combine is None else combine(g_in)

            return modified_grad(x, y, ab_vjp)
        if nonneg:  # x >= 0 (e.g. after a ReLU): no clamped copies of x
            z_a, z_b = layer_forward_multi(module, x, [wp, wn], [_plus(b), _minus(b)])
        else:
            z_a, z_b = layer_forward_multi(module, x.clamp(min=0), [wp, wn], [_plus(b), _minus(b)])
            a2, b2 = layer_forward_multi(module, x.clamp(max=0), [wn, wp], [None, None])
            z_a, z_b = z_a + a2, z_b + b2
        m_a = (self.alpha * y / stabilize(z_a, self.stabilizer)).detach()
        m_b = (self.beta * y / stabilize(z_b, self.stabilizer)).detach()
        return replace_grad(y, z_a * m_a - z_b * m_b)


class FirstLayerRule(Rule):
    """Base of the first-layer rules (flat, w^2, z^B), whose input relevance does not carry a factor ``x``.

    Their relevance is carried by auxiliary tensors (ones, or the box bounds) registered with the active
    scope; the attribution adds ``carrier * d/d carrier`` to the relevance of the model input that the
    layer consumes. They therefore only apply to a layer whose input is a model input.
    """

    def _carrier(self, like: Tensor, value: Union[float, Tensor], x: Tensor) -> Tensor:
        c = torch.as_tensor(value, dtype=like.dtype, device=like.device).expand_as(like).clone()
        c.requires_grad_(True)
        add_carrier(x, c)
        return c


@register_rule("flat")
@dataclass(frozen=True)
class Flat(FirstLayerRule):
    """LRP-flat (Lapuschkin et al., 2019): all weights and inputs set to 1, bias dropped.

    ``R_i = sum_j 1 / (sum_i' 1) * R_j`` over the receptive field. First layer only.
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_stabilizer(self.stabilizer, "flat")

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, _ = layer_params(module)
        ones = self._carrier(x, 1.0, x)
        z = layer_forward(module, ones, torch.ones_like(w), None)
        m = (y / stabilize(z, self.stabilizer)).detach()
        return replace_grad(y, z * m)


@register_rule("wsquare")
@dataclass(frozen=True)
class WSquare(FirstLayerRule):
    """LRP-w^2 (Montavon et al., 2017): weights squared, inputs set to 1 (as zennit, the bias squared too).

    ``R_i = sum_j W_ji^2 / (sum_i' W_i'j^2 + b_j^2) * R_j``. First layer only.
    """

    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_stabilizer(self.stabilizer, "wsquare")

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, b = layer_params(module)
        ones = self._carrier(x, 1.0, x)
        z = layer_forward(module, ones, w * w, None if b is None else b * b)
        m = (y / stabilize(z, self.stabilizer)).detach()
        return replace_grad(y, z * m)


@register_rule("zbox")
@dataclass(frozen=True)
class ZBox(FirstLayerRule):
    """LRP-z^B (Montavon et al., 2017) for inputs bounded by a box ``[low, high]``, as zennit's ``ZBox``.

    ``z_j = sum_i x_i W_ji - l_i W_ji^+ - h_i W_ji^- (+ b_j - b_j^+ - b_j^-)``,
    ``R_i = (x_i W_ji - l_i W_ji^+ - h_i W_ji^-) / z_j * R_j``. First layer only.

    Parameters
    ----------
    low, high : float or Tensor
        Lowest / highest valid input value (broadcast against one example); ``low <= high``.
    """

    low: Union[float, Tensor] = 0.0
    high: Union[float, Tensor] = 1.0
    stabilizer: float = 1e-6

    def __post_init__(self) -> None:
        _check_stabilizer(self.stabilizer, "zbox")
        if bool(torch.as_tensor(self.low).gt(torch.as_tensor(self.high)).any()):
            raise RuleParameterError(f"zbox: low must be <= high (got low={self.low}, high={self.high})")

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        w, b = layer_params(module)
        lo = self._carrier(x, torch.as_tensor(self.low).to(x), x)
        hi = self._carrier(x, torch.as_tensor(self.high).to(x), x)
        # the module's own output y = x W + b (and its graph, for x's gradient W^T) is reused, not re-evaluated
        z = y - layer_forward(module, lo, w.clamp(min=0), _plus(b)) - layer_forward(module, hi, w.clamp(max=0), _minus(b))
        m = (y / stabilize(z.detach(), self.stabilizer)).detach()
        # carriers enter with a minus sign: their relevance is -l W^+ s and -h W^- s
        return replace_grad(y, z * m)


# ------------------------------------------------------------------------------ elementwise and products


# autograd nodes of activations whose own Jacobian equals f(x) / x everywhere (incl. 0 at x = 0)
_EXACT_IDENTITY_NODES = frozenset({"ReluBackward0", "ReluBackward1"})


@register_rule("identity")
@dataclass(frozen=True)
class Identity(Rule):
    """Identity rule (AttnLRP, Prop. 3.1): ``R_in = R_out`` through an elementwise nonlinearity.

    Gradient form: the local Jacobian ``f'(x)`` is replaced by ``f(x) / x`` (0 where ``x = 0``), a
    constant, so that ``x * g_in = f(x) * g_out``.
    """

    def is_relu_jacobian(self) -> bool:
        # f(x) / x = 1[x > 0] on a ReLU; exact types only (a subclass may change the activation rule)
        return type(self) in (Identity, Pass)

    def apply_activation(self, x: Tensor, y: Tensor) -> Tensor:
        if type(y.grad_fn).__name__ in _EXACT_IDENTITY_NODES:
            return y  # ReLU: f(x) / x = 1[x > 0] = f'(x), the rule *is* the plain gradient (no extra work)
        # y / x, then 0 where x == 0 (masked_fill_ on the fresh quotient: cheaper than two torch.where),
        # computed now: the model may write into y in place after the activation (legal for autograd, as
        # the activation saved x); the backward scales the gradient by it (no surrogate x * ratio)
        ratio = torch.div(y.detach(), x.detach()).masked_fill_(x.detach() == 0, 0.0)
        return modified_grad(x, y, GradScale(ratio))

    def apply_activation_module(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        """As :meth:`apply_activation`, with ``f(x) / x`` recomputed in the backward pass from ``x``.

        Done only where the layer before keeps ``x`` for the backward pass anyway (an epsilon rule reads
        it there): then the ratio costs no memory at all, for one more evaluation of ``f``. ``f`` is the
        module's own ``forward`` (called without hooks, under no_grad). Bit for bit the same ratio; the
        model may still write into ``y`` in place. Elsewhere, under autocast (where the backward pass would
        recompute ``f`` in another precision) and in the exact second-order mode the ratio is computed in
        the forward pass.
        """
        if (not is_kept(x) or type(y.grad_fn).__name__ in _EXACT_IDENTITY_NODES or _tangent.active()
                or torch.is_autocast_enabled(x.device.type) or not (x.requires_grad and torch.is_grad_enabled())):
            return self.apply_activation(x, y)
        return modified_grad(x, y, _RecomputedRatio(module, x))


class _RecomputedRatio:
    """``g * f(x) / x`` (0 where ``x == 0``) with ``f`` the activation module's forward, run in the backward."""

    __slots__ = ("module", "x")

    def __init__(self, module: Any, x: Tensor) -> None:
        self.module, self.x = module, Frozen(x)

    def __call__(self, g: Tensor) -> Tensor:
        x = self.x.get()
        with torch.no_grad():
            # (an in-place module -- made out-of-place only while the scope is open -- gets a copy)
            fx = type(self.module).forward(self.module, x.clone() if getattr(self.module, "inplace", False) else x)
        return g * torch.div(fx, x).masked_fill_(x == 0, 0.0)

    def apply_softmax(self, x: Tensor, y: Tensor) -> Tensor:  # used only if mapped explicitly
        return self.apply_activation(x, y)


@register_rule("pass")
@dataclass(frozen=True)
class Pass(Identity):
    """Pass rule (zennit's ``Pass``): ``R_in = R_out``; the same as ``identity`` in gradient form."""


@register_rule("uniform")
@dataclass(frozen=True)
class Uniform(Rule):
    """Uniform rule for a k-way elementwise product (AttnLRP, Prop. 3.3).

    Each of the k input-dependent factors receives ``R_out / k``: the gradient to each factor is divided
    by k. A factor that carries no gradient (a constant or detached tensor) is not counted, so the other
    receives everything.

    Parameters
    ----------
    weights : tuple of float, optional
        Explicit shares per factor instead of ``1/k`` (must sum to 1); ``(0, 1)`` detaches the first.
    """

    weights: Optional[tuple[float, ...]] = None

    def __post_init__(self) -> None:
        if self.weights is not None:
            if any((not math.isfinite(w)) or w < 0 for w in self.weights):
                raise RuleParameterError(f"uniform: weights must be finite and >= 0, got {self.weights}")
            if abs(sum(self.weights) - 1.0) > 1e-9:
                raise RuleParameterError(f"uniform: weights must sum to 1 (conservation), got {self.weights}")

    def product_weights(self, k: int) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0 / k] * k

    def apply_product(self, factors: Sequence[Tensor]) -> list[Tensor]:
        live = [i for i, f in enumerate(factors) if isinstance(f, Tensor) and f.requires_grad]
        if self.weights is not None:
            if len(self.weights) != len(factors):
                raise RuleParameterError(f"uniform: {len(self.weights)} weights for a {len(factors)}-way product")
            return [scale_grad(f, w, copy=False) if isinstance(f, Tensor) else f for f, w in zip(factors, self.weights)]
        k = max(len(live), 1)
        return [scale_grad(f, 1.0 / k, copy=False) if i in live else f for i, f in enumerate(factors)]


# ------------------------------------------------------------------------------------------ attention


@register_rule("softmax")
@dataclass(frozen=True)
class Softmax(Rule):
    """AttnLRP softmax rule (Achtibat et al., 2024, Prop. 3.2): Taylor decomposition at ``x`` with bias.

    ``R_in_i = x_i * (R_out_i - s_i * sum_j R_out_j)`` with ``s = softmax(x)``. In gradient form this is
    exactly ``x * (J_softmax^T g)``: the plain gradient, so the rule adds no work and keeps fused
    kernels usable. Not conservative by design; masked (-inf) logits get 0.
    """

    def apply_softmax(self, x: Tensor, y: Tensor) -> Tensor:
        return y

    def is_plain_jacobian(self, kind: str) -> bool:
        return kind == "softmax"


@register_rule("bilinear")
@dataclass(frozen=True)
class Bilinear(Rule):
    """AttnLRP bilinear rule for matrix products (Achtibat et al., 2024, Prop. 3.3 / 3.4).

    For ``O = A V``: ``R_A[j,i] = sum_p A_ji V_ip R_jp / (2 O_jp + eps)`` and
    ``R_V[i,p] = sum_j A_ji V_ip R_jp / (2 O_jp + eps)`` (the epsilon rule per factor, then a uniform half
    split); the same for ``q k^T``. In gradient form (eps -> 0): each factor's gradient is halved. At an
    attention kernel ``softmax(q k^T) V`` (with the softmax rule inside) this is: gradients of q and k
    divided by 4, of v by 2, at the kernel's inputs, so fused kernels (SDPA, flash) keep working.
    """

    def apply_matmul(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        a_live = isinstance(a, Tensor) and a.requires_grad
        b_live = isinstance(b, Tensor) and b.requires_grad
        if a_live and b_live:
            return scale_grad(a, 0.5, copy=False), scale_grad(b, 0.5, copy=False)
        return a, b

    def apply_attention(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return scale_grad(q, 0.25, copy=False), scale_grad(k, 0.25, copy=False), scale_grad(v, 0.5, copy=False)


@register_rule("cp_attention")
@dataclass(frozen=True)
class CPAttention(Rule):
    """CP-LRP (Ali et al., ICML 2022): attention weights treated as constants.

    Relevance flows only through the value path: at an attention kernel q and k are detached and v keeps
    its full gradient; at an explicit softmax its output is detached; in a gated MLP (as a product rule)
    the gate factor (the first) is detached and the other factor receives all relevance.
    """

    def apply_attention(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return q.detach(), k.detach(), v

    def product_weights(self, k: int) -> list[float]:
        return [0.0] + [1.0 / (k - 1)] * (k - 1)

    def apply_softmax(self, x: Tensor, y: Tensor) -> Tensor:
        return y.detach()

    def apply_matmul(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        return a, b  # the softmax output is already constant; products keep their true gradient

    def apply_product(self, factors: Sequence[Tensor]) -> list[Tensor]:
        return [factors[0].detach() if isinstance(factors[0], Tensor) else factors[0], *factors[1:]]


# ------------------------------------------------------------------------------------------------ norm


@register_rule("norm")
@dataclass(frozen=True)
class Norm(Rule):
    """AttnLRP norm rule (Achtibat et al., 2024, Prop. 3.4): ``1/sigma`` treated as a constant.

    LayerNorm ``y = (x - mean(x)) / sigma * w + b`` and RMSNorm ``y = x / rms(x) * w``: the normaliser is
    computed and detached (stop-gradient), the mean subtraction stays linear, and the gradient flows as
    through a linear map ``x -> (x - mean) * (w / sigma)``. The forward value is unchanged.
    """

    def holds_normalizer_constant(self) -> bool:
        return True

    def apply_norm(self, spec: NormSpec, x: Tensor, y: Tensor) -> Tensor:
        dims = tuple(range(-spec.dims, 0))
        h = x.to(torch.promote_types(x.dtype, torch.float32)) if spec.upcast else x
        if spec.kind == "layernorm":
            centred = h - h.mean(dim=dims, keepdim=True)
            sigma = torch.sqrt(centred.detach().pow(2).mean(dim=dims, keepdim=True) + spec.eps)
            lin = centred / sigma
        elif spec.kind == "rmsnorm":
            sigma = torch.sqrt(h.detach().pow(2).mean(dim=dims, keepdim=True) + spec.eps)
            lin = h / sigma
        else:
            raise ValueError(f"norm: unknown NormSpec.kind {spec.kind!r} (expected 'layernorm' or 'rmsnorm')")
        if spec.weight is not None:
            lin = lin * (spec.weight.to(h.dtype) + spec.weight_offset)
        lin = lin.to(y.dtype)
        return replace_grad(y, lin)
