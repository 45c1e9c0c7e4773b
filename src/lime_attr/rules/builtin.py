"""The built-in rules.

Module rules follow Montavon et al., "Layer-wise relevance propagation: an overview" (2019) and zennit's
conventions (Anders et al., 2021); transformer rules follow AttnLRP (Achtibat et al., ICML 2024,
arXiv:2402.05602) and CP-LRP (Ali et al., ICML 2022). Everything is in *gradient form*: relevance of a
tensor ``x`` is ``x * g`` with ``g`` the rule-modified gradient of one backward pass seeded with 1 at the
explained output, so relevance at the output equals the explained logit.

For a layer ``y = f(x; W, b)`` with incoming gradient ``g`` (so ``R_out = y * g``), the layer rules
compute ``g_in = sum_k J_k^T (y * g / z_k)`` with the rule's modified forward passes ``z_k``. Gamma, z+
and alpha-beta state only their formula (a :class:`~lime_attr.rules.kernels.LayerFormula`);
:func:`~lime_attr.rules.kernels.evaluate` computes it, with a fast kernel where the layer's transpose is
known (the backward is exactly the transposed layers the formula needs, the layer's own backward never
runs) and the reference evaluation (autograd on the re-evaluated layers) elsewhere or under
:func:`~lime_attr.rules.kernels.use_fast_kernels` ``(False)``. Both give the same relevance and the same
second derivatives (``tests/test_rules.py``, ``tests/test_rules_kernels.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from ..context import add_carrier
from ..errors import RuleParameterError
from ..specs import NormSpec
from . import _tangent
from ._grad import Frozen, GradScale, epsilon_factor, epsilon_grad_hook, is_kept, modified_grad, mul_grad_hook, replace_grad, scale_grad
from ._layer import layer_forward, layer_params
from .kernels import Branch, LayerFormula, evaluate, spread
from .registry import Rule, register_rule

__all__ = [
    "Epsilon", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox", "Identity", "Pass",
    "Uniform", "Softmax", "Bilinear", "Norm", "CPAttention", "Gradient", "NormSpec", "FirstLayerRule",
]


def _check_nonneg(name: str, value: float, rule: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise RuleParameterError(f"{rule}: {name} must be a finite number >= 0, got {value!r}")




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
    ``b + g b^-``). Identical to zennit's ``Gamma``. A sign-split formula
    (:mod:`~lime_attr.rules.kernels`): where the input is non-negative (after a ReLU) one extra layer
    evaluation gives both denominators, and the ``z < 0`` transpose is skipped when its incoming gradient
    is zero (a ReLU after the layer).

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

    def formula(self) -> LayerFormula:
        """The branches ``z^>`` (outputs ``y > 0``) and ``z^<`` (``y < 0``)."""
        up, down = (1.0 + self.gamma, 1.0), (1.0, 1.0 + self.gamma)  # W + g W^+, W + g W^- (as (W^+, W^-) weights)
        return LayerFormula((Branch(x_plus=up, x_minus=down, bias=up, where="pos"),
                             Branch(x_plus=down, x_minus=up, bias=down, where="neg")), self.stabilizer)

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        return evaluate(self.formula(), module, x, y)


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

    def formula(self) -> LayerFormula:
        """One branch: ``x^+`` meets ``W^+``, ``x^-`` meets ``W^-``, bias ``b^+``."""
        return LayerFormula((Branch(x_plus=(1.0, 0.0), x_minus=(0.0, 1.0), bias=(1.0, 0.0)),), self.stabilizer)

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        return evaluate(self.formula(), module, x, y)


@register_rule("alpha_beta")
@dataclass(frozen=True)
class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al., 2015), as zennit's ``AlphaBeta``.

    ``R_i = alpha * (x_i^+ W^+ + x_i^- W^-)_ij / z^+_j R_j - beta * (x_i^+ W^- + x_i^- W^+)_ij / z^-_j R_j``
    with ``z^+ = x^+ W^+ + x^- W^- + b^+`` and ``z^- = x^+ W^- + x^- W^+ + b^-``. (``z^-`` is its own
    layer evaluation, never ``y - z^+``: where ``z^-`` is exactly 0 the stabilised ``1 / z^-`` is huge, and
    the difference form would cancel it against the other branch in floating point.)

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

    def formula(self) -> LayerFormula:
        """The branches ``z^+`` (share ``alpha``) and ``z^-`` (share ``-beta``)."""
        plus, minus = (1.0, 0.0), (0.0, 1.0)
        return LayerFormula((Branch(x_plus=plus, x_minus=minus, bias=plus, scale=self.alpha),
                             Branch(x_plus=minus, x_minus=plus, bias=minus, scale=-self.beta)), self.stabilizer)

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        return evaluate(self.formula(), module, x, y)


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
        return spread(y, layer_forward(module, ones, torch.ones_like(w), None), self.stabilizer)


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
        return spread(y, layer_forward(module, ones, w * w, None if b is None else b * b), self.stabilizer)


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
        # carriers enter with a minus sign: their relevance is -l W^+ s and -h W^- s
        b_pos, b_neg = (None, None) if b is None else (b.clamp(min=0), b.clamp(max=0))
        z = y - layer_forward(module, lo, w.clamp(min=0), b_pos) - layer_forward(module, hi, w.clamp(max=0), b_neg)
        return spread(y, z, self.stabilizer)


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
