"""Hallucination report: greedy, sampling, VCD and LIME on the embedded demo models (issue #6, section 6).

For the two embedded models (``builtin:digits-llava``, ``builtin:tones-qwen2audio``) and every
decoding method (greedy, sampling, VCD, LIME ``reference`` and LIME ``fast``) this answers the
held-out mini benchmarks of :mod:`lime_attr.models.heldout` and scores them with the project's
scorers:

* mini-POPE, splits ``random`` / ``popular`` / ``adversarial``: :func:`~lime_attr.evaluation.score_pope`
  for the image model ("yes" positive), :func:`~lime_attr.evaluation.score_audio_qa` for the audio
  model ("no" positive, as in Kuan et al. 2024);
* mini-CHAIR ("List the digits." / "List the sounds."): :func:`~lime_attr.evaluation.score_chair`;

under two input conditions, ``clean`` and ``degraded`` (the corruption of
``lime_attr.models.DEFAULT_CORRUPTION``; skipped, with the reason recorded, when this lime_attr has
none). Per method and condition it also measures the time per generated token (process CPU time and
wall time, and the ratio to greedy measured in the same run), the modality reliance and the grounding
of the first answer token (before: the plain model; after: LIME's perturbed model, from its token
records), and how many answers each method changed against greedy (fixed / introduced errors).
An investigation section sweeps LIME's learning rate and steps on the adversarial split and measures
why LIME does or does not change answers (perturbation size against the keys / values, confidence of
the answer token, what the inner loop achieved).

Run ``python -m benchmarks.hallucination_report`` (writes ``docs/benchmarks/hallucination.json``, the
figures next to it and ``docs/benchmarks_hallucination.rst``), ``--quick`` for a smoke run (written to
``outputs/benchmarks_quick`` unless ``--out`` is given), ``--limit N`` questions per POPE split,
``--conditions clean`` to run one condition.

Layout of ``hallucination.json``::

    schema_version, generated (UTC date), runtime {wall_seconds, cpu_seconds}
    settings                       Settings of the run (limits, decoding knobs, seeds, threads)
    machine                        cpu model, cores, torch threads, platform, library versions
    methods.<name>                 description; decoding: DecodingConfig.to_dict() (+ lime_config per model)
    conditions.<name>              status (ok | skipped), reason, corruption spec per model
    models.<model>
        info                       class, parameters, modality, pope scorer, parser, positive class
        lime_config.<method>       the full LimeConfig of each LIME method (LimeConfig.to_dict)
        conditions.<condition>
            status / reason, n_pope_per_split, n_descriptions
            labels.<split>         the questions' labels, in question order
            pope.<split>.<method>  metrics, counts, parser, config, metadata (the scorer's to_dict without
                                   items), answers (list of str, question order), n
            chair.<method>         metrics, counts, config, answers, ground_truth, n
            timing.<method>        n_items, n_tokens, cpu_seconds, wall_seconds,
                                   cpu_s_per_token, wall_s_per_token, cpu_ratio_to_greedy, wall_ratio_to_greedy
            relevance.<method>     reliance_before (mean over POPE questions), grounding_before (mean over
                                   "yes" questions), n, n_grounding; LIME also: reliance_after,
                                   grounding_after, focus_before / focus_after, n_optimised, n_skipped,
                                   first_token_changed, share_before_check
            changes.<benchmark>.<method>
                                   n, changed, fixed, introduced, other (against greedy, same items)
        investigation              condition, split, n, diagnostics (answer-token confidence, K/V RMS),
                                   sweep: [{label, lr, steps, metrics, changes, reliance/grounding, cost ...}]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import inspect
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from lime_attr.evaluation import POPE_SPLITS

from . import _common
from ._report import holm, sign_test

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
QUICK_OUT = REPO_ROOT / "outputs" / "benchmarks_quick"
JSON_NAME = "hallucination.json"
PAGE_NAME = "benchmarks_hallucination.rst"

MODEL_NAMES = ("digits-llava", "tones-qwen2audio")
METHOD_NAMES = ("greedy", "sample", "vcd", "lime-reference", "lime-fast", "lime-reference-lr10x",
                "lime-reference-lr100x")
#: LIME methods whose learning rate is a multiple of the paper's (``-lr<F>x``): NOT the paper's settings.
SWEEP_SUFFIX = "-lr"
CONDITIONS = ("prior", "clean", "degraded")
#: Probe conditions of the "prior" condition (lime_attr.models.PROBE_CONDITIONS), in report order.
PROBE_BENCHES = ("conflict", "consistent_yes", "consistent_no", "control")
#: The POPE splits (the one definition: lime_attr.evaluation.POPE_SPLITS).
SPLITS = POPE_SPLITS

#: How each demo model is scored (scorer, parser, positive class) -- see the page for why.
MODEL_SETUP: dict[str, dict[str, Any]] = {
    "digits-llava": {
        "modality": "image",
        "pope_benchmark": "pope",
        "scorer": "score_pope",
        "parser": "llava_pope",
        "positive": "yes",
        "placeholder_attr": ("image_token_index", "image_token_id"),
    },
    "tones-qwen2audio": {
        "modality": "audio",
        "pope_benchmark": "audio_qa",
        "scorer": "score_audio_qa",
        # kuan2024 (the released rule) is case-sensitive and reads the demo model's lower-case "no" as
        # unparsed; "strict" reads yes / no exactly (documented on the page)
        "parser": "strict",
        "positive": "no",
        "placeholder_attr": ("audio_token_index", "audio_token_id"),
    },
}


@dataclass(frozen=True)
class Settings(_common.PresetSettings):
    """Knobs of one report run (all recorded in the json).

    Attributes
    ----------
    limit : int or None
        Questions per POPE split (the first ``limit`` of each split; the sets alternate yes / no per
        item, so an even limit is balanced). ``None``: every question of the split.
    n_descriptions : int
        Items of the description (CHAIR) set per model (``clean`` / ``degraded``).
    n_probe : int
        Items per prior-probe condition (``prior``; :func:`lime_attr.models.prior_probe`, test split).
    n_probe_descriptions : int
        Broken-pair description items of the ``prior`` condition (:func:`lime_attr.models.prior_descriptions`).
    conditions : tuple of str
        Input conditions to run (``prior``: the clean prior probes; ``clean`` / ``degraded``: the
        held-out POPE and description sets, clean or with the default corruption).
    models, methods, splits : tuple of str
        What to run.
    max_new_tokens_pope, max_new_tokens_chair : int
        Generation limits (answers are "yes"/"no" + EOS, descriptions at most four objects + EOS).
    temperature, top_p : float, optional
        Sampling baseline (``top_p`` None: the full distribution).
    seed : int
        Seed of sampling (``torch.manual_seed(seed)`` before each answer) and of VCD's noise.
    vcd_alpha, vcd_beta, vcd_noise_step : float, float, int
        VCD (Leng et al., 2024 defaults).
    sweep_limit : int
        Questions of the adversarial split used by the investigation sweep (0 disables it).
    sweep_lr_factors, sweep_steps : tuple
        Learning-rate multipliers of the paper preset, and step counts, of the sweep (LIME reference
        mode); every (factor, steps) pair in ``sweep_grid`` is run.
    threads : int
        ``torch.set_num_threads``.
    quick : bool
        The ``--quick`` smoke run.
    """

    limit: Optional[int] = 60
    n_descriptions: int = 50
    n_probe: int = 200
    n_probe_descriptions: int = 200
    conditions: tuple = CONDITIONS
    models: tuple = MODEL_NAMES
    methods: tuple = METHOD_NAMES
    splits: tuple = SPLITS
    max_new_tokens_pope: int = 4
    max_new_tokens_chair: int = 8
    temperature: float = 1.0
    top_p: Optional[float] = None
    seed: int = 0
    vcd_alpha: float = 1.0
    vcd_beta: float = 0.1
    vcd_noise_step: int = 500
    sweep_limit: int = 0
    sweep_grid: tuple = ((1.0, 7), (10.0, 7), (100.0, 7), (1000.0, 7), (100.0, 20))
    threads: int = 1
    quick: bool = False

    #: ``quick``: a handful of questions, one sweep point beyond the paper's
    #: (:meth:`~benchmarks._common.PresetSettings.quick_run`)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": dict(limit=2, n_descriptions=1, n_probe=2, n_probe_descriptions=1, sweep_limit=2,
                      sweep_grid=((1.0, 7), (100.0, 7)), quick=True),
    }


# --------------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------------
def corruption_support() -> tuple[Optional[dict], Optional[str]]:
    """``(DEFAULT_CORRUPTION, None)`` when this lime_attr can degrade the held-out inputs, else
    ``(None, reason)``. Checked through the public surface only (no corruption code here)."""
    import lime_attr.models as models

    spec = getattr(models, "DEFAULT_CORRUPTION", None)
    if spec is None:
        return None, ("lime_attr.models.DEFAULT_CORRUPTION does not exist in this version of lime_attr, so the "
                      "held-out inputs cannot be degraded; the degraded condition was not run")
    for fn in (models.pope_questions, models.description_items):
        if "corruption" not in inspect.signature(fn).parameters:
            return None, (f"lime_attr.models.{fn.__name__} has no 'corruption' argument in this version; the "
                          "degraded condition was not run")
    return dict(spec), None


def _corruption_for(spec: dict, model_name: str, modality: str) -> Any:
    for key in (model_name, modality, "vision" if modality == "image" else modality):
        if key in spec:
            return spec[key]
    raise KeyError(f"DEFAULT_CORRUPTION has no entry for {model_name} (keys: {sorted(spec)})")


def load_items(model_name: str, condition: str, settings: Settings, corruption: Any = None) -> dict[str, list]:
    """``{split: questions[:limit]}`` and ``{"chair": description items}`` for one model and condition.

    The ``prior`` condition: ``{probe condition: prior_probe(...)}`` (test split) and ``{"chair": broken-pair
    descriptions}``.
    """
    from lime_attr.models import description_items, pope_questions, prior_descriptions, prior_probe

    if condition == "prior":
        probes: dict[str, list] = {c: prior_probe(model_name, c, n=settings.n_probe) for c in PROBE_BENCHES}
        if settings.n_probe_descriptions > 0:
            probes["chair"] = prior_descriptions(model_name, n=settings.n_probe_descriptions)
        return probes
    kw = {} if condition == "clean" else {"corruption": corruption}
    out: dict[str, list] = {}
    for split in settings.splits:
        out[split] = pope_questions(model_name, split, **kw)[: settings.limit]
    if settings.n_descriptions > 0:
        out["chair"] = description_items(model_name, n_items=settings.n_descriptions, **kw)
    return out


# --------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------
def registered_method(method: str) -> str:
    """The decoding-method registry name of a report method (``lime-reference-lr10x`` -> ``lime``).

    Raises
    ------
    lime_attr.mitigation.UnknownDecodingMethodError
        When the part before the first ``-`` is not registered (the message lists the registered ones).
    """
    from lime_attr.mitigation import get_decoding_method

    return get_decoding_method(method.split("-", 1)[0]).name


def decoding_config(method: str, settings: Settings, max_new_tokens: int):
    """The :class:`~lime_attr.generation.DecodingConfig` of a method (LIME: its mode only).

    The method's first ``-``-separated part names a registered decoding method
    (:func:`lime_attr.mitigation.available_decoding_methods`); a method without settings here runs with its
    defaults.
    """
    from lime_attr.generation import DecodingConfig

    base = registered_method(method)
    options: dict[str, Any] = {
        "sample": dict(temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed),
        "vcd": dict(seed=settings.seed, vcd_alpha=settings.vcd_alpha, vcd_beta=settings.vcd_beta,
                    vcd_noise_step=settings.vcd_noise_step),
        "lime": dict(lime_mode=lime_mode_of(method)) if base == "lime" and "-" in method else {},
    }.get(base, {})
    return DecodingConfig(base, max_new_tokens, **options)


def lime_mode_of(method: str) -> str:
    """``"reference"`` / ``"fast"`` of a LIME method name (``lime-<mode>`` or ``lime-<mode>-lr<F>x``)."""
    return method.split("-")[1]


def lr_factor_of(method: str) -> float:
    """The learning-rate multiple of the paper's preset in a method name (1 without a ``-lr<F>x`` suffix)."""
    if SWEEP_SUFFIX not in method:
        return 1.0
    tail = method.rsplit(SWEEP_SUFFIX, 1)[1]
    if not tail.endswith("x"):
        raise ValueError(f"method {method!r}: the learning-rate suffix must read '-lr<factor>x', e.g. '-lr10x'")
    return float(tail[:-1])


