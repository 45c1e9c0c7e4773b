"""Shared plumbing of the evaluation package: its error type, file reading and JSON conversion.

Nothing here is benchmark specific. The loaders of :mod:`~lime_attr.evaluation.pope`,
:mod:`~lime_attr.evaluation.audio_qa` and :mod:`~lime_attr.evaluation.chair` read their files through
these helpers so that a missing file or a malformed line always produces the same kind of message
(the path, the line number and what was expected).
"""
from __future__ import annotations

import csv
import json
import logging
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

