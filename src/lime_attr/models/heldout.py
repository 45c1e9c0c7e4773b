"""Held-out evaluation data of the demo models: POPE-style yes/no sets and description (CHAIR) sets.

Everything here is a deterministic function of its arguments; the held-out digit images come from the
held-out pool (disjoint from training), held-out clips from seeds the training script never uses.

POPE construction (Li et al., EMNLP 2023, adapted): one set of scenes / clips is shared by the three
splits. For each item, ``m = min(pairs_per_item, #present)`` present objects are asked about (label
``"yes"``, the same objects in every split) and ``m`` absent objects (label ``"no"``) chosen by the
split's negative sampling:

``random``
    uniformly among the absent objects;
``popular``
    the most frequent objects of the *training* distribution that are absent;
``adversarial``
    the absent objects that co-occur most with the present ones in the training distribution
    (score ``max_{p present} P(o | p)``), so the partner of a present paired object always comes first.

Hence every split has exactly 50 % "yes". The held-out scenes are drawn with a weaker co-occurrence
prior than training (``partner_prob = 0.5`` instead of 0.9), so that the adversarial split contains many
items where the prior points to an absent object.

Every builder takes ``corruption=`` (a spec of :mod:`lime_attr.models.corruption`, e.g. ``"noise:0.3"``,
``"snr:-5"`` or ``"degraded"``): the same items with degraded images / waveforms, so that the models
have to fall back on their priors. ``None`` (the default) gives the clean items, bit-identical to a call
without the keyword; labels, boxes and spans never change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..evaluation.pope import POPE_SPLITS, PopeQuestion, PopeSplit
from .corruption import CorruptionSpec, parse_corruption
from .priors import HELDOUT_PARTNER_PROB, CooccurrencePrior
from .processing import description_question, existence_question, format_prompt
from .scenes import DIGIT_PRIOR, DigitScene, make_scenes
from .sounds import SOUND_PRIOR, SoundClip, make_clips
from .tasks import resolve_task

__all__ = [
    "POPE_SPLITS",
    "DEFAULT_SEED",
    "PopeQuestion",
    "DescriptionItem",
    "heldout_items",
    "pope_questions",
    "pope_splits",
    "description_items",
    "resolve_task",
    "object_names",
    "task_prior",
]

#: Default seed of the held-out items (training never draws from it).
DEFAULT_SEED: int = 2024


@dataclass
class DescriptionItem:
    """One item of the description (CHAIR-style) set.

    Attributes
    ----------
    item_id : int
        Index in the set.
    modality : str
        ``"image"`` or ``"audio"``.
    question : str
        ``"List the digits."`` / ``"List the sounds."``.
    prompt : str
        The question in the demo models' prompt format.
    objects : list of str
        Ground-truth objects, canonical order.
    reference : str
        Ground-truth description (objects joined by spaces).
    image, audio, sampling_rate, boxes, spans
        As in :class:`~lime_attr.evaluation.PopeQuestion`.
    """

    item_id: int
    modality: str
    question: str
    prompt: str
    objects: list[str]
    reference: str
    image: np.ndarray | None = None
    audio: np.ndarray | None = None
    sampling_rate: int | None = None
    boxes: dict[str, tuple[int, int, int, int]] | None = None
    spans: dict[str, tuple[float, float]] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of all fields (arrays are not copied)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _prior(model_name: str) -> CooccurrencePrior:
    return DIGIT_PRIOR if model_name == "digits-llava" else SOUND_PRIOR


def object_names(task: str) -> tuple[str, ...]:
    """Object names of a task in canonical order (digits ``"0"``-``"9"`` or the sound classes)."""
    return _prior(resolve_task(task)).names


def task_prior(task: str) -> CooccurrencePrior:
    """The :class:`~lime_attr.models.priors.CooccurrencePrior` of a task's data."""
    return _prior(resolve_task(task))


def heldout_items(
    task: str,
    n_items: int,
    seed: int = DEFAULT_SEED,
    partner_prob: float = HELDOUT_PARTNER_PROB,
    corruption: CorruptionSpec = None,
) -> list[DigitScene] | list[SoundClip]:
    """Held-out scenes (vision) or clips (audio).

    Parameters
    ----------
    task : str
        ``"vision"`` / ``"digits-llava"`` or ``"audio"`` / ``"tones-qwen2audio"``.
    n_items : int
        Number of items.
    seed : int
        Seed of the items.
    partner_prob : float
        Co-occurrence strength of the prior (0.5 by default, 0.9 reproduces the training distribution).
    corruption : str, Corruption, mapping or None
        Degrade every image / waveform (:func:`~lime_attr.models.corruption.parse_corruption`); item
        ``i`` is corrupted with the key ``(seed, i)``, so a set is a deterministic function of
        ``(seed, corruption)``. Objects, boxes and spans are unchanged.

    Returns
    -------
    list of DigitScene or list of SoundClip
    """
    name = resolve_task(task)
    corrupt = parse_corruption(corruption, name)
    if name == "digits-llava":
        scenes = make_scenes(n_items, seed=seed, split="heldout", partner_prob=partner_prob)
        if corrupt is None:
            return scenes
        return [replace(s, image=corrupt.apply_image(s.image, (seed, i))) for i, s in enumerate(scenes)]
    clips = make_clips(n_items, seed=seed, split="heldout", partner_prob=partner_prob)
    if corrupt is None:
        return clips
    return [replace(c, audio=corrupt.apply_audio(c.audio, (seed, i))) for i, c in enumerate(clips)]


