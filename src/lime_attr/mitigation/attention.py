"""Switching a model's attention implementation for a while, restored exactly.

LIME's inner forwards and its unperturbed logits must come from the same attention kernel; the kernel the
attention rules see is set through transformers' public ``set_attn_implementation``.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import nn

__all__ = ["switch_attention"]


def _configs(model: nn.Module) -> list:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    stack = list(seen.values())
    while stack:
        cfg = stack.pop()
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation_internal") and id(sub) not in seen:
                seen[id(sub)] = sub
                stack.append(sub)
    return list(seen.values())


def switch_attention(model: nn.Module, impl: Optional[str]) -> Callable[[], None]:
    """Set the attention implementation ``impl`` for the whole model; return the function that restores it.

    Parameters
    ----------
    model : PreTrainedModel
    impl : str or None
        ``"eager"``, ``"sdpa"``...; None (or the current implementation) changes nothing.

    Returns
    -------
    callable
        ``restore()``: puts back every (sub-)config's setting exactly.

    Raises
    ------
    TypeError
        If the model has no ``set_attn_implementation``.
    """
    if impl is None or getattr(getattr(model, "config", None), "_attn_implementation", impl) == impl:
        return lambda: None
    saved = [(c, c._attn_implementation_internal) for c in _configs(model)]
    setter = getattr(model, "set_attn_implementation", None)
    if setter is None:
        raise TypeError(f"{type(model).__name__} cannot switch its attention implementation; load it with "
                        f"attn_implementation={impl!r} or set LimeConfig(attn_implementation=None)")
    setter(impl)

    def restore() -> None:
        for c, v in saved:
            c._attn_implementation_internal = v

    return restore
