"""Prior probes: held-out clean-input question sets that separate prior-driven errors from blindness.

Each probe item is a clean held-out scene (``digits-llava``) or clip (``tones-qwen2audio``) built around
one co-occurring pair ``(a, b)`` of the task's prior (``3 <-> 8``, ``1 <-> 7``; ``chirp <-> click``,
``hum <-> buzz``), with one yes/no existence question. The conditions:

``conflict``
    one member of the pair is present, the question asks about its missing partner. Label ``"no"``;
    the prior says yes.
``consistent_yes``
    both members are present, the question asks about one of them. Label ``"yes"``.
``consistent_no``
    neither member is present, the question asks about one of them. Label ``"no"``.
``control``
    the ``conflict`` scenes (same seed, same scenes), asked about an absent object that is not the
    partner. Label ``"no"``.

Besides the focus pair a scene holds up to three more objects, drawn as *units*: an unpaired object, or
the other pair complete (so a scene never holds a second broken pair). The number of extra objects is
uniform over the feasible sizes, the set uniform among those of that size, positions (grid cells or
audio slots) uniform, and the queried object uniform among the condition's choices.

An item is identified by its *key*: condition, focus pair, every present object with its position, and
the queried object. Keys are split by a stable hash (CRC-32 of the key) into a ``"validation"`` half
(for checkpoint and hyper-parameter choices) and a ``"test"`` half (for claims), so the two splits never
share a scene layout; within a call the keys are distinct. Media (digit glyphs from the held-out pool,
synthesised events) come from a random stream seeded by ``(seed, condition, split)``. Everything is a
deterministic function of the arguments: no iteration over Python sets or hash order.

:func:`prior_descriptions` gives the ``conflict`` scenes with the description request instead, scored by
the partner-hallucination rate (the absent partner is listed) and CHAIR_i.
"""

from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from .heldout import resolve_task
from .priors import CooccurrencePrior
from .processing import description_question, existence_question, format_prompt
from .scenes import DIGIT_PRIOR, GRID, make_scene
from .sounds import SOUND_PRIOR, make_clip

__all__ = [
    "PROBE_CONDITIONS",
    "PROBE_SPLITS",
    "DEFAULT_PROBE_SEED",
    "ProbeItem",
    "prior_probe",
    "prior_descriptions",
    "probe_capacity",
]

#: The probe conditions, in report order.
PROBE_CONDITIONS: tuple[str, ...] = ("conflict", "consistent_yes", "consistent_no", "control")
#: The two disjoint halves of every condition's key space.
PROBE_SPLITS: tuple[str, ...] = ("validation", "test")
#: Default seed of the probe media streams.
DEFAULT_PROBE_SEED: int = 0
_PRIORS = {"digits-llava": DIGIT_PRIOR, "tones-qwen2audio": SOUND_PRIOR}
_POSITIONS = {"digits-llava": GRID * GRID, "tones-qwen2audio": 4}
_MAX_OBJECTS = 4
_ENUMERATE_LIMIT = 200_000
# Key-space sizes are ~2.4e7 (digits) and ~1e3 (tones); above _ENUMERATE_LIMIT a split holds about half
# of the keys, and this fraction is a safe floor for it.
_LARGE_SPLIT_FRACTION = 0.45

Key = tuple[str, tuple[str, str], tuple[tuple[str, int], ...], str]