def lime_config(model: Any, method: str, **overrides: Any):
    """``LimeConfig.for_model(model, mode=...)`` with relevance recording (public API only).

    Fast mode also measures the relevance under the perturbation the token was emitted from
    (``final_relevance=True``), so that its "after" numbers describe what it emitted. A ``-lr<F>x``
    suffix multiplies the preset's learning rate by ``F`` (not the paper's settings).
    """
    from lime_attr.mitigation import LimeConfig

    mode = lime_mode_of(method)
    if mode == "fast":
        overrides = {"final_relevance": True, **overrides}
    factor = lr_factor_of(method)
    if factor != 1.0 and "lr" not in overrides:
        overrides = {"lr": LimeConfig.for_model(model).lr * factor, **overrides}
    return LimeConfig.for_model(model, mode=mode, record_relevance=True, **overrides)


def encode(model: Any, processor: Any, item: Any) -> dict:
    """Processor outputs of one held-out item (image or audio)."""
    from lime_attr.generation import prepare_inputs

    if getattr(item, "image", None) is not None:
        return prepare_inputs(model, processor, [item.prompt], images=[item.image])
    return prepare_inputs(model, processor, [item.prompt], audios=[item.audio], sampling_rate=item.sampling_rate)


@dataclass
class Answer:
    """One generated answer with its cost and, for LIME, the first token's record."""

    text: str
    tokens: list
    cpu: float
    wall: float
    record: Any = None


