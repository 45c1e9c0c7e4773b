"""The registered benchmarks: POPE, CHAIR and audio hallucination QA.

Each is a :class:`~lime_attr.evaluation.registry.Benchmark`: for the embedded demo models
(``builtin:digits-llava``, ``builtin:tones-qwen2audio``) the items are the held-out mini benchmarks of
:mod:`lime_attr.models.heldout`, for other models they come from the user's benchmark files.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from lime_attr.evaluation.audio_qa import load_audio_qa, score_audio_qa
from lime_attr.evaluation.chair import CocoChair, score_chair
from lime_attr.evaluation.pope import POPE_SPLITS, load_pope_questions, score_pope
from lime_attr.evaluation.registry import Benchmark, BenchmarkItems, BenchmarkRequest, register_benchmark

__all__ = ["POPE", "AUDIO_QA", "CHAIR", "CHAIR_PROMPT", "DIGIT_WORDS"]

#: synonyms of the digits in the embedded CHAIR benchmark
DIGIT_WORDS = {"0": ["zero"], "1": ["one"], "2": ["two"], "3": ["three"], "4": ["four"], "5": ["five"],
               "6": ["six"], "7": ["seven"], "8": ["eight"], "9": ["nine"]}

#: the captioning prompt of the CHAIR evaluations in the LLaVA / OPERA / LIME papers
CHAIR_PROMPT = "Please describe this image in detail."


def _heldout_questions(request: BenchmarkRequest, vision: bool) -> BenchmarkItems:
    task = request.builtin
    if vision != (task == "digits-llava"):
        raise ValueError(f"{request.benchmark} needs the {'vision' if vision else 'audio'} demo model, "
                         f"not builtin:{task}")
    from ..models import pope_questions

    return BenchmarkItems(pope_questions(task, request.split, corruption=request.corruption))


def _pope_items(request: BenchmarkRequest) -> BenchmarkItems:
    if request.builtin is not None:
        return _heldout_questions(request, vision=True)
    qfile = request.file("questions", "--questions FILE")
    items = [q for q in load_pope_questions(qfile) if q.split in (None, request.split)]
    return BenchmarkItems(items, media_root=request.files.get("image_dir"), question_field="text")


def _audio_qa_items(request: BenchmarkRequest) -> BenchmarkItems:
    if request.builtin is not None:
        return _heldout_questions(request, vision=False)
    qfile = request.file("questions", "--questions FILE")
    items = [q for q in load_audio_qa(qfile) if getattr(q, "sampling", None) in (None, request.split)]
    return BenchmarkItems(items, media_root=request.files.get("audio_dir"), question_field="prompt_text")


def _yes_no_scorer(score: Any) -> Any:
    def make_scorer(request: BenchmarkRequest, items: Sequence[Any]) -> Any:
        return functools.partial(score, parser=request.parser, keep_items=False)

    return make_scorer


def _chair_items(request: BenchmarkRequest) -> BenchmarkItems:
    if request.builtin is not None:
        from ..models import description_items

        return BenchmarkItems(description_items(request.builtin, corruption=request.corruption))
    for key in ("annotations", "synonyms", "image_dir"):
        request.file(key)
    with open(request.files["annotations"]) as fh:
        images = json.load(fh).get("images", [])
    prompt = request.files.get("prompt") or CHAIR_PROMPT
    items = [SimpleNamespace(image_id=im["id"], image=im["file_name"], prompt=None, question=prompt)
             for im in images]
    if not items:
        raise ValueError(f"{request.files['annotations']} lists no images")
    return BenchmarkItems(items, media_root=request.files["image_dir"], config={"prompt": prompt})


def _chair_scorer(request: BenchmarkRequest, items: Sequence[Any]) -> Any:
    if request.builtin is not None:
        vocab = DIGIT_WORDS if request.builtin == "digits-llava" else None
        if vocab is None:
            from ..models import object_names

            vocab = {name: [] for name in object_names(request.builtin)}
        truth = [set(it.objects) for it in items]
        return lambda its, answers, config=None: score_chair(  # noqa: E731
            answers, truth[: len(answers)], vocab, config=config, keep_items=False)
    chair = CocoChair.from_files(request.files["annotations"], request.files.get("captions"),
                                 request.files["synonyms"], image_ids=[it.image_id for it in items])
    return lambda its, answers, config=None: chair.score(its, answers, config=config, keep_items=False)  # noqa: E731


#: POPE (Li et al., 2023): yes/no object existence, "yes" positive
POPE = register_benchmark(Benchmark(
    name="pope", load_items=_pope_items, make_scorer=_yes_no_scorer(score_pope), parser="llava_pope",
    description="POPE yes/no object existence questions (Li et al., 2023)", splits=POPE_SPLITS))

#: CHAIR (Rohrbach et al., 2018): object hallucination in free descriptions
CHAIR = register_benchmark(Benchmark(
    name="chair", load_items=_chair_items, make_scorer=_chair_scorer, parser=None,
    description="CHAIR object hallucination in image descriptions (Rohrbach et al., 2018)"))

#: Audio hallucination QA (Kuan et al., 2024): yes/no sound-event existence, "no" positive
AUDIO_QA = register_benchmark(Benchmark(
    name="audio-qa", load_items=_audio_qa_items, make_scorer=_yes_no_scorer(score_audio_qa), parser="kuan2024",
    description="audio hallucination yes/no questions (Kuan et al., 2024)", splits=POPE_SPLITS))
