"""The KV cache through transformers' current API.

transformers 5.x renamed the cache argument and output field from ``past_key_values`` to ``cache`` (the
old name warns: removed in 5.40). These two helpers use whichever name the installed version declares,
so no call of lime_attr passes a deprecated argument.
"""
from __future__ import annotations

from typing import Any

from transformers.modeling_outputs import CausalLMOutputWithPast

__all__ = ["CACHE_ARGUMENT", "cache_kwargs", "output_cache"]

#: the name of the cache argument and output field of the installed transformers
CACHE_ARGUMENT: str = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) \
    else "past_key_values"


def cache_kwargs(cache: Any) -> dict:
    """``{name: cache}`` for a model call, with the installed transformers' argument name."""
    return {CACHE_ARGUMENT: cache}


def output_cache(output: Any) -> Any:
    """The cache a model call returned (``None`` when it returned none)."""
    return getattr(output, CACHE_ARGUMENT, None)
