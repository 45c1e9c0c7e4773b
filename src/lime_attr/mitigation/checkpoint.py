r"""LIME's own activation checkpoint: the inner forward *and* its relevance backward, one decoder layer at a time.

An inner step of LIME differentiates a relevance, itself a (rule-modified) gradient taken with
``create_graph=True``. Without a checkpoint autograd keeps three graphs of the whole sequence alive until
the update: the forward's, the relevance backward's and what the double backward needs of both. On a 1B
model with a 616-token prompt that is more than the weights (``docs/lime.rst``, "Memory").

A checkpoint of the forward alone does not lower that peak: the relevance backward with
``create_graph=True`` recomputes each layer and keeps the recomputed graph for the double backward. So
this checkpoint wraps both passes of each decoder layer :math:`h_{i+1} = f_i(h_i, \Delta_i)`:

* forward: :math:`f_i` runs without keeping its graph; :math:`h_i` and :math:`\Delta_i` are saved;
* relevance backward (``create_graph=True``): the hidden-state gradient
  :math:`g_i = J_{f_i}(h_i, \Delta_i)^\top g_{i+1}` is itself computed as one checkpointed node that keeps
  only :math:`(h_i, g_{i+1}, \Delta_i)`;
* double backward: that node recomputes :math:`f_i` and its vector-Jacobian product with a graph, and
  differentiates it once; the first-order gradient of the KL term recomputes :math:`f_i` once more.

So at most one layer's graphs exist at a time, plus two hidden-state tensors per layer. The cost is the
recomputation: each layer's forward runs three more times per step and its backward twice more. The
numbers are the same as without the checkpoint (the same operations per layer; tested to 1e-6 and on
the emitted tokens).

On CPU, with ``release_heap`` (``LimeConfig.release_heap``, on by default), freed heap pages are handed
back to the operating system before each recomputation (:mod:`lime_attr.mitigation.heap`): glibc would
otherwise keep the freed recomputation buffers resident, about 1 GB of the peak on that 1B model.

It is not ``transformers``' gradient checkpointing, which acts only in training mode and turns the KV
cache off. Nothing is patched globally: each decoder layer *instance* gets a ``forward`` attribute while
LIME's session runs, removed exactly afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor, nn

from ..context import ForwardState, running
from .heap import release_freed_heap

__all__ = ["DeltaAccess", "LayerCheckpoint"]

DeltaPair = tuple[Optional[Tensor], Optional[Tensor]]


class DeltaAccess(Protocol):
    """What the checkpoint needs of the perturbations' owner (``LimeOptimizer`` implements it)."""

    def delta_pair(self, layer: int, hidden_states: Tensor) -> DeltaPair:
        """``(Delta_K, Delta_V)`` of a decoder layer this token (either may be ``None``), created (zero) for
        ``hidden_states`` ``[batch, seq, hidden]`` if not yet."""

    def substitute_deltas(self, layer: int, pair: DeltaPair) -> Any:
        """While active, the attention transform adds ``pair`` to that layer's keys and values."""


