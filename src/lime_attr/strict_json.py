"""Strict JSON values: what every JSON file lime_attr writes is made of (no NaN, no inf)."""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]

logger = logging.getLogger(__name__)


def jsonable(value: Any) -> Any:
    """Convert ``value`` into plain JSON types (dict / list / str / int / float / bool / None).

    Tuples and sets become lists (sets sorted when possible), paths and dtypes become strings,
    dataclasses become dicts, numpy and torch scalars become Python numbers, and non-finite floats
    become ``None`` (strict JSON has no NaN). Anything else is converted with ``str`` and a warning is
    logged, so that a report is always writable.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (set, frozenset)):
        items = [jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    # numpy / torch scalars and 0-d arrays expose .item(); 1-d arrays expose .tolist()
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        try:
            return jsonable(tolist())
        except (TypeError, ValueError, RuntimeError):
            pass
    logger.warning("value of type %s is not JSON-serialisable; stored as its str()", type(value).__name__)
    return str(value)
