"""Gradient-form primitives every rule is built from.

Each primitive returns a tensor whose *value* is exactly the value of the original computation (bit for
bit) while its *gradient* is the rule-modified one. All of them are written with differentiable torch
ops, so a backward pass through them can itself be differentiated (``create_graph=True``).
"""
from __future__ import annotations

import torch
from torch import Tensor


def replace_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    """Return ``value`` in the forward pass with the gradient of ``surrogate``.

    ``value.detach() + (surrogate - surrogate.detach())``: the bracket is exactly zero, so the
    forward value is ``value`` bit for bit, and the only gradient path is through ``surrogate``.
    (Plain torch ops on purpose: the op-coverage mode must see them to track input dependence; a custom
    ``autograd.Function`` would hide its output from the mode.)
    """
    return value.detach() + (surrogate - surrogate.detach())


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """Identity in the forward pass; multiplies the gradient flowing back through it by ``factor``."""
    if factor == 1.0:
        return x
    if factor == 0.0:
        return x.detach()
    return replace_grad(x, x * factor)


def mul_grad_hook(y: Tensor, factor: Tensor) -> Tensor:
    """Multiply the gradient arriving at ``y`` (from all its consumers) by the constant ``factor``.

    Registers a tensor hook on ``y`` and returns ``y`` itself: no forward work and no copy. Use it for a
    rule that rescales a *module output's* total gradient (e.g. LRP-epsilon); use :func:`scale_grad`
    for one consumer's copy of a tensor.
    """
    if y.requires_grad and torch.is_grad_enabled():
        factor = factor.detach()
        y.register_hook(lambda g: g * factor)
    return y


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + eps * sign(z)`` with ``sign(0) = +1`` (the LRP-epsilon denominator)."""
    if eps == 0.0:
        return z
    # 0-dim branches in z's dtype (python scalars would be cast to the default dtype): no ones-tensors
    return z + torch.where(z >= 0, z.new_tensor(eps), z.new_tensor(-eps))


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
