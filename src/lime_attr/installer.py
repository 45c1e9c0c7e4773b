"""The installer a scope hands to canonizers and rules: everything they change is undone on exit.

zennit's removable-handle pattern: whatever a canonizer or a rule attaches to a model instance (a
hook, a changed attribute, a selected attention implementation) is registered here as a handle or an
undo function, and :meth:`Installer.restore` undoes all of it in reverse order, exactly once.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

__all__ = ["Installer"]


class Installer:
    """Collects the undo actions of one scope entry and declarations made by canonizers.

    Examples
    --------
    >>> import torch
    >>> from lime_attr.installer import Installer
    >>> layer = torch.nn.Linear(2, 2)
    >>> installer = Installer()
    >>> _ = installer.add_hook(layer.register_forward_hook(lambda m, a, o: o * 2))
    >>> installer.restore()
    >>> len(layer._forward_hooks)
    0
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []
        self._normalizing: set[int] = set()

    def on_exit(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Run ``fn()`` when the scope exits (after everything registered later). Returns ``fn``."""
        if not callable(fn):
            raise TypeError(f"installer.on_exit takes a function of no arguments, got {fn!r}")
        self._undo.append(fn)
        return fn

    def add_hook(self, handle: Any) -> Any:
        """Remove ``handle`` (anything with ``.remove()``, e.g. a torch hook handle) on exit. Returns it."""
        remove = getattr(handle, "remove", None)
        if not callable(remove):
            raise TypeError(f"installer.add_hook takes a removable handle (with .remove()), e.g. the result of "
                            f"module.register_forward_hook(...), got {handle!r}")
        self._undo.append(remove)
        return handle

    def declare_normalizing(self, modules: Iterable[Any]) -> None:
        """Inside these modules a division by an input-dependent tensor is a normalisation (norm rule)."""
        self._normalizing.update(id(m) for m in modules)

    def is_normalizing(self, module: Any) -> bool:
        """Whether a canonizer declared ``module`` normalizing."""
        return id(module) in self._normalizing

    @property
    def has_normalizing(self) -> bool:
        """Whether any module was declared normalizing."""
        return bool(self._normalizing)

    def restore(self) -> None:
        """Undo everything, newest first; every undo runs even if one fails (the first error is raised)."""
        error: BaseException | None = None
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:  # noqa: BLE001 - keep undoing, re-raise the first
                error = error or exc
        self._normalizing.clear()
        if error is not None:
            raise error