class LayerCheckpoint:
    """Checkpoint every decoder layer of the language model during LIME's inner forwards.

    Parameters
    ----------
    layers : sequence of nn.Module
        The language model's decoder layers (each called as ``layer(hidden_states, **kwargs)`` and returning
        the next hidden states).
    perturbed : sequence of int
        Indices (into ``layers``) of the layers whose attention gets a perturbation.
    deltas : DeltaAccess
        The owner of the perturbations.
    state : ForwardState
        The attribution's scope. Recomputations run as part of its forward (its rules and attention
        transforms apply); while its op-coverage check runs, layers run unchanged so that the check sees
        every op.
    release_heap : bool
        Before each recomputation of a layer on CPU, give freed heap pages back to the operating system
        (:func:`~lime_attr.mitigation.heap.release_freed_heap`, glibc's ``malloc_trim``; nothing elsewhere).
    """

    def __init__(self, layers: Sequence[nn.Module], perturbed: Sequence[int], deltas: DeltaAccess,
                 state: ForwardState, release_heap: bool = False) -> None:
        if len(layers) == 0:
            raise ValueError("LimeConfig.activation_checkpoint needs a language model with decoder layers; this "
                             "model has none. Set activation_checkpoint=False")
        self.layers = list(layers)
        self.perturbed = set(perturbed)
        self.deltas = deltas
        self.state = state
        self.release_heap = release_heap
        self.on = False
        self.releases = 0  # heap releases run (how often a recomputation started on CPU with release_heap)

    @contextlib.contextmanager
    def installed(self) -> Iterator["LayerCheckpoint"]:
        """Each layer instance's ``forward`` wrapped while the context runs; restored exactly on exit."""
        saved = []
        try:
            for i, layer in enumerate(self.layers):
                saved.append((layer, "forward" in layer.__dict__, layer.__dict__.get("forward")))
                layer.forward = self._wrapped(i, layer.forward)
            yield self
        finally:
            for layer, had, original in reversed(saved):
                if had:
                    layer.forward = original
                else:
                    layer.__dict__.pop("forward", None)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Checkpoint the forwards (and their relevance backwards) that start inside this context."""
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def _wrapped(self, index: int, forward: Callable) -> Callable:
        def layer_forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
            if not (self.on and torch.is_grad_enabled()) or self.state.checking_ops:
                return forward(hidden_states, *args, **kwargs)
            _check_constant_arguments(index, args, kwargs)
            return self._checkpointed(index, forward, hidden_states, args, kwargs)

        layer_forward.__wrapped__ = forward  # type: ignore[attr-defined]
        return layer_forward

    def _checkpointed(self, index: int, forward: Callable, hidden: Tensor, args: tuple, kwargs: dict) -> Tensor:
        pair: Optional[DeltaPair] = None
        if index in self.perturbed:
            pair = self.deltas.delta_pair(index, hidden)
        present = [d is not None for d in pair] if pair is not None else []
        tensors = [d for d in (pair or ()) if d is not None]

        def run(h: Tensor, ds: Sequence[Tensor], recompute: bool = False) -> Tensor:
            if recompute and self.release_heap and h.device.type == "cpu":
                release_freed_heap()  # the freed buffers of the last layer's graphs, before this one's
                self.releases += 1
            with running(self.state), contextlib.ExitStack() as stack:  # (recomputations run in the backward)
                if pair is not None:
                    it = iter(ds)
                    stack.enter_context(self.deltas.substitute_deltas(index, tuple(next(it) if p else None
                                                                                   for p in present)))
                out = forward(h, *args, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"LimeConfig.activation_checkpoint: decoder layer {index} returned "
                                f"{type(out).__name__}, not the hidden-states tensor; this model's layers are not "
                                "supported. Set activation_checkpoint=False")
            return out

        return _Layer.apply(run, hidden, *tensors)


def _check_constant_arguments(index: int, args: tuple, kwargs: dict) -> None:
    """Only the hidden states may carry gradient into a checkpointed layer, and no cache may be written."""
    for name, value in [*((f"argument {i + 1}", a) for i, a in enumerate(args)), *kwargs.items()]:
        if isinstance(value, Tensor) and value.requires_grad:
            raise RuntimeError(f"activation checkpoint: decoder layer {index} got {name} with requires_grad; only "
                               "the hidden states may depend on the input. Set activation_checkpoint=False")
        if name in ("cache", "past_key_values", "past_key_value") and value is not None:
            raise RuntimeError(f"activation checkpoint: decoder layer {index} got a KV cache ({name}); LIME's inner "
                               "forward runs without one. Set activation_checkpoint=False")


def _recompute(run: Callable, h: Tensor, ds: Sequence[Tensor]) -> tuple[Tensor, Tensor, list[Tensor]]:
    """``(out, h', ds')``: the layer recomputed on detached copies that require grad."""
    hx = h.detach().requires_grad_(True)
    dx = [d.detach().requires_grad_(True) for d in ds]
    return run(hx, dx, recompute=True), hx, dx


class _Layer(torch.autograd.Function):
    """``h_{i+1} = f_i(h_i, Delta_i)`` without a kept graph; the backward is a checkpointed node itself."""

    @staticmethod
    def forward(ctx: Any, run: Callable, hidden: Tensor, *deltas: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(hidden, *deltas)
        with torch.enable_grad():  # the scope applies its rules and transforms only with gradients on
            out = run(hidden.detach(), [d.detach() for d in deltas])
        return out.detach()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple:
        hidden, *deltas = ctx.saved_tensors
        if torch.is_grad_enabled():  # the relevance backward (create_graph): only the hidden-state gradient
            return (None, _LayerVJP.apply(ctx.run, hidden, grad_out, *deltas), *([None] * len(deltas)))
        with torch.enable_grad():  # a first-order backward (the KL term's gradient): hidden states and Delta
            out, hx, dx = _recompute(ctx.run, hidden, deltas)
            grads = torch.autograd.grad(out, [hx, *dx], grad_out, allow_unused=True)
        return (None, *grads)


class _LayerVJP(torch.autograd.Function):
    """``g_i = J_{f_i}(h_i, Delta_i)^T g_{i+1}``, keeping only its inputs; differentiable once."""

    @staticmethod
    def forward(ctx: Any, run: Callable, hidden: Tensor, grad_out: Tensor, *deltas: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(hidden, grad_out, *deltas)
        with torch.enable_grad():
            out, hx, _ = _recompute(run, hidden, deltas)
            (g,) = torch.autograd.grad(out, [hx], grad_out.detach())
        return g

    @staticmethod
    def backward(ctx: Any, grad_g: Tensor) -> tuple:
        hidden, grad_out, *deltas = ctx.saved_tensors
        if torch.is_grad_enabled():
            raise RuntimeError("LimeConfig.activation_checkpoint supports one derivative of the relevance "
                               "(second_order='autograd'), not higher orders")
        with torch.enable_grad():
            out, hx, dx = _recompute(ctx.run, hidden, deltas)
            gx = grad_out.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(out, [hx], gx, create_graph=True)
            grads = torch.autograd.grad(g, [hx, gx, *dx], grad_g, allow_unused=True)
        return (None, *grads)
