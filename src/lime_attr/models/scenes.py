"""Digit scenes: the synthetic images the ``digits-llava`` demo model is trained and evaluated on.

A scene is a ``32 x 32`` RGB canvas divided into a fixed ``4 x 4`` grid of ``8 x 8`` cells. Between
one and four *distinct* digit classes are drawn from :data:`DIGIT_PRIOR`; each digit is an ``8 x 8``
grey image from scikit-learn's bundled digits data set (:func:`sklearn.datasets.load_digits`, no
download), drawn white on a faint noise background into its own randomly chosen cell. A digit's
bounding box is therefore its cell, known exactly; the cells coincide with the vision tower's 8 x 8
patches, so each digit is seen by exactly one image token.

Priors (documented in the model card as well):

* pairs ``3 <-> 8`` and ``1 <-> 7`` co-occur: in training scenes ``P(8 | 3)`` and ``P(7 | 1)`` are
  about 0.85 (``partner_prob = 0.9``), in held-out scenes about 0.5 (``partner_prob = 0.5``);
* digits ``0``, ``2`` and ``5`` are drawn three times as often as the others (``popular`` objects).

The digit *images* come from disjoint pools: 75 % of each class's samples for training scenes, the
remaining 25 % for held-out scenes (fixed split, seed 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np

from .priors import TRAIN_PARTNER_PROB, CooccurrencePrior

__all__ = [
    "CANVAS_SIZE",
    "CELL_SIZE",
    "GRID",
    "DIGIT_NAMES",
    "DIGIT_PRIOR",
    "DigitScene",
    "digit_pools",
    "make_scene",
    "make_scenes",
]

#: Side of the square canvas in pixels.
CANVAS_SIZE: int = 32
#: Side of one grid cell in pixels (one digit fills one cell).
CELL_SIZE: int = 8
#: Number of cells per row / column.
GRID: int = CANVAS_SIZE // CELL_SIZE
#: Object names of the vision task, in canonical (description) order.
DIGIT_NAMES: tuple[str, ...] = tuple(str(d) for d in range(10))

#: The prior of the digit scenes, with the pairs (3, 8) and (1, 7) and the digits 0, 2 and 5 three times as frequent.
DIGIT_PRIOR = CooccurrencePrior(
    names=DIGIT_NAMES,
    weights=(3.0, 1.0, 3.0, 1.0, 1.0, 3.0, 1.0, 1.0, 1.0, 1.0),
    pairs=(("3", "8"), ("1", "7")),
    min_objects=1,
    max_objects=4,
)

Split = Literal["train", "heldout"]
_TRAIN_FRACTION = 0.75
_BACKGROUND_MAX = 24  # background noise level (uint8), well below digit ink


@dataclass
class DigitScene:
    """One digit scene with its ground truth.

    Attributes
    ----------
    image : numpy.ndarray
        ``uint8`` array of shape ``(32, 32, 3)`` (height, width, RGB), grey (three equal channels).
    digits : list of str
        Digits present, ascending (the canonical description order).
    boxes : dict of str to tuple of int
        Bounding box ``(x0, y0, x1, y1)`` of each present digit in pixels, end-exclusive.
    cells : dict of str to int
        Grid cell index (row-major, ``0 .. 15``) of each present digit.
    sample_ids : dict of str to int
        Index of the digit image in :func:`sklearn.datasets.load_digits` (for provenance).
    split : str
        ``"train"`` or ``"heldout"`` (which digit-image pool was used).
    """

    image: np.ndarray
    digits: list[str]
    boxes: dict[str, tuple[int, int, int, int]]
    cells: dict[str, int]
    sample_ids: dict[str, int] = field(default_factory=dict)
    split: str = "heldout"

    @property
    def objects(self) -> list[str]:
        """Alias of :attr:`digits` (the generic name used by the benchmark helpers)."""
        return self.digits

    def description(self) -> str:
        """Ground-truth answer to "List the digits." (digits ascending, space separated)."""
        return " ".join(self.digits)


@lru_cache(maxsize=1)
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)  # (1797, 8, 8), values 0..16
    return images, np.asarray(data.target, dtype=np.int64)


@lru_cache(maxsize=2)
def digit_pools(split: Split) -> dict[int, np.ndarray]:
    """Indices into :func:`sklearn.datasets.load_digits` of each class's image pool.

    Parameters
    ----------
    split : {"train", "heldout"}
        Which pool; the two are disjoint (75 % / 25 % of each class, fixed permutation, seed 0).

    Returns
    -------
    dict of int to numpy.ndarray
        Digit class -> sample indices.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    _, targets = _load_digits()
    rng = np.random.default_rng(0)
    pools: dict[int, np.ndarray] = {}
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(targets == cls))
        cut = int(round(_TRAIN_FRACTION * len(idx)))
        pools[cls] = np.sort(idx[:cut] if split == "train" else idx[cut:])
    return pools