def _n_tokens(tokens: list, eos: set) -> int:
    """Generated tokens up to and including the first EOS."""
    for i, t in enumerate(tokens):
        if t in eos:
            return i + 1
    return len(tokens)


def answer_item(model: Any, processor: Any, enc: dict, method: str, settings: Settings, max_new_tokens: int,
                lime_cfg: Any = None) -> Answer:
    """Answer one item with a method; times only the generation (process CPU and wall clock)."""
    from lime_attr.generation import generate
    from lime_attr.mitigation import lime_generate

    with _common.Stopwatch() as clock:
        if method.startswith("lime-"):
            res = lime_generate(model, processor, enc, lime_cfg, max_new_tokens=max_new_tokens)
            text, tokens = res.texts[0].strip(), res.tokens[0].tolist()
            record = res.records[0] if res.records else None
        else:
            res = generate(model, processor, enc, decoding_config(method, settings, max_new_tokens))
            text, tokens, record = res.texts[0], list(res.tokens[0]), None
    return Answer(text, tokens, clock.cpu, clock.wall, record)


# --------------------------------------------------------------------------------------------------
# relevance: reliance and grounding of the first answer token
# --------------------------------------------------------------------------------------------------
def placeholder_positions(model: Any, input_ids: torch.Tensor, model_name: str) -> torch.Tensor:
    """Positions of the image / audio placeholder tokens (the features, markers excluded) in row 0."""
    cfg = model.config
    tid = None
    for name in MODEL_SETUP[model_name]["placeholder_attr"]:
        tid = getattr(cfg, name, None)
        if tid is not None:
            break
    if tid is None:
        raise ValueError(f"{model_name}: no placeholder token id in the model config")
    return (input_ids[0] == int(tid)).nonzero().flatten().cpu()


