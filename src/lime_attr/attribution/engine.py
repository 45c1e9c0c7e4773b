r"""The relevance engine: one forward inside a scope, one rule-modified backward, ``x * g``.

Every attribution of lime_attr -- :class:`~lime_attr.LRP`, :class:`~lime_attr.ModalityAttribution`,
:class:`~lime_attr.LayerLRP` (through its latent form) and LIME's inner loop -- computes relevance with
:func:`relevance`. In gradient form (Achtibat et al., 2024) the relevance of an input ``x`` for the
explained output ``z`` is

.. math:: R(x) = x \odot \tilde g, \qquad \tilde g = \tilde J^\top \mathbf 1,

where :math:`\tilde J` is the product of the rules' modified local Jacobians: the scope installs the
rules, so the ordinary backward pass of ``z`` *is* the rule-modified one. What differs between the
adapters is only the *forward*: a function of the explained tensors that returns the explained scalar
per example (LRP selects Captum's target, ModalityAttribution the answer's logits, LIME the token its
decoder picks).

Options: ``create_graph`` keeps the graph so that the relevance can be differentiated (autograd's
double backward, the reference code's second order); ``second_order="exact"`` returns a relevance whose
derivative is exact (:mod:`lime_attr.attribution.exact`); ``latent`` also returns the relevance of
hidden states (module outputs, or any :class:`Recorder`) from the same backward pass; ``per_output``
runs one backward per explained column.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor

from ..errors import LimeAttrError
from ..scope import LRPScope
from .exact import exact_attribute
from .latent import LatentRecorder

__all__ = ["relevance", "Relevance", "Recorder", "FirstLayerRuleError", "SECOND_ORDERS"]

#: the values of ``second_order``
SECOND_ORDERS = ("autograd", "exact")


class FirstLayerRuleError(LimeAttrError, ValueError, TypeError):
    """A first-layer rule (flat / wsquare / zbox) where its relevance cannot be carried to an input."""


class Recorder(Protocol):
    """What ``latent=`` accepts besides module names: records tensors during the forward.

    A context manager (entered inside the scope, around the forward and the backward) whose
    ``tensors()`` are differentiated in the same backward pass and whose ``relevance(grads, detach)`` turns
    their gradients into relevance. :class:`~lime_attr.attribution.latent.LatentRecorder` is one.
    """

    def __enter__(self) -> Any: ...  # pragma: no cover - protocol

    def __exit__(self, *exc: Any) -> Any: ...  # pragma: no cover - protocol

    def tensors(self) -> list[Tensor]: ...  # pragma: no cover - protocol

    def relevance(self, grads: Sequence[Optional[Tensor]], detach: bool = True) -> dict: ...  # pragma: no cover


@dataclass
class Relevance:
    """What :func:`relevance` returns.

    Attributes
    ----------
    inputs : tuple of Tensor
        ``x * g`` per explained input (plus what first-layer rules carry to it), shaped like the input.
    output : Tensor
        The explained output the forward returned (``[batch]``, or ``[batch, n]`` with ``per_output``);
        its graph is attached.
    latent : dict or None
        The recorder's relevance (``{name: relevance}``), with ``latent`` only.
    parts : list of Relevance or None
        With ``per_output``: one result per explained column (``inputs`` / ``latent`` above are their sums).
    """

    inputs: tuple[Tensor, ...]
    output: Tensor
    latent: Optional[dict] = None
    parts: Optional[list] = None

    def delta(self) -> Tensor:
        """``output - sum(relevance)`` per example (``[batch]``): what biases and stabilisers absorb."""
        total = sum(r.reshape(r.shape[0], -1).sum(1) for r in self.inputs)
        return self.output - total


def relevance(scope: LRPScope, forward: Callable[..., Tensor], inputs: Sequence[Tensor], *,
              create_graph: bool = False, second_order: str = "autograd",
              latent: Union[None, str, Sequence[str], Recorder] = None, per_output: bool = False,
              retain_graph: bool = False, carriers: str = "add",
              wrt: Optional[Callable[[], Sequence[Tensor]]] = None) -> Relevance:
    r"""Relevance of ``inputs`` for the output of ``forward``: one forward and one backward in ``scope``.

    Parameters
    ----------
    scope : LRPScope
        The rules bound to the model; entered for the call unless it is already active.
    forward : callable
        ``forward(*inputs) -> Tensor``: the explained output, one scalar per example (``[batch]``;
        ``[batch, n]`` with ``per_output``). It receives the inputs as tensors that require grad.
    inputs : sequence of Tensor
        The explained tensors (may be empty when only ``latent`` is read).
    create_graph : bool
        Keep the graph, so that the relevance can itself be differentiated (autograd's double backward).
    second_order : {"autograd", "exact"}
        ``"exact"``: the relevance's derivative is exact (:func:`~lime_attr.attribution.exact.exact_attribute`,
        one reverse-over-forward pass when it is differentiated); implies a differentiable result, not
        with ``latent``, ``per_output`` or first-layer rules.
    latent : str, sequence of str or Recorder, optional
        Qualified module names whose output relevance is returned too
        (:class:`~lime_attr.attribution.latent.LatentRecorder`), or any :class:`Recorder`.
    per_output : bool
        One backward per column of a ``[batch, n]`` output (the parts are returned, and their sums).
    retain_graph : bool
        Keep the forward's graph after the backward (e.g. to differentiate another function of the
        output, as LIME's KL term).
    carriers : {"add", "refuse"}
        What to do with first-layer rules' carrier tensors: add their relevance to the matching input,
        or refuse them (:class:`FirstLayerRuleError`).
    wrt : callable, optional
        ``second_order="exact"`` only: ``wrt() -> tensors`` (called after the forward), the tensors besides
        the inputs that the relevance is differentiable w.r.t.; default: those the forward read, recorded.

    Returns
    -------
    Relevance

    Examples
    --------
    >>> import torch
    >>> from lime_attr import LRPScope
    >>> from lime_attr.attribution.engine import relevance
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    >>> res = relevance(LRPScope(net, "epsilon-plus", None), lambda x: net(x)[:, 1], [torch.randn(2, 4)])
    >>> res.inputs[0].shape, res.delta().shape
    (torch.Size([2, 4]), torch.Size([2]))
    """
    _check_options(second_order, latent, per_output, carriers)
    if second_order == "exact":
        rel, out = exact_attribute(scope, forward, tuple(inputs), retain_graph=retain_graph, wrt=wrt)
        return Relevance(rel, out)
    work = tuple(x if x.requires_grad else x.detach().requires_grad_(True) for x in inputs)
    recorder = LatentRecorder(scope.model, latent) if isinstance(latent, (str, list, tuple)) else latent
    entered = contextlib.nullcontext() if scope.active else scope
    with torch.enable_grad(), entered, (recorder if recorder is not None else contextlib.nullcontext()):
        out = forward(*work)
        found = scope.pop_carriers()
        if found and carriers == "refuse":
            raise FirstLayerRuleError(NO_CARRIERS)
        # the backward runs inside the scope: zennit rules keep their backward hooks only while it is active
        latent_t = recorder.tensors() if recorder is not None else []
        if not per_output:
            return _backward(out, work, inputs, found, latent_t, recorder, create_graph, retain_graph)
        parts = [_backward(out[:, k], work, inputs, found, latent_t, recorder, create_graph,
                           retain_graph or create_graph or k < out.shape[1] - 1) for k in range(out.shape[1])]
    return Relevance(_sum_tuples([p.inputs for p in parts]), out, _sum_latent([p.latent for p in parts]), parts)


NO_CARRIERS = ("first-layer rules (flat / wsquare / zbox) are not supported here: their relevance is carried by "
               "auxiliary tensors, not by x * gradient at the explained tensors. Use a composite without them")


def _check_options(second_order: str, latent: Any, per_output: bool, carriers: str) -> None:
    if second_order not in SECOND_ORDERS:
        raise ValueError(f"second_order must be 'autograd' or 'exact', got {second_order!r}")
    if carriers not in ("add", "refuse"):
        raise ValueError(f"carriers must be 'add' or 'refuse', got {carriers!r}")
    if second_order == "exact" and latent:
        raise ValueError("latent relevance is not available with second_order='exact'")
    if second_order == "exact" and per_output:
        raise ValueError("per_output is not available with second_order='exact'")


def _backward(out: Tensor, work: tuple, originals: Sequence[Tensor], carriers: list, latent_t: list,
              recorder: Any, create_graph: bool, retain_graph: bool) -> Relevance:
    """One rule-modified backward seeded with 1 at every entry of ``out``, and ``x * g``."""
    carrier_t = [c for _, c in carriers]
    wrt = list(work) + carrier_t + list(latent_t)
    grads = torch.autograd.grad(out, wrt, grad_outputs=torch.ones_like(out), create_graph=create_graph,
                                retain_graph=retain_graph or None, allow_unused=True) if wrt else ()
    n, m = len(work), len(carrier_t)
    latent_rel = recorder.relevance(grads[n + m:], detach=not create_graph) if recorder is not None else None
    xs, gs = work, grads[:n]
    if not create_graph:
        xs = tuple(x.detach() for x in work)
        gs = tuple(None if g is None else g.detach() for g in gs)
        carriers = [(x, c.detach()) for x, c in carriers]
    rel = [x * (g if g is not None else torch.zeros_like(x)) for x, g in zip(xs, gs)]
    for (x_in, c), g in zip(carriers, grads[n:n + m]):
        if g is None:
            continue
        idx = _match_input(x_in, originals, work)
        if idx is None:
            raise FirstLayerRuleError("a first-layer rule (flat / wsquare / zbox) was applied to a layer whose input "
                                      "is not a model input; map it only to the first layer ('first_layer')")
        rel[idx] = rel[idx] + c * (g if create_graph else g.detach())
    return Relevance(tuple(rel), out, latent_rel)


def _match_input(x: Tensor, originals: Sequence[Tensor], inputs: Sequence[Tensor]) -> Optional[int]:
    for i, (orig, inp) in enumerate(zip(originals, inputs)):
        for cand in (orig, inp):
            if x is cand or (x.shape == cand.shape and x.data_ptr() == cand.data_ptr()):
                return i
    return None


def _sum_tuples(parts: list) -> tuple:
    acc = None
    for p in parts:
        acc = p if acc is None else tuple(a + c for a, c in zip(acc, p))
    return tuple(acc or ())


def _sum_latent(parts: list) -> Optional[dict]:
    if not parts or parts[0] is None:
        return None
    acc = dict(parts[0])
    for p in parts[1:]:
        acc = {k: acc[k] + p[k] for k in acc}
    return acc
