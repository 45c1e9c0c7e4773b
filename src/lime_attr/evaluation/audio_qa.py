"""Audio object-hallucination QA (Kuan, Huang and Lee, Interspeech 2024).

POPE-style discriminative questions about sound events in AudioCaps clips ("Is there a sound of
<object> in the audio?"), with random / popular / adversarial negative sampling. Unlike visual POPE,
precision, recall and F1 take **"no" as the positive class** (the benchmark measures how well a model
rejects absent objects); accuracy and ``yes_rate`` (answers parsed as yes / N) complete the report.
``yes_ratio`` carries the same number as ``yes_rate`` so that tables line up with POPE.

Data format
-----------
The authors release the three splits as Hugging Face datasets
(``kuanhuggingface/AudioHallucination_AudioCaps-{Random,Popular,Adversarial}``), one record per
question with the fields

``entry_id``
    Record id.
``audio_index``
    AudioCaps clip id; the audio file is ``<audio_root>/<audio_index>.wav``.
``prompt_text``
    The question given to the model.
``object``
    The sound event asked about.
``attribute``
    ``positive`` if the object is in the clip, ``negative`` otherwise.
``label``
    The correct answer, ``Yes`` / ``No``.
``sampling``
    How the negative object was drawn: ``random``, ``popular`` or ``adversarial``.

:func:`load_audio_qa` reads those records from an export of the dataset as JSON lines, a JSON array,
CSV (header row with the field names) or Parquet (needs ``pyarrow``); nothing is downloaded. An optional
``audio_path`` field overrides the path built from ``audio_root``. :func:`load_audio_qa_responses`
reads the result CSV written by the authors' ``inference.py``
(``entry_id,audio_index,label,response``).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lime_attr.evaluation._common import (
    EvaluationDataError,
    PathLike,
    read_csv_records,
    read_json_records,
    require_file,
)
from lime_attr.evaluation.binary import Answers, UnparsedPolicy, common_value, normalize_label, score_binary_qa
from lime_attr.evaluation.parsing import NO, AnswerParser
from lime_attr.evaluation.pope import POPE_SPLITS
from lime_attr.evaluation.results import BinaryQAResult

__all__ = [
    "AUDIO_QA_SAMPLINGS",
    "AudioQAItem",
    "load_audio_qa",
    "load_audio_qa_responses",
    "score_audio_qa",
]

logger = logging.getLogger(__name__)

#: The negative samplings of the audio-QA files: the POPE splits.
AUDIO_QA_SAMPLINGS = POPE_SPLITS
_REQUIRED = ("audio_index", "prompt_text", "label")
_KNOWN = ("entry_id", "audio_index", "audio_path", "prompt_text", "object", "attribute", "label", "sampling")


@dataclass(frozen=True)
class AudioQAItem:
    """One audio hallucination question.

    Attributes
    ----------
    entry_id
        Record id (the row number when the file has none).
    audio_index
        AudioCaps clip id.
    audio_path
        Path of the audio file, or ``None`` when neither ``audio_root`` nor ``audio_path`` was given.
    prompt_text
        The question.
    label
        ``"yes"`` or ``"no"``.
    object, attribute, sampling
        As in the released data (``None`` when absent).
    extra
        Other fields of the record.
    """

    entry_id: Any
    audio_index: str
    audio_path: Optional[str]
    prompt_text: str
    label: str
    object: Optional[str] = None
    attribute: Optional[str] = None
    sampling: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def _read_records(p: Path) -> list[dict[str, Any]]:
    suffix = p.suffix.lower()
    if suffix == ".csv":
        return read_csv_records(p, "audio QA file")
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(
                f"reading {str(p)!r} needs pyarrow (pip install pyarrow), or export the dataset to JSON "
                "lines / CSV first"
            ) from None
        return [dict(r) for r in pq.read_table(p).to_pylist()]
    return read_json_records(p, "audio QA file")


def load_audio_qa(
    path: PathLike,
    audio_root: Optional[PathLike] = None,
    audio_ext: str = ".wav",
    sampling: Optional[str] = None,
) -> list[AudioQAItem]:
    """Read audio hallucination QA questions (Kuan et al. format, see the module docstring).

    Parameters
    ----------
    path
        ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` export of a split.
    audio_root
        Folder of the AudioCaps clips; ``audio_path = audio_root / (audio_index + audio_ext)``.
    audio_ext
        Audio file suffix.
    sampling
        Keep only records of this sampling type (the records' ``sampling`` field must exist).

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    EvaluationDataError
        On a missing required field (``audio_index``, ``prompt_text``, ``label``), a label other than
        yes/no, an ``attribute`` that contradicts the label, or an unknown sampling type.
    """
    p = require_file(path, "audio QA file")
    if sampling is not None and sampling not in AUDIO_QA_SAMPLINGS:
        raise EvaluationDataError(f"unknown sampling {sampling!r}; expected one of {AUDIO_QA_SAMPLINGS}")
    records = _read_records(p)
    items: list[AudioQAItem] = []
    for i, rec in enumerate(records, start=1):
        where = f"{p.name}, record {i}"
        missing = [k for k in _REQUIRED if rec.get(k) in (None, "")]
        if missing:
            raise EvaluationDataError(
                f"audio QA file {str(p)!r}, record {i}: missing field(s) {missing}; expected at least "
                f"{list(_REQUIRED)}"
            )
        label = normalize_label(rec["label"], where)
        attribute = rec.get("attribute") or None
        if attribute is not None:
            attr = str(attribute).strip().lower()
            if attr not in ("positive", "negative"):
                raise EvaluationDataError(f"{where}: attribute {attribute!r}; expected 'positive' or 'negative'")
            if (attr == "positive") != (label == "yes"):
                raise EvaluationDataError(f"{where}: attribute {attribute!r} contradicts label {rec['label']!r}")
            attribute = attr
        samp = rec.get("sampling") or None
        if samp is not None:
            samp = str(samp).strip().lower()
            if samp not in AUDIO_QA_SAMPLINGS:
                raise EvaluationDataError(f"{where}: sampling {rec['sampling']!r}; expected one of {AUDIO_QA_SAMPLINGS}")
        if sampling is not None:
            if samp is None:
                raise EvaluationDataError(f"{where}: no 'sampling' field to filter on")
            if samp != sampling:
                continue
        audio_index = str(rec["audio_index"])
        if rec.get("audio_path"):
            audio_path: Optional[str] = str(rec["audio_path"])
        elif audio_root is not None:
            audio_path = str(Path(audio_root) / f"{audio_index}{audio_ext}")
        else:
            audio_path = None
        items.append(
            AudioQAItem(
                entry_id=rec.get("entry_id", i - 1),
                audio_index=audio_index,
                audio_path=audio_path,
                prompt_text=str(rec["prompt_text"]),
                label=label,
                object=(str(rec["object"]) if rec.get("object") not in (None, "") else None),
                attribute=attribute,
                sampling=samp,
                extra={k: v for k, v in rec.items() if k not in _KNOWN},
            )
        )
    if not items:
        raise EvaluationDataError(f"audio QA file {str(p)!r} holds no questions" + (f" with sampling={sampling!r}" if sampling else ""))
    logger.info("loaded %d audio QA questions from %s", len(items), p)
    return items


def load_audio_qa_responses(path: PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Read the result CSV of Kuan et al.'s ``inference.py``: ``entry_id,audio_index,label,response``.

    Returns
    -------
    items : list of dict
        ``{"entry_id", "audio_index", "label"}`` dicts (label normalised to yes/no).
    answers : list of str
        The ``response`` column. Pass both to :func:`score_audio_qa`.
    """
    p = require_file(path, "audio QA response file")
    rows = read_csv_records(p, "audio QA response file")
    items: list[dict[str, Any]] = []
    answers: list[str] = []
    for i, row in enumerate(rows, start=1):
        missing = [k for k in ("label", "response") if k not in row or row[k] is None]
        if missing:
            raise EvaluationDataError(
                f"audio QA response file {str(p)!r}, row {i}: missing column(s) {missing}; expected "
                "entry_id,audio_index,label,response"
            )
        items.append({
            "entry_id": row.get("entry_id", i - 1),
            "audio_index": row.get("audio_index"),
            "label": normalize_label(row["label"], f"{p.name}, row {i}"),
        })
        answers.append(row["response"])
    return items, answers


def score_audio_qa(
    items: Sequence[Any],
    answers: Answers,
    *,
    parser: Union[str, AnswerParser] = "kuan2024",
    unparsed: UnparsedPolicy = "wrong",
    config: Optional[Mapping[str, Any]] = None,
    zero_division: float = 0.0,
    keep_items: bool = True,
) -> BinaryQAResult:
    """Score answers on the audio hallucination QA, "no" being the positive class.

    Parameters
    ----------
    items
        :class:`AudioQAItem` objects (or mappings / objects with a ``label``, or label strings).
    answers
        Free-form answers aligned with ``items``, a ``{entry_id: answer}`` mapping, or an answer file.
    parser
        Default ``kuan2024``, the rule of the benchmark's released script.
    unparsed
        Policy for unparsed answers (see :func:`~lime_attr.evaluation.binary.confusion_counts`). The
        released script counts an unparsed answer as a wrong "no": in the precision denominator and
        never correct. ``"wrong"`` (default) keeps it wrong but out of the precision denominator;
        the two agree when every answer parses.
    config
        Free-form configuration stored in the result.
    zero_division
        Value reported for an undefined precision / recall / F1.
    keep_items
        Store per-item details in ``result.items``.

    Returns
    -------
    BinaryQAResult
        ``metrics``: accuracy, precision, recall, f1 (positive class "no"), yes_rate and yes_ratio
        (equal); counts as in :class:`~lime_attr.evaluation.binary.ConfusionCounts` with TP = answered
        "no" to a "no" question.
    """
    meta: dict[str, Any] = {}
    samp = common_value(items, "sampling")
    if samp is not None:
        meta["split"] = samp
    result = score_binary_qa(
        items, answers, benchmark="audio_qa", positive=NO, parser=parser, unparsed=unparsed,
        config=config, zero_division=zero_division, id_field="entry_id", keep_items=keep_items,
        metadata=meta,
    )
    metrics = dict(result.metrics)
    metrics["yes_rate"] = metrics["yes_ratio"]
    result.metrics = {k: metrics[k] for k in ("accuracy", "precision", "recall", "f1", "yes_rate", "yes_ratio")}
    return result
