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

__all__ = ["run_benchmark", "DIGIT_WORDS", "SOUND_VOCABULARY"]

#: synonyms of the digits in the embedded CHAIR benchmark
DIGIT_WORDS = {"0": ["zero"], "1": ["one"], "2": ["two"], "3": ["three"], "4": ["four"], "5": ["five"],
               "6": ["six"], "7": ["seven"], "8": ["eight"], "9": ["nine"]}

_SPLITS = ("random", "popular", "adversarial")

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


def run_benchmark(benchmark: str, model_spec: str, decoding: Any, split: str = "all", limit: Optional[int] = None,
                  files: Optional[Mapping[str, Any]] = None, dtype: Optional[str] = None, progress: bool = True,
                  model: Any = None, processor: Any = None) -> list:
    """Score ``model_spec`` with ``decoding`` on ``benchmark`` (``pope``, ``chair`` or ``audio-qa``).

    Returns one result per split (POPE, audio-QA) or a single CHAIR result, each with
    ``config = {"model", "benchmark", "split", "decoding", "n"}``.
    """
    files = dict(files or {})
    if model is None:
        from ..models import load_model

        model, processor = load_model(model_spec, dtype=dtype)
    builtin = model_spec.split(":", 1)[1] if model_spec.startswith("builtin:") else None
    base = {"model": model_spec, "benchmark": benchmark, "decoding": decoding.to_dict()}
    results = []
    if benchmark in ("pope", "audio-qa"):
        for sp in _splits(split):
            if builtin is not None:
                from ..models import pope_questions

                task = builtin
                if (benchmark == "pope") != (task == "digits-llava"):
                    raise ValueError(f"{benchmark} needs the {'vision' if benchmark == 'pope' else 'audio'} demo model, "
                                     f"not builtin:{task}")
                items = pope_questions(task, sp)
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
            cfg = dict(base, split=sp, n=len(items))
            fn = _answer_fn(model, processor, decoding, builtin, media_root, qfield)
            results.append(run_eval(items, fn, functools.partial(scorer, keep_items=False), cfg, progress=progress,
                                    desc=f"{benchmark} {sp}"))
        return results
    if benchmark == "chair":
        if builtin is not None:
            from ..models import description_items

            items = description_items(builtin)
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
