"""Result objects of the hallucination scorers, and their JSON / CSV writers.

Every scorer returns an :class:`EvalResult` (or a subclass) holding

* ``metrics`` -- the headline numbers under fixed names (``accuracy``, ``precision``, ``recall``,
  ``f1``, ``yes_ratio`` for yes/no benchmarks; ``chair_s``, ``chair_i``, ``recall``, ``length`` for
  CHAIR), as fractions in [0, 1] (``length`` in words);
* ``counts`` -- the integers the metrics were computed from;
* ``parser`` -- name and description of the answer parser (yes/no benchmarks);
* ``config`` -- the caller's free-form configuration (model, decoding settings, prompt, seed ...);
* ``metadata`` -- what was scored (dataset, split, positive class, metric definitions);
* ``notes`` -- human-readable remarks about edge cases met while scoring (e.g. a zero division);
* ``items`` -- optional per-item details (parsed prediction, hallucinated words ...).

``to_dict()`` gives a JSON-serialisable dict; :func:`write_json` and :func:`write_csv` write one or
several results.
"""
from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from lime_attr.evaluation._common import PathLike, ensure_parent
from lime_attr.strict_json import jsonable

__all__ = ["EvalResult", "BinaryQAResult", "ChairResult", "write_json", "write_csv", "result_from_dict"]

logger = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """Outcome of scoring one benchmark (one split) with one configuration.

    Parameters
    ----------
    benchmark
        ``"pope"``, ``"audio_qa"``, ``"chair"`` ... .
    metrics
        Metric name -> value. ``None`` (or NaN) marks an undefined value.
    counts
        Count name -> integer.
    config
        Caller's configuration, stored verbatim (converted to JSON types by :meth:`to_dict`).
    parser
        ``{"name", "description"}`` of the answer parser, or ``None`` where no parsing happens.
    metadata
        Description of what was scored.
    notes
        Remarks about edge cases (zero divisions, unparsed answers ...).
    items
        Per-item details; included in :meth:`to_dict` only on request.
    """

    benchmark: str
    metrics: dict[str, Optional[float]]
    counts: dict[str, int]
    config: dict[str, Any] = field(default_factory=dict)
    parser: Optional[dict[str, str]] = None
    metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    items: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Optional[float]:
        """``result["f1"]`` is ``result.metrics["f1"]``."""
        try:
            return self.metrics[name]
        except KeyError:
            raise KeyError(f"no metric {name!r}; available: {', '.join(self.metrics)}") from None

    def to_dict(self, include_items: bool = False) -> dict[str, Any]:
        """JSON-serialisable dict of the result.

        Keys: ``benchmark``, ``metrics``, ``counts``, ``parser``, ``config``, ``metadata``, ``notes``
        and, with ``include_items=True``, ``items``. Non-finite metric values become ``None``.
        """
        out: dict[str, Any] = {
            "benchmark": self.benchmark,
            "metrics": jsonable(self.metrics),
            "counts": jsonable(self.counts),
            "parser": jsonable(self.parser),
            "config": jsonable(self.config),
            "metadata": jsonable(self.metadata),
            "notes": list(self.notes),
        }
        if include_items:
            out["items"] = jsonable(self.items)
        return out

    def to_json(self, path: PathLike, include_items: bool = False, indent: int = 2) -> None:
        """Write :meth:`to_dict` to ``path`` as JSON (parent directories are created)."""
        write_json(self, path, include_items=include_items, indent=indent)

    def to_row(self) -> dict[str, Any]:
        """Flat dict for a CSV row: benchmark, metadata and metric/count columns, parser name, config.

        Metric and count columns keep their names (a count whose name is taken gets a ``count_``
        prefix), metadata columns are prefixed ``meta_``; the config is one JSON string column.
        """
        row: dict[str, Any] = {"benchmark": self.benchmark}
        for k, v in self.metadata.items():
            if isinstance(v, (str, int, float, bool)) or v is None:
                row[f"meta_{k}"] = v
        row["parser"] = self.parser["name"] if self.parser else ""
        for k, v in jsonable(self.metrics).items():
            row[k] = "" if v is None else v
        for k, v in self.counts.items():
            row[f"count_{k}" if k in row else k] = v
        row["config"] = json.dumps(jsonable(self.config), sort_keys=True)
        return row


