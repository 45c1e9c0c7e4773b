"""POPE: Polling-based Object Probing Evaluation (Li et al., EMNLP 2023).

Balanced yes/no questions "Is there a <object> in the image?" over COCO, A-OKVQA and GQA images,
with three ways of drawing the absent objects (negative sampling): ``random``, ``popular`` and
``adversarial``. The positive class is "yes". Metrics (see :mod:`lime_attr.evaluation.binary`):
accuracy, precision, recall, F1 and ``yes_ratio`` = answers parsed as yes / N.

Question files (POPE repository, ``output/<dataset>/<dataset>_pope_<split>.json``) are JSON lines
despite the suffix, one question per line::

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
     "text": "Is there a snowboard in the image?", "label": "yes"}

Answer files are JSON lines too, one answer per line, with ``question_id`` and the model's answer
under ``text`` (LLaVA's ``model_vqa_loader``), ``answer`` (POPE's own script) or ``response``.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lime_attr.evaluation._common import (
    EvaluationDataError,
    PathLike,
    read_json_records,
    require_file,
)
from lime_attr.evaluation.binary import (
    Answers,
    UnparsedPolicy,
    align_answers,
    common_value,
    load_answers,
    normalize_label,
    score_binary_qa,
)
from lime_attr.evaluation.parsing import YES, AnswerParser
from lime_attr.evaluation.results import BinaryQAResult

__all__ = [
    "POPE_DATASETS",
    "POPE_SPLITS",
    "PopeSplit",
    "PopeQuestion",
    "pope_filename",
    "find_pope_file",
    "load_pope_questions",
    "load_answers",
    "align_answers",
    "score_pope",
]

logger = logging.getLogger(__name__)

POPE_DATASETS = ("coco", "aokvqa", "gqa")
#: The three POPE negative-sampling strategies (Li et al., 2023): the one definition of the splits, used by
#: the POPE files, the held-out demo sets (:mod:`lime_attr.models.heldout`), audio-QA's ``sampling`` and
#: the harness.
POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")

#: A POPE split name.
PopeSplit = Literal["random", "popular", "adversarial"]

_FILENAME = re.compile(r"^(?P<dataset>[a-z0-9]+)_pope_(?P<split>[a-z]+)$")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE question: a balanced yes/no existence question about an image (or an audio clip).

    The one question type of lime_attr: :func:`load_pope_questions` fills the fields of the POPE
    files, :func:`lime_attr.models.pope_questions` (the held-out sets of the embedded demo models)
    fills the media and demo fields too.

    Attributes
    ----------
    question_id
        Identifier from the file (an int in the released files); for the held-out demo sets the
        position of the question in its split.
    image
        Image file name, relative to the dataset's image folder (POPE files), or the ``uint8``
        ``(H, W, 3)`` image itself (demo sets); ``None`` for audio.
    text
        The question, e.g. ``"Is there a snowboard in the image?"``.
    label
        ``"yes"`` or ``"no"``.
    dataset, split
        Taken from the file name when it follows ``<dataset>_pope_<split>.json``, else as given.
    extra
        Any other fields of the record (e.g. LLaVA's ``category``).
    object
        The queried object (demo sets: digit or sound class).
    modality
        ``"image"`` or ``"audio"`` (demo sets).
    item_id
        Index of the scene / clip in the held-out item list (items are shared across splits).
    prompt
        The question in the demo models' prompt format (:func:`lime_attr.models.format_prompt`).
    present
        All objects present in the item (demo sets).
    audio, sampling_rate
        ``float32`` waveform and its rate (audio demo set).
    boxes
        Box ``(x0, y0, x1, y1)`` of every present digit (vision demo set).
    spans
        ``(start, end)`` seconds of every present event (audio demo set).
    region
        Box or span of the queried object if present, else ``None``.
    """

    question_id: Any
    image: Any
    text: str
    label: str
    dataset: Optional[str] = None
    split: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    object: Optional[str] = None
    modality: Optional[str] = None
    item_id: Optional[int] = None
    prompt: Optional[str] = None
    present: Optional[list[str]] = None
    audio: Any = None
    sampling_rate: Optional[int] = None
    boxes: Optional[dict[str, tuple[int, int, int, int]]] = None
    spans: Optional[dict[str, tuple[float, float]]] = None
    region: Optional[tuple[Any, ...]] = None

    @property
    def question(self) -> str:
        """The question (an alias of :attr:`text`)."""
        return self.text

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of all fields (arrays are not copied)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def pope_filename(dataset: str, split: str) -> str:
    """``"<dataset>_pope_<split>.json"``, the name used by the POPE repository."""
    _check_dataset_split(dataset, split)
    return f"{dataset}_pope_{split}.json"


def _check_dataset_split(dataset: Optional[str], split: Optional[str]) -> None:
    if dataset is not None and dataset not in POPE_DATASETS:
        raise EvaluationDataError(f"unknown POPE dataset {dataset!r}; expected one of {POPE_DATASETS}")
    if split is not None and split not in POPE_SPLITS:
        raise EvaluationDataError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")