def region_mask(n_tokens: int, item: Any) -> Optional[torch.Tensor]:
    """Which placeholder tokens lie in the queried object's region (None when it has none).

    Image: the tokens form a ``side x side`` row-major grid over the image (digits-llava: 4x4 cells of
    8x8 pixels); a cell counts when its centre is inside the box ``(x0, y0, x1, y1)``. Audio: the tokens
    split the clip evenly in time (tones-qwen2audio: 25 x 80 ms); a token counts when its centre is in
    ``[t0, t1)``. The same rule as :func:`lime_attr.metrics.grounding_score` with ``level="tokens"``.
    """
    region = getattr(item, "region", None)
    if region is None:
        return None
    if getattr(item, "image", None) is not None:
        side = int(round(math.sqrt(n_tokens)))
        if side * side != n_tokens:
            raise ValueError(f"{n_tokens} image tokens do not form a square grid")
        h, w = item.image.shape[:2]
        x0, y0, x1, y1 = [float(v) for v in region]
        ys = (torch.arange(side, dtype=torch.float64) + 0.5) * (h / side)
        xs = (torch.arange(side, dtype=torch.float64) + 0.5) * (w / side)
        return (((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]).flatten()
    duration = len(item.audio) / float(item.sampling_rate)
    t0, t1 = [float(v) for v in region]
    centres = (torch.arange(n_tokens, dtype=torch.float64) + 0.5) * (duration / n_tokens)
    return (centres >= t0) & (centres < t1)


def grounding_of(relevance: torch.Tensor, positions: torch.Tensor, inside: Optional[torch.Tensor]) -> float:
    r"""Grounding from a relevance vector over the LM positions: :math:`\sum_{B}|R| / \sum_{P}|R|` over
    the placeholder positions ``P`` and those inside the region ``B``."""
    if inside is None:
        return float("nan")
    rel = relevance.detach().double().cpu().reshape(-1)[positions].abs()
    den = float(rel.sum())
    return float(rel[inside].sum()) / den if den > 0 else float("nan")


class RelevanceProbe:
    """Reliance and grounding of the plain model for a given first answer token (cached)."""

    def __init__(self, model: Any, processor: Any, model_name: str) -> None:
        from lime_attr import ModalityAttribution

        self.model, self.model_name = model, model_name
        self.attribution = ModalityAttribution(model, processor)
        self.cache: dict[Any, dict[str, float]] = {}

    def __call__(self, key: Any, enc: dict, item: Any, token: int) -> dict[str, float]:
        from lime_attr.metrics import grounding_score, modality_reliance

        full_key = (key, int(token))
        if full_key in self.cache:
            return self.cache[full_key]
        res = self.attribution.attribute(enc, target=int(token))
        reliance = float(modality_reliance(res)[0])
        region = getattr(item, "region", None)
        if region is None:
            grounding = float("nan")
        elif getattr(item, "image", None) is not None:
            grounding = grounding_score(res, box=region, level="tokens")
        else:
            grounding = grounding_score(res, time_span=region, level="tokens")
        out = {"reliance": reliance, "grounding": grounding}
        self.cache[full_key] = out
        return out


def _mean(values: Sequence[float]) -> Optional[float]:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else None


# --------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------
def score_yes_no(model_name: str, items: Sequence[Any], answers: Sequence[str], config: dict) -> Any:
    """The project's scorer of the model's yes/no benchmark (see :data:`MODEL_SETUP`)."""
    from lime_attr.evaluation import score_audio_qa, score_pope

    setup = MODEL_SETUP[model_name]
    scorer = score_pope if setup["scorer"] == "score_pope" else score_audio_qa
    return scorer(items, list(answers), parser=setup["parser"], config=config, keep_items=False)


def chair_vocabulary(model_name: str) -> dict:
    """The CHAIR vocabulary: :data:`~lime_attr.evaluation.harness.DIGIT_WORDS` or the sound classes."""
    from lime_attr.evaluation.harness import DIGIT_WORDS
    from lime_attr.models import object_names

    if model_name == "digits-llava":
        return DIGIT_WORDS
    return {name: [] for name in object_names(model_name)}


def score_descriptions(model_name: str, items: Sequence[Any], answers: Sequence[str], config: dict,
                       keep_items: bool = False) -> Any:
    from lime_attr.evaluation import score_chair

    return score_chair(list(answers), [set(it.objects) for it in items], chair_vocabulary(model_name),
                       config=config, keep_items=keep_items)


def _correct_yes_no(model_name: str, item: Any, answer: str) -> bool:
    from lime_attr.evaluation import get_parser

    return get_parser(MODEL_SETUP[model_name]["parser"])(answer) == item.label


def mentioned_objects(model_name: str, items: Sequence[Any], answers: Sequence[str]) -> list[set]:
    """The objects each description mentions (CHAIR's matching)."""
    res = score_descriptions(model_name, items, answers, {}, keep_items=True)
    return [{m[1] for m in d["mentions"]} for d in res.items]


def _correct_descriptions(model_name: str, items: Sequence[Any], answers: Sequence[str]) -> list[bool]:
    """Exact match: the set of mentioned objects equals the ground truth."""
    return [m == set(it.objects) for m, it in zip(mentioned_objects(model_name, items, answers), items)]


def changes_against(reference: Sequence[str], answers: Sequence[str], ref_ok: Sequence[bool],
                    ok: Sequence[bool], ref_keys: Optional[Sequence[Any]] = None,
                    keys: Optional[Sequence[Any]] = None) -> dict[str, int]:
    """How many answers differ from the reference (greedy), and whether that fixed or introduced an error.

    ``keys`` / ``ref_keys`` are what counts as "the answer" (the parsed yes / no for POPE); by default
    the text. ``text_changed`` counts any difference of the generated text (e.g. "no" -> "no buzz").
    """
    ref_keys = list(reference) if ref_keys is None else list(ref_keys)
    keys = list(answers) if keys is None else list(keys)
    out = {"n": len(answers), "changed": 0, "fixed": 0, "introduced": 0, "other": 0, "text_changed": 0}
    for r, a, rk, k, rok, aok in zip(reference, answers, ref_keys, keys, ref_ok, ok):
        out["text_changed"] += int(r != a)
        if rk == k:
            continue
        out["changed"] += 1
        if aok and not rok:
            out["fixed"] += 1
        elif rok and not aok:
            out["introduced"] += 1
        else:
            out["other"] += 1
    return out


def add_sign_tests(changes: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Add ``sign_p`` and the Holm-adjusted ``holm_p`` (family: every set x method of one model and
    condition, ``holm_family``) to each entry of ``changes`` in place."""
    cells = [(bench, m) for bench, per in changes.items() for m in per]
    raw = [sign_test(changes[b][m]["fixed"], changes[b][m]["introduced"]) for b, m in cells]
    for (b, m), p, q in zip(cells, raw, holm(raw)):
        changes[b][m].update(sign_p=p, holm_p=q, holm_family=len(cells))


def parsed_answers(model_name: str, answers: Sequence[str]) -> list:
    """The yes / no (or None) the model's parser reads from each answer."""
    from lime_attr.evaluation import get_parser

    parse = get_parser(MODEL_SETUP[model_name]["parser"])
    return [parse(a) for a in answers]


def _result_dict(result: Any) -> dict[str, Any]:
    d = result.to_dict()
    d.pop("items", None)
    return d


# --------------------------------------------------------------------------------------------------
# one model, one condition
# --------------------------------------------------------------------------------------------------
def _eos_ids(model: Any) -> set:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}


def evaluate_condition(model: Any, processor: Any, model_name: str, items: dict[str, list], condition: str,
                       settings: Settings, probe: RelevanceProbe, lime_cfgs: dict[str, Any]) -> dict[str, Any]:
    """Every method on the POPE splits and the descriptions of one model and condition."""
    eos = _eos_ids(model)
    methods = list(settings.methods)
    timing = {m: {"n_items": 0, "n_tokens": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0} for m in methods}
    rel: dict[str, dict[str, list]] = {m: {"reliance_before": [], "grounding_before": [], "reliance_after": [],
                                           "grounding_after": [], "focus_before": [], "focus_after": [],
                                           "optimised": [], "skipped": [], "changed": [], "check": [], "kl_last": []}
                                       for m in methods}
    pope: dict[str, dict[str, Any]] = {}
    chair: dict[str, Any] = {}
    changes: dict[str, dict[str, Any]] = {}
    base_config = {"model": f"builtin:{model_name}", "condition": condition}

    for bench, bench_items in items.items():
        is_pope = bench != "chair"
        max_new = settings.max_new_tokens_pope if is_pope else settings.max_new_tokens_chair
        encs = [encode(model, processor, it) for it in bench_items]
        answers: dict[str, list[str]] = {}
        for method in methods:
            t0 = time.perf_counter()
            texts = []
            for idx, (item, enc) in enumerate(zip(bench_items, encs)):
                a = answer_item(model, processor, enc, method, settings, max_new, lime_cfgs.get(method))
                texts.append(a.text)
                tm = timing[method]
                tm["n_items"] += 1
                tm["n_tokens"] += _n_tokens(a.tokens, eos)
                tm["cpu_seconds"] += a.cpu
                tm["wall_seconds"] += a.wall
                if not is_pope or not a.tokens:
                    continue
                key = (condition, bench, item.item_id, item.object)
                r = rel[method]
                if a.record is not None:
                    rec = a.record
                    explained = int(rec.unperturbed_tokens[0])
                    before = probe(key, enc, item, explained)
                    r["changed"].append(bool(rec.changed[0]))
                    if rec.relevance_after is not None:
                        pos = placeholder_positions(model, enc["input_ids"], model_name)
                        inside = region_mask(len(pos), item)
                        r["reliance_after"].append(float(rec.share_after[0]))
                        r["grounding_after"].append(grounding_of(rec.relevance_after[0], pos, inside))
                        r["focus_before"].append(float(rec.focus_before[0]))
                        r["focus_after"].append(float(rec.focus_after[0]))
                        r["optimised"].append(True)
                        if not math.isnan(float(rec.share_before[0])):
                            r["check"].append(abs(float(rec.share_before[0]) - before["reliance"]))
                    else:  # the optimisation was skipped (gate): the emitted token is the unperturbed one
                        r["reliance_after"].append(before["reliance"])
                        r["grounding_after"].append(before["grounding"])
                        r["optimised"].append(False)
                    if rec.skipped:
                        r["skipped"].append(rec.skipped)
                    if rec.kl:
                        r["kl_last"].append(float(rec.kl[-1][0]))
                else:
                    before = probe(key, enc, item, int(a.tokens[0]))
                r["reliance_before"].append(before["reliance"])
                r["grounding_before"].append(before["grounding"])
            answers[method] = texts
            cfg = dict(base_config, decoding=decoding_config(method, settings, max_new).to_dict(),
                       n=len(bench_items))
            if method in lime_cfgs:
                cfg["lime_config"] = f"models.{model_name}.lime_config.{method}"
            if is_pope:
                cfg.update(benchmark=MODEL_SETUP[model_name]["pope_benchmark"], split=bench)
                entry = _result_dict(score_yes_no(model_name, bench_items, texts, cfg))
                entry.update(answers=texts, n=len(bench_items))
                pope.setdefault(bench, {})[method] = entry
            else:
                cfg.update(benchmark="chair")
                entry = _result_dict(score_descriptions(model_name, bench_items, texts, cfg))
                entry.update(answers=texts, ground_truth=[list(it.objects) for it in bench_items],
                             n=len(bench_items))
                if all(getattr(it, "partner", None) for it in bench_items):
                    from lime_attr.models.accuracy import partner_hallucination_rate

                    entry["partner_hallucination"] = partner_hallucination_rate(bench_items, texts)
                chair[method] = entry
            logger.info("[%s %s %s] %-14s %s (%.1f s)", model_name, condition, bench, method,
                        _headline(entry), time.perf_counter() - t0)
        # changes against greedy
        if "greedy" in answers:
            if is_pope:
                ok = {m: [_correct_yes_no(model_name, it, a) for it, a in zip(bench_items, answers[m])]
                      for m in answers}
            else:
                ok = {m: _correct_descriptions(model_name, bench_items, answers[m]) for m in answers}
            if is_pope:
                keys = {m: parsed_answers(model_name, answers[m]) for m in answers}
            else:  # the set of objects mentioned
                keys = {m: [frozenset(x) for x in mentioned_objects(model_name, bench_items, answers[m])]
                        for m in answers}
            changes[bench] = {m: changes_against(answers["greedy"], answers[m], ok["greedy"], ok[m],
                                                 keys["greedy"], keys[m])
                              for m in answers if m != "greedy"}
    add_sign_tests(changes)

    for m, tm in timing.items():
        tm["cpu_s_per_token"] = tm["cpu_seconds"] / max(tm["n_tokens"], 1)
        tm["wall_s_per_token"] = tm["wall_seconds"] / max(tm["n_tokens"], 1)
    if "greedy" in timing:
        g = timing["greedy"]
        for tm in timing.values():
            tm["cpu_ratio_to_greedy"] = tm["cpu_s_per_token"] / g["cpu_s_per_token"]
            tm["wall_ratio_to_greedy"] = tm["wall_s_per_token"] / g["wall_s_per_token"]
    relevance = {}
    for m, r in rel.items():
        entry: dict[str, Any] = {
            "n": len(r["reliance_before"]),
            "reliance_before": _mean(r["reliance_before"]),
            "grounding_before": _mean(r["grounding_before"]),
            "n_grounding": sum(1 for v in r["grounding_before"] if not math.isnan(v)),
        }
        if m in lime_cfgs:
            entry.update(
                reliance_after=_mean(r["reliance_after"]),
                grounding_after=_mean(r["grounding_after"]),
                focus_before=_mean(r["focus_before"]),
                focus_after=_mean(r["focus_after"]),
                n_optimised=int(sum(r["optimised"])),
                n_skipped=len(r["skipped"]),
                skipped_reasons=sorted(set(r["skipped"])),
                first_token_changed=int(sum(r["changed"])),
                share_before_check=max(r["check"]) if r["check"] else None,
                kl_last=_mean(r["kl_last"]),
            )
        relevance[m] = entry
    return {"status": "ok", "n_pope_per_split": {s: len(items[s]) for s in items if s != "chair"},
            "labels": {s: [it.label for it in items[s]] for s in items if s != "chair"},
            "n_descriptions": len(items.get("chair", [])), "pope": pope, "chair": chair, "timing": timing,
            "relevance": relevance, "changes": changes}


def _headline(entry: dict[str, Any]) -> str:
    m = entry.get("metrics", {})
    keys = ("accuracy", "f1", "yes_ratio") if "accuracy" in m else ("chair_s", "chair_i", "recall")
    return " ".join(f"{k}={m[k]:.3f}" for k in keys if m.get(k) is not None)


# --------------------------------------------------------------------------------------------------
# investigation
# --------------------------------------------------------------------------------------------------
def kv_rms(model: Any, processor: Any, encs: Sequence[dict]) -> dict[str, Any]:
    """RMS of the keys and values (k_proj / v_proj outputs) of every language-model layer over prompts.

    RoPE rotates pairs of key channels, so the RMS of the keys after RoPE (where LIME adds its
    perturbation) equals the RMS measured here.
    """
    stats: dict[str, list[float]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if "language_model" in name and (name.endswith("k_proj") or name.endswith("v_proj")):
            def hook(m, args, out, name=name):
                stats.setdefault(name, []).append(float(out.detach().double().pow(2).mean()))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for enc in encs:
                model(**enc)
    finally:
        for h in hooks:
            h.remove()
    per = {name: math.sqrt(float(np.mean(v))) for name, v in stats.items()}
    keys = [v for n, v in per.items() if n.endswith("k_proj")]
    values = [v for n, v in per.items() if n.endswith("v_proj")]
    return {"per_module": per, "key_rms_min": min(keys), "key_rms_mean": float(np.mean(keys)),
            "value_rms_min": min(values), "value_rms_mean": float(np.mean(values))}


def answer_confidence(model: Any, encs: Sequence[dict]) -> dict[str, Any]:
    """Probability of the greedy first answer token and its logit margin over the runner-up."""
    probs, margins = [], []
    with torch.no_grad():
        for enc in encs:
            logits = model(**enc).logits[0, -1].double()
            top2 = torch.topk(logits, 2).values
            probs.append(float(torch.softmax(logits, -1).max()))
            margins.append(float(top2[0] - top2[1]))
    p = np.array(probs)
    return {"p_top_median": float(np.median(p)), "p_top_min": float(p.min()),
            "share_p_top_ge_0_9": float((p >= 0.9).mean()), "share_p_top_ge_0_99": float((p >= 0.99).mean()),
            "logit_margin_median": float(np.median(margins)), "logit_margin_min": float(np.min(margins))}


def investigate(model: Any, processor: Any, model_name: str, questions: Sequence[Any], condition: str,
                settings: Settings, probe: RelevanceProbe) -> dict[str, Any]:
    """LIME (reference mode) with larger learning rates / more steps on the adversarial split, plus the
    measurements that explain the outcome."""
    from lime_attr.mitigation import modality_positions

    encs = [encode(model, processor, q) for q in questions]
    eos = _eos_ids(model)
    greedy = [answer_item(model, processor, e, "greedy", settings, settings.max_new_tokens_pope) for e in encs]
    g_texts = [a.text for a in greedy]
    g_ok = [_correct_yes_no(model_name, q, a) for q, a in zip(questions, g_texts)]
    g_cpu = sum(a.cpu for a in greedy) / max(sum(_n_tokens(a.tokens, eos) for a in greedy), 1)
    base = lime_config(model, "lime-reference")
    out: dict[str, Any] = {
        "condition": condition, "split": "adversarial", "n": len(questions), "mode": "reference",
        "paper_lr": base.lr, "kl_weight": base.kl_weight,
        "greedy": {"metrics": _result_dict(score_yes_no(model_name, questions, g_texts, {}))["metrics"],
                   "cpu_s_per_token": g_cpu},
        "diagnostics": {"confidence": answer_confidence(model, encs), "kv": kv_rms(model, processor, encs[:16])},
        "sweep": [],
    }
    for factor, steps in settings.sweep_grid:
        cfg = lime_config(model, "lime-reference", lr=base.lr * factor, steps=int(steps))
        t0 = time.perf_counter()
        texts, r_after, g_after, f_before, f_after, rel_drop, kl_last, cpu, ntok, updates = ([] for _ in range(10))
        gaps, top_in_m, rel_first = [], [], []
        for q, enc in zip(questions, encs):
            a = answer_item(model, processor, enc, "lime-reference", settings, settings.max_new_tokens_pope, cfg)
            texts.append(a.text)
            cpu.append(a.cpu)
            ntok.append(_n_tokens(a.tokens, eos))
            rec = a.record
            if rec is None or rec.relevance_after is None:
                continue
            pos = placeholder_positions(model, enc["input_ids"], model_name)
            r_after.append(float(rec.share_after[0]))
            g_after.append(grounding_of(rec.relevance_after[0], pos, region_mask(len(pos), q)))
            f_before.append(float(rec.focus_before[0]))
            f_after.append(float(rec.focus_after[0]))
            updates.append(int(rec.steps))
            if rec.rel_losses:
                rel_first.append(float(rec.rel_losses[0][0]))
                rel_drop.append(float(rec.rel_losses[0][0]) - float(rec.rel_losses[-1][0]))
                kl_last.append(float(rec.kl[-1][0]))
            if rec.relevance_before is not None:
                # how far the perceptual positions are from the top of softmax(R / tau)
                rb = rec.relevance_before[0].double()
                mod = modality_positions(model, processor, enc["input_ids"], enc["attention_mask"])[0]
                gaps.append(float((rb[~mod].max() - rb[mod].max()) / cfg.temperature))
                top_in_m.append(bool(mod[int(rb.argmax())]))
        ok = [_correct_yes_no(model_name, q, t) for q, t in zip(questions, texts)]
        before = [probe((condition, q.item_id, q.object), e, q, int(a.tokens[0]))
                  for q, e, a in zip(questions, encs, greedy)]
        n_upd = float(np.mean(updates)) if updates else 0.0
        # Adam moves each coordinate by at most about lr per update (|m_hat / sqrt(v_hat)| <= ~1), and in
        # reference mode the emitted token sees n_updates - 1 of them (the last update is discarded)
        effective = max(n_upd - 1.0, 0.0) if cfg.emit_from == "last_forward" else n_upd
        bound = cfg.lr * effective
        kv = out["diagnostics"]["kv"]
        point = {
            "label": f"lr x{factor:g}, {steps} steps", "lr_factor": factor, "lr": cfg.lr, "steps": int(steps),
            "metrics": _result_dict(score_yes_no(model_name, questions, texts, {}))["metrics"],
            "changes": changes_against(g_texts, texts, g_ok, ok, parsed_answers(model_name, g_texts),
                                       parsed_answers(model_name, texts)),
            "answers": texts,
            "reliance_before": _mean([b["reliance"] for b in before]),
            "reliance_after": _mean(r_after),
            "grounding_before": _mean([b["grounding"] for b in before]),
            "grounding_after": _mean(g_after),
            "focus_before": _mean(f_before), "focus_after": _mean(f_after),
            "focus_before_median": float(np.median(f_before)) if f_before else None,
            "focus_after_median": float(np.median(f_after)) if f_after else None,
            "rel_loss_first_mean": _mean(rel_first),
            "rel_loss_drop_mean": _mean(rel_drop), "kl_last_mean": _mean(kl_last),
            "softmax_gap_median": float(np.median(gaps)) if gaps else None,
            "share_top_relevance_on_modality": float(np.mean(top_in_m)) if top_in_m else None,
            "updates_mean": n_upd,
            "delta_bound": bound,
            "delta_bound_over_key_rms": bound / kv["key_rms_mean"],
            "delta_bound_over_value_rms": bound / kv["value_rms_mean"],
            "cpu_s_per_token": sum(cpu) / max(sum(ntok), 1),
        }
        point["cpu_ratio_to_greedy"] = point["cpu_s_per_token"] / g_cpu
        out["sweep"].append(point)
        logger.info("[%s investigation] %-22s acc=%.3f changed=%d fixed=%d introduced=%d (%.1f s)", model_name,
                    point["label"], point["metrics"]["accuracy"], point["changes"]["changed"],
                    point["changes"]["fixed"], point["changes"]["introduced"], time.perf_counter() - t0)
    return out


# --------------------------------------------------------------------------------------------------
# whole run
# --------------------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, threads, platform and library versions (:func:`benchmarks._common.machine_info`)."""
    return _common.machine_info("cpu", ("torch", "transformers", "lime_attr", "numpy"), gpu=False)


def _model_info(model: Any, model_name: str) -> dict[str, Any]:
    setup = MODEL_SETUP[model_name]
    return {
        "class": type(model).__name__,
        "model_type": model.config.model_type,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "modality": setup["modality"],
        "pope_benchmark": setup["pope_benchmark"],
        "scorer": setup["scorer"],
        "parser": setup["parser"],
        "positive_class": setup["positive"],
    }


METHOD_DESCRIPTIONS = {
    "greedy": "transformers generate(), do_sample=False",
    "sample": "transformers generate(), do_sample=True",
    "vcd": "greedy decoding of VCD's contrasted logits (lime_attr VCDLogitsProcessor via generation.generate)",
    "lime-reference": "lime_generate with LimeConfig.for_model(model, mode='reference'), greedy",
    "lime-fast": "lime_generate with LimeConfig.for_model(model, mode='fast', final_relevance=True), greedy (fast-mode defaults: confidence gate, compressed updates)",
    "lime-reference-lr10x": "as LIME reference with 10x the paper's learning rate (NOT the paper's settings; a sweep point)",
    "lime-reference-lr100x": "as LIME reference with 100x the paper's learning rate (NOT the paper's settings; a sweep point)",
}


def method_description(method: str) -> str:
    """The page's description of a method (:data:`METHOD_DESCRIPTIONS`, else the registered method's)."""
    from lime_attr.mitigation import get_decoding_method

    return METHOD_DESCRIPTIONS.get(method) or get_decoding_method(registered_method(method)).description


def run_report(settings: Settings, out_dir: Path | str, page: Optional[Path | str] = None,
               figures: bool = True) -> dict[str, Any]:
    """Run everything and write ``hallucination.json`` (and the figures and the page).

    Parameters
    ----------
    settings : Settings
    out_dir : path
        Folder of the json and the PNG figures.
    page : path, optional
        The reStructuredText page (default ``out_dir.parent / "benchmarks_hallucination.rst"``).
    figures : bool
        Draw the figures and write the page (the json is always written).

    Returns
    -------
    dict
        What was written to the json.
    """
    from lime_attr.models import load_builtin

    torch.set_num_threads(settings.threads)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    spec, reason = corruption_support()
    conditions: dict[str, Any] = {}
    for cond in settings.conditions:
        if cond not in CONDITIONS:
            raise ValueError(f"unknown condition {cond!r}; use {', '.join(CONDITIONS)}")
        if cond == "degraded" and spec is None:
            logger.warning("degraded condition skipped: %s", reason)
            conditions[cond] = {"status": "skipped", "reason": reason}
        else:
            conditions[cond] = {"status": "ok", "corruption": ({m: _corruption_for(spec, m, MODEL_SETUP[m]["modality"])
                                                                for m in settings.models} if cond == "degraded"
                                                               else None)}
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "settings": settings.to_dict(),
        "machine": machine_info(),
        "methods": {},
        "conditions": conditions,
        "models": {},
    }
    for method in settings.methods:
        report["methods"][method] = {
            "description": method_description(method),
            "decoding_pope": decoding_config(method, settings, settings.max_new_tokens_pope).to_dict(),
            "decoding_chair": decoding_config(method, settings, settings.max_new_tokens_chair).to_dict(),
        }
    for model_name in settings.models:
        model, processor = load_builtin(model_name)
        model.eval()
        probe = RelevanceProbe(model, processor, model_name)
        lime_cfgs = {m: lime_config(model, m) for m in settings.methods if m.startswith("lime-")}
        entry: dict[str, Any] = {
            "info": _model_info(model, model_name),
            "lime_config": {m: c.to_dict() for m, c in lime_cfgs.items()},  # the objective by name
            "conditions": {},
        }
        for cond, meta in conditions.items():
            if meta["status"] != "ok":
                entry["conditions"][cond] = dict(meta)
                continue
            corruption = meta["corruption"][model_name] if meta["corruption"] else None
            items = load_items(model_name, cond, settings, corruption)
            entry["conditions"][cond] = evaluate_condition(model, processor, model_name, items, cond, settings,
                                                           probe, lime_cfgs)
        if settings.sweep_limit > 0 and "adversarial" in settings.splits:
            cond = "degraded" if conditions.get("degraded", {}).get("status") == "ok" else "clean"
            if conditions.get(cond, {}).get("status") == "ok":
                meta = conditions[cond]
                corruption = meta["corruption"][model_name] if meta["corruption"] else None
                sweep_settings = dataclasses.replace(settings, limit=settings.sweep_limit, n_descriptions=0,
                                                     splits=("adversarial",))
                qs = load_items(model_name, cond, sweep_settings, corruption)["adversarial"]
                entry["investigation"] = investigate(model, processor, model_name, qs, cond, settings, probe)
                if cond != "degraded":
                    entry["investigation"]["note"] = ("run on the clean condition because the degraded one was "
                                                      "not available")
        report["models"][model_name] = entry
        del model, processor, probe
    report["runtime"] = {"wall_seconds": round(time.perf_counter() - wall0, 1),
                         "cpu_seconds": round(time.process_time() - cpu0, 1)}
    report = _common.clean_json(report)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(dumps(report) + "\n", encoding="utf-8")
    if figures:
        from ._hallucination_page import write_figures, write_rst

        names = write_figures(report, out_dir)
        page = Path(page) if page is not None else out_dir.parent / PAGE_NAME
        write_rst(report, page, out_dir.name, names)
    logger.info("wrote %s (%.0f s wall)", out_dir / JSON_NAME, report["runtime"]["wall_seconds"])
    return report


def render(json_path: Path | str, page: Optional[Path | str] = None) -> dict[str, Any]:
    """Redraw the figures (next to the json) and the page (default: the json folder's parent) from a json."""
    from ._hallucination_page import write_figures, write_rst

    json_path = Path(json_path)
    report = json.loads(json_path.read_text(encoding="utf-8"))
    names = write_figures(report, json_path.parent)
    write_rst(report, Path(page) if page is not None else json_path.parent.parent / PAGE_NAME, json_path.parent.name,
              names)
    return report


def merge(json_paths: Sequence[Path | str], out_dir: Path | str, page: Optional[Path | str] = None) -> dict[str, Any]:
    """Combine reports of the same settings run for different models (e.g. one process per model).

    The settings must agree except for ``models``; runtimes add up, the machine entry is the first's
    (each part's is kept under ``parts``). Writes the json, the figures and the page like :func:`run_report`.
    """
    parts = [json.loads(Path(p).read_text(encoding="utf-8")) for p in json_paths]
    if not parts:
        raise ValueError("merge needs at least one hallucination.json")
    strip = [{k: v for k, v in p["settings"].items() if k != "models"} for p in parts]
    if any(s != strip[0] for s in strip[1:]):
        raise ValueError("the reports to merge were run with different settings (other than models)")
    report = dict(parts[0])
    report["models"] = {name: entry for p in parts for name, entry in p["models"].items()}
    report["settings"] = dict(parts[0]["settings"], models=list(report["models"]))
    report["runtime"] = {k: round(sum(p["runtime"][k] for p in parts), 1) for k in ("wall_seconds", "cpu_seconds")}
    report["parts"] = [{"models": list(p["models"]), "generated": p["generated"], "machine": p["machine"],
                        "runtime": p["runtime"]} for p in parts]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JSON_NAME).write_text(dumps(report) + "\n", encoding="utf-8")
    render(out_dir / JSON_NAME, page)
    return report


