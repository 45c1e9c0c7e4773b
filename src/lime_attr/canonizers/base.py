"""Canonizer base and registry (placeholder until the Hugging Face canonizers land)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import UnknownNameError, UnsupportedModelError

_CANONIZERS: dict[str, type] = {}


class Canonizer:
    """Declarative per-family adapter applied to one model instance inside a scope."""

    model_types: tuple[str, ...] = ()

    def apply(self, model: nn.Module, scope: Any) -> dict:
        """Prepare ``model`` (reversibly, via ``scope``) and return site overrides."""
        return {}


def register_canonizer(*model_types: str) -> Callable[[type], type]:
    """Class decorator registering a canonizer for ``model_types``."""

    def decorator(cls: type) -> type:
        cls.model_types = tuple(model_types)
        for mt in model_types:
            _CANONIZERS[mt] = cls
        return cls

    return decorator


def available_canonizers() -> list[str]:
    """Sorted model types that have a canonizer."""
    return sorted(_CANONIZERS)


def get_canonizer(model_type: str) -> Canonizer:
    """The canonizer registered for ``model_type``."""
    try:
        return _CANONIZERS[model_type]()
    except KeyError:
        raise UnknownNameError(f"no canonizer named {model_type!r}; available: {available_canonizers()}") from None


def canonizer_for(model: nn.Module) -> Canonizer:
    """The canonizer for ``model.config.model_type``; a clear error if the type is unsupported."""
    mt = model.config.model_type
    if mt not in _CANONIZERS:
        raise UnsupportedModelError(
            f"no canonizer is registered for model_type {mt!r} ({type(model).__name__}). Supported: "
            f"{', '.join(available_canonizers()) or '(none yet)'}. See the docs page 'Writing a canonizer' "
            "(docs/writing_a_canonizer.rst) to add one in a few lines with @register_canonizer."
        )
    return _CANONIZERS[mt]()
