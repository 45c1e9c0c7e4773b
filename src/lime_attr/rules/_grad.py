"""Gradient-form primitives every rule is built from.

Each primitive returns a tensor whose *value* is exactly the value of the original computation (bit for
bit) while its *gradient* is the rule-modified one. Their backward passes are built from differentiable
torch ops, so a backward pass through them can itself be differentiated (``create_graph=True``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..context import mark_dependent
from . import _tangent


def replace_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    """Return ``value`` in the forward pass with the gradient of ``surrogate``.

    The forward value is ``value`` bit for bit (no arithmetic on it: :func:`modified_grad` with the
    identity as the backward map), and the only gradient path is through ``surrogate`` -- the same as
    ``value.detach() + (surrogate - surrogate.detach())`` without its two full-size elementwise passes.
    """
    if _tangent.active():  # exact second order (lime_attr.attribution.exact): a forward-mode dual
        return _tangent.replace_grad(value, surrogate)
    if not (surrogate.requires_grad and torch.is_grad_enabled()):
        return value.detach()
    return _modified(surrogate, value, _identity)


def scale_grad(x: Tensor, factor: float, *, copy: bool = True) -> Tensor:
    """Identity in the forward pass; multiplies the gradient flowing back through it by ``factor``.

    Parameters
    ----------
    x : Tensor
        The tensor whose gradient *through this use* is scaled (other consumers of ``x`` keep theirs).
    factor : float
        The scale.
    copy : bool
        ``True`` (default): the result is a copy of ``x``, so that an in-place op on it cannot reach
        ``x``'s other consumers. ``False``: the result shares ``x``'s storage (no copy, and where ``x`` is
        saved for a backward pass elsewhere, no second tensor): only for a consumer that does not write
        into its input in place, e.g. an attention kernel, a matrix product or an elementwise product.
    """
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    if _tangent.active():
        return _tangent.replace_grad(x, x * factor)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x
    # by default a copy (one pass), not ``x`` itself: ``x`` usually has other consumers that an in-place op
    # on the result must not reach
    return _modified(x, x.detach().clone() if copy else x, GradScale(factor))


class GradScale:
    """The vector-Jacobian map ``g -> g * factor`` (a constant or a tensor kept from the forward pass)."""

    __slots__ = ("factor",)

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def __call__(self, g: Tensor) -> Tensor:
        return g * self.factor


def mul_grad_hook(y: Tensor, factor: Tensor) -> Tensor:
    """Multiply the gradient arriving at ``y`` (from all its consumers) by the constant ``factor``.

    Registers a tensor hook on ``y`` and returns ``y`` itself: no forward work and no copy. Use it for a
    rule that rescales a *module output's* total gradient (e.g. LRP-epsilon); use :func:`scale_grad`
    for one consumer's copy of a tensor.
    """
    if _tangent.active():
        return _tangent.scale_tangent(y, factor)
    if y.requires_grad and torch.is_grad_enabled():
        factor = factor.detach()
        y.register_hook(lambda g: g * factor)
    return y


def epsilon_grad_hook(y: Tensor, eps: float) -> Tensor:
    """Multiply the gradient arriving at ``y`` by ``|y| / (|y| + eps)`` (LRP-epsilon in gradient form).

    Returns ``y`` itself. The factor is computed in the backward pass from ``y``'s own storage, which
    the hook keeps alive; where a consumer of ``y`` saves it for its backward anyway (an attention kernel
    its values, a gated MLP its factors, the caller the logits) that costs no memory at all, and elsewhere
    one tensor the size of ``y``, as a precomputed factor would. A write into ``y`` after the rule (an
    in-place op, which autograd allows on a tensor nothing saved) would change the factor: the hook checks
    ``y``'s version counter and raises instead of returning a wrong gradient.
    """
    if eps == 0.0:
        return y
    if _tangent.active():
        return _tangent.scale_tangent(y, epsilon_factor(y, eps))
    if y.requires_grad and torch.is_grad_enabled():
        y.register_hook(EpsilonScale(y, eps))
        mark_kept(y)
    return y


def epsilon_factor(y: Tensor, eps: float) -> Tensor:
    """``|y| / (|y| + eps)`` computed now, as a constant (for a factor that must not read ``y`` later)."""
    a = y.detach().abs()
    return a.div_(a + eps)


def mark_kept(t: Tensor) -> None:
    """Note that ``t``'s values are kept for the backward pass (a rule reads them there)."""
    try:
        t._lime_attr_kept = True  # an attribute of this tensor object only, gone with it
    except AttributeError:  # a tensor subclass without instance attributes: the rules just keep their own
        pass


def is_kept(t: Tensor) -> bool:
    """Whether a rule keeps ``t``'s values for the backward pass anyway (then reading them is free)."""
    return getattr(t, "_lime_attr_kept", False)


class Frozen:
    """A tensor's value kept for a backward pass, read there (for factors computed lazily).

    Holds ``t.detach()`` (the same storage, no copy) and ``t``'s version counter. Reading it after ``t``
    was written in place (which autograd allows on a tensor that nothing saved) raises instead of
    returning the changed values.
    """

    __slots__ = ("t", "version")

    def __init__(self, t: Tensor) -> None:
        self.t = t.detach()
        self.version = self.t._version

    def get(self) -> Tensor:
        if self.t._version != self.version:
            raise RuntimeError(
                "lime_attr: a tensor that an LRP rule reads in the backward pass was modified in place after "
                f"the rule saw it (version {self.version} -> {self.t._version}), so the rule's factor would "
                "be wrong. Replace the in-place op (e.g. `y *= s`, `y.add_(b)`) after that layer or "
                "activation with its out-of-place form (`y = y * s`).")
        return self.t