#: JSON with one-space indentation, lists of scalars kept on one line (:func:`benchmarks._common.compact_dumps`)
dumps = _common.compact_dumps


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point (``python -m benchmarks.hallucination_report``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 questions per split, 1 description")
    parser.add_argument("--limit", type=int, default=None, help="questions per POPE split (default: all of them)")
    parser.add_argument("--descriptions", type=int, default=None, help="description (CHAIR) items per model")
    parser.add_argument("--sweep-limit", type=int, default=None,
                        help="adversarial questions in the investigation sweep (0 disables it)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS), help="comma-separated: prior,clean,degraded")
    parser.add_argument("--probe-items", type=int, default=None, help="items per prior-probe condition")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)}, or "
                             f"{QUICK_OUT.relative_to(REPO_ROOT)} with --quick); the page goes to its parent")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--render", type=Path, default=None, metavar="JSON",
                        help="only redraw the figures and the page from an existing hallucination.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                        help="combine reports run for different models into --out (json, figures, page)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "httpx", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.render is not None:
        return render(args.render)
    if args.merge is not None:
        return merge(args.merge, args.out or DEFAULT_OUT)
    conditions = tuple(c.strip() for c in args.conditions.split(",") if c.strip())
    overrides: dict[str, Any] = {"threads": args.threads, "conditions": conditions, "models": tuple(args.models)}
    if args.limit is not None:
        overrides["limit"] = args.limit
    if args.descriptions is not None:
        overrides["n_descriptions"] = args.descriptions
    if args.sweep_limit is not None:
        overrides["sweep_limit"] = args.sweep_limit
    if args.probe_items is not None:
        overrides["n_probe"] = overrides["n_probe_descriptions"] = args.probe_items
    settings = Settings.quick_run(**overrides) if args.quick else Settings(**overrides)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return run_report(settings, out)


if __name__ == "__main__":
    main()
