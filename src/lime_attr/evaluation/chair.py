r"""CHAIR: Caption Hallucination Assessment with Image Relevance (Rohrbach et al., EMNLP 2018).

An object word of a generated caption is *hallucinated* when its category is not among the image's
ground-truth objects. Over a set of captions :math:`c` with ground-truth category sets :math:`G_c`
and object mentions :math:`M_c` (a list: a category mentioned twice counts twice):

.. math::

    \mathrm{CHAIR}_I &= \frac{\sum_c \#\{m \in M_c : \mathrm{cat}(m) \notin G_c\}}{\sum_c |M_c|},\qquad
    \mathrm{CHAIR}_S = \frac{\#\{c : \exists m \in M_c,\ \mathrm{cat}(m) \notin G_c\}}{\#\{c\}},\\
    \mathrm{recall} &= \frac{\sum_c |\{\mathrm{cat}(m) : m \in M_c\} \cap G_c|}{\sum_c |G_c|},\qquad
    \mathrm{length} = \frac{\sum_c \#\mathrm{words}(c)}{\#\{c\}}.

CHAIR_I and CHAIR_S are the definitions of the original code; recall (micro-averaged over captions)
and length follow the extension used by later hallucination work (e.g. OPERA's ``chair.py``).
For COCO, :math:`G_c` is the union of the categories of the image's instance annotations and of the
categories mentioned in its reference captions (parsed exactly like generated captions).

How words become categories (this implementation)
-------------------------------------------------
1. **Tokens**: the caption is lower-cased, typographic apostrophes become ``'``, and tokens are the
   maximal runs matching ``[a-z0-9]+('[a-z]+)?`` -- words and numbers; punctuation and hyphens
   separate tokens. A trailing possessive ``'s`` is ignored for matching. ``length`` counts these
   tokens.
2. **Synonyms**: every synonym (tokenised the same way, so multi-word synonyms such as "hot dog" or
   "teddy bear" are token sequences) maps to its category. A synonym listed under two categories
   keeps the later one (as in the original code) and a warning is logged.
3. **Matching**: scanning left to right, at each position the longest token sequence that is a
   synonym or a phrase rule is taken, and scanning resumes after it; otherwise the scan moves one
   token on.
4. **Plurals**: a sequence matches if it is a synonym as written or after its *last* token is
   singularised. Singular candidates are tried in order, the first that is a synonym wins: an
   irregular table (men, women, children, people, mice, geese, feet, teeth, knives, wives, leaves,
   shelves, wolves, halves, calves, loaves, oxen), ``-ies -> -y``, ``-ves -> -f`` / ``-fe``,
   ``-es -> ''`` after s, x, z, ch, sh or o, and ``-s -> ''`` (not for ``-ss``). Because only synonyms are accepted, a wrong
   candidate never creates an object.
5. **Phrase rules** (COCO, ``coco_rules=True``): the hand-written exceptions of the original code --
   "baby X" / "adult X" is the animal X (bird, cat, dog, horse, sheep, cow, elephant, bear, zebra,
   giraffe, animal, cub), not a person; "passenger jet" / "passenger train" are the vehicle;
   "bow tie" is a tie; "toilet seat" is a toilet; and "seat" is dropped from a caption that also
   mentions "toilet". A rule target that is no synonym (e.g. "animal") yields no object.

The original implementation singularises every token with ``pattern.en`` and tokenises with NLTK;
the two agree on ordinary captions but can differ on rare inflections and punctuation, and its
``length`` counts NLTK tokens including punctuation. It also splits synonym lines on ``", "`` without
stripping, so an entry after a double space (" motor bike", " cheesecake" in the released file) and a
capitalised entry ("iPhone") never match there; here entries are stripped and lower-cased, so they
do. Report which implementation produced a number.

Files (all supplied by the user; nothing is downloaded)
-------------------------------------------------------
* COCO ``instances_<split>.json`` and ``captions_<split>.json`` (several of each may be given, e.g.
  train and val);
* a synonyms file in the original CHAIR format: one category per line, comma-separated synonyms,
  the first being the category name (``person, girl, boy, man, woman, ...``);
* generated captions: a JSON array or JSON lines of ``{"image_id", "caption"}`` records, a
  ``{image_id: caption}`` object, or the original code's ``{"imgToEval": {...}}`` layout.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

from lime_attr.evaluation._common import (
    EvaluationDataError,
    PathLike,
    check_same_length,
    field_of,
    read_json,
    read_json_records,
    require_file,
)
from lime_attr.evaluation.results import ChairResult

__all__ = [
    "CHAIR_METRIC_NAMES",
    "COCO_ANIMAL_WORDS",
    "coco_phrase_rules",
    "tokenize",
    "singular_candidates",
    "ObjectMention",
    "ObjectVocabulary",
    "load_synonyms",
    "load_generated_captions",
    "score_chair",
    "CocoChair",
]

logger = logging.getLogger(__name__)

CHAIR_METRIC_NAMES = ("chair_s", "chair_i", "recall", "length")

_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'"})

_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
    "geese": "goose", "feet": "foot", "teeth": "tooth", "knives": "knife", "wives": "wife",
    "leaves": "leaf", "shelves": "shelf", "wolves": "wolf", "halves": "half", "calves": "calf",
    "loaves": "loaf", "oxen": "ox",
}

COCO_ANIMAL_WORDS = (
    "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub",
)


def coco_phrase_rules() -> tuple[dict[str, Optional[str]], list[tuple[str, str]]]:
    """The COCO-specific exceptions of the original CHAIR code, restated.

    Returns
    -------
    phrase_rules : dict
        ``{"baby dog": "dog", ..., "passenger jet": "jet", "bow tie": "tie", "toilet seat": "toilet"}``.
    drop_if_present : list of tuple
        ``[("seat", "toilet")]`` (drop "seat" when "toilet" is mentioned).
    """
    rules: dict[str, Optional[str]] = {}
    for animal in COCO_ANIMAL_WORDS:
        rules[f"baby {animal}"] = animal
        rules[f"adult {animal}"] = animal
    rules["passenger jet"] = "jet"
    rules["passenger train"] = "train"
    rules["bow tie"] = "tie"
    rules["toilet seat"] = "toilet"
    return rules, [("seat", "toilet")]


def tokenize(text: str) -> list[str]:
    """Lower-case word / number tokens of ``text`` (step 1 of the module docstring)."""
    if not isinstance(text, str):
        raise TypeError(f"expected a caption string, got {type(text).__name__}")
    return _TOKEN.findall(text.lower().translate(_APOSTROPHES))


def _match_form(token: str) -> str:
    return token[:-2] if token.endswith("'s") else token


def singular_candidates(word: str) -> list[str]:
    """Possible singular forms of ``word``, most specific first (step 4 of the module docstring)."""
    out: list[str] = []
    if word in _IRREGULAR:
        out.append(_IRREGULAR[word])
    if len(word) > 3 and word.endswith("ies"):
        out.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        out.extend((word[:-3] + "f", word[:-3] + "fe"))
    if len(word) > 3 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh", "o")):
        out.append(word[:-2])
    if len(word) > 1 and word.endswith("s") and not word.endswith("ss"):
        out.append(word[:-1])
    seen: list[str] = []
    for c in out:
        if c and c != word and c not in seen:
            seen.append(c)
    return seen


@dataclass(frozen=True)
class ObjectMention:
    """One object found in a caption.

    Attributes
    ----------
    text
        The caption tokens that matched, joined by spaces (e.g. ``"hot dogs"``).
    synonym
        The synonym (or phrase-rule target) they matched, in its listed form (``"hot dog"``).
    category
        The category it maps to.
    start
        Index of the first matched token in :func:`tokenize` output.
    """

    text: str
    synonym: str
    category: str
    start: int


class ObjectVocabulary:
    """Object categories and their synonyms, with the matching rules of the module docstring.

    Parameters
    ----------
    synonyms
        ``category -> synonyms``; the category name itself always counts as a synonym. For the digits
        benchmark e.g. ``{"3": ["three"], "7": ["seven"]}``.
    phrase_rules
        ``phrase -> synonym`` (or ``None`` for "not an object"), checked before synonyms at equal
        length, e.g. ``{"baby dog": "dog"}``.
    drop_if_present
        ``(synonym, trigger)`` pairs: mentions matched as ``synonym`` are dropped from a caption in
        which ``trigger`` is also matched.
    plural_handling
        Match plurals through :func:`singular_candidates`.

    Raises
    ------
    EvaluationDataError
        On an empty vocabulary or an empty synonym.
    """

    def __init__(
        self,
        synonyms: Mapping[str, Iterable[str]],
        *,
        phrase_rules: Optional[Mapping[str, Optional[str]]] = None,
        drop_if_present: Iterable[tuple[str, str]] = (),
        plural_handling: bool = True,
    ) -> None:
        if not synonyms:
            raise EvaluationDataError("the object vocabulary is empty")
        self._index: dict[tuple[str, ...], tuple[str, str]] = {}  # tokens -> (synonym, category)
        categories: list[str] = []
        for category, syns in synonyms.items():
            cat = " ".join(tokenize(str(category)))
            if not cat:
                raise EvaluationDataError(f"category name {category!r} has no word characters")
            if isinstance(syns, str):
                raise TypeError(f"synonyms of {category!r} must be a list of strings, not a string")
            categories.append(cat)
            for syn in [cat, *syns]:
                toks = tuple(tokenize(str(syn)))
                if not toks:
                    raise EvaluationDataError(f"empty synonym {syn!r} for category {category!r}")
                prev = self._index.get(toks)
                if prev is not None and prev[1] != cat:
                    logger.warning(
                        "synonym %r is listed for %r and %r; keeping %r", " ".join(toks), prev[1], cat, cat
                    )
                self._index[toks] = (" ".join(toks), cat)
        self.categories: tuple[str, ...] = tuple(dict.fromkeys(categories))
        self._rules: dict[tuple[str, ...], Optional[str]] = {}
        for phrase, target in (phrase_rules or {}).items():
            toks = tuple(tokenize(phrase))
            if not toks:
                raise EvaluationDataError(f"empty phrase rule {phrase!r}")
            self._rules[toks] = None if target is None else " ".join(tokenize(target))
        self.drop_if_present: tuple[tuple[str, str], ...] = tuple(
            (" ".join(tokenize(a)), " ".join(tokenize(b))) for a, b in drop_if_present
        )
        self.plural_handling = plural_handling
        self._max_len = max(len(k) for k in [*self._index, *self._rules])

    def __repr__(self) -> str:
        return (
            f"ObjectVocabulary({len(self.categories)} categories, {len(self._index)} synonyms, "
            f"{len(self._rules)} phrase rules, plural_handling={self.plural_handling})"
        )

    def __contains__(self, word: str) -> bool:
        return self.lookup(word) is not None

    def describe(self) -> dict[str, Any]:
        """Summary stored in result metadata."""
        return {
            "categories": len(self.categories),
            "synonyms": len(self._index),
            "phrase_rules": len(self._rules),
            "drop_if_present": [list(p) for p in self.drop_if_present],
            "plural_handling": self.plural_handling,
        }

    def lookup(self, word: str) -> Optional[str]:
        """Category of a word or phrase (synonym lookup with plural handling), or ``None``."""
        toks = tuple(_match_form(t) for t in tokenize(word))
        for form in self._forms(toks):
            hit = self._index.get(form)
            if hit is not None:
                return hit[1]
        return None

    def category(self, name: str) -> str:
        """Resolve a ground-truth entry -- a category name or one of its synonyms -- to its category.

        Raises
        ------
        EvaluationDataError
            If the name is not in the vocabulary.
        """
        toks = " ".join(tokenize(str(name)))
        if toks in self.categories:
            return toks
        cat = self.lookup(str(name))
        if cat is None:
            raise EvaluationDataError(
                f"ground-truth object {name!r} is not a category or synonym of the vocabulary "
                f"({len(self.categories)} categories, e.g. {', '.join(self.categories[:5])})"
            )
        return cat

    def _forms(self, toks: tuple[str, ...]) -> list[tuple[str, ...]]:
        forms = [toks]
        if self.plural_handling and toks:
            forms.extend(toks[:-1] + (c,) for c in singular_candidates(toks[-1]))
        return forms

    def extract(self, caption: str) -> list[ObjectMention]:
        """Object mentions of a caption, in order (steps 1-5 of the module docstring)."""
        tokens = tokenize(caption)
        forms_src = [_match_form(t) for t in tokens]
        mentions: list[ObjectMention] = []
        i = 0
        while i < len(tokens):
            step = 1
            for n in range(min(self._max_len, len(tokens) - i), 0, -1):
                matched = False
                for form in self._forms(tuple(forms_src[i:i + n])):
                    if form in self._rules:
                        target = self._rules[form]
                        hit = self._index.get(tuple(target.split())) if target else None
                        if hit is not None:
                            mentions.append(ObjectMention(" ".join(tokens[i:i + n]), hit[0], hit[1], i))
                        matched = True
                        break
                    hit = self._index.get(form)
                    if hit is not None:
                        mentions.append(ObjectMention(" ".join(tokens[i:i + n]), hit[0], hit[1], i))
                        matched = True
                        break
                if matched:
                    step = n
                    break
            i += step
        if self.drop_if_present and mentions:
            present = {m.synonym for m in mentions}
            drop = {a for a, b in self.drop_if_present if b in present}
            if drop:
                mentions = [m for m in mentions if m.synonym not in drop]
        return mentions

    @classmethod
    def from_synonyms_file(
        cls, path: PathLike, *, coco_rules: bool = True, plural_handling: bool = True
    ) -> "ObjectVocabulary":
        """Build a vocabulary from a CHAIR synonyms file (see :func:`load_synonyms`).

        ``coco_rules`` adds :func:`coco_phrase_rules`.
        """
        rules, drops = coco_phrase_rules() if coco_rules else ({}, [])
        return cls(load_synonyms(path), phrase_rules=rules, drop_if_present=drops, plural_handling=plural_handling)


def load_synonyms(path: PathLike) -> dict[str, list[str]]:
    """Read a CHAIR synonyms file: one category per line, comma-separated synonyms, first = category.

    Surrounding whitespace of each entry is removed, empty entries and blank lines are skipped. A
    category appearing on two lines has its synonyms merged.

    Raises
    ------
    FileNotFoundError, EvaluationDataError
        Missing file; a file with no category.
    """
    p = require_file(path, "synonyms file")
    out: dict[str, list[str]] = {}
    for line in p.read_text(encoding="utf-8").splitlines():
        entries = [e.strip() for e in line.split(",")]
        entries = [e for e in entries if e]
        if not entries:
            continue
        cat, syns = entries[0], entries[1:]
        bucket = out.setdefault(cat, [])
        bucket.extend(s for s in syns if s not in bucket and s != cat)
    if not out:
        raise EvaluationDataError(f"synonyms file {str(p)!r} holds no category")
    return out


def _norm_image_id(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return value


def load_generated_captions(
    path: PathLike, image_id_key: str = "image_id", caption_key: str = "caption"
) -> tuple[list[Any], list[str]]:
    """Read generated captions.

    Accepted layouts: a JSON array or JSON lines of ``{image_id_key, caption_key}`` records, a
    ``{image_id: caption}`` object, or the original CHAIR code's ``{"imgToEval": {key: record}}``.
    Numeric string ids become ints (COCO ids are ints).

    Returns
    -------
    image_ids : list
        The image ids, in file order.
    captions : list of str
        The captions, aligned with ``image_ids``.
    """
    p = require_file(path, "generated caption file")
    text = p.read_text(encoding="utf-8")
    records: list[dict[str, Any]]
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        data = None  # JSON lines (or malformed: read_json_records reports the line)
    if isinstance(data, list):
        records = read_json_records(p, "generated caption file")
    elif isinstance(data, dict):
        if "imgToEval" in data:
            records = list(data["imgToEval"].values())
        elif image_id_key in data:
            records = [data]
        elif all(isinstance(v, str) for v in data.values()):
            records = [{image_id_key: k, caption_key: v} for k, v in data.items()]
        else:
            raise EvaluationDataError(
                f"generated caption file {str(p)!r}: a JSON object must map image ids to captions or hold "
                "'imgToEval'"
            )
    else:
        records = read_json_records(p, "generated caption file")
    ids: list[Any] = []
    caps: list[str] = []
    for i, rec in enumerate(records, start=1):
        if image_id_key not in rec or caption_key not in rec:
            raise EvaluationDataError(
                f"generated caption file {str(p)!r}, record {i}: needs {image_id_key!r} and {caption_key!r}"
            )
        if not isinstance(rec[caption_key], str):
            raise EvaluationDataError(f"generated caption file {str(p)!r}, record {i}: caption is not a string")
        ids.append(_norm_image_id(rec[image_id_key]))
        caps.append(rec[caption_key])
    return ids, caps


def score_chair(
    captions: Sequence[str],
    ground_truth: Sequence[Collection[str]],
    vocabulary: Union[ObjectVocabulary, Mapping[str, Iterable[str]]],
    *,
    image_ids: Optional[Sequence[Any]] = None,
    config: Optional[Mapping[str, Any]] = None,
    zero_division: float = 0.0,
    keep_items: bool = True,
    metadata: Optional[Mapping[str, Any]] = None,
) -> ChairResult:
    """CHAIR_S, CHAIR_I, recall and length of captions against ground-truth object sets.

    The generic entry point: any object vocabulary (e.g. digits for the embedded benchmark) and any
    ground truth. Formulas in the module docstring.

    Parameters
    ----------
    captions
        Generated captions.
    ground_truth
        For each caption, the objects really present: category names or synonyms of ``vocabulary``.
    vocabulary
        An :class:`ObjectVocabulary` or a ``category -> synonyms`` mapping (default matching rules,
        no phrase rules).
    image_ids
        Optional ids stored in per-item details.
    config
        Free-form configuration stored in the result.
    zero_division
        Value of CHAIR_I when no caption mentions an object, and of recall when no ground truth is
        given (a note is added).
    keep_items
        Store per-caption details (mentions, hallucinated mentions, ground truth) in ``result.items``.
    metadata
        Extra metadata to store.

    Raises
    ------
    EvaluationDataError
        On mismatched lengths, no captions, or a ground-truth object unknown to the vocabulary.
    """
    vocab = vocabulary if isinstance(vocabulary, ObjectVocabulary) else ObjectVocabulary(vocabulary)
    check_same_length(captions, ground_truth, "captions", "ground_truth")
    if image_ids is not None:
        check_same_length(captions, image_ids, "captions", "image_ids")
    if len(captions) == 0:
        raise EvaluationDataError("no captions to score")
    n_caps = n_hall_caps = n_mentions = n_hall = n_gt = n_recalled = n_words = 0
    items: list[dict[str, Any]] = []
    for k, (cap, gt_raw) in enumerate(zip(captions, ground_truth)):
        if not isinstance(cap, str):
            raise EvaluationDataError(f"caption {k} is {type(cap).__name__}, expected str")
        if isinstance(gt_raw, str):
            raise EvaluationDataError(f"ground truth {k} is a string; pass a collection of object names")
        gt = {vocab.category(g) for g in gt_raw}
        mentions = vocab.extract(cap)
        hallucinated = [m for m in mentions if m.category not in gt]
        recalled = {m.category for m in mentions} & gt
        words = len(tokenize(cap))
        n_caps += 1
        n_hall_caps += bool(hallucinated)
        n_mentions += len(mentions)
        n_hall += len(hallucinated)
        n_gt += len(gt)
        n_recalled += len(recalled)
        n_words += words
        if keep_items:
            items.append({
                "image_id": image_ids[k] if image_ids is not None else k,
                "caption": cap,
                "mentions": [[m.text, m.category] for m in mentions],
                "hallucinated": [[m.text, m.category] for m in hallucinated],
                "gt_objects": sorted(gt),
                "chair_s": int(bool(hallucinated)),
                "chair_i": len(hallucinated) / len(mentions) if mentions else 0.0,
                "length": words,
            })
    notes: list[str] = []
    if n_mentions == 0:
        notes.append(f"no caption mentions an object: chair_i is undefined, reported as {zero_division}")
        logger.warning("CHAIR: no object mentions; chair_i reported as %s", zero_division)
    if n_gt == 0:
        notes.append(f"no ground-truth objects: recall is undefined, reported as {zero_division}")
        logger.warning("CHAIR: no ground-truth objects; recall reported as %s", zero_division)
    metrics = {
        "chair_s": n_hall_caps / n_caps,
        "chair_i": n_hall / n_mentions if n_mentions else zero_division,
        "recall": n_recalled / n_gt if n_gt else zero_division,
        "length": n_words / n_caps,
    }
    counts = {
        "n_captions": n_caps,
        "n_hallucinated_captions": n_hall_caps,
        "n_mentions": n_mentions,
        "n_hallucinated_mentions": n_hall,
        "n_gt_objects": n_gt,
        "n_recalled_objects": n_recalled,
        "n_words": n_words,
    }
    meta = {"vocabulary": vocab.describe(), "zero_division": zero_division, **(metadata or {})}
    return ChairResult(
        benchmark="chair", metrics=metrics, counts=counts, config=dict(config or {}), parser=None,
        metadata=meta, notes=notes, items=items,
    )


def _as_list(paths: Union[PathLike, Sequence[PathLike], None]) -> list[PathLike]:
    if paths is None:
        return []
    if isinstance(paths, (str, bytes)) or hasattr(paths, "__fspath__"):
        return [paths]  # type: ignore[list-item]
    return list(paths)  # type: ignore[arg-type]


class CocoChair:
    """CHAIR on COCO: ground truth from instance annotations and reference captions.

    Build it with :meth:`from_files`; call :meth:`score` (or the object itself, which makes it a
    ``scorer`` for :func:`~lime_attr.evaluation.run_eval`).

    Parameters
    ----------
    vocabulary
        The object vocabulary (from the synonyms file).
    image_objects
        ``image_id -> ground-truth categories``.
    sources
        Description of the files the ground truth came from (stored in result metadata).
    """

    def __init__(
        self,
        vocabulary: ObjectVocabulary,
        image_objects: Mapping[Any, Collection[str]],
        sources: Optional[Mapping[str, Any]] = None,
    ) -> None:
        self.vocabulary = vocabulary
        self.image_objects: dict[Any, frozenset[str]] = {k: frozenset(v) for k, v in image_objects.items()}
        self.sources = dict(sources or {})

    def __repr__(self) -> str:
        return f"CocoChair({len(self.image_objects)} images, {self.vocabulary!r})"

    @classmethod
    def from_files(
        cls,
        instances: Union[PathLike, Sequence[PathLike]],
        captions: Union[PathLike, Sequence[PathLike], None],
        synonyms: Union[PathLike, ObjectVocabulary],
        *,
        image_ids: Optional[Iterable[Any]] = None,
        coco_rules: bool = True,
        plural_handling: bool = True,
    ) -> "CocoChair":
        """Load ground truth from COCO annotation files.

        Parameters
        ----------
        instances
            ``instances_<split>.json`` file(s).
        captions
            ``captions_<split>.json`` file(s); ``None`` uses instance annotations only (not CHAIR as
            defined; a warning is logged).
        synonyms
            Synonyms file path, or a ready :class:`ObjectVocabulary`.
        image_ids
            Restrict the ground truth to these images (faster for a 500-image evaluation).
        coco_rules, plural_handling
            Matching options (see the module docstring); ignored when ``synonyms`` is a vocabulary.

        Raises
        ------
        FileNotFoundError
            For a missing file.
        EvaluationDataError
            If an instance category is not in the synonyms file, or a file lacks the COCO keys.
        """
        vocab = (
            synonyms if isinstance(synonyms, ObjectVocabulary)
            else ObjectVocabulary.from_synonyms_file(synonyms, coco_rules=coco_rules, plural_handling=plural_handling)
        )
        wanted = None if image_ids is None else {_norm_image_id(i) for i in image_ids}
        objects: dict[Any, set[str]] = {}
        inst_paths = _as_list(instances)
        cap_paths = _as_list(captions)
        if not inst_paths:
            raise EvaluationDataError("at least one COCO instances file is needed")
        if not cap_paths:
            logger.warning("CHAIR ground truth from instance annotations only (no caption files given)")
        for path in inst_paths:
            data = read_json(path, "COCO instances file")
            if not isinstance(data, dict) or "annotations" not in data or "categories" not in data:
                raise EvaluationDataError(f"COCO instances file {str(path)!r} lacks 'annotations' / 'categories'")
            names = {c["id"]: c["name"] for c in data["categories"]}
            cat_of: dict[Any, str] = {}
            for cid, name in names.items():
                cat = vocab.lookup(name)
                if cat is None:
                    raise EvaluationDataError(
                        f"COCO category {name!r} (id {cid}) of {str(path)!r} is not in the synonyms file; add a "
                        "line starting with it"
                    )
                cat_of[cid] = cat
            for img in data.get("images", []):
                if wanted is None or img["id"] in wanted:
                    objects.setdefault(img["id"], set())
            for ann in data["annotations"]:
                imid = ann["image_id"]
                if wanted is not None and imid not in wanted:
                    continue
                if ann["category_id"] not in cat_of:
                    raise EvaluationDataError(
                        f"{str(path)!r}: annotation {ann.get('id')} has unknown category_id {ann['category_id']}"
                    )
                objects.setdefault(imid, set()).add(cat_of[ann["category_id"]])
        for path in cap_paths:
            data = read_json(path, "COCO captions file")
            if not isinstance(data, dict) or "annotations" not in data:
                raise EvaluationDataError(f"COCO captions file {str(path)!r} lacks 'annotations'")
            for img in data.get("images", []):
                if wanted is None or img["id"] in wanted:
                    objects.setdefault(img["id"], set())
            for ann in data["annotations"]:
                imid = ann["image_id"]
                if wanted is not None and imid not in wanted:
                    continue
                objects.setdefault(imid, set()).update(m.category for m in vocab.extract(ann["caption"]))
        sources = {
            "instances": [str(p) for p in inst_paths],
            "captions": [str(p) for p in cap_paths],
        }
        logger.info("CHAIR ground truth for %d images", len(objects))
        return cls(vocab, objects, sources)

    def ground_truth(self, image_id: Any) -> frozenset[str]:
        """Ground-truth categories of an image.

        Raises
        ------
        EvaluationDataError
            If the image is in none of the annotation files (or was filtered out by ``image_ids``).
        """
        key = _norm_image_id(image_id)
        try:
            return self.image_objects[key]
        except KeyError:
            raise EvaluationDataError(
                f"image_id {image_id!r} is not in the COCO annotation files loaded ({len(self.image_objects)} "
                "images)"
            ) from None

    def score(
        self,
        items: Sequence[Any],
        captions: Sequence[str],
        *,
        config: Optional[Mapping[str, Any]] = None,
        zero_division: float = 0.0,
        keep_items: bool = True,
    ) -> ChairResult:
        """Score generated captions.

        Parameters
        ----------
        items
            Image ids, or records with an ``image_id`` (mapping key or attribute), aligned with
            ``captions``.
        captions
            Generated captions.
        config, zero_division, keep_items
            As in :func:`score_chair`.
        """
        check_same_length(items, captions, "items", "captions")
        ids = []
        for it in items:
            if isinstance(it, (int, str)):
                ids.append(_norm_image_id(it))
            else:
                try:
                    ids.append(_norm_image_id(field_of(it, "image_id")))
                except KeyError:
                    raise EvaluationDataError(f"item {it!r} is neither an image id nor has an 'image_id'") from None
        gts = [sorted(self.ground_truth(i)) for i in ids]
        return score_chair(
            captions, gts, self.vocabulary, image_ids=ids, config=config, zero_division=zero_division,
            keep_items=keep_items, metadata={"dataset": "coco", "ground_truth": self.sources},
        )

    __call__ = score

    def score_file(self, path: PathLike, *, config: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> ChairResult:
        """Score a generated-caption file (:func:`load_generated_captions`)."""
        ids, caps = load_generated_captions(path)
        return self.score(ids, caps, config=config, **kwargs)
