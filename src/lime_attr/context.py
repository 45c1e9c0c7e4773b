"""The per-forward state that rules read: which scope's model is running its forward right now.

This is the bottom of the library: rules, canonizers' attention bridge and adapters read the running
scope from here, so none of them imports the scope. A scope pushes itself (:func:`running`) around its
model's forward and pops itself after; the stack lives in a ``contextvars.ContextVar``, so threads
and asyncio tasks each see their own, and nested scopes of different models stack correctly.

What a running scope offers its rules is the :class:`ForwardState` protocol below. A custom rule that
computes through an ``autograd.Function`` (hidden from the op-coverage check) calls
:func:`mark_dependent` on its output; a first-layer rule hands its auxiliary tensors to
:func:`add_carrier`.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional, Protocol

from torch import Tensor

__all__ = ["ForwardState", "current_scope", "running", "mark_dependent", "add_carrier"]


class ForwardState(Protocol):
    """What a running scope offers the code that runs inside its model's forward."""

    def mark_dependent(self, out: Any, like: Optional[Tensor] = None) -> None:
        """Tell the op-coverage check that ``out`` depends on the explained input (when ``like`` does)."""

    def depends_on_input(self, *tensors: Any) -> bool:
        """Whether the op-coverage check sees any of ``tensors`` as depending on the explained input."""

    def add_carrier(self, x: Tensor, carrier: Tensor) -> None:
        """Register an auxiliary tensor whose relevance belongs to the module input ``x``."""

    def attention_rule(self, module: Any) -> Any:
        """The attention rule the scope assigned to an attention module (or None)."""

    def transform_attention(self, module: Any, q: Tensor, k: Tensor, v: Tensor, kwargs: dict) -> tuple:
        """``(q, k, v)`` after the scope's attention transforms (LIME's key/value perturbations)."""

    @property
    def checking_ops(self) -> bool:
        """Whether the op mode (op rules and the op-coverage check) runs in the current forward."""

    def enter_covered(self) -> None:
        """Ops from here on are covered by a rule (until :meth:`exit_covered`)."""

    def exit_covered(self) -> None:
        """End of the span opened by :meth:`enter_covered`."""


_RUNNING: ContextVar[tuple] = ContextVar("lime_attr_running_scopes", default=())


def current_scope() -> Optional[ForwardState]:
    """The innermost scope whose model is running its forward now, or None."""
    stack = _RUNNING.get()
    return stack[-1] if stack else None


@contextlib.contextmanager
def running(state: ForwardState) -> Iterator[None]:
    """Make ``state`` the current scope for the duration of the block (nests; restored on exit)."""
    token = _RUNNING.set((*_RUNNING.get(), state))
    try:
        yield
    finally:
        _RUNNING.reset(token)


def mark_dependent(out: Any, like: Optional[Tensor] = None) -> None:
    """:meth:`ForwardState.mark_dependent` on the current scope; nothing outside a scope."""
    state = current_scope()
    if state is not None:
        state.mark_dependent(out, like)


def add_carrier(x: Tensor, carrier: Tensor) -> bool:
    """:meth:`ForwardState.add_carrier` on the current scope; returns whether a scope took it."""
    state = current_scope()
    if state is None:
        return False
    state.add_carrier(x, carrier)
    return True


Transform = Callable[[Any, Tensor, Tensor, Tensor, dict], tuple]
