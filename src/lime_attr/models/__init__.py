"""Embedded demo multimodal models, their synthetic data and held-out evaluation sets.

Two tiny but real transformers models are trained by ``python -m lime_attr.models.train`` and shipped as
package data, so that every attribution / LIME example and test runs offline on a CPU:

``digits-llava``
    :class:`transformers.LlavaForConditionalGeneration` answering questions about scenes of
    scikit-learn digits (:mod:`lime_attr.models.scenes`).
``tones-qwen2audio``
    :class:`transformers.Qwen2AudioForConditionalGeneration` answering questions about synthetic
    sound clips (:mod:`lime_attr.models.sounds`).

Load them with :func:`load_builtin` or :func:`load_model` (``"builtin:<name>"``, a local folder or a hub
id); get the prior probes (clean inputs where the language prior conflicts with the evidence, and their
controls) from :func:`prior_probe` / :func:`prior_descriptions` (:mod:`lime_attr.models.probes`), and
held-out POPE-style and description sets from :mod:`lime_attr.models.heldout`, clean or degraded by a
named corruption of :mod:`lime_attr.models.corruption` (:data:`DEFAULT_CORRUPTION` is the "degraded"
condition of each model). Both models are trained by the two-stage LLaVA-style recipe of
:mod:`lime_attr.models.train`, so they hallucinate from their language prior on clean inputs.
"""

from .corruption import (
    AUDIO_CORRUPTIONS,
    DEFAULT_CORRUPTION,
    IMAGE_CORRUPTIONS,
    Corruption,
    corrupt_audio,
    corrupt_image,
    parse_corruption,
)
from .heldout import (
    POPE_SPLITS,
    DescriptionItem,
    PopeQuestion,
    description_items,
    heldout_items,
    object_names,
    pope_questions,
    pope_splits,
    task_prior,
)
from .probes import PROBE_CONDITIONS, PROBE_SPLITS, ProbeItem, prior_descriptions, prior_probe, probe_capacity
from .loading import available_builtins, builtin_path, load_builtin, load_model
from .processing import description_question, existence_question, format_prompt
from .scenes import DigitScene, make_scene, make_scenes
from .sounds import SoundClip, make_clip, make_clips

__all__ = [
    "available_builtins",
    "builtin_path",
    "load_builtin",
    "load_model",
    "PROBE_CONDITIONS",
    "PROBE_SPLITS",
    "ProbeItem",
    "prior_probe",
    "prior_descriptions",
    "probe_capacity",
    "POPE_SPLITS",
    "PopeQuestion",
    "DescriptionItem",
    "pope_questions",
    "pope_splits",
    "description_items",
    "heldout_items",
    "object_names",
    "task_prior",
    "Corruption",
    "DEFAULT_CORRUPTION",
    "IMAGE_CORRUPTIONS",
    "AUDIO_CORRUPTIONS",
    "parse_corruption",
    "corrupt_image",
    "corrupt_audio",
    "format_prompt",
    "existence_question",
    "description_question",
    "DigitScene",
    "SoundClip",
    "make_scene",
    "make_scenes",
    "make_clip",
    "make_clips",
]
