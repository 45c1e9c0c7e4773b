"""Exactly differentiable relevance: ``second_order="exact"`` of the relevance engine (``LRP.attribute``, LIME).

Relevance is ``R = x * g~`` with ``g~ = J~^T e`` the rule-modified gradient of the explained output
(``J~``: the product of the rules' modified local Jacobians, each a function of the true forward values).
Differentiating the rule-modified backward pass with autograd (``create_graph=True``, the default
``second_order="autograd"``) is exact only where no rule-modified value enters a later backward formula:
a value such as ``V`` in ``g_A = g V^T`` or a held-constant factor (``1/sigma``, ``z / (z + eps)``)
carries the *modified* Jacobian (or none) in the double backward.

The exact derivative comes from a forward-mode identity. For a cotangent ``v`` on ``R``::

    <v, R> = <x * v, J~^T e> = e^T J~ (x * v),

a Jacobian-vector product through the *modified* Jacobians, seeded with ``u = x * v``. The forward is run
once more with dual tensors in tangent mode (:func:`lime_attr.rules.tangent_mode`): every primitive's primal is
the true value with its true reverse-mode graph, its tangent the rule's modified directional
derivative, and a rule's "held constant" drops the tangent only. The tangent of the explained output,
``e^T J~(Delta) (x * v)``, is then an ordinary function of every tensor ``Delta`` the forward read
(perturbations, parameters, the input itself, also through ``u``), and one reverse pass over it
(reverse-over-forward) is the exact vector-Jacobian product ``d<v, R>/dDelta``.

:func:`exact_attribute` computes ``R`` by the usual single backward pass and returns it as the output of
an autograd function whose backward runs this reverse-over-forward pass: differentiating the returned
relevance (``loss(R).backward()``, ``torch.autograd.grad``) is exact, at the cost of one dual forward and
one reverse pass over it per differentiation.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..ops import tensors_in
from ..rules import tangent_mode
from .checks import check_finite, validate_inputs

__all__ = ["exact_attribute", "relevance_vjp"]


class _ExternalRecorder(TorchFunctionMode):
    """Records the tensors that require grad and that the forward reads without having produced them.

    These are what the relevance can depend on besides the explained inputs: parameters, perturbations
    (added by hooks or stored on modules), additional forward arguments. They become inputs of the
    exact relevance's autograd function, so that its backward returns their gradients.
    """

    def __init__(self, exclude: Sequence[Tensor]) -> None:
        super().__init__()
        self._exclude = {id(t) for t in exclude}
        self.external: dict[int, Tensor] = {}
        # autograd nodes are numbered in creation order (per thread): a tensor whose node is older than the
        # forward was made before it (also tensors made where torch functions are disabled count as inner)
        with torch.enable_grad():
            self._start = (torch.zeros((), requires_grad=True) * 1).grad_fn._sequence_nr()

    def _outer(self, t: Tensor) -> bool:
        return t.requires_grad and (t.grad_fn is None or t.grad_fn._sequence_nr() < self._start)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tensors_in(args) + tensors_in(kwargs):
            k = id(t)
            if k not in self.external and k not in self._exclude and self._outer(t):
                self.external[k] = t
        return func(*args, **kwargs)


class _Runner:
    """Everything the exact backward needs to rerun the forward in tangent mode."""

    def __init__(self, scope: Any, forward: Callable[..., Tensor], inputs: Sequence[Tensor],
                 external: Sequence[Tensor], relevance: Sequence[Tensor]) -> None:
        self.scope, self.forward = scope, forward
        self.inputs = [x.detach() for x in inputs]
        self.external = list(external)
        self.relevance = [r.detach() for r in relevance]

    def tangent_output(self, xs: Sequence[Tensor], tangents: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """``(primal, tangent)`` of the explained output ``[batch]`` for inputs ``xs`` with ``tangents``."""
        scope = self.scope
        ctx = scope if not scope.active else _null()
        with torch.enable_grad(), ctx, fwAD.dual_level(), tangent_mode():
            duals = [fwAD.make_dual(x, t) for x, t in zip(xs, tangents)]
            try:
                out = self.forward(*duals)
            except RuntimeError as exc:
                cause = exc.__cause__ or exc
                raise RuntimeError(
                    f"second_order='exact': the forward in tangent mode (forward-mode AD) failed: {str(cause).rstrip('.')}. Every "
                    "op must support forward-mode AD, and rules must be built from lime_attr.rules' primitives "
                    "(replace_grad / scale_grad / mul_grad_hook / modified_grad), not their own autograd "
                    "Function (zennit rules are not supported)") from cause
            carriers = scope.pop_carriers()
            if carriers:
                raise ValueError(_NO_CARRIERS)
            primal, tangent = fwAD.unpack_dual(out)
        return primal, (torch.zeros_like(primal) if tangent is None else tangent)

    def vjp(self, v_rel: Sequence[Optional[Tensor]], v_out: Optional[Tensor]) -> list[Optional[Tensor]]:
        """Exact ``d(<v_rel, R> + <v_out, out>) / d(inputs, external)``."""
        v_rel = [torch.zeros_like(x) if v is None else v for x, v in zip(self.inputs, v_rel)]
        with torch.enable_grad():  # (a backward runs without grad mode)
            xs = [x.clone().requires_grad_(True) for x in self.inputs]
            primal, tangent = self.tangent_output(xs, [x * v for x, v in zip(xs, v_rel)])
            s = tangent.sum()
            _check_consistent(s, v_rel, self.relevance)
            if v_out is not None:
                s = s + (primal * v_out).sum()
            wrt = xs + self.external
            if not s.requires_grad:
                return [None] * len(wrt)
            return list(torch.autograd.grad(s, wrt, allow_unused=True))


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_CARRIERS = ("second_order='exact' does not support first-layer rules (flat / wsquare / zbox): their "
                "relevance is carried by auxiliary tensors, not by x * gradient")


def _check_consistent(s: Tensor, v_rel: Sequence[Tensor], relevance: Sequence[Tensor]) -> None:
    """The tangent pass must reproduce ``<v, R>`` of the first-order pass: otherwise some rule did not run
    in tangent mode (a custom rule with its own autograd function, a zennit rule), and its derivative
    would be silently wrong."""
    ref = sum((v.to(r.dtype) * r).sum() for v, r in zip(v_rel, relevance))
    scale = sum((v.to(r.dtype) * r).abs().sum() for v, r in zip(v_rel, relevance))
    eps = torch.finfo(s.dtype).eps
    tol = 10 * max(eps ** 0.5, 1e-6) * (float(scale) + 1e-30)
    if abs(float(s.detach()) - float(ref)) > tol:
        raise RuntimeError(
            f"second_order='exact': the tangent pass gives <v, R> = {float(s):.6g} but the relevance is "
            f"{float(ref):.6g}; some rule or hook does not support tangent mode (rules must be built from "
            "lime_attr.rules' primitives replace_grad / scale_grad / mul_grad_hook / modified_grad)")


class _ExactRelevance(torch.autograd.Function):
    """Forward: the precomputed relevance and explained output; backward: the exact VJP (:class:`_Runner`)."""

    @staticmethod
    def forward(ctx, runner: _Runner, values: tuple, *tensors: Tensor):  # noqa: D401
        ctx.runner = runner
        return tuple(values)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        runner: _Runner = ctx.runner
        n = len(runner.inputs)
        out = runner.vjp(grads[:n], grads[n])
        return (None, None, *out)


def exact_attribute(scope: Any, forward: Callable[..., Tensor], inputs: tuple[Tensor, ...], *,
                    retain_graph: bool = False,
                    wrt: Optional[Callable[[], Sequence[Tensor]]] = None) -> tuple[tuple[Tensor, ...], Tensor]:
    """Relevance of ``inputs`` whose derivative is exact (``second_order="exact"`` of the relevance engine).

    Parameters
    ----------
    scope : LRPScope
        The rules; entered for the first-order pass (and for each differentiation) unless already active.
    forward : callable
        ``forward(*inputs) -> Tensor [batch]``: the explained output (as for
        :func:`lime_attr.attribution.engine.relevance`). It is run again, in tangent mode, whenever the
        returned relevance is differentiated, so it must compute the same function each time.
    inputs : tuple of Tensor
        The explained inputs.
    retain_graph : bool
        Keep the first forward's graph after the first-order backward (to differentiate another
        function of the model's outputs too).
    wrt : callable, optional
        ``wrt() -> tensors``, called after the first forward: the tensors besides the inputs that the
        relevance is differentiable w.r.t. (LIME: its perturbations). Default: every tensor requiring grad
        that the forward read, recorded while it runs (a torch-function mode, which costs Python time per op).

    Returns
    -------
    relevance : tuple of Tensor
        ``x * g~`` per input, the same values as the first-order relevance; differentiable w.r.t. the
        inputs and every tensor requiring grad that the forward read (parameters, perturbations).
    output : Tensor
        The explained output ``[batch]``, differentiable the same way (``output - sum(relevance)`` is the
        convergence delta).
    """
    work = tuple(x.detach().requires_grad_(True) for x in inputs)
    recorder = _ExternalRecorder(list(inputs) + list(work))
    with torch.enable_grad(), (scope if not scope.active else _null()):
        with (recorder if wrt is None else _null()):
            out = forward(*work)
        if scope.pop_carriers():
            raise ValueError(_NO_CARRIERS)
        grads = torch.autograd.grad(out, work, grad_outputs=torch.ones_like(out), allow_unused=True,
                                    retain_graph=retain_graph)
    rel = tuple((x * (torch.zeros_like(x) if g is None else g)).detach() for x, g in zip(work, grads))
    check_finite(rel)
    external = list(recorder.external.values()) if wrt is None else list(wrt())
    runner = _Runner(scope, forward, inputs, external, rel)
    res = _ExactRelevance.apply(runner, (*rel, out.detach()), *inputs, *external)
    return tuple(res[:-1]), res[-1]


def relevance_vjp(lrp: Any, inputs: Tensor | tuple[Tensor, ...], v: Tensor | tuple[Tensor, ...], target: Any = None,
                  wrt: Sequence[Tensor] = (), additional_forward_args: Any = None,
                  relevance: Tensor | tuple[Tensor, ...] | None = None,
                  **model_kwargs: Any) -> tuple[Optional[Tensor], ...]:
    """The exact vector-Jacobian product of relevance: ``d<v, R(inputs)> / d(inputs, *wrt)``.

    The explicit form of what differentiating ``LRP.attribute(..., second_order="exact")`` computes: one
    forward in tangent mode seeded with ``x * v`` and one reverse pass over its output tangent. No
    first-order pass is run.

    Parameters
    ----------
    lrp : LRP
        The attribution whose relevance is differentiated (its ``scope()`` and
        :meth:`~lime_attr.LRP.explained_forward` are used).
    inputs : Tensor or tuple of Tensor
        The explained inputs ``x``.
    v : Tensor or tuple of Tensor
        The cotangent on the relevance (same structure as ``inputs``).
    target : Any
        As for :meth:`LRP.attribute`.
    wrt : sequence of Tensor
        Further tensors (requiring grad) the model reads, e.g. perturbations or parameters.
    additional_forward_args : Any
        As for :meth:`LRP.attribute`.
    relevance : Tensor or tuple of Tensor, optional
        The first-order relevance ``R`` at these inputs, if the caller has it: the tangent pass is then
        checked to reproduce ``<v, R>`` (a rule without tangent-mode support would otherwise give a
        silently wrong derivative; ``RuntimeError`` names the problem).

    Returns
    -------
    tuple
        The gradient w.r.t. each input, then each tensor of ``wrt`` (None where it does not matter).

    Examples
    --------
    >>> import torch
    >>> from lime_attr import LRP
    >>> from lime_attr.attribution.exact import relevance_vjp
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, v = torch.randn(2, 4), torch.randn(2, 4)
    >>> (gx, gw) = relevance_vjp(LRP(model, "epsilon-plus"), x, v, target=1, wrt=[model[0].weight])
    >>> gx.shape, gw.shape
    (torch.Size([2, 4]), torch.Size([8, 4]))
    """
    inputs_t = inputs if isinstance(inputs, tuple) else (inputs,)
    v_t = v if isinstance(v, tuple) else (v,)
    if len(v_t) != len(inputs_t) or any(a.shape != b.shape for a, b in zip(inputs_t, v_t)):
        raise ValueError("v must have the structure and shapes of inputs")
    validate_inputs(inputs_t)
    forward = lrp.explained_forward(inputs_t, target, additional_forward_args, **model_kwargs)
    runner = _Runner(lrp.scope(), forward, inputs_t, list(wrt), [])
    with torch.enable_grad():  # also when called under no_grad or from inside a custom backward
        xs = [x.detach().clone().requires_grad_(True) for x in inputs_t]
        _, tangent = runner.tangent_output(xs, [x * vv for x, vv in zip(xs, v_t)])
        s = tangent.sum()
        if relevance is not None:
            rel_t = relevance if isinstance(relevance, tuple) else (relevance,)
            _check_consistent(s, v_t, [r.detach() for r in rel_t])
        targets = xs + list(wrt)
        if not s.requires_grad:
            return tuple(None for _ in targets)
        return tuple(torch.autograd.grad(s, targets, allow_unused=True))