def find_pope_file(root: PathLike, dataset: str, split: str) -> Path:
    """Locate ``<dataset>_pope_<split>.json`` under ``root``.

    Looks in ``root/<dataset>/`` (POPE's ``output/`` layout), then ``root/`` itself; ``.jsonl`` is
    accepted as suffix too.

    Raises
    ------
    FileNotFoundError
        Naming every path tried.
    """
    name = pope_filename(dataset, split)
    root = Path(root)
    tried = []
    for folder in (root / dataset, root):
        for candidate in (folder / name, folder / (name + "l")):
            tried.append(str(candidate))
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"POPE question file for {dataset}/{split} not found; tried: {', '.join(tried)}")


def load_pope_questions(
    path: PathLike, dataset: Optional[str] = None, split: Optional[str] = None
) -> list[PopeQuestion]:
    """Read a POPE question file.

    Parameters
    ----------
    path
        JSON-lines file (or a JSON array) of records with ``question_id``, ``image``, ``text``,
        ``label``.
    dataset, split
        Override what is inferred from a ``<dataset>_pope_<split>.json`` file name.

    Raises
    ------
    FileNotFoundError
        If the file is missing.
    EvaluationDataError
        On a missing field, a label other than yes/no, a duplicate ``question_id``, or an unknown
        dataset / split name.
    """
    p = require_file(path, "POPE question file")
    stem = p.name.split(".")[0]
    m = _FILENAME.match(stem)
    if m is not None:
        dataset = dataset if dataset is not None else m.group("dataset")
        split = split if split is not None else m.group("split")
    if dataset is not None and dataset not in POPE_DATASETS:
        logger.warning("POPE dataset %r is not one of %s", dataset, POPE_DATASETS)
    _check_dataset_split(None, split)
    records = read_json_records(p, "POPE question file")
    questions: list[PopeQuestion] = []
    seen: set[str] = set()
    for i, rec in enumerate(records, start=1):
        missing = [k for k in ("question_id", "image", "text", "label") if k not in rec]
        if missing:
            raise EvaluationDataError(
                f"POPE question file {str(p)!r}, record {i}: missing field(s) {missing}; expected "
                "question_id, image, text, label"
            )
        key = str(rec["question_id"])
        if key in seen:
            raise EvaluationDataError(f"POPE question file {str(p)!r}: duplicate question_id {rec['question_id']!r}")
        seen.add(key)
        label = normalize_label(rec["label"], f"{p.name}, record {i}")
        extra = {k: v for k, v in rec.items() if k not in ("question_id", "image", "text", "label")}
        questions.append(
            PopeQuestion(
                question_id=rec["question_id"], image=str(rec["image"]), text=str(rec["text"]),
                label=label, dataset=dataset, split=split, extra=extra,
            )
        )
    if not questions:
        raise EvaluationDataError(f"POPE question file {str(p)!r} holds no questions")
    logger.info("loaded %d POPE questions from %s (%s/%s)", len(questions), p, dataset, split)
    return questions


def score_pope(
    questions: Sequence[Any],
    answers: Answers,
    *,
    parser: Union[str, AnswerParser] = "llava_pope",
    unparsed: UnparsedPolicy = "wrong",
    config: Optional[Mapping[str, Any]] = None,
    zero_division: float = 0.0,
    keep_items: bool = True,
) -> BinaryQAResult:
    """Score model answers on POPE questions, "yes" being the positive class.

    Parameters
    ----------
    questions
        :class:`PopeQuestion` objects (or mappings / objects with a ``label``, or label strings).
    answers
        The model's free-form answers: a list aligned with ``questions``, a ``{question_id: answer}``
        mapping, or the path of an answer file (:func:`load_answers`).
    parser
        Answer parser name or object; default LLaVA's rule, which is also POPE's.
    unparsed
        Policy for answers the parser cannot read (see
        :func:`~lime_attr.evaluation.binary.confusion_counts`); irrelevant for ``llava_pope``, which
        always answers.
    config
        Free-form configuration stored in the result (model, decoding, prompt, seed ...).
    zero_division
        Value reported for an undefined precision / recall / F1 (see
        :mod:`lime_attr.evaluation.binary`).
    keep_items
        Store per-question details (id, label, answer, parsed prediction) in ``result.items``.

    Returns
    -------
    BinaryQAResult
        ``metrics``: accuracy, precision, recall, f1, yes_ratio; ``counts``: TP, FP, TN, FN, n, ...;
        ``metadata``: dataset, split (when all questions share them), positive_class="yes".

    Raises
    ------
    EvaluationDataError
        On mismatched lengths, unknown labels, missing answers.
    """
    meta: dict[str, Any] = {}
    for name in ("dataset", "split"):
        value = common_value(questions, name)
        if value is not None:
            meta[name] = value
    return score_binary_qa(
        questions, answers, benchmark="pope", positive=YES, parser=parser, unparsed=unparsed,
        config=config, zero_division=zero_division, id_field="question_id", keep_items=keep_items,
        metadata=meta,
    )
