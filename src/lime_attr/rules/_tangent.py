"""Tangent mode: the gradient-form primitives as forward-mode maps, for exactly differentiable relevance.

Relevance is ``R = x * (J~^T e)`` with ``J~`` the product of the rules' modified local Jacobians. For a
fixed cotangent ``v``, ``<v, R> = e^T J~ (x * v)``: a forward-mode Jacobian-vector product through the
*modified* Jacobians, seeded with the tangent ``u = x * v`` at the input. In tangent mode every primitive
returns a dual tensor whose

* **primal** is the true value, with its true reverse-mode graph (``replace_grad(value, surrogate)``
  differentiates as ``value``), and whose
* **tangent** is the rule's modified directional derivative (the surrogate's tangent, or the incoming
  tangent scaled by the rule's factor),

and every ``detach()`` (a rule's "held constant", e.g. ``1/sigma``, ``z / (z + eps)``, ``f(x) / x``)
drops only the tangent: the constant stays a differentiable function of the true forward values. The
tangent of the explained output, ``e^T J~(Delta) u``, is then an ordinary differentiable function of
every tensor ``Delta`` the forward read, and one reverse pass over it (reverse-over-forward) gives the
exact derivative of ``<v, R>`` (see :mod:`lime_attr.attribution.exact`).

Tangent mode is active only inside :func:`tangent_mode` (a context variable and a ``TorchFunctionMode``
pushed for one forward); outside it the primitives are unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["active", "tangent_mode", "stop_tangent", "replace_grad", "scale_tangent", "modified_grad"]

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("lime_attr_tangent_mode", default=False)


def active() -> bool:
    """Whether the current forward runs in tangent mode."""
    return _ACTIVE.get()


def stop_tangent(t: Tensor) -> Tensor:
    """``t`` without its forward-mode tangent, keeping its reverse-mode graph (tangent mode's ``detach``)."""
    return fwAD.unpack_dual(t).primal


def _tangent(t: Tensor) -> Optional[Tensor]:
    return fwAD.unpack_dual(t).tangent if isinstance(t, Tensor) else None


def _dual(primal: Tensor, tangent: Optional[Tensor]) -> Tensor:
    if tangent is None:
        return primal
    if tangent.shape != primal.shape or tangent.dtype != primal.dtype:
        tangent = torch.broadcast_to(tangent.to(primal.dtype), primal.shape).contiguous()
    return fwAD.make_dual(primal, tangent)


def replace_grad(value: Tensor, surrogate: Tensor) -> Tensor:
    """Tangent-mode ``replace_grad``: primal ``value`` (true graph), tangent of ``surrogate``."""
    return _dual(stop_tangent(value), _tangent(surrogate))


def scale_tangent(y: Tensor, factor: Tensor) -> Tensor:
    """Tangent-mode ``mul_grad_hook``: primal ``y`` (true graph), tangent ``factor * tangent(y)``.

    ``factor`` is held constant for the tangent (its own tangent is dropped) but stays differentiable
    in reverse mode.
    """
    t = _tangent(y)
    return _dual(stop_tangent(y), None if t is None else t * stop_tangent(factor))


def modified_grad(x: Tensor, value: Tensor, vjp: Callable[[Tensor], Tensor]) -> Tensor:
    """Tangent-mode ``modified_grad``: primal ``value``, tangent ``J~ tangent(x)`` with ``J~^T = vjp``.

    ``vjp`` is linear in its argument, so its transpose applied to ``u`` is ``d/dg <vjp(g), u>``, one
    reverse pass through ``vjp`` at ``g = 1`` (recorded, so that it can be differentiated again; a
    point where every entry is nonzero, so that no data-dependent shortcut inside ``vjp`` drops a term).
    """
    primal = stop_tangent(value)
    u = _tangent(x)
    if u is None:
        return primal
    with torch.enable_grad():
        g0 = torch.ones(primal.shape, dtype=primal.dtype, device=primal.device, requires_grad=True)
        out = vjp(g0)
        (t,) = torch.autograd.grad(out, g0, grad_outputs=u.to(out.dtype), create_graph=True, allow_unused=True)
    return _dual(primal, t)


# Elementwise ops whose forward-mode formula, for an operand without a tangent, runs on torch's "efficient
# zero" tensors through a Python meta kernel: ~0.5 ms per call instead of microseconds (torch 2.x). Such an
# operand gets a materialised zero tangent instead (same result, fast kernels).
_ELEMENTWISE = frozenset(
    "mul __mul__ __rmul__ multiply add __add__ __radd__ sub __sub__ __rsub__ subtract div __truediv__ "
    "__rtruediv__ true_divide divide where".split())


def _zero_dual(a, ref: Tensor):
    if _tangent(ref) is None:
        return a
    if isinstance(a, Tensor):
        if not a.is_floating_point() or _tangent(a) is not None:
            return a
        return fwAD.make_dual(a, torch.zeros_like(a))
    if isinstance(a, (int, float)) and not isinstance(a, bool) and ref.is_floating_point():
        c = torch.tensor(a, dtype=ref.dtype, device=ref.device)
        return fwAD.make_dual(c, torch.zeros_like(c))
    return a


class _StopTangentMode(TorchFunctionMode):
    """``detach()`` drops the tangent only (see the module docstring).

    Besides: ``out=`` calls are computed out of place and copied in (recorded), operands without a tangent
    of elementwise arithmetic get a zero tangent (speed), and softmax / SDPA are evaluated from elementary
    ops (differentiable tangents). Values are unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is Tensor.detach or func is torch.detach:
            return stop_tangent(args[0])
        if func is Tensor.detach_:
            raise RuntimeError("an in-place detach_() inside the forward cannot be differentiated exactly "
                               "(second_order='exact'); use detach()")
        out = kwargs.get("out")
        if isinstance(out, Tensor):
            # rules write temporaries with out=... (fewer allocations); here those temporaries are functions of
            # values that keep their graph, and out= ops do not record one: compute, then copy in (recorded)
            kwargs = {k: v for k, v in kwargs.items() if k != "out"}
            args = tuple(a.clone() if a is out else a for a in args)  # an input the result overwrites
            return out.copy_(self.__torch_function__(func, types, args, kwargs))
        name = getattr(func, "__name__", None)
        if name in _ELEMENTWISE and len(args) >= 2:
            ref = next((a for a in args if isinstance(a, Tensor) and _tangent(a) is not None), None)
            if ref is not None:
                args = tuple(_zero_dual(a, ref) for a in args)
            return func(*args, **kwargs)
        if name == "softmax" and args and _tangent(args[0]) is not None:
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if dim is not None:
                return _softmax(args[0], dim, kwargs.get("dtype"))
        if name == "scaled_dot_product_attention":
            qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")[len(args[:3]):]]
            if any(_tangent(t) is not None for t in qkv if isinstance(t, Tensor)):
                return _sdpa(*args, **kwargs)
        return func(*args, **kwargs)


def _sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
          is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` from elementary ops (its kernels call softmax below the function
    mode, see :func:`_softmax`); the reference formula of torch's documentation, without dropout."""
    if dropout_p:
        raise RuntimeError("second_order='exact' needs attention without dropout (model.eval())")
    import math

    n, s = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    scores = (query @ key.transpose(-2, -1)) * _zero_dual(scale, query)
    if is_causal:
        causal = torch.ones(n, s, dtype=torch.bool, device=query.device).tril()  # top-left aligned, as torch
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + _zero_dual(attn_mask, scores)
    return _softmax(scores, -1) @ value


def _softmax(x: Tensor, dim: int, dtype: Optional[torch.dtype] = None) -> Tensor:
    """Softmax from elementary ops. (torch 2.x: the reverse-mode graph of softmax's forward-mode tangent
    saves ``exp``'s output and then overwrites it in place, so reverse-over-forward through
    ``torch.softmax`` fails with "modified by an inplace operation".)"""
    if dtype is not None:
        x = x.to(dtype)
    e = torch.exp(x - x.amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


@contextlib.contextmanager
def tangent_mode() -> Iterator[None]:
    """Run the primitives in tangent mode for the duration of the block (use inside ``fwAD.dual_level``)."""
    token = _ACTIVE.set(True)
    try:
        with _StopTangentMode():
            yield
    finally:
        _ACTIVE.reset(token)
