r"""Confusion counts and metrics of yes/no benchmarks, with a choosable positive class.

POPE (Li et al., EMNLP 2023) takes "yes" as the positive class; the audio hallucination QA of Kuan,
Huang and Lee (Interspeech 2024) takes "no". Both report accuracy, precision, recall, F1 and the share
of "yes" answers. With :math:`P` the positive answer:

.. math::

    TP &= \#\{label = P,\ pred = P\},\quad FP = \#\{label \ne P,\ pred = P\},\\
    TN &= \#\{label \ne P,\ pred \ne P\},\quad FN = \#\{label = P,\ pred \ne P\}\ (\text{parsed}),\\
    N &= TP + FP + TN + FN + U,\\
    \mathrm{accuracy} &= (TP + TN) / N,\qquad
    \mathrm{precision} = TP / (TP + FP),\\
    \mathrm{recall} &= TP / (TP + FN + U_P),\\
    F_1 &= \frac{2\,\mathrm{precision}\cdot\mathrm{recall}}{\mathrm{precision} + \mathrm{recall}}
         = \frac{2\,TP}{2\,TP + FP + FN + U_P},\\
    \mathrm{yes\_ratio} &= \#\{pred = \text{yes}\} / N,

where :math:`U` counts unparsed answers kept in the denominators (policy ``"wrong"``) and :math:`U_P`
those among them whose label is the positive class. Without unparsed answers these are exactly the
formulas of the POPE repository's ``evaluate.py`` and of Kuan et al.'s ``evaluation.py`` (which reports
percentages; here every value is a fraction).

F1 is computed from the counts (the right-hand form), which equals the harmonic mean whenever that is
defined and gives 0 when TP = 0 (where the reference scripts divide 0 by 0).
Undefined ratios -- precision with no predicted positives, recall with no positive labels, F1 with
neither -- take the value ``zero_division`` (default 0.0, scikit-learn's default) and a note is added
to the result; the reference scripts raise ``ZeroDivisionError`` there.

The module also holds the plumbing shared by the POPE and audio-QA scorers: reading answer files
(:func:`load_answers`), putting answers in item order (:func:`align_answers`) and
:func:`score_binary_qa`.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lime_attr.evaluation._common import (
    EvaluationDataError,
    PathLike,
    check_same_length,
    field_of,
    read_json_records,
    require_file,
)
from lime_attr.evaluation.parsing import NO, YES, AnswerParser, get_parser
from lime_attr.evaluation.results import BinaryQAResult

__all__ = [
    "UnparsedPolicy",
    "ConfusionCounts",
    "normalize_label",
    "confusion_counts",
    "binary_metrics",
    "BINARY_METRIC_NAMES",
    "Answers",
    "load_answers",
    "align_answers",
    "score_binary_qa",
]

logger = logging.getLogger(__name__)

#: How a scorer counts an unparsed answer (see the ``unparsed`` argument of the scorers).
UnparsedPolicy = Literal["wrong", "exclude", "error", "yes", "no"]
_POLICIES = ("wrong", "exclude", "error", "yes", "no")
BINARY_METRIC_NAMES = ("accuracy", "precision", "recall", "f1", "yes_ratio")
ANSWER_KEYS = ("text", "answer", "response")

#: Answers: a list aligned with the questions, a ``{question_id: answer}`` mapping, or an answer file.
Answers = Union[Sequence[str], Mapping[Any, str], PathLike]

_LABEL_STRINGS = {"yes": YES, "no": NO}


def normalize_label(value: Any, where: str = "") -> str:
    """Map a ground-truth label to ``"yes"`` / ``"no"``.

    Accepted: the strings yes / no in any case with surrounding whitespace, ``True`` / ``False`` and
    the integers 1 / 0. Anything else raises :class:`EvaluationDataError` naming ``where``.
    """
    if isinstance(value, bool):
        return YES if value else NO
    if isinstance(value, int) and value in (0, 1):
        return YES if value == 1 else NO
    if isinstance(value, str):
        out = _LABEL_STRINGS.get(value.strip().lower())
        if out is not None:
            return out
    loc = f" ({where})" if where else ""
    raise EvaluationDataError(f"unknown label {value!r}{loc}; expected 'yes' or 'no'")


def _check_prediction(value: Any, index: int) -> Optional[str]:
    if value is None or value == YES or value == NO:
        return value
    raise EvaluationDataError(
        f"prediction {index} is {value!r}; parsed predictions must be 'yes', 'no' or None (unparsed)"
    )


@dataclass(frozen=True)
class ConfusionCounts:
    """Counts of a yes/no evaluation for a given positive class.

    ``TP``, ``FP``, ``TN``, ``FN`` count parsed answers only. ``unparsed_pos`` / ``unparsed_neg``
    count unparsed answers kept in the denominators (policy ``"wrong"``) by the label's class;
    ``excluded`` counts answers dropped (policy ``"exclude"``). ``pred_yes`` / ``pred_no`` count parsed
    answers by value, ``label_yes`` / ``label_no`` the kept items by label.
    """

    TP: int
    FP: int
    TN: int
    FN: int
    unparsed_pos: int = 0
    unparsed_neg: int = 0
    excluded: int = 0
    pred_yes: int = 0
    pred_no: int = 0
    label_yes: int = 0
    label_no: int = 0

    @property
    def n(self) -> int:
        """The number of items counted (TP + FP + TN + FN + unparsed kept)."""
        return self.TP + self.FP + self.TN + self.FN + self.unparsed_pos + self.unparsed_neg

    @property
    def unparsed(self) -> int:
        """Unparsed answers kept in the denominators."""
        return self.unparsed_pos + self.unparsed_neg

    def as_dict(self) -> dict[str, int]:
        """Plain dict including ``n`` and ``unparsed``."""
        d = asdict(self)
        d["unparsed"] = self.unparsed
        d["n"] = self.n
        return d


def confusion_counts(
    labels: Sequence[str],
    predictions: Sequence[Optional[str]],
    positive: str = YES,
    unparsed: UnparsedPolicy = "wrong",
) -> ConfusionCounts:
    """Count TP / FP / TN / FN of parsed predictions against labels.

    Parameters
    ----------
    labels
        Ground truth, each ``"yes"`` or ``"no"`` (normalised with :func:`normalize_label`).
    predictions
        Parsed answers: ``"yes"``, ``"no"`` or ``None`` for an unparsed answer.
    positive
        The positive class, ``"yes"`` (POPE) or ``"no"`` (audio QA of Kuan et al.).
    unparsed
        What to do with ``None`` predictions:

        * ``"wrong"`` (default): keep the item and count it as an error -- it is in N, and in the
          recall denominator if its label is the positive class, but it is not a predicted positive;
        * ``"exclude"``: drop the item from every count (reported as ``excluded``);
        * ``"error"``: raise :class:`EvaluationDataError`;
        * ``"yes"`` / ``"no"``: treat the answer as that prediction.

    Raises
    ------
    EvaluationDataError
        On mismatched lengths, unknown labels, predictions outside yes/no/None, or an unparsed answer
        under ``unparsed="error"``.
    """
    check_same_length(labels, predictions, "labels", "predictions")
    pos = normalize_label(positive, "positive class")
    if unparsed not in _POLICIES:
        raise ValueError(f"unparsed must be one of {_POLICIES}, got {unparsed!r}")
    tp = fp = tn = fn = u_pos = u_neg = excluded = 0
    pred_yes = pred_no = label_yes = label_no = 0
    unparsed_idx: list[int] = []
    for i, (lab_raw, pred_raw) in enumerate(zip(labels, predictions)):
        lab = normalize_label(lab_raw, f"item {i}")
        pred = _check_prediction(pred_raw, i)
        if pred is None:
            if unparsed == "error":
                unparsed_idx.append(i)
                continue
            if unparsed == "exclude":
                excluded += 1
                continue
            if unparsed in (YES, NO):
                pred = unparsed
        if lab == YES:
            label_yes += 1
        else:
            label_no += 1
        if pred is None:
            if lab == pos:
                u_pos += 1
            else:
                u_neg += 1
            continue
        if pred == YES:
            pred_yes += 1
        else:
            pred_no += 1
        if pred == pos:
            if lab == pos:
                tp += 1
            else:
                fp += 1
        else:
            if lab == pos:
                fn += 1
            else:
                tn += 1
    if unparsed_idx:
        shown = ", ".join(str(i) for i in unparsed_idx[:10])
        more = f" and {len(unparsed_idx) - 10} more" if len(unparsed_idx) > 10 else ""
        raise EvaluationDataError(
            f"{len(unparsed_idx)} answer(s) could not be parsed as yes/no (items {shown}{more}) and "
            "unparsed='error'; use another parser or unparsed='wrong' / 'exclude'"
        )
    return ConfusionCounts(
        TP=tp, FP=fp, TN=tn, FN=fn, unparsed_pos=u_pos, unparsed_neg=u_neg, excluded=excluded,
        pred_yes=pred_yes, pred_no=pred_no, label_yes=label_yes, label_no=label_no,
    )


def _ratio(num: float, den: float, zero_division: float, what: str, notes: list[str]) -> float:
    if den == 0:
        notes.append(f"{what} is undefined (zero denominator); reported as {zero_division}")
        logger.warning("%s is undefined (zero denominator); reported as %s", what, zero_division)
        return zero_division
    return num / den


def binary_metrics(
    counts: ConfusionCounts, zero_division: float = 0.0
) -> tuple[dict[str, float], list[str]]:
    """Accuracy, precision, recall, F1 and yes_ratio from counts (formulas in the module docstring).

    Parameters
    ----------
    counts
        Output of :func:`confusion_counts`.
    zero_division
        Value of an undefined ratio (``float("nan")`` to propagate; it becomes ``null`` in JSON).

    Returns
    -------
    metrics : dict
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio"}``.
    notes : list of str
        Remarks on undefined ratios.

    Raises
    ------
    EvaluationDataError
        When no item is left to score.
    """
    n = counts.n
    if n == 0:
        raise EvaluationDataError(
            "no items to score" + (f" ({counts.excluded} excluded as unparsed)" if counts.excluded else "")
        )
    notes: list[str] = []
    accuracy = (counts.TP + counts.TN) / n
    precision = _ratio(counts.TP, counts.TP + counts.FP, zero_division, "precision (no predicted positives)", notes)
    recall = _ratio(counts.TP, counts.TP + counts.FN + counts.unparsed_pos, zero_division,
                    "recall (no positive labels)", notes)
    # 2PR/(P+R) written in counts: defined (and 0 when TP = 0) unless there are neither predicted nor
    # actual positives.
    f1 = _ratio(2 * counts.TP, 2 * counts.TP + counts.FP + counts.FN + counts.unparsed_pos, zero_division,
                "f1 (no predicted and no actual positives)", notes)
    yes_ratio = counts.pred_yes / n
    return (
        {"accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1, "yes_ratio": yes_ratio},
        notes,
    )


def load_answers(path: PathLike, answer_key: Optional[str] = None) -> Union[dict[str, str], list[str]]:
    """Read a model-answer file (JSON lines).

    Parameters
    ----------
    path
        One record per line.
    answer_key
        Field holding the answer; by default the first of ``text``, ``answer``, ``response`` present.

    Returns
    -------
    dict or list
        ``{str(question_id): answer}`` when every record has a ``question_id``, otherwise the answers
        in file order (then they are matched to questions by position, as POPE's ``evaluate.py`` does).

    Raises
    ------
    EvaluationDataError
        If a record has no answer field or a question_id repeats.
    """
    p = require_file(path, "answer file")
    records = read_json_records(p, "answer file")
    answers: list[str] = []
    for i, rec in enumerate(records, start=1):
        keys = (answer_key,) if answer_key else ANSWER_KEYS
        key = next((k for k in keys if k in rec), None)
        if key is None:
            raise EvaluationDataError(
                f"answer file {str(p)!r}, record {i}: no answer field; looked for {list(keys)}"
            )
        answers.append(rec[key])
    if records and all("question_id" in r for r in records):
        by_id: dict[str, str] = {}
        for rec, ans in zip(records, answers):
            k = str(rec["question_id"])
            if k in by_id:
                raise EvaluationDataError(f"answer file {str(p)!r}: duplicate question_id {rec['question_id']!r}")
            by_id[k] = ans
        return by_id
    return answers


def align_answers(items: Sequence[Any], answers: Answers, id_field: str = "question_id") -> list[str]:
    """Put answers in the order of ``items``.

    ``answers`` may be a sequence aligned with ``items``, a mapping from item id (compared as strings)
    to answer, or the path of an answer file (see :func:`load_answers`).

    Raises
    ------
    EvaluationDataError
        On a length mismatch, or ids missing from / unknown to the mapping.
    """
    if isinstance(answers, (str, Path)) or hasattr(answers, "__fspath__"):
        answers = load_answers(answers)  # type: ignore[arg-type]
    if isinstance(answers, Mapping):
        by_id = {str(k): v for k, v in answers.items()}
        ids = [str(field_of(it, id_field)) for it in items]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise EvaluationDataError(
                f"{len(missing)} item(s) have no answer (ids {', '.join(missing[:10])}"
                f"{' ...' if len(missing) > 10 else ''})"
            )
        extra = set(by_id) - set(ids)
        if extra:
            raise EvaluationDataError(
                f"{len(extra)} answer(s) belong to no item (ids {', '.join(sorted(extra)[:10])}"
                f"{' ...' if len(extra) > 10 else ''})"
            )
        return [by_id[i] for i in ids]
    answers = list(answers)  # type: ignore[arg-type]
    if len(answers) != len(items):
        raise EvaluationDataError(
            f"{len(items)} questions but {len(answers)} answers; they must align one to one"
        )
    return answers


def _labels(items: Sequence[Any]) -> list[str]:
    out = []
    for i, it in enumerate(items):
        if isinstance(it, str):
            out.append(normalize_label(it, f"item {i}"))
            continue
        try:
            raw = field_of(it, "label")
        except KeyError:
            raise EvaluationDataError(f"item {i} has no 'label'") from None
        out.append(normalize_label(raw, f"item {i}"))
    return out


def common_value(items: Sequence[Any], name: str) -> Optional[str]:
    values = set()
    for it in items:
        try:
            values.add(field_of(it, name))
        except (KeyError, TypeError):
            return None
    return values.pop() if len(values) == 1 else None


def score_binary_qa(
    items: Sequence[Any],
    answers: Answers,
    *,
    benchmark: str,
    positive: str,
    parser: Union[str, AnswerParser],
    unparsed: UnparsedPolicy,
    config: Optional[Mapping[str, Any]],
    zero_division: float,
    id_field: str,
    keep_items: bool,
    metadata: Mapping[str, Any],
) -> BinaryQAResult:
    """Shared implementation of :func:`score_pope` and :func:`~lime_attr.evaluation.score_audio_qa`."""
    if len(items) == 0:
        raise EvaluationDataError("no items to score")
    labels = _labels(items)
    try:
        aligned = align_answers(items, answers, id_field=id_field)
    except KeyError:
        raise EvaluationDataError(
            f"answers were given by id but the items have no {id_field!r}; pass answers as a list"
        ) from None
    p = get_parser(parser)
    preds = [p(a) for a in aligned]
    counts = confusion_counts(labels, preds, positive=positive, unparsed=unparsed)
    metrics, notes = binary_metrics(counts, zero_division=zero_division)
    if counts.unparsed or counts.excluded:
        notes.append(
            f"{counts.unparsed + counts.excluded} answer(s) unparsed by {p.name!r} "
            f"(policy {unparsed!r})"
        )
    meta = {
        "positive_class": normalize_label(positive),
        "unparsed_policy": unparsed,
        "zero_division": zero_division,
        **metadata,
    }
    per_item: list[dict[str, Any]] = []
    if keep_items:
        for i, (it, lab, ans, pred) in enumerate(zip(items, labels, aligned, preds)):
            try:
                item_id = field_of(it, id_field)
            except (KeyError, TypeError):
                item_id = i
            per_item.append({"id": item_id, "label": lab, "answer": ans, "prediction": pred})
    return BinaryQAResult(
        benchmark=benchmark,
        metrics=metrics,
        counts=counts.as_dict(),
        config=dict(config or {}),
        parser=p.info(),
        metadata=meta,
        notes=notes,
        items=per_item,
    )
