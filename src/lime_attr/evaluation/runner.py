"""The evaluation runner: answer every item, score, write the report -- in one process or under torchrun.

.. code-block:: python

    from functools import partial
    from lime_attr.evaluation import load_pope_questions, run_eval, score_pope

    questions = load_pope_questions("POPE/coco/coco_pope_random.json")
    result = run_eval(
        questions,
        answer_fn=lambda q: my_model_answer(q.image, q.text),
        scorer=partial(score_pope, parser="llava_pope"),
        config={"model": "llava-1.5-7b", "decoding": "greedy", "max_new_tokens": 16},
        output="reports/pope_coco_random.json",
    )

The same script runs with ``python script.py`` or ``torchrun --nproc_per_node 4 script.py``; the
report is the same (see :mod:`lime_attr.evaluation.sharding` for how).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from tqdm.auto import tqdm

from lime_attr.evaluation._common import PathLike, ensure_parent
from lime_attr.strict_json import jsonable
from lime_attr.evaluation.results import EvalResult
from lime_attr.evaluation.sharding import (
    DistInfo,
    all_gather_objects,
    broadcast_from_main,
    init_distributed,
    merge_shards,
    shard_indices,
)

__all__ = ["run_eval", "Scorer"]

logger = logging.getLogger(__name__)

#: A scorer ``(items, answers, config=...) -> EvalResult`` (e.g. ``score_pope``).
Scorer = Callable[..., EvalResult]


def _fingerprint(n: int, config: Mapping[str, Any]) -> str:
    blob = json.dumps({"n": n, "config": jsonable(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _raise_remote(statuses: Sequence[Any], what: str) -> None:
    failed = [(r, s) for r, s in enumerate(statuses) if s[0] == "error"]
    if failed:
        rank, (_, msg, tb) = failed[0]
        raise RuntimeError(f"{what} failed on rank {rank}: {msg}\n--- traceback on rank {rank} ---\n{tb}")


def run_eval(
    items: Sequence[Any],
    answer_fn: Callable[[Any], Any],
    scorer: Scorer,
    config: Optional[Mapping[str, Any]] = None,
    progress: bool = True,
    *,
    output: Optional[PathLike] = None,
    answers_output: Optional[PathLike] = None,
    include_items: bool = False,
    desc: str = "evaluating",
) -> EvalResult:
    """Answer every item with ``answer_fn``, score all answers with ``scorer``, write the report.

    In a single process this is a loop. Under torchrun (see :func:`~lime_attr.evaluation.init_distributed`)
    the process group is initialised if needed, rank ``r`` of ``N`` answers items ``r, r + N, ...``,
    the answers are gathered with ``all_gather_object`` and restored to the original order, rank 0
    scores them and writes the files, and the result is broadcast, so that every rank returns the
    same result -- equal to the single-process one.

    Parameters
    ----------
    items
        The questions / images; every rank must pass the same sequence (checked by length and config).
    answer_fn
        ``item -> answer`` (usually the model's generated text). Answers must be picklable.
    scorer
        Called once as ``scorer(items, answers, config=config)``; e.g. :func:`score_pope`,
        :func:`score_audio_qa`, a :class:`CocoChair`, or a ``functools.partial`` of them.
    config
        The decoding configuration (model, method, sampling, prompt, seed ...); passed to the scorer
        and stored in the report. Must be JSON-serialisable (or convertible, see ``to_dict``).
    progress
        Show a tqdm progress bar on rank 0.
    output
        JSON report path (written by rank 0): ``result.to_dict(include_items=include_items)``.
    answers_output
        Optional JSON-lines file of the raw answers in item order, ``{"index": i, "answer": ...}``.
    include_items
        Include per-item details in the JSON report.
    desc
        Progress-bar label.

    Returns
    -------
    EvalResult
        The scored result (on every rank).

    Raises
    ------
    RuntimeError
        If ranks disagree on the items / config, or ``answer_fn`` or the scorer raised on some rank
        (every rank raises, naming the failing rank, instead of hanging in a collective).
    """
    config = dict(config or {})
    info: DistInfo = init_distributed()
    n = len(items)
    if info.is_distributed:
        prints = all_gather_objects(_fingerprint(n, config), info)
        if len(set(prints)) != 1:
            raise RuntimeError(
                "ranks were given different items or config (fingerprints "
                f"{prints}); every rank must build the same item list and config"
            )
    my_indices = shard_indices(n, info.rank, info.world_size)
    logger.info("rank %d/%d answers %d of %d items", info.rank, info.world_size, len(my_indices), n)
    local: list[tuple[int, Any]] = []
    status: tuple[Any, ...]
    t0 = time.perf_counter()
    try:
        bar = tqdm(my_indices, desc=desc, disable=not (progress and info.is_main), dynamic_ncols=True)
        for i in bar:
            local.append((i, answer_fn(items[i])))
        status = ("ok", local)
    except Exception as exc:  # reported to every rank below, then re-raised
        if not info.is_distributed:
            raise
        status = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    statuses = all_gather_objects(status, info)
    _raise_remote(statuses, "answer_fn")
    answers = merge_shards([s[1] for s in statuses], n)
    logger.info("answered %d items in %.1f s", n, time.perf_counter() - t0)

    outcome: tuple[Any, ...] = ("ok", None)
    if info.is_main:
        try:
            result = scorer(items, answers, config=config)
            if output is not None:
                result.to_json(output, include_items=include_items)
            if answers_output is not None:
                p = ensure_parent(answers_output)
                with p.open("w", encoding="utf-8") as fh:
                    for i, a in enumerate(answers):
                        fh.write(json.dumps({"index": i, "answer": jsonable(a)}) + "\n")
            outcome = ("ok", result)
        except Exception as exc:
            if not info.is_distributed:
                raise
            outcome = ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())
    outcome = broadcast_from_main(outcome, info)
    _raise_remote([outcome], "scoring on rank 0")
    return outcome[1]
