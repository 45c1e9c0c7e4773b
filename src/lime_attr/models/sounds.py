"""Sound scenes: the synthetic clips the ``tones-qwen2audio`` demo model is trained and evaluated on.

A clip is :data:`CLIP_SECONDS` = 2 s of mono audio at :data:`SAMPLING_RATE` = 16 kHz over a faint white
noise floor. It is divided into four fixed 0.5 s slots; between one and four events of *distinct*
classes are drawn from :data:`SOUND_PRIOR` and each is placed in its own slot (random onset inside the
slot, duration 0.25-0.42 s), so events never overlap and each has a known ``(start, end)`` span.

Event classes (:data:`SOUND_NAMES`):

``tone``
    steady sinusoid, 500-1500 Hz.
``chirp``
    linear upward sweep from 1-2 kHz to 3-6 kHz.
``click``
    train of 5 ms decaying broadband clicks every 30-60 ms.
``noise``
    white noise burst.
``hum``
    low 80-160 Hz fundamental with three decaying harmonics.
``buzz``
    sawtooth wave at 200-400 Hz (rich harmonics).

Priors (documented in the model card as well):

* pairs ``chirp <-> click`` and ``hum <-> buzz`` co-occur: ``P(click | chirp)`` about 0.85 in training
  clips (``partner_prob = 0.9``) and about 0.5 in held-out clips (``partner_prob = 0.5``);
* ``tone`` and ``noise`` are drawn three times as often as the other classes (``popular``).

Training and held-out clips use disjoint random streams (seeds) and the same synthesis; unlike the
digit images there is no finite pool to split, each event is synthesised with fresh parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from .priors import TRAIN_PARTNER_PROB, CooccurrencePrior

__all__ = [
    "SAMPLING_RATE",
    "CLIP_SECONDS",
    "SLOT_SECONDS",
    "SOUND_NAMES",
    "SOUND_PRIOR",
    "SoundClip",
    "make_clip",
    "make_clips",
    "synthesize_event",
]

#: Sampling rate of every clip in Hz.
SAMPLING_RATE: int = 16000
#: Duration of every clip in seconds.
CLIP_SECONDS: float = 2.0
#: Duration of one event slot in seconds (four slots per clip).
SLOT_SECONDS: float = 0.5
#: Object (event class) names of the audio task, in canonical (description) order.
SOUND_NAMES: tuple[str, ...] = ("tone", "chirp", "click", "noise", "hum", "buzz")

#: The prior of the sound clips, with the pairs (chirp, click) and (hum, buzz) and tone and noise three times as frequent.
SOUND_PRIOR = CooccurrencePrior(
    names=SOUND_NAMES,
    weights=(3.0, 1.0, 1.0, 3.0, 1.0, 1.0),
    pairs=(("chirp", "click"), ("hum", "buzz")),
    min_objects=1,
    max_objects=4,
)

_NUM_SLOTS = int(round(CLIP_SECONDS / SLOT_SECONDS))
_NUM_SAMPLES = int(round(CLIP_SECONDS * SAMPLING_RATE))
_FADE_SECONDS = 0.005


@dataclass
class SoundClip:
    """One sound clip with its ground truth.

    Attributes
    ----------
    audio : numpy.ndarray
        ``float32`` waveform of shape ``(32000,)`` in ``[-1, 1]``.
    sampling_rate : int
        Always :data:`SAMPLING_RATE`.
    events : list of str
        Event classes present, in canonical order (:data:`SOUND_NAMES`).
    spans : dict of str to tuple of float
        ``(start, end)`` in seconds of each present event.
    slots : dict of str to int
        Slot index (``0 .. 3``) of each event.
    split : str
        ``"train"`` or ``"heldout"``.
    """

    audio: np.ndarray
    sampling_rate: int
    events: list[str]
    spans: dict[str, tuple[float, float]]
    slots: dict[str, int]
    split: str = "heldout"

    @property
    def objects(self) -> list[str]:
        """Alias of :attr:`events` (the generic name used by the benchmark helpers)."""
        return self.events

    def description(self) -> str:
        """Ground-truth answer to "List the sounds." (classes in canonical order, space separated)."""
        return " ".join(self.events)


def _fade(signal: np.ndarray) -> np.ndarray:
    n = min(int(_FADE_SECONDS * SAMPLING_RATE), len(signal) // 2)
    if n > 0:
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, n))
        signal[:n] *= ramp
        signal[-n:] *= ramp[::-1]
    return signal


def synthesize_event(name: str, duration: float, rng: np.random.Generator) -> np.ndarray:
    """Synthesise one event of class ``name`` (peak amplitude about 1).

    Parameters
    ----------
    name : str
        One of :data:`SOUND_NAMES`.
    duration : float
        Length in seconds.
    rng : numpy.random.Generator
        Source of randomness for the class parameters (frequencies, rates).

    Returns
    -------
    numpy.ndarray
        ``float64`` waveform of ``round(duration * 16000)`` samples.
    """
    n = int(round(duration * SAMPLING_RATE))
    t = np.arange(n) / SAMPLING_RATE
    if name == "tone":
        f = rng.uniform(500.0, 1500.0)
        sig = np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
    elif name == "chirp":
        f0, f1 = rng.uniform(1000.0, 2000.0), rng.uniform(3000.0, 6000.0)
        sig = np.sin(2 * np.pi * (f0 * t + 0.5 * (f1 - f0) / duration * t**2))
    elif name == "click":
        sig = np.zeros(n)
        period = int(rng.uniform(0.03, 0.06) * SAMPLING_RATE)
        width = int(0.005 * SAMPLING_RATE)
        envelope = np.exp(-np.arange(width) / (width / 3))
        for start in range(int(rng.integers(0, period // 2)), n - width, period):
            burst = rng.standard_normal(width) * envelope
            sig[start : start + width] += burst / max(np.abs(burst).max(), 1e-8)
        return sig
    elif name == "noise":
        sig = rng.standard_normal(n) / 3.0
    elif name == "hum":
        f = rng.uniform(80.0, 160.0)
        sig = sum((0.6**h) * np.sin(2 * np.pi * f * (h + 1) * t) for h in range(4))
        sig = sig / 1.6
    elif name == "buzz":
        f = rng.uniform(200.0, 400.0)
        sig = 2.0 * ((f * t + rng.uniform()) % 1.0) - 1.0
    else:
        raise ValueError(f"unknown sound class {name!r}; expected one of {SOUND_NAMES}")
    return _fade(np.asarray(sig, dtype=np.float64))


def make_clip(
    rng: np.random.Generator,
    split: Literal["train", "heldout"] = "heldout",
    partner_prob: float = TRAIN_PARTNER_PROB,
    events: list[int] | None = None,
    slots: dict[int, int] | None = None,
) -> SoundClip:
    """Compose one sound clip.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of randomness (the clip is a deterministic function of its state).
    split : {"train", "heldout"}
        Recorded in the result (the caller chooses disjoint seeds for the two).
    partner_prob : float
        Co-occurrence strength of :data:`SOUND_PRIOR` (ignored if ``events`` is given).
    events : list of int, optional
        Force the set of event classes (indices into :data:`SOUND_NAMES`).
    slots : dict of int to int, optional
        Force the slot (``0 .. 3``) of each event class (requires ``events``, one distinct slot per
        class); random slots when ``None``.

    Returns
    -------
    SoundClip
    """
    classes = sorted(events) if events is not None else SOUND_PRIOR.sample(rng, partner_prob)
    if len(set(classes)) != len(classes) or len(classes) > _NUM_SLOTS:
        raise ValueError(f"invalid event set {classes}")
    if slots is None:
        placed = rng.choice(_NUM_SLOTS, size=len(classes), replace=False)
    else:
        if sorted(slots) != classes or len(set(slots.values())) != len(classes):
            raise ValueError(f"slots must map each event of {classes} to a distinct slot, got {slots}")
        placed = [slots[c] for c in classes]
    audio = rng.standard_normal(_NUM_SAMPLES) * rng.uniform(0.003, 0.01)
    spans: dict[str, tuple[float, float]] = {}
    slot_of: dict[str, int] = {}
    for cls, slot in zip(classes, placed):
        name = SOUND_NAMES[cls]
        duration = float(rng.uniform(0.25, 0.42))
        onset = float(slot) * SLOT_SECONDS + float(rng.uniform(0.02, SLOT_SECONDS - duration - 0.02))
        start = int(round(onset * SAMPLING_RATE))
        sig = synthesize_event(name, duration, rng) * rng.uniform(0.3, 0.7)
        audio[start : start + len(sig)] += sig
        spans[name] = (start / SAMPLING_RATE, (start + len(sig)) / SAMPLING_RATE)
        slot_of[name] = int(slot)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)
    return SoundClip(
        audio=audio,
        sampling_rate=SAMPLING_RATE,
        events=[SOUND_NAMES[c] for c in classes],
        spans=spans,
        slots=slot_of,
        split=split,
    )


def make_clips(
    n: int,
    seed: int = 0,
    split: Literal["train", "heldout"] = "heldout",
    partner_prob: float = TRAIN_PARTNER_PROB,
) -> list[SoundClip]:
    """Generate ``n`` clips deterministically from ``seed``.

    Parameters
    ----------
    n : int
        Number of clips.
    seed : int
        Seed of :func:`numpy.random.default_rng`.
    split : {"train", "heldout"}
        Recorded in each clip.
    partner_prob : float
        Co-occurrence strength of :data:`SOUND_PRIOR`.

    Returns
    -------
    list of SoundClip
    """
    rng = np.random.default_rng(seed)
    return [make_clip(rng, split=split, partner_prob=partner_prob) for _ in range(n)]
