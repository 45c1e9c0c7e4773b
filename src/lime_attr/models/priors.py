"""Co-occurrence priors shared by the demo scene (vision) and clip (audio) generators.

The demo models are trained on data in which some object pairs almost always appear together and some
objects are more frequent than others. A model trained on such data can answer "is there an 8?" from
the presence of a 3 alone, i.e. from a *language prior*, which is exactly the failure mode that the
attribution-guided mitigation in :mod:`lime_attr.mitigation` is meant to expose and reduce.

Sampling procedure of :meth:`CooccurrencePrior.sample` (one scene / clip):

1. draw a target count ``k`` uniformly from ``[min_objects, max_objects]``;
2. repeatedly draw an object ``o`` not yet chosen (and not banned) with probability proportional to
   ``weights[o]``;
3. if ``o`` has a partner ``p`` (``pairs``) not yet decided, add ``p`` with probability
   ``partner_prob`` (even if this exceeds ``k``, never beyond ``max_objects``); otherwise ban ``p`` for
   this scene, so that the pair is broken cleanly;
4. stop when ``k`` objects are chosen.

With ``partner_prob = 0.9`` (training) ``P(partner present | object present)`` is about 0.85; held-out
sets use a weaker prior (``partner_prob = 0.5`` by default), so that prior-breaking scenes, where the
language prior misleads, are common.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

__all__ = ["CooccurrencePrior", "TRAIN_PARTNER_PROB", "HELDOUT_PARTNER_PROB"]

#: Probability that the partner of a paired object is added, in training data.
TRAIN_PARTNER_PROB: float = 0.9
#: Default probability that the partner of a paired object is added, in held-out evaluation data.
HELDOUT_PARTNER_PROB: float = 0.5


@dataclass(frozen=True)
class CooccurrencePrior:
    """Frequency and pair co-occurrence prior over a small set of object names.

    Parameters
    ----------
    names : tuple of str
        Object names, in canonical order (descriptions list objects in this order).
    weights : tuple of float
        Unnormalised drawing weight of each object (``popular`` objects have larger weights).
    pairs : tuple of tuple of str
        Symmetric pairs ``(a, b)`` of objects that (almost) always co-occur.
    min_objects, max_objects : int
        Range of the number of objects per scene.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    pairs: tuple[tuple[str, str], ...]
    min_objects: int = 1
    max_objects: int = 4
    _partner: dict[int, int] = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        if len(self.names) != len(self.weights):
            raise ValueError("names and weights must have the same length")
        partner: dict[int, int] = {}
        for a, b in self.pairs:
            ia, ib = self.names.index(a), self.names.index(b)
            if ia in partner or ib in partner:
                raise ValueError(f"object in more than one pair: {a!r}, {b!r}")
            partner[ia], partner[ib] = ib, ia
        object.__setattr__(self, "_partner", partner)

    @property
    def num_objects(self) -> int:
        """Number of object classes."""
        return len(self.names)

    def partner_of(self, name: str) -> str | None:
        """Return the co-occurrence partner of ``name`` or ``None``."""
        idx = self._partner.get(self.names.index(name))
        return None if idx is None else self.names[idx]

    def sample(
        self, rng: np.random.Generator, partner_prob: float = TRAIN_PARTNER_PROB, whole_pairs: bool = False
    ) -> list[int]:
        """Draw the set of object indices of one scene (sorted ascending).

        Parameters
        ----------
        rng : numpy.random.Generator
            Source of randomness.
        partner_prob : float
            Probability of adding the partner of a paired object.
        whole_pairs : bool
            If True, a paired object drawn when the scene has no room left for its partner is skipped
            instead of breaking the pair, so pairs break only by the ``1 - partner_prob`` coin and
            ``P(partner | object) = 2 p / (1 + p)`` exactly (equal weights within a pair). If False
            (the default) the ``max_objects`` cap breaks pairs too.

        Returns
        -------
        list of int
            Distinct object indices, ascending.
        """
        k = int(rng.integers(self.min_objects, self.max_objects + 1))
        chosen: list[int] = []
        banned: set[int] = set()
        while len(chosen) < k:
            candidates = [i for i in range(self.num_objects) if i not in chosen and i not in banned]
            if not candidates:
                break
            # inverse-CDF draw proportional to the weights (plain floats: this runs in tight loops)
            threshold = float(rng.random()) * sum(self.weights[i] for i in candidates)
            obj = candidates[-1]
            for i in candidates:
                threshold -= self.weights[i]
                if threshold < 0.0:
                    obj = i
                    break
            partner = self._partner.get(obj)
            keep_pair = partner is not None and partner not in chosen and partner not in banned
            if whole_pairs and keep_pair and len(chosen) + 1 >= self.max_objects:
                banned.add(obj)  # no room for the pair: skip the object rather than break the pair
                continue
            chosen.append(obj)
            if not keep_pair:
                continue
            if rng.random() < partner_prob and len(chosen) < self.max_objects:
                chosen.append(partner)
            else:
                banned.add(partner)
        return sorted(chosen)

    def statistics(
        self, partner_prob: float = TRAIN_PARTNER_PROB, n: int = 20000, seed: int = 12345
    ) -> tuple[np.ndarray, np.ndarray]:
        """Monte-Carlo marginal frequencies and co-occurrence counts under this prior.

        Parameters
        ----------
        partner_prob : float
            Partner probability of the distribution to measure (training distribution by default).
        n : int
            Number of sampled scenes.
        seed : int
            Seed of the sampler (the result is deterministic).

        Returns
        -------
        frequency : numpy.ndarray
            Fraction of scenes that contain each object.
        cooccurrence : numpy.ndarray
            ``cooccurrence[i, j]`` = fraction of scenes containing ``i`` that also contain ``j``
            (``P(j | i)``); the diagonal is zero.
        """
        return _statistics(self, float(partner_prob), int(n), int(seed))

    def popular_order(self) -> list[int]:
        """Object indices sorted from most to least frequent in the training distribution."""
        freq, _ = self.statistics()
        return [int(i) for i in np.argsort(-freq, kind="stable")]


@lru_cache(maxsize=16)
def _statistics(
    prior: CooccurrencePrior, partner_prob: float, n: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    m = prior.num_objects
    presence = np.zeros((n, m), dtype=np.float64)
    for row in range(n):
        presence[row, prior.sample(rng, partner_prob)] = 1.0
    counts = presence.T @ presence
    singles = np.diag(counts).copy()
    cooc = counts / np.maximum(singles[:, None], 1.0)
    np.fill_diagonal(cooc, 0.0)
    freq = singles / n
    freq.setflags(write=False)
    cooc.setflags(write=False)
    return freq, cooc
