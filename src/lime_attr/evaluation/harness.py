"""The evaluation harness: a model + a decoding method on POPE, CHAIR or audio-QA.

For the embedded demo models (``builtin:digits-llava``, ``builtin:tones-qwen2audio``) the questions are
the held-out mini benchmarks of :mod:`lime_attr.models.heldout`; for real models they come from the
user's benchmark files. Answers come from :func:`lime_attr.generation.generate` and are scored by the
scorers of this package; every result carries the parser and the full decoding configuration.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .audio_qa import load_audio_qa, score_audio_qa
from .chair import CocoChair, score_chair
from .pope import load_pope_questions, score_pope
from .runner import run_eval

__all__ = ["run_benchmark", "check_corruption", "check_benchmark_args", "BENCHMARK_FILES", "DIGIT_WORDS",
           "BUILTIN_PARSER"]

#: the benchmark-file arguments of :func:`run_benchmark` (``files``); the builtin models use their embedded
#: held-out questions instead
BENCHMARK_FILES = ("questions", "image_dir", "audio_dir", "annotations", "captions", "synonyms")

#: The answer parser of the embedded demo models. They answer a bare lower-case "yes" / "no", which the
#: ``kuan2024`` rule (case-sensitive, "No" only) would leave unparsed.
BUILTIN_PARSER = "strict"

#: synonyms of the digits in the embedded CHAIR benchmark
DIGIT_WORDS = {"0": ["zero"], "1": ["one"], "2": ["two"], "3": ["three"], "4": ["four"], "5": ["five"],
               "6": ["six"], "7": ["seven"], "8": ["eight"], "9": ["nine"]}

#: the captioning prompt of the CHAIR evaluations in the LLaVA / OPERA / LIME papers
CHAIR_PROMPT = "Please describe this image in detail."


def _splits(split: str) -> Sequence[str]:
    if split == "all":
        return _SPLITS
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; use random, popular, adversarial or all")
    return (split,)


def _answer_fn(model: Any, processor: Any, decoding: Any, builtin: Optional[str], media_root: Optional[str],
               question_field: str):
    from ..generation import generate, load_audio, load_image, prepare_inputs

    tok = getattr(processor, "tokenizer", processor)

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
        return generate(model, processor, enc, decoding).texts[0]

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
    """Score ``model_spec`` with ``decoding`` on ``benchmark`` (``pope``, ``chair`` or ``audio-qa``).

    Parameters
    ----------
    benchmark : {"pope", "chair", "audio-qa"}
        The benchmark.
    model_spec : str
        ``builtin:<name>``, a checkpoint folder or a hub id (recorded in the config).
    decoding : DecodingConfig
        Decoding method and settings.
    split : str
        ``random``, ``popular``, ``adversarial`` or ``all`` (POPE, audio-QA).
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
        Yes/no answer parser (:func:`lime_attr.evaluation.get_parser`). Default: the scorer's own
        (``llava_pope`` for POPE, ``kuan2024`` for audio-QA) on user files, :data:`BUILTIN_PARSER`
        (``strict``) on the builtin demo models.

    Returns
    -------
    list
        One result per split (POPE, audio-QA) or a single CHAIR result, each with
        ``config = {"model", "benchmark", "split", "decoding", "n"}``; builtin models add
        ``"corruption"`` (the canonical spec string, ``None`` for clean data).

    Raises
    ------
    ValueError
        Unknown benchmark or split, missing files, a bad corruption spec, or a corruption for a
        non-builtin model.
    """
    files = dict(files or {})
    check_benchmark_args(model_spec, limit, files)
    builtin = model_spec.split(":", 1)[1] if model_spec.startswith("builtin:") else None
    if parser is not None:
        from .parsing import get_parser

        get_parser(parser)  # an unknown name fails here, listing the registered parsers
    corrupt = check_corruption(corruption, model_spec)
    if model is None:
        from ..models import load_model

        model, processor = load_model(model_spec, dtype=dtype)
    base = {"model": model_spec, "benchmark": benchmark, "decoding": decoding.to_dict()}
    if builtin is not None:
        base["corruption"] = None if corrupt is None else str(corrupt)
    results = []
    if benchmark in ("pope", "audio-qa"):
        for sp in _splits(split):
            if builtin is not None:
                from ..models import pope_questions

                task = builtin
                if (benchmark == "pope") != (task == "digits-llava"):
                    raise ValueError(f"{benchmark} needs the {'vision' if benchmark == 'pope' else 'audio'} demo model, "
                                     f"not builtin:{task}")
                items = pope_questions(task, sp, corruption=corrupt)
                media_root, qfield = None, "question"
            else:
                qfile = files.get("questions")
                if not qfile:
                    raise ValueError(f"{benchmark} on a non-builtin model needs --questions FILE")
                if benchmark == "pope":
                    items = [q for q in load_pope_questions(qfile) if q.split in (None, sp)]
                    media_root, qfield = files.get("image_dir"), "text"
                else:
                    items = [q for q in load_audio_qa(qfile) if getattr(q, "sampling", None) in (None, sp)]
                    media_root, qfield = files.get("audio_dir"), "prompt_text"
            if limit is not None:
                items = items[:limit]
            if not items:
                raise ValueError(f"no {benchmark} questions for split {sp!r}")
            scorer = score_pope if benchmark == "pope" else score_audio_qa
            chosen = parser or (BUILTIN_PARSER if builtin is not None else None)
            if chosen is not None:
                scorer = functools.partial(scorer, parser=chosen)
            cfg = dict(base, split=sp, n=len(items))
            fn = _answer_fn(model, processor, decoding, builtin, media_root, qfield)
            results.append(run_eval(items, fn, functools.partial(scorer, keep_items=False), cfg, progress=progress,
                                    desc=f"{benchmark} {sp}"))
        return results
    if benchmark == "chair":
        if builtin is not None:
            from ..models import description_items

            items = description_items(builtin, corruption=corrupt)
            if limit is not None:
                items = items[:limit]
            vocab = DIGIT_WORDS if builtin == "digits-llava" else None
            if vocab is None:
                from ..models import object_names

                vocab = {name: [] for name in object_names(builtin)}
            truth = [set(it.objects) for it in items]
            scorer = lambda its, answers, config=None: score_chair(  # noqa: E731
                answers, truth[: len(answers)], vocab, config=config, keep_items=False)
            fn = _answer_fn(model, processor, decoding, builtin, None, "question")
            return [run_eval(items, fn, scorer, dict(base, n=len(items)), progress=progress, desc="chair")]
        for key in ("annotations", "synonyms", "image_dir"):
            if not files.get(key):
                raise ValueError(f"chair on a non-builtin model needs --{key.replace('_', '-')}")
        import json
        from types import SimpleNamespace

        with open(files["annotations"]) as fh:
            images = json.load(fh).get("images", [])
        items = [SimpleNamespace(image_id=im["id"], image=im["file_name"], prompt=None,
                                 question=files.get("prompt") or CHAIR_PROMPT) for im in images]
        if limit is not None:
            items = items[:limit]
        if not items:
            raise ValueError(f"{files['annotations']} lists no images")
        chair = CocoChair.from_files(files["annotations"], files.get("captions"), files["synonyms"],
                                     image_ids=[it.image_id for it in items])
        fn = _answer_fn(model, processor, decoding, None, files["image_dir"], "question")
        scorer = lambda its, answers, config=None: chair.score(its, answers, config=config, keep_items=False)  # noqa: E731
        return [run_eval(items, fn, scorer, dict(base, n=len(items), prompt=items[0].question), progress=progress,
                         desc="chair")]
    raise ValueError(f"unknown benchmark {benchmark!r}; use pope, chair or audio-qa")
