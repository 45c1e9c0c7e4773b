"""The evaluation harness: a model + a decoding method on a registered benchmark (POPE, CHAIR, audio-QA ...).

The benchmarks come from the registry (:mod:`lime_attr.evaluation.registry`; POPE, CHAIR and audio-QA
are registered in :mod:`lime_attr.evaluation.standard`). For the embedded demo models
(``builtin:digits-llava``, ``builtin:tones-qwen2audio``) the questions are the held-out mini benchmarks
of :mod:`lime_attr.models.heldout`; for real models they come from the user's benchmark files. Answers
come from :func:`lime_attr.generation.generate` and are scored by the benchmark's scorer; every result
carries the parser and the full decoding configuration.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from .registry import BenchmarkRequest, get_benchmark
from .runner import run_eval
from .standard import CHAIR_PROMPT, DIGIT_WORDS

__all__ = ["run_benchmark", "check_corruption", "check_benchmark_args", "BENCHMARK_FILES", "DIGIT_WORDS",
           "BUILTIN_PARSER", "CHAIR_PROMPT"]

#: the benchmark-file arguments of :func:`run_benchmark` (``files``); the builtin models use their embedded
#: held-out questions instead
BENCHMARK_FILES = ("questions", "image_dir", "audio_dir", "annotations", "captions", "synonyms")

#: The answer parser of the embedded demo models. They answer a bare lower-case "yes" / "no", which the
#: ``kuan2024`` rule (case-sensitive, "No" only) would leave unparsed.
BUILTIN_PARSER = "strict"


def _answer_fn(model: Any, processor: Any, run: Any, builtin: Optional[str], media_root: Optional[str],
               question_field: str):
    """``answer(item) -> text``; ``run(inputs) -> GenerationResult`` (a decoding session's)."""
    from ..generation import load_audio, load_image, prepare_inputs

    def prompt_of(item: Any, kind: str) -> str:
        if builtin is not None:
            return item.prompt
        q = getattr(item, question_field)
        messages = [{"role": "user", "content": [{"type": kind}, {"type": "text", "text": q}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    def answer(item: Any) -> str:
        images = audios = sr = None
        if getattr(item, "image", None) is not None and not isinstance(item.image, str):
            images, kind = [item.image], "image"
        elif getattr(item, "audio", None) is not None and not isinstance(item.audio, str):
            audios, sr, kind = [item.audio], item.sampling_rate, "audio"
        elif isinstance(getattr(item, "image", None), str):
            images, kind = [load_image(str(Path(media_root or ".") / item.image))], "image"
        else:
            fe = getattr(processor, "feature_extractor", None)
            sr = int(getattr(fe, "sampling_rate", 16000))
            path = getattr(item, "audio_path", None) or getattr(item, "audio_index", None)
            audios, kind = [load_audio(str(Path(media_root or ".") / str(path)), sr)], "audio"
        enc = prepare_inputs(model, processor, [prompt_of(item, kind)], images=images, audios=audios,
                             sampling_rate=sr)
        return run(enc).texts[0]

    return answer


def check_benchmark_args(model_spec: str, limit: Optional[int] = None,
                         files: Optional[Mapping[str, Any]] = None) -> None:
    """Cheap checks of :func:`run_benchmark`'s arguments, before any model is loaded.

    Raises
    ------
    ValueError
        A ``limit`` below 1, or benchmark files given for a builtin model (which would ignore them).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive number of questions per split (or None for all), got {limit!r}")
    if model_spec.startswith("builtin:"):
        given = [k for k in BENCHMARK_FILES if (files or {}).get(k) is not None]
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{model_spec} uses its embedded held-out questions, so {flags} would be ignored: drop "
                             f"{'it' if len(given) == 1 else 'them'}, or evaluate a checkpoint folder / hub id on "
                             "your benchmark files")


def check_corruption(corruption: Any, model_spec: str) -> Any:
    """The parsed corruption of a benchmark run (``None`` for clean data), checked before any model loads.

    Raises
    ------
    ValueError
        A bad spec, or a corruption for a model that is not a builtin demo model.
    """
    clean = corruption is None or (isinstance(corruption, str) and corruption.strip().lower() in ("clean", "none", ""))
    if clean:
        return None
    builtin = model_spec.split(":", 1)[1] if model_spec.startswith("builtin:") else None
    if builtin is None:
        raise ValueError(f"corruption={str(corruption)!r} applies only to the embedded held-out sets of the "
                         f"builtin demo models (builtin:digits-llava, builtin:tones-qwen2audio), not to "
                         f"{model_spec!r}; degrade your own benchmark files instead")
    from ..models import parse_corruption

    return parse_corruption(corruption, builtin)


def run_benchmark(benchmark: str, model_spec: str, decoding: Any, split: str = "all", limit: Optional[int] = None,
                  files: Optional[Mapping[str, Any]] = None, dtype: Optional[str] = None, progress: bool = True,
                  model: Any = None, processor: Any = None, corruption: Any = None,
                  parser: Optional[str] = None) -> list:
    """Score ``model_spec`` with ``decoding`` on a registered ``benchmark`` (``pope``, ``chair``, ``audio-qa`` ...).

    Parameters
    ----------
    benchmark : str
        A name of :func:`~lime_attr.evaluation.available_benchmarks`.
    model_spec : str
        ``builtin:<name>``, a checkpoint folder or a hub id (recorded in the config).
    decoding : DecodingConfig
        Decoding method (a name of :func:`~lime_attr.mitigation.available_decoding_methods`) and settings.
    split : str
        One of the benchmark's splits (``random``, ``popular``, ``adversarial`` for POPE and audio-QA)
        or ``all``; ignored by a benchmark without splits (CHAIR).
    limit : int, optional
        At most this many questions per split (items for CHAIR).
    files : mapping, optional
        Benchmark files of non-builtin models (``questions``, ``image_dir``, ...).
    dtype : str, optional
        Model dtype when ``model`` is not given.
    progress : bool
        Show progress bars.
    model, processor : optional
        An already loaded model (``model_spec`` is then only recorded).
    corruption : str, Corruption, mapping or None
        Builtin models only: degrade the held-out images / clips
        (:func:`lime_attr.models.parse_corruption`, e.g. ``"noise:0.35"``, ``"snr:18"`` or
        ``"degraded"`` for :data:`lime_attr.models.DEFAULT_CORRUPTION`). ``None``: clean data.
    parser : str, optional
        Yes/no answer parser (:func:`lime_attr.evaluation.get_parser`). Default: the benchmark's own
        (``llava_pope`` for POPE, ``kuan2024`` for audio-QA) on user files, :data:`BUILTIN_PARSER`
        (``strict``) on the builtin demo models.

    Returns
    -------
    list
        One result per split (POPE, audio-QA) or a single result (CHAIR), each with
        ``config = {"model", "benchmark", "split", "decoding", "n"}`` (no ``split`` without splits);
        builtin models add ``"corruption"`` (the canonical spec string, ``None`` for clean data).

    Raises
    ------
    ValueError
        Unknown benchmark (:class:`~lime_attr.evaluation.UnknownBenchmarkError`, listing the registered
        ones) or decoding method (:class:`~lime_attr.mitigation.UnknownDecodingMethodError`) or split, missing files, a bad corruption spec, or a corruption for a non-builtin model.
    """
    files = dict(files or {})
    check_benchmark_args(model_spec, limit, files)
    from ..mitigation import get_decoding_method

    get_decoding_method(decoding.method)  # an unregistered method fails here, listing the registered ones
    bench = get_benchmark(benchmark)
    splits = bench.resolve_splits(split)
    builtin = model_spec.split(":", 1)[1] if model_spec.startswith("builtin:") else None
    if parser is not None:
        from .parsing import get_parser

        get_parser(parser)  # an unknown name fails here, listing the registered parsers
    corrupt = check_corruption(corruption, model_spec)
    if model is None:
        from ..models import load_model

        model, processor = load_model(model_spec, dtype=dtype)
    base = {"model": model_spec, "benchmark": bench.name, "decoding": decoding.to_dict()}
    if builtin is not None:
        base["corruption"] = None if corrupt is None else str(corrupt)
    chosen = parser or (BUILTIN_PARSER if builtin is not None else bench.parser)
    from ..generation import generation_session

    with generation_session(model, processor, decoding) as run:  # e.g. LIME's LRP scope: installed once
        return [_run_split(bench, BenchmarkRequest(benchmark=bench.name, model_spec=model_spec, split=sp, files=files,
                                                   corruption=corrupt, parser=chosen),
                           _Answering(model, processor, run, builtin), base, limit, progress) for sp in splits]


@dataclass(frozen=True)
class _Answering:
    """What answers the questions: the model, its processor, the decoding session's ``run``, the builtin name."""

    model: Any
    processor: Any
    run: Any
    builtin: Optional[str]


def _run_split(bench: Any, request: BenchmarkRequest, answering: _Answering, base: dict, limit: Optional[int],
               progress: bool) -> Any:
    """One split of a benchmark: its items, scorer and config, answered with the session's ``run``."""
    sp = request.split
    data = bench.load_items(request)
    items = list(data.items) if limit is None else list(data.items)[:limit]
    if not items:
        raise ValueError(f"no {bench.name} questions for split {sp!r}" if sp is not None else f"no {bench.name} items")
    scorer = bench.make_scorer(request, items)
    cfg = dict(base, split=sp, n=len(items)) if sp is not None else dict(base, n=len(items))
    cfg.update(data.config)
    fn = _answer_fn(answering.model, answering.processor, answering.run, answering.builtin, data.media_root,
                    data.question_field)
    return run_eval(items, fn, scorer, cfg, progress=progress, desc=bench.name if sp is None else f"{bench.name} {sp}")