def _cell_box(cell: int) -> tuple[int, int, int, int]:
    row, col = divmod(cell, GRID)
    return (col * CELL_SIZE, row * CELL_SIZE, (col + 1) * CELL_SIZE, (row + 1) * CELL_SIZE)


def make_scene(
    rng: np.random.Generator,
    split: Split = "heldout",
    partner_prob: float = TRAIN_PARTNER_PROB,
    digits: list[int] | None = None,
    cells: dict[int, int] | None = None,
) -> DigitScene:
    """Compose one digit scene.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (the scene is a deterministic function of its state).
    split : {"train", "heldout"}
        Digit-image pool to draw from.
    partner_prob : float
        Co-occurrence strength of :data:`DIGIT_PRIOR` (ignored if ``digits`` is given).
    digits : list of int, optional
        Force the set of digit classes instead of sampling it from the prior.
    cells : dict of int to int, optional
        Force the grid cell (row-major, ``0 .. 15``) of each digit class (requires ``digits``, one
        distinct cell per class); random cells when ``None``.

    Returns
    -------
    DigitScene
    """
    images, _ = _load_digits()
    pools = digit_pools(split)
    classes = sorted(digits) if digits is not None else DIGIT_PRIOR.sample(rng, partner_prob)
    if len(set(classes)) != len(classes) or len(classes) > GRID * GRID:
        raise ValueError(f"invalid digit set {classes}")
    if cells is None:
        placed = rng.choice(GRID * GRID, size=len(classes), replace=False)
    else:
        if sorted(cells) != classes or len(set(cells.values())) != len(classes):
            raise ValueError(f"cells must map each digit of {classes} to a distinct cell, got {cells}")
        placed = [cells[c] for c in classes]
    canvas = rng.integers(0, _BACKGROUND_MAX, size=(CANVAS_SIZE, CANVAS_SIZE), dtype=np.int64).astype(np.float64)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    cell_of: dict[str, int] = {}
    sample_ids: dict[str, int] = {}
    for cls, cell in zip(classes, placed):
        sample = int(rng.choice(pools[cls]))
        glyph = images[sample] / 16.0 * 255.0
        x0, y0, x1, y1 = _cell_box(int(cell))
        canvas[y0:y1, x0:x1] = np.maximum(canvas[y0:y1, x0:x1], glyph)
        name = DIGIT_NAMES[cls]
        boxes[name], cell_of[name], sample_ids[name] = (x0, y0, x1, y1), int(cell), sample
    image = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)
    return DigitScene(
        image=image,
        digits=[DIGIT_NAMES[c] for c in classes],
        boxes=boxes,
        cells=cell_of,
        sample_ids=sample_ids,
        split=split,
    )


def make_scenes(
    n: int, seed: int = 0, split: Split = "heldout", partner_prob: float = TRAIN_PARTNER_PROB
) -> list[DigitScene]:
    """Generate ``n`` scenes deterministically from ``seed``.

    Parameters
    ----------
    n : int
        Number of scenes.
    seed : int
        Seed of :func:`numpy.random.default_rng`.
    split : {"train", "heldout"}
        Digit-image pool.
    partner_prob : float
        Co-occurrence strength of :data:`DIGIT_PRIOR`.

    Returns
    -------
    list of DigitScene
    """
    rng = np.random.default_rng(seed)
    return [make_scene(rng, split=split, partner_prob=partner_prob) for _ in range(n)]
