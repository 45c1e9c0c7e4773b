"""Shared plumbing of the evaluation package: its error type, file reading and JSON conversion.

Nothing here is benchmark specific. The loaders of :mod:`~lime_attr.evaluation.pope`,
:mod:`~lime_attr.evaluation.audio_qa` and :mod:`~lime_attr.evaluation.chair` read their files through
these helpers so that a missing file or a malformed line always produces the same kind of message
(the path, the line number and what was expected).
"""
from __future__ import annotations

import csv
import dataclasses
import enum
import json
import logging
import math
import os
from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any, Union

from lime_attr.errors import LimeAttrError

__all__ = ["EvaluationDataError", "PathLike"]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]


class EvaluationDataError(LimeAttrError, ValueError):
    """Malformed evaluation input: an unknown label, a missing field, mismatched lengths, a bad file.

    The message names the file (and line) or the argument at fault and what was expected.
    """


def require_file(path: PathLike, what: str) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path`, raising ``FileNotFoundError`` if it is not a file.

    Parameters
    ----------
    path
        The path given by the user.
    what
        What the file should be (used in the message), e.g. ``"POPE question file"``.
    """
    p = Path(path)
    if not p.is_file():
        hint = " (it is a directory)" if p.is_dir() else ""
        raise FileNotFoundError(f"{what} not found: {str(p)!r}{hint}")
    return p


def read_json_records(path: PathLike, what: str) -> list[dict[str, Any]]:
    """Read a file of JSON objects: JSON lines, or one JSON array of objects.

    The POPE question files are JSON lines despite their ``.json`` suffix, while some forks store the
    same records as one array; both are accepted. Blank lines are skipped.

    Parameters
    ----------
    path
        File to read.
    what
        Description of the file for error messages.

    Returns
    -------
    list of dict
        The records in file order.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    EvaluationDataError
        If a line is not valid JSON or a record is not an object.
    """
    p = require_file(path, what)
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EvaluationDataError(f"{what} {str(p)!r} is not valid JSON: {exc}") from exc
        records = list(data)
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise EvaluationDataError(
                    f"{what} {str(p)!r}: element {i} is {type(rec).__name__}, expected a JSON object"
                )
        return records
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationDataError(
                f"{what} {str(p)!r}, line {lineno}: not valid JSON ({exc.msg}); expected one JSON object "
                "per line"
            ) from exc
        if not isinstance(rec, dict):
            raise EvaluationDataError(
                f"{what} {str(p)!r}, line {lineno}: {type(rec).__name__}, expected a JSON object"
            )
        records.append(rec)
    return records


def read_csv_records(path: PathLike, what: str) -> list[dict[str, str]]:
    """Read a CSV file with a header row into a list of dicts (one per row, header names as keys)."""
    p = require_file(path, what)
    with p.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None:
            raise EvaluationDataError(f"{what} {str(p)!r} is empty; expected a header row")
        return [dict(row) for row in reader]


def read_json(path: PathLike, what: str) -> Any:
    """Read one JSON document, with a clear error for a missing or malformed file."""
    p = require_file(path, what)
    try:
        with p.open(encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise EvaluationDataError(f"{what} {str(p)!r} is not valid JSON: {exc}") from exc


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


def ensure_parent(path: PathLike) -> Path:
    """Create the parent directory of ``path`` if needed and return it as a Path."""
    p = Path(path)
    if p.parent and not p.parent.exists():
        p.parent.mkdir(parents=True, exist_ok=True)
    return p


def field_of(item: Any, name: str) -> Any:
    """Return ``item.name`` or ``item[name]``; raise ``KeyError`` when neither exists."""
    if isinstance(item, Mapping):
        return item[name]
    if hasattr(item, name):
        return getattr(item, name)
    raise KeyError(name)


def check_same_length(a: Sized, b: Sized, what_a: str, what_b: str) -> None:
    """Raise :class:`EvaluationDataError` when two sequences differ in length."""
    if len(a) != len(b):
        raise EvaluationDataError(
            f"{what_a} and {what_b} have different lengths ({len(a)} vs {len(b)}); they must align one "
            "to one"
        )