@dataclass
class BinaryQAResult(EvalResult):
    """Result of a yes/no benchmark (POPE, audio hallucination QA).

    ``metadata["positive_class"]`` says which answer precision, recall and F1 treat as positive
    ("yes" for POPE, "no" for the audio QA of Kuan et al.).
    """

    @property
    def accuracy(self) -> Optional[float]:
        """(TP + TN) / N."""
        return self.metrics["accuracy"]

    @property
    def precision(self) -> Optional[float]:
        """TP / (TP + FP), positive class as in ``positive_class``."""
        return self.metrics["precision"]

    @property
    def recall(self) -> Optional[float]:
        """TP / (number of items whose label is the positive class)."""
        return self.metrics["recall"]

    @property
    def f1(self) -> Optional[float]:
        """2 P R / (P + R)."""
        return self.metrics["f1"]

    @property
    def yes_ratio(self) -> Optional[float]:
        """Answers parsed as "yes" / N."""
        return self.metrics["yes_ratio"]

    @property
    def positive_class(self) -> str:
        """``"yes"`` or ``"no"``."""
        return str(self.metadata.get("positive_class", "yes"))


@dataclass
class ChairResult(EvalResult):
    """Result of CHAIR scoring (Rohrbach et al., 2018)."""

    @property
    def chair_s(self) -> Optional[float]:
        """Captions with at least one hallucinated object / captions."""
        return self.metrics["chair_s"]

    @property
    def chair_i(self) -> Optional[float]:
        """Hallucinated object mentions / object mentions."""
        return self.metrics["chair_i"]

    @property
    def recall(self) -> Optional[float]:
        """Ground-truth objects mentioned / ground-truth objects (summed over captions)."""
        return self.metrics["recall"]

    @property
    def length(self) -> Optional[float]:
        """Average number of words per caption."""
        return self.metrics["length"]


_RESULT_CLASSES: dict[str, type[EvalResult]] = {
    "pope": BinaryQAResult,
    "audio_qa": BinaryQAResult,
    "chair": ChairResult,
}


def result_from_dict(data: Mapping[str, Any]) -> EvalResult:
    """Rebuild a result from :meth:`EvalResult.to_dict` output (the class is chosen by ``benchmark``)."""
    cls = _RESULT_CLASSES.get(str(data.get("benchmark")), EvalResult)
    return cls(
        benchmark=str(data["benchmark"]),
        metrics=dict(data.get("metrics", {})),
        counts=dict(data.get("counts", {})),
        config=dict(data.get("config") or {}),
        parser=data.get("parser"),
        metadata=dict(data.get("metadata") or {}),
        notes=list(data.get("notes") or []),
        items=list(data.get("items") or []),
    )


#: One result, a ``{name: result}`` mapping, or an iterable of results.
ResultOrResults = Union[EvalResult, Mapping[str, EvalResult], Iterable[EvalResult]]


def write_json(
    results: ResultOrResults, path: PathLike, include_items: bool = False, indent: int = 2
) -> None:
    """Write one result, a list of results, or a ``{name: result}`` mapping as JSON.

    A single result is written as its :meth:`~EvalResult.to_dict`; a list as a JSON array; a mapping
    as a JSON object with the same keys.
    """
    if isinstance(results, EvalResult):
        payload: Any = results.to_dict(include_items=include_items)
    elif isinstance(results, Mapping):
        payload = {str(k): r.to_dict(include_items=include_items) for k, r in results.items()}
    else:
        payload = [r.to_dict(include_items=include_items) for r in results]
    p = ensure_parent(path)
    with p.open("w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=indent, sort_keys=False, allow_nan=False)
        fh.write("\n")
    logger.info("wrote %s", p)


def write_csv(results: ResultOrResults, path: PathLike) -> None:
    """Write results as CSV, one row per result (see :meth:`EvalResult.to_row`).

    The columns are the union over all rows, in first-seen order; a mapping's keys go into a leading
    ``name`` column.
    """
    if isinstance(results, EvalResult):
        rows = [results.to_row()]
    elif isinstance(results, Mapping):
        rows = [{"name": str(k), **r.to_row()} for k, r in results.items()]
    else:
        rows = [r.to_row() for r in results]
    columns: list[str] = []
    for row in rows:
        for k in row:
            if k not in columns:
                columns.append(k)
    p = ensure_parent(path)
    with p.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %s", p)
