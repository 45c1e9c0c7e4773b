"""Latent relevance: relevance at hidden states (module outputs) from the same backward pass.

The relevance of a hidden state ``h`` is ``h * g(h)``, where ``g(h)`` is the rule-modified gradient that
the one backward pass of :meth:`lime_attr.LRP.attribute` carries through ``h`` -- exactly what the
relevance of the input is, one layer further in. Under a conservative composite (CP-LRP, bias-free
model) the relevance of any complete cut through the network (e.g. the residual stream after a block)
sums to the explained logit.
"""
from __future__ import annotations

import difflib
from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn

__all__ = ["LatentRecorder"]


def _first_tensor(out: Any) -> Optional[Tensor]:
    if isinstance(out, Tensor):
        return out
    for key in ("last_hidden_state", "logits"):
        value = getattr(out, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    return None


class LatentRecorder:
    """Records the outputs of named modules during one forward, to read their relevance after the backward.

    Parameters
    ----------
    model : nn.Module
    names : sequence of str
        Qualified module names (as in ``model.named_modules()``, e.g. ``"model.layers.0"``). A module
        returning a tuple / ``ModelOutput`` is recorded at its first tensor (the hidden states).

    Notes
    -----
    Enter the recorder *inside* the LRP scope: its hooks then run after the rules' hooks and see each
    module's final output. A module called several times in one forward yields a list (call order).
    """

    def __init__(self, model: nn.Module, names: Union[str, Sequence[str]]) -> None:
        names = [names] if isinstance(names, str) else list(names)
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            hints = {n: difflib.get_close_matches(n, list(modules), n=3) for n in missing}
            raise KeyError(f"latent: no module named {missing} in {type(model).__name__}; close names: {hints}. "
                           "Use the qualified names of model.named_modules()")
        self.names = names
        self.modules = [modules[n] for n in names]
        self.captured: dict[str, list[Tensor]] = {}
        self._handles: list = []

    def __enter__(self) -> "LatentRecorder":
        self.captured = {n: [] for n in self.names}
        for name, module in zip(self.names, self.modules):
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            t = _first_tensor(out)
            if t is None:
                raise TypeError(f"latent: module {name!r} ({type(module).__name__}) returned no tensor")
            if t.requires_grad:
                self.captured[name].append(t)
        return hook

    def tensors(self) -> list[Tensor]:
        """The recorded tensors, flattened in name order (to pass to ``torch.autograd.grad``)."""
        for name in self.names:
            if not self.captured.get(name):
                raise RuntimeError(f"latent: module {name!r} did not run (or its output carries no gradient) in "
                                   "this forward")
        return [t for n in self.names for t in self.captured[n]]

    def relevance(self, grads: Sequence[Optional[Tensor]], detach: bool = True) -> dict[str, Any]:
        """``{name: h * g}`` from the gradients of :meth:`tensors` (same order); lists for repeated calls."""
        out: dict[str, Any] = {}
        it = iter(grads)
        for name in self.names:
            rels = []
            for h in self.captured[name]:
                g = next(it)
                h_ = h.detach() if detach else h
                r = h_ * g if g is not None else h_ * 0
                rels.append(r.detach() if detach else r)
            out[name] = rels[0] if len(rels) == 1 else rels
        return out