class EpsilonScale:
    """``g -> g * |y| / (|y| + eps)`` with ``y`` read in the backward pass (see :class:`Frozen`).

    ``nonnegative=True`` for a ``y`` known to be ``>= 0`` (a ReLU's output): no ``abs`` pass.
    """

    __slots__ = ("y", "eps", "nonnegative")

    def __init__(self, y: Tensor, eps: float, nonnegative: bool = False) -> None:
        self.y, self.eps, self.nonnegative = Frozen(y), eps, nonnegative

    def __call__(self, g: Tensor) -> Tensor:
        y = self.y.get()
        return epsilon_scale(g, y if self.nonnegative else y.abs(), self.eps)


def epsilon_scale(g: Tensor, a: Tensor, eps: float) -> Tensor:
    """``g * a / (a + eps)`` for ``a >= 0`` with one new tensor (two while dividing); differentiable in ``g``
    when ``g`` requires grad (``create_graph=True``), in place on the new tensor otherwise."""
    f = a + eps
    torch.div(a, f, out=f)
    return g * f if g.requires_grad else f.mul_(g)


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (the LRP-epsilon denominator)."""
    if eps == 0.0:
        return z
    # copysign (one fast elementwise kernel; torch.where is several times slower on CPU); ``z + 0.0`` turns
    # -0.0 into +0.0, so that sign(-0) = +1 as well (bit-identical to z + where(z >= 0, eps, -eps))
    return z + torch.copysign(z.new_tensor(eps), z + 0.0)


def stabilize_(z: Tensor, eps: float) -> Tensor:
    """In-place :func:`stabilize` for a temporary ``z`` that nothing else uses."""
    if eps == 0.0:
        return z
    signed_eps = z + 0.0
    return z.add_(torch.copysign(z.new_tensor(eps), signed_eps, out=signed_eps))


def nonnegative(x: Tensor) -> bool:
    """Whether ``x >= 0`` everywhere (one reduction; False for NaN). Decides a rule's exact fast path."""
    return x.numel() == 0 or bool(x.amin() >= 0)


def safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0``."""
    zero = den == 0
    return torch.where(zero, torch.zeros_like(num), num / torch.where(zero, torch.ones_like(den), den))


class _GradToRelevance(torch.autograd.Function):
    """Identity forward; backward maps an incoming gradient g to relevance ``y * g``."""

    @staticmethod
    def forward(ctx, y: Tensor) -> Tensor:  # noqa: D401
        ctx.save_for_backward(y)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return y * g


class _RelevanceToGrad(torch.autograd.Function):
    """Identity forward; backward maps incoming relevance R to a gradient ``R / x`` (0 where x = 0)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D401
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, r: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return safe_divide(r, x)


def grad_to_relevance(y: Tensor) -> Tensor:
    """Boundary used by the zennit adapter: gradients arriving at ``y`` become relevance ``y * g``."""
    return _GradToRelevance.apply(y)


def relevance_to_grad(x: Tensor) -> Tensor:
    """Boundary used by the zennit adapter: relevance arriving at ``x`` becomes the gradient ``R / x``."""
    return _RelevanceToGrad.apply(x)


class _ModifiedGrad(torch.autograd.Function):
    """Forward: a given value; backward: a given vector-Jacobian product w.r.t. the input ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, value_and_vjp: tuple) -> Tensor:  # noqa: D401
        value, ctx.vjp = value_and_vjp
        return value.detach()  # shares value's storage, bit for bit; a fresh tensor, so in-place ops may follow

    @staticmethod
    def backward(ctx, g: Tensor):
        return ctx.vjp(g), None


def modified_grad(x: Tensor, value: Tensor, vjp) -> Tensor:
    """``value`` in the forward pass; in the backward pass the gradient sent to ``x`` is ``vjp(g)``.

    For layer rules whose modified backward is a fixed linear map of the incoming gradient ``g`` (the
    rule's transposed layer with modified weights, scaled by ratios computed in the forward pass): only
    what ``vjp`` closes over is kept for the backward pass, and nothing of the layer's own forward graph.
    ``vjp`` must be written with differentiable torch ops (``create_graph=True`` differentiates it).

    A custom ``autograd.Function`` is invisible to the op-coverage mode, so its output is marked as
    input-dependent here when ``x`` is (the ops after the layer stay checked).
    """
    if _tangent.active():
        out = _tangent.modified_grad(x, value, vjp)
        _mark_dependent(out, x)
        return out
    return _modified(x, value, vjp)


def _identity(g: Tensor) -> Tensor:
    return g


def _modified(x: Tensor, value: Tensor, vjp) -> Tensor:
    out = _ModifiedGrad.apply(x, (value, vjp))
    _mark_dependent(out, x)
    return out


def _mark_dependent(out: Tensor, like: Tensor) -> None:
    mark_dependent(out, like)