@dataclass
class ProbeItem:
    """One prior-probe question on a clean held-out scene or clip.

    Attributes
    ----------
    item_id : int
        Index in the probe set.
    condition : str
        One of :data:`PROBE_CONDITIONS` (``"description"`` for :func:`prior_descriptions`).
    split : str
        ``"validation"`` or ``"test"``.
    modality : str
        ``"image"`` or ``"audio"``.
    question, prompt : str
        The question and the full prompt (:func:`~lime_attr.models.processing.format_prompt`).
    label : str
        ``"yes"`` or ``"no"`` (the reference description for description items).
    object : str or None
        The queried object (``None`` for description items).
    pair : tuple of str
        The focus pair ``(a, b)`` of the item.
    partner : str or None
        The absent partner in ``conflict`` / ``control`` / description scenes, else ``None``.
    present : list of str
        Objects present, canonical order.
    regions : dict
        Box ``(x0, y0, x1, y1)`` (pixels) or span ``(start, end)`` (seconds) of every present object.
    image : numpy.ndarray or None
        ``uint8`` ``(32, 32, 3)`` image.
    waveform : numpy.ndarray or None
        ``float32`` waveform at ``sampling_rate``.
    sampling_rate : int or None
        16000 for audio.
    """

    item_id: int
    condition: str
    split: str
    modality: str
    question: str
    prompt: str
    label: str
    object: str | None
    pair: tuple[str, str]
    partner: str | None
    present: list[str]
    regions: dict[str, tuple[Any, ...]]
    image: np.ndarray | None = None
    waveform: np.ndarray | None = None
    sampling_rate: int | None = None

    @property
    def audio(self) -> np.ndarray | None:
        """Alias of :attr:`waveform` (the name the held-out sets use)."""
        return self.waveform

    @property
    def objects(self) -> list[str]:
        """Alias of :attr:`present`."""
        return self.present

    @property
    def boxes(self) -> dict[str, tuple[Any, ...]] | None:
        """:attr:`regions` of an image item, else ``None``."""
        return self.regions if self.modality == "image" else None

    @property
    def spans(self) -> dict[str, tuple[Any, ...]] | None:
        """:attr:`regions` of an audio item, else ``None``."""
        return self.regions if self.modality == "audio" else None

    @property
    def region(self) -> tuple[Any, ...] | None:
        """Region of the queried object if it is present, else ``None``."""
        return self.regions.get(self.object) if self.object is not None else None

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` of all fields (arrays are not copied)."""
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _model_name(model_name: str) -> str:
    try:
        return resolve_task(model_name)
    except ValueError:
        raise ValueError(
            f"no prior probe set for model {model_name!r}; probe sets exist for "
            f"{sorted(_PRIORS)} (the builtin demo models)"
        ) from None


def _check_condition(condition: str) -> None:
    if condition not in PROBE_CONDITIONS:
        raise ValueError(f"unknown probe condition {condition!r}; expected one of {PROBE_CONDITIONS}")


def _check_split(split: str) -> None:
    if split not in PROBE_SPLITS:
        raise ValueError(f"unknown probe split {split!r}; expected one of {PROBE_SPLITS}")


def _units(prior: CooccurrencePrior, pair: tuple[str, str]) -> list[tuple[str, ...]]:
    """Extra-object units besides ``pair``: unpaired objects and the other pairs (complete)."""
    paired = {o for p in prior.pairs for o in p}
    units: list[tuple[str, ...]] = [(o,) for o in prior.names if o not in paired]
    units += [tuple(p) for p in prior.pairs if tuple(p) != pair]
    return units


def _extra_sets(prior: CooccurrencePrior, pair: tuple[str, str], room: int, nonempty: bool) -> list[list[tuple[str, ...]]]:
    """All extra-unit combinations of at most ``room`` objects, grouped by object count (ascending)."""
    units = _units(prior, pair)
    by_size: dict[int, list[tuple[str, ...]]] = {}
    for r in range(len(units) + 1):
        for combo in itertools.combinations(units, r):
            size = sum(len(u) for u in combo)
            if size <= room and (size > 0 or not nonempty):
                by_size.setdefault(size, []).append(tuple(o for u in combo for o in u))
    return [by_size[s] for s in sorted(by_size)]


def _scene_templates(prior: CooccurrencePrior, condition: str) -> list[tuple[tuple[str, str], list[str], list[str], list]]:
    """Per (pair, base) the base objects, the query choices and the extra sets by size."""
    out = []
    for pair in prior.pairs:
        a, b = pair
        if condition == "conflict":
            for member, partner in ((a, b), (b, a)):
                extras = _extra_sets(prior, pair, _MAX_OBJECTS - 1, nonempty=False)
                out.append((pair, [member], [partner], extras))
        elif condition == "consistent_yes":
            out.append((pair, [a, b], [a, b], _extra_sets(prior, pair, _MAX_OBJECTS - 2, nonempty=False)))
        else:
            out.append((pair, [], [a, b], _extra_sets(prior, pair, _MAX_OBJECTS, nonempty=True)))
    return out


def _split_of(key: Key) -> str:
    return PROBE_SPLITS[zlib.crc32(repr(key).encode()) % 2]


def _all_keys(prior: CooccurrencePrior, condition: str, positions: int):
    for pair, base, partners, extras_by_size in _scene_templates(prior, condition):
        for extras in (e for group in extras_by_size for e in group):
            objects = sorted([*base, *extras], key=prior.names.index)
            for query in partners:
                for cells in itertools.permutations(range(positions), len(objects)):
                    yield (condition, pair, tuple(zip(objects, cells)), query)


def _total_keys(prior: CooccurrencePrior, condition: str, positions: int) -> int:
    total = 0
    for _, base, partners, extras_by_size in _scene_templates(prior, condition):
        for extras in (e for group in extras_by_size for e in group):
            total += len(partners) * math.perm(positions, len(base) + len(extras))
    return total


def probe_capacity(model_name: str, condition: str, split: str = "test") -> int:
    """Most distinct items :func:`prior_probe` can make for a model, condition and split.

    Exact (by enumeration) for key spaces up to 200,000 keys; for larger ones (``digits-llava``) a floor
    of 45 % of the key space (a split holds about half of it).

    Parameters
    ----------
    model_name : str
        ``"digits-llava"`` or ``"tones-qwen2audio"`` (or ``"vision"`` / ``"audio"``).
    condition : str
        One of :data:`PROBE_CONDITIONS`.
    split : {"validation", "test"}
        Which half.

    Returns
    -------
    int
    """
    name = _model_name(model_name)
    _check_condition(condition)
    _check_split(split)
    return _capacity(name, condition, split)


def _split_keys(name: str, condition: str, split: str) -> list[Key] | None:
    """Every key of a split, or None when the key space is too large to enumerate."""
    prior, positions = _PRIORS[name], _POSITIONS[name]
    if _total_keys(prior, condition, positions) > _ENUMERATE_LIMIT:
        return None
    return [k for k in _all_keys(prior, condition, positions) if _split_of(k) == split]


def _capacity(name: str, condition: str, split: str, keys: list[Key] | None = None) -> int:
    condition = "conflict" if condition == "control" else condition  # control asks about the conflict scenes
    keys = _split_keys(name, condition, split) if keys is None else keys
    if keys is None:
        return int(_total_keys(_PRIORS[name], condition, _POSITIONS[name]) * _LARGE_SPLIT_FRACTION)
    return len(keys)


def _draw_key(prior: CooccurrencePrior, condition: str, positions: int, rng: np.random.Generator) -> Key:
    templates = _scene_templates(prior, condition)
    pair, base, partners, extras_by_size = templates[int(rng.integers(len(templates)))]
    group = extras_by_size[int(rng.integers(len(extras_by_size)))]
    extras = group[int(rng.integers(len(group)))]
    objects = sorted([*base, *extras], key=prior.names.index)
    query = partners[int(rng.integers(len(partners)))]
    cells = [int(c) for c in rng.choice(positions, size=len(objects), replace=False)]
    return (condition, pair, tuple(zip(objects, cells)), query)


def _keys(name: str, condition: str, split: str, n: int, rng: np.random.Generator) -> list[Key]:
    prior, positions = _PRIORS[name], _POSITIONS[name]
    enumerated = _split_keys(name, condition, split)
    capacity = _capacity(name, condition, split, enumerated)
    if n > capacity:
        raise ValueError(
            f"n={n} is more than the {capacity} distinct {condition!r} items the {name} probe generator "
            f"can make for the {split!r} split; ask for n <= {capacity}"
        )
    if enumerated is not None and n > capacity // 4:
        order = rng.permutation(len(enumerated))
        return [enumerated[int(i)] for i in order[:n]]
    seen: set[Key] = set()
    keys = []
    while len(keys) < n:
        key = _draw_key(prior, condition, positions, rng)
        if _split_of(key) == split and key not in seen:
            seen.add(key)
            keys.append(key)
    return keys


def _media(name: str, key: Key, rng: np.random.Generator) -> Any:
    prior = _PRIORS[name]
    placed = {prior.names.index(o): cell for o, cell in key[2]}
    classes = sorted(placed)
    if name == "digits-llava":
        return make_scene(rng, split="heldout", digits=classes, cells=placed)
    return make_clip(rng, split="heldout", events=classes, slots=placed)


def _item(name: str, key: Key, item_id: int, split: str, question: str, label: str, scene: Any) -> ProbeItem:
    condition, pair, placed, query = key
    present = list(scene.objects)
    partner = next((o for o in pair if o not in present), None) if condition != "consistent_no" else None
    is_image = name == "digits-llava"
    return ProbeItem(
        item_id=item_id,
        condition=condition,
        split=split,
        modality="image" if is_image else "audio",
        question=question,
        prompt=format_prompt(name, question),
        label=label,
        object=query,
        pair=pair,
        partner=partner,
        present=present,
        regions=dict(scene.boxes if is_image else scene.spans),
        image=scene.image if is_image else None,
        waveform=None if is_image else scene.audio,
        sampling_rate=None if is_image else scene.sampling_rate,
    )


def _stream(seed: int, condition: str, split: str) -> np.random.Generator:
    code = PROBE_CONDITIONS.index("conflict" if condition == "control" else condition)
    # control shares the conflict scenes: same layout draws, same media
    return np.random.default_rng((int(seed), 0x9B0E, code, PROBE_SPLITS.index(split)))


def _check_n(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return int(n)


def prior_probe(
    model_name: str, condition: str, n: int = 200, seed: int = DEFAULT_PROBE_SEED, split: str = "test"
) -> list[ProbeItem]:
    """A prior-probe set: ``n`` distinct clean held-out items of one condition.

    Parameters
    ----------
    model_name : str
        ``"digits-llava"`` or ``"tones-qwen2audio"`` (or ``"vision"`` / ``"audio"``).
    condition : {"conflict", "consistent_yes", "consistent_no", "control"}
        See the module docstring.
    n : int
        Number of items; at most :func:`probe_capacity`.
    seed : int
        Seed of the layout draws and the media.
    split : {"test", "validation"}
        ``"test"`` (default) for claims, ``"validation"`` for choices; the two never share a layout.

    Returns
    -------
    list of ProbeItem

    Raises
    ------
    ValueError
        Unknown model, condition or split, or ``n`` above the generator's capacity.

    Examples
    --------
    >>> from lime_attr.models import prior_probe
    >>> items = prior_probe("digits-llava", "conflict", n=3, seed=0)
    >>> [(it.label, it.object in it.present, it.partner == it.object) for it in items]
    [('no', False, True), ('no', False, True), ('no', False, True)]
    """
    name = _model_name(model_name)
    _check_condition(condition)
    _check_split(split)
    n = _check_n(n)
    rng = _stream(seed, condition, split)
    keys = _keys(name, "conflict" if condition == "control" else condition, split, n, rng)
    if condition == "control":
        keys = [_control_key(name, key, np.random.default_rng((int(seed), 0xC0, i))) for i, key in enumerate(keys)]
    items = []
    for item_id, key in enumerate(keys):
        label = "yes" if key[3] in dict(key[2]) else "no"
        question = existence_question(name, key[3])
        items.append(_item(name, key, item_id, split, question, label, _media(name, key, rng)))
    return items


def _control_key(name: str, key: Key, rng: np.random.Generator) -> Key:
    prior = _PRIORS[name]
    _, pair, placed, partner = key
    objects = [o for o, _ in placed]
    choices = [o for o in prior.names if o not in objects and o != partner]
    return ("control", pair, placed, choices[int(rng.integers(len(choices)))])


def prior_descriptions(
    model_name: str, n: int = 200, seed: int = DEFAULT_PROBE_SEED, split: str = "test"
) -> list[ProbeItem]:
    """Description requests on broken-pair (``conflict``) scenes.

    The scenes are those of ``prior_probe(model_name, "conflict", n, seed, split)``; the question is the
    description request (``"List the digits."``), ``label`` the reference description and ``partner``
    the absent partner whose mention is a partner hallucination.

    Parameters
    ----------
    model_name, n, seed, split
        As in :func:`prior_probe`.

    Returns
    -------
    list of ProbeItem
        ``condition="description"``, ``object=None``.
    """
    name = _model_name(model_name)
    _check_split(split)
    n = _check_n(n)
    rng = _stream(seed, "conflict", split)
    keys = _keys(name, "conflict", split, n, rng)
    question = description_question(name)
    items = []
    for item_id, key in enumerate(keys):
        scene = _media(name, key, rng)
        item = _item(name, key, item_id, split, question, scene.description(), scene)
        item.condition, item.object = "description", None
        items.append(item)
    return items