def _negatives(
    prior: CooccurrencePrior, present: list[int], m: int, split: str, rng: np.random.Generator
) -> list[int]:
    absent = [i for i in range(prior.num_objects) if i not in present]
    if split == "random":
        return [int(i) for i in rng.choice(absent, size=m, replace=False)]
    if split == "popular":
        order = prior.popular_order()
        return [i for i in order if i in absent][:m]
    if split == "adversarial":
        _, cooc = prior.statistics()
        score = cooc[present].max(axis=0)
        shuffled = [int(i) for i in rng.permutation(absent)]  # random tie breaking
        return sorted(shuffled, key=lambda i: -score[i])[:m]
    raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")


def pope_questions(
    task: str,
    split: PopeSplit = "random",
    n_items: int = 150,
    pairs_per_item: int = 2,
    seed: int = DEFAULT_SEED,
    partner_prob: float = HELDOUT_PARTNER_PROB,
    corruption: CorruptionSpec = None,
) -> list[PopeQuestion]:
    """POPE-style balanced yes/no questions on held-out items.

    Parameters
    ----------
    task : str
        ``"vision"`` / ``"digits-llava"`` or ``"audio"`` / ``"tones-qwen2audio"``.
    split : {"random", "popular", "adversarial"}
        Negative sampling.
    n_items : int
        Number of scenes / clips (the default 150 gives about 480 questions).
    pairs_per_item : int
        At most this many yes and as many no questions per item.
    seed : int
        Seed of items and sampling.
    partner_prob : float
        Co-occurrence strength of the held-out items.
    corruption : str, Corruption, mapping or None
        Degraded media (see :func:`heldout_items`); questions and labels are those of the clean set.

    Returns
    -------
    list of lime_attr.evaluation.PopeQuestion
        Exactly half of them labelled ``"yes"``; per item alternating yes / no.
    """
    name = resolve_task(task)
    prior = _prior(name)
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    items = heldout_items(name, n_items, seed=seed, partner_prob=partner_prob, corruption=corruption)
    split_code = POPE_SPLITS.index(split)
    questions: list[PopeQuestion] = []
    for item_id, item in enumerate(items):
        present = [prior.names.index(o) for o in item.objects]
        m = min(pairs_per_item, len(present), prior.num_objects - len(present))
        pos_rng = np.random.default_rng((seed, item_id, 7))
        neg_rng = np.random.default_rng((seed, item_id, 11 + split_code))
        positives = [int(i) for i in pos_rng.choice(present, size=m, replace=False)]
        negatives = _negatives(prior, present, m, split, neg_rng)
        for pos, neg in zip(positives, negatives):
            for obj_idx, label in ((pos, "yes"), (neg, "no")):
                questions.append(_question(name, item, item_id, prior.names[obj_idx], label, split,
                                           len(questions)))
    return questions


def _question(name: str, item: DigitScene | SoundClip, item_id: int, obj: str, label: str, split: str,
              question_id: int) -> PopeQuestion:
    text = existence_question(name, obj)
    common = dict(
        question_id=question_id,
        text=text,
        label=label,
        object=obj,
        split=split,
        item_id=item_id,
        prompt=format_prompt(name, text),
        present=list(item.objects),
    )
    if isinstance(item, DigitScene):
        return PopeQuestion(modality="image", image=item.image, boxes=item.boxes, region=item.boxes.get(obj), **common)
    return PopeQuestion(
        modality="audio",
        image=None,
        audio=item.audio,
        sampling_rate=item.sampling_rate,
        spans=item.spans,
        region=item.spans.get(obj),
        **common,
    )


def pope_splits(task: str, corruption: CorruptionSpec = None, **kwargs: Any) -> dict[str, list[PopeQuestion]]:
    """All three POPE splits, ``{split: pope_questions(task, split, corruption=corruption, **kwargs)}``."""
    return {split: pope_questions(task, split, corruption=corruption, **kwargs) for split in POPE_SPLITS}


def description_items(
    task: str,
    n_items: int = 100,
    seed: int = DEFAULT_SEED + 1,
    partner_prob: float = HELDOUT_PARTNER_PROB,
    corruption: CorruptionSpec = None,
) -> list[DescriptionItem]:
    """Held-out description requests with their ground-truth object sets (for CHAIR-style scoring).

    Parameters
    ----------
    task : str
        ``"vision"`` / ``"digits-llava"`` or ``"audio"`` / ``"tones-qwen2audio"``.
    n_items : int
        Number of items.
    seed : int
        Seed of the items (differs from the POPE default so the two sets do not share items).
    partner_prob : float
        Co-occurrence strength of the held-out items.
    corruption : str, Corruption, mapping or None
        Degraded media (see :func:`heldout_items`); the ground-truth objects are unchanged.

    Returns
    -------
    list of DescriptionItem
    """
    name = resolve_task(task)
    question = description_question(name)
    out: list[DescriptionItem] = []
    for item_id, item in enumerate(
        heldout_items(name, n_items, seed=seed, partner_prob=partner_prob, corruption=corruption)
    ):
        common = dict(
            item_id=item_id,
            question=question,
            prompt=format_prompt(name, question),
            objects=list(item.objects),
            reference=item.description(),
        )
        if isinstance(item, DigitScene):
            out.append(DescriptionItem(modality="image", image=item.image, boxes=item.boxes, **common))
        else:
            out.append(
                DescriptionItem(
                    modality="audio", audio=item.audio, sampling_rate=item.sampling_rate, spans=item.spans, **common
                )
            )
    return out
