"""Seeded, deterministic corruptions of the demo models' held-out images and clips.

On their clean held-out data the demo models are near perfect, so they rarely need a prior to answer.
Degrading the *evidence* (never the training distribution) makes them fall back on the co-occurrence
prior they learned, which is the regime where hallucination mitigation can be measured. A corruption is
named by a short spec string; steps are joined with ``+`` and applied left to right:

Image steps (``uint8`` ``(H, W, 3)`` images; intensities are taken in ``[0, 1]``, i.e. divided by 255;
grey images, the demo scenes, stay grey):

``noise:S``
    additive Gaussian noise of standard deviation ``S`` (fraction of the full range), then clipped to
    ``[0, 1]`` and rounded to ``uint8``.
``contrast:C``
    contrast scaled by ``C`` in ``[0, 1]`` towards the image mean: ``x' = m + C (x - m)``.
``blur:S``
    Gaussian blur of standard deviation ``S`` pixels (separable, reflect padding, radius ``ceil(3 S)``).
``occlude:P``
    cut-out: every ``4 x 4`` block (a quarter of a digit cell) is set to 0 with probability ``P``.

Audio steps (``float32`` waveforms; the result is not clipped, the feature extractor needs no range):

``snr:D``
    additive white Gaussian noise with signal-to-noise ratio ``D`` dB relative to the mean power of the
    whole clip, ``10 log10(mean(x^2) / mean(n^2)) = D`` exactly (the drawn noise is rescaled).
``attenuate:D``
    gain of ``-D`` dB, ``x' = 10^(-D/20) x``.
``dropout:P``
    packet loss: every 20 ms frame (320 samples at 16 kHz) is muted (set to 0) with probability ``P``.

A ``seed:K`` token (default 0) selects a different noise realisation. Every step draws from
``numpy.random.default_rng((K, key..., step_index))`` where the key identifies the item (the held-out
set seed and the item index), so a corrupted item is a deterministic function of the spec and the item,
the same item is corrupted identically in all POPE splits, and the spec ``"clean"`` (or ``None``) leaves
the data bit-identical.

Example::

    from lime_attr.models import DEFAULT_CORRUPTION, pope_questions

    qs = pope_questions("digits-llava", "adversarial", corruption="noise:0.3+contrast:0.5")
    qs = pope_questions("digits-llava", "adversarial", corruption=DEFAULT_CORRUPTION["digits-llava"])
    qs = pope_questions("digits-llava", "adversarial", corruption="degraded")   # the same
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .tasks import resolve_task

__all__ = [
    "Corruption",
    "CorruptionSpec",
    "DEFAULT_CORRUPTION",
    "IMAGE_CORRUPTIONS",
    "AUDIO_CORRUPTIONS",
    "parse_corruption",
    "corrupt_image",
    "corrupt_audio",
]

#: Image corruption kinds and the meaning of their value.
IMAGE_CORRUPTIONS: dict[str, str] = {
    "noise": "Gaussian noise standard deviation, fraction of the intensity range (>= 0)",
    "contrast": "contrast factor towards the image mean, in [0, 1]",
    "blur": "Gaussian blur standard deviation in pixels (>= 0)",
    "occlude": "probability that a 4x4 block is blacked out, in [0, 1]",
}
#: Audio corruption kinds and the meaning of their value.
AUDIO_CORRUPTIONS: dict[str, str] = {
    "snr": "signal-to-noise ratio of added white noise in dB (any real number)",
    "attenuate": "attenuation in dB (>= 0)",
    "dropout": "probability that a 20 ms frame is muted, in [0, 1]",
}
_ALL = {**IMAGE_CORRUPTIONS, **AUDIO_CORRUPTIONS}
_CLEAN = ("clean", "none", "")

#: The default "degraded" condition of each demo model (the spec ``"degraded"`` resolves to it):
#: chosen in ``docs/demo_models.rst`` ("Degraded inputs and prior-driven hallucination") as the
#: condition where the models' accuracy drops clearly and their errors follow the co-occurrence prior.
DEFAULT_CORRUPTION: dict[str, str] = {
    "digits-llava": "noise:0.35",
    "tones-qwen2audio": "snr:18",
}

_OCCLUDE_BLOCK = 4
_DROPOUT_FRAME = 320


@dataclass(frozen=True)
class Corruption:
    """A named, seeded chain of input corruptions.

    Parameters
    ----------
    steps : tuple of tuple
        ``(kind, value)`` pairs applied left to right; kinds from :data:`IMAGE_CORRUPTIONS` or
        :data:`AUDIO_CORRUPTIONS` (one modality per chain).
    seed : int
        Seed of the noise realisations (non-negative).

    Examples
    --------
    >>> Corruption.parse("noise:0.3+contrast:0.5")
    Corruption(steps=(('noise', 0.3), ('contrast', 0.5)), seed=0)
    >>> str(Corruption.parse({"snr": -5, "seed": 2}))
    'snr:-5+seed:2'
    """

    steps: tuple[tuple[str, float], ...]
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("a Corruption needs at least one step; use corruption=None for clean data")
        if not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"corruption seed must be a non-negative integer, got {self.seed!r}")
        for kind, value in self.steps:
            _check_step(kind, value)
        kinds = {kind for kind, _ in self.steps}
        if kinds & set(IMAGE_CORRUPTIONS) and kinds & set(AUDIO_CORRUPTIONS):
            raise ValueError(f"corruption {self} mixes image and audio steps")

    @property
    def modality(self) -> str:
        """``"image"`` or ``"audio"``."""
        return "image" if self.steps[0][0] in IMAGE_CORRUPTIONS else "audio"

    def __str__(self) -> str:
        parts = [f"{kind}:{value:g}" for kind, value in self.steps]
        if self.seed:
            parts.append(f"seed:{self.seed}")
        return "+".join(parts)

    @classmethod
    def parse(cls, spec: CorruptionSpec) -> Corruption:
        """Build a corruption from a spec; see :func:`parse_corruption` (which also accepts ``None``)."""
        out = parse_corruption(spec)
        if out is None:
            raise ValueError(f"{spec!r} means no corruption; expected steps such as 'noise:0.3'")
        return out

    def _rng(self, key: tuple[int, ...], step: int) -> np.random.Generator:
        return np.random.default_rng((int(self.seed), *(int(k) for k in key), step))

    def apply_image(self, image: np.ndarray, key: tuple[int, ...] = ()) -> np.ndarray:
        """Corrupted copy of an image.

        Parameters
        ----------
        image : numpy.ndarray
            ``uint8`` array ``(H, W, C)``; grey images (equal channels) stay grey.
        key : tuple of int
            Non-negative integers naming the item (held-out sets use ``(set_seed, item_index)``); the
            noise of step ``j`` comes from ``numpy.random.default_rng((seed, *key, j))``.

        Returns
        -------
        numpy.ndarray
            ``uint8`` array of the same shape.
        """
        _require(self, "image")
        x = np.asarray(image)
        if x.dtype != np.uint8 or x.ndim != 3:
            raise ValueError(f"expected a uint8 (H, W, C) image, got {x.dtype} {x.shape}")
        grey = x.shape[2] > 1 and all(np.array_equal(x[..., 0], x[..., c]) for c in range(1, x.shape[2]))
        f = (x[..., :1] if grey else x).astype(np.float64) / 255.0
        for i, (kind, value) in enumerate(self.steps):
            rng = self._rng(key, i)
            if kind == "noise":
                f = f + rng.standard_normal(f.shape) * value
            elif kind == "contrast":
                m = f.mean(axis=(0, 1), keepdims=True)
                f = m + value * (f - m)
            elif kind == "blur":
                f = _gaussian_blur(f, value)
            elif kind == "occlude":
                h, w = f.shape[0], f.shape[1]
                b = _OCCLUDE_BLOCK
                mask = rng.random((math.ceil(h / b), math.ceil(w / b))) < value
                full = np.repeat(np.repeat(mask, b, axis=0), b, axis=1)[:h, :w]
                f = np.where(full[..., None], 0.0, f)
            f = np.clip(f, 0.0, 1.0)
        out = np.rint(f * 255.0).astype(np.uint8)
        return np.repeat(out, x.shape[2], axis=2) if grey else out

    def apply_audio(self, audio: np.ndarray, key: tuple[int, ...] = ()) -> np.ndarray:
        """Corrupted copy of a waveform.

        Parameters
        ----------
        audio : numpy.ndarray
            Waveform (any float dtype, any length; 16 kHz assumed for the 20 ms frames of ``dropout``).
        key : tuple of int
            Non-negative integers naming the item, as in :meth:`apply_image`.

        Returns
        -------
        numpy.ndarray
            ``float32`` waveform of the same shape (not clipped).
        """
        _require(self, "audio")
        a = np.asarray(audio, dtype=np.float64)
        for i, (kind, value) in enumerate(self.steps):
            if kind == "snr":
                noise = self._rng(key, i).standard_normal(a.shape)
                power = float(np.mean(a**2))
                noise *= math.sqrt(power / 10 ** (value / 10.0) / float(np.mean(noise**2)))
                a = a + noise
            elif kind == "attenuate":
                a = a * 10 ** (-value / 20.0)
            elif kind == "dropout":
                n = a.shape[-1]
                mask = self._rng(key, i).random(math.ceil(n / _DROPOUT_FRAME)) < value
                a = np.where(np.repeat(mask, _DROPOUT_FRAME)[:n], 0.0, a)
        return a.astype(np.float32)


#: What :func:`parse_corruption` accepts.
CorruptionSpec = Union[None, str, Corruption, Mapping[str, Any]]


def _valid() -> str:
    img = ", ".join(f"{k}:<{v}>" for k, v in IMAGE_CORRUPTIONS.items())
    aud = ", ".join(f"{k}:<{v}>" for k, v in AUDIO_CORRUPTIONS.items())
    return (f"image: {img}; audio: {aud}; join steps with '+', add 'seed:K' for another noise draw, "
            f"'degraded' for the default of a demo model, 'clean' for none")


def _check_step(kind: str, value: float) -> None:
    if kind not in _ALL:
        raise ValueError(f"unknown corruption {kind!r}; valid corruptions are {_valid()}")
    if not isinstance(value, (int, float, np.integer, np.floating)) or not math.isfinite(value):
        raise ValueError(f"corruption {kind!r} needs a finite number, got {value!r}")
    if kind in ("contrast", "occlude", "dropout") and not 0.0 <= value <= 1.0:
        raise ValueError(f"corruption {kind!r} needs a value in [0, 1] ({_ALL[kind]}), got {value!r}")
    if kind in ("noise", "blur", "attenuate") and value < 0:
        raise ValueError(f"corruption {kind!r} needs a value >= 0 ({_ALL[kind]}), got {value!r}")


def _require(c: Corruption, modality: str) -> None:
    if c.modality != modality:
        names = IMAGE_CORRUPTIONS if modality == "image" else AUDIO_CORRUPTIONS
        raise ValueError(f"corruption {str(c)!r} is for {c.modality}, but the data is {modality}; "
                         f"{modality} corruptions are {sorted(names)}")


def parse_corruption(spec: CorruptionSpec, task: str | None = None) -> Corruption | None:
    """Turn a corruption spec into a :class:`Corruption` (``None`` for clean data).

    Parameters
    ----------
    spec : None, str, Corruption or mapping
        ``None``, ``"clean"`` or ``"none"``: no corruption. A string of ``kind:value`` steps joined by
        ``+`` with an optional ``seed:K`` (``"noise:0.3+contrast:0.5"``, ``"snr:-5+seed:1"``);
        ``"degraded"``: :data:`DEFAULT_CORRUPTION` of ``task``. A mapping ``{kind: value, ...}``
        (insertion order, optional ``"seed"``). A :class:`Corruption` is returned as is.
    task : str, optional
        Demo model name or modality alias (``"vision"``, ``"audio"``); needed for ``"degraded"`` and
        used to check that the corruption fits the modality.

    Returns
    -------
    Corruption or None

    Raises
    ------
    ValueError
        Unknown kinds, bad values, a malformed string or a modality mismatch; the message lists the
        valid corruptions.
    """
    if spec is None:
        return None
    if isinstance(spec, Corruption):
        out = spec
    elif isinstance(spec, str):
        text = spec.strip().lower()
        if text in _CLEAN:
            return None
        if text == "degraded":
            if task is None:
                raise ValueError("corruption 'degraded' needs the task (demo model name) it is the default of")
            return parse_corruption(DEFAULT_CORRUPTION[resolve_task(task)], task)
        steps: list[tuple[str, float]] = []
        seed = 0
        for token in text.split("+"):
            kind, sep, raw = token.strip().partition(":")
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if not sep or not math.isfinite(value):
                raise ValueError(f"malformed corruption step {token.strip()!r} in {spec!r}; expected kind:value. "
                                 f"Valid corruptions are {_valid()}") from None
            if kind == "seed":
                if value != int(value) or value < 0:
                    raise ValueError(f"corruption seed must be a non-negative integer, got {raw!r}")
                seed = int(value)
            else:
                steps.append((kind, value))
        if not steps:
            raise ValueError(f"corruption {spec!r} has no steps; valid corruptions are {_valid()}")
        out = Corruption(tuple(steps), seed)
    elif isinstance(spec, Mapping):
        items = dict(spec)
        seed = items.pop("seed", 0)
        if not items:
            raise ValueError(f"corruption {spec!r} has no steps; valid corruptions are {_valid()}")
        out = Corruption(tuple((str(k), float(v)) for k, v in items.items()), int(seed))
    else:
        raise TypeError(f"a corruption spec is None, a str, a Corruption or a mapping, got {type(spec).__name__}")
    if task is not None:
        modality = "image" if resolve_task(task) == "digits-llava" else "audio"
        if out.modality != modality:
            _require(out, modality)
    return out


def corrupt_image(image: np.ndarray, spec: CorruptionSpec, key: tuple[int, ...] = ()) -> np.ndarray:
    """Apply an image corruption spec to one image.

    Parameters
    ----------
    image : numpy.ndarray
        ``uint8`` ``(H, W, C)`` image.
    spec : None, str, Corruption or mapping
        See :func:`parse_corruption` (``"degraded"`` needs a task and is not accepted here).
    key : tuple of int
        Names the item (seeds the noise together with the spec's seed).

    Returns
    -------
    numpy.ndarray
        A corrupted copy, or ``image`` itself for a clean spec.
    """
    c = parse_corruption(spec)
    return image if c is None else c.apply_image(image, key)


def corrupt_audio(audio: np.ndarray, spec: CorruptionSpec, key: tuple[int, ...] = ()) -> np.ndarray:
    """Apply an audio corruption spec to one waveform.

    Parameters
    ----------
    audio : numpy.ndarray
        Waveform.
    spec : None, str, Corruption or mapping
        See :func:`parse_corruption` (``"degraded"`` needs a task and is not accepted here).
    key : tuple of int
        Names the item (seeds the noise together with the spec's seed).

    Returns
    -------
    numpy.ndarray
        A corrupted ``float32`` copy, or ``audio`` itself for a clean spec.
    """
    c = parse_corruption(spec)
    return audio if c is None else c.apply_audio(audio, key)


def _gaussian_blur(f: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return f
    radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * f.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(f, pad, mode="reflect")
        f = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="valid"), axis, padded)
    return f
