"""Tests of the sharded runner: real 2-process gloo runs under torchrun against a single-process run.

The worker script below is written to a temporary folder and launched with
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (CPU, gloo backend).
"""
from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lime_attr.evaluation import (
    DistInfo,
    from_pretrained_kwargs,
    init_distributed,
    load_pope_questions,
    run_eval,
    score_pope,
    shard_indices,
)
from lime_attr.evaluation.sharding import gather_in_order, merge_shards

FIX = Path(__file__).parent / "fixtures" / "eval"
SRC = Path(__file__).resolve().parents[1] / "src"

WORKER = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    from lime_attr.evaluation import load_pope_questions, run_eval, score_pope

    out, fixture, n, fail_rank = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rank = int(os.environ.get("RANK", 0))
    questions = load_pope_questions(fixture)[:n]
    config = {"model": "toy", "decoding": {"do_sample": False, "max_new_tokens": 4}}
    seen = []

    def answer_fn(q):
        seen.append(q.question_id)
        return "No, there is none." if q.question_id % 3 == 0 else "Yes, there is."

    result = run_eval(
        questions, answer_fn, score_pope, config, progress=True,
        output=out / "report.json", answers_output=out / "answers.jsonl",
    )
    (out / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "result": result.to_dict()}))

    # second evaluation in the same process group: answer_fn raises on one rank only
    def failing(q):
        if rank == fail_rank:
            raise ValueError("toy failure")
        return "Yes"

    if fail_rank >= 0:
        try:
            run_eval(questions, failing, score_pope, config, progress=False, output=out / "never.json")
        except RuntimeError as exc:
            (out / f"error{rank}.txt").write_text(str(exc))
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _worker_args(tmp: Path, out: Path, n: int, fail_rank: int) -> list[str]:
    worker = tmp / "worker.py"
    worker.write_text(WORKER)
    out.mkdir(parents=True, exist_ok=True)
    return [str(worker), str(out), str(FIX / "coco_pope_random.json"), str(n), str(fail_rank)]


@pytest.mark.slow
def test_torchrun_two_ranks_equals_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 9  # uneven: rank 0 answers 5 items, rank 1 answers 4
    # single process: the same script, run in this interpreter (no torchrun variables)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    args = _worker_args(tmp_path, tmp_path / "single", n, -1)
    monkeypatch.setattr(sys, "argv", args)
    runpy.run_path(args[0], run_name="__main__")
    # two processes, gloo on CPU
    args = _worker_args(tmp_path, tmp_path / "multi", n, 1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    multi = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert multi.returncode == 0, multi.stderr[-3000:]

    report_1 = json.loads((tmp_path / "single" / "report.json").read_text())
    report_2 = json.loads((tmp_path / "multi" / "report.json").read_text())
    assert report_2 == report_1
    assert report_1["counts"]["n"] == n
    assert (tmp_path / "multi" / "answers.jsonl").read_text() == (tmp_path / "single" / "answers.jsonl").read_text()

    # each rank answered its strided shard only, and returned the merged result
    r0 = json.loads((tmp_path / "multi" / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "multi" / "rank1.json").read_text())
    assert r0["seen"] == [1, 3, 5, 7, 9] and r1["seen"] == [2, 4, 6, 8]
    assert r0["result"] == r1["result"] == report_1

    # and the single-process report is what score_pope gives directly
    q = load_pope_questions(FIX / "coco_pope_random.json")[:n]
    answers = ["No, there is none." if x.question_id % 3 == 0 else "Yes, there is." for x in q]
    direct = score_pope(q, answers, config={"model": "toy", "decoding": {"do_sample": False, "max_new_tokens": 4}})
    assert direct.to_dict() == report_1

    # an answer_fn failing on rank 1 makes every rank raise (naming rank 1) instead of hanging
    for rank in (0, 1):
        msg = (tmp_path / "multi" / f"error{rank}.txt").read_text()
        assert "answer_fn failed on rank 1" in msg and "toy failure" in msg
    assert not (tmp_path / "multi" / "never.json").exists()


def test_single_process_run_eval(tmp_path: Path) -> None:
    q = load_pope_questions(FIX / "coco_pope_random.json")
    calls: list[int] = []

    def answer_fn(x):
        calls.append(x.question_id)
        return "Yes" if x.label == "yes" else "No"

    r = run_eval(q, answer_fn, score_pope, {"model": "oracle"}, progress=False, output=tmp_path / "r.json")
    assert calls == [x.question_id for x in q]
    assert r.accuracy == 1.0 and r.config == {"model": "oracle"}
    assert json.loads((tmp_path / "r.json").read_text()) == r.to_dict()

    def broken(x):
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):  # single process: the original exception
        run_eval(q, broken, score_pope, progress=False)


def test_run_eval_with_other_scorers(tmp_path: Path) -> None:
    from functools import partial

    from lime_attr.evaluation import CocoChair, load_audio_qa, load_generated_captions, score_audio_qa

    chair = CocoChair.from_files(FIX / "instances_mini.json", FIX / "captions_mini.json", FIX / "synonyms_mini.txt")
    ids, caps = load_generated_captions(FIX / "generated_captions.json")
    by_id = dict(zip(ids, caps))
    r = run_eval(ids, by_id.__getitem__, chair, {"model": "toy"}, progress=False, answers_output=tmp_path / "a.jsonl")
    assert r.chair_i == pytest.approx(0.25) and r.config == {"model": "toy"}
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [x["answer"] for x in lines] == caps

    items = load_audio_qa(FIX / "audio_qa_random.jsonl")
    a = run_eval(items, lambda it: "No", partial(score_audio_qa, parser="strict"), progress=False)
    assert a.recall == 1.0 and a.precision == 0.5 and a.metrics["yes_rate"] == 0.0


def test_init_distributed_without_torchrun_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed()
    assert info == DistInfo(0, 1, 0, None) and info.is_main and not info.is_distributed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")
    assert init_distributed().backend is None  # world size 1: no process group needed


def test_shard_indices_and_merge() -> None:
    assert shard_indices(9, 0, 2) == [0, 2, 4, 6, 8]
    assert shard_indices(9, 1, 2) == [1, 3, 5, 7]
    assert shard_indices(2, 3, 4) == []
    with pytest.raises(ValueError):
        shard_indices(3, 2, 2)
    with pytest.raises(RuntimeError, match="answered twice"):
        merge_shards([[(0, "a")], [(0, "b")]], 1)
    with pytest.raises(RuntimeError, match="unanswered"):
        merge_shards([[(0, "a")]], 2)
    with pytest.raises(RuntimeError, match="outside"):
        merge_shards([[(5, "a")]], 2)
    assert gather_in_order([(1, "b"), (0, "a")], 2, DistInfo()) == ["a", "b"]


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 60), st.integers(1, 9))
def test_strided_shards_partition_and_reorder(n: int, world: int) -> None:
    shards = [shard_indices(n, r, world) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    values = merge_shards([[(i, f"answer-{i}") for i in s] for s in reversed(shards)], n)
    assert values == [f"answer-{i}" for i in range(n)]


def test_from_pretrained_kwargs_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert from_pretrained_kwargs() == {}
    assert from_pretrained_kwargs(dtype=torch.bfloat16) == {"dtype": torch.bfloat16}
    assert from_pretrained_kwargs("auto") == {"device_map": "auto"}
    assert from_pretrained_kwargs("cpu") == {"device_map": "cpu"}
    assert from_pretrained_kwargs(None) == {}


def test_from_pretrained_kwargs_gpu_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPU layouts computed against a faked 4-GPU machine (nothing is allocated)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    for var, val in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "x"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(var, val)
    assert from_pretrained_kwargs() == {"device_map": {"": 1}}
    kw = from_pretrained_kwargs("auto", gpus_per_rank=2, max_memory_per_gpu="70GiB")
    assert kw == {"device_map": "auto", "max_memory": {2: "70GiB", 3: "70GiB"}}
    with pytest.raises(ValueError, match="nproc_per_node 1"):
        from_pretrained_kwargs("auto", gpus_per_rank=4, max_memory_per_gpu="70GiB")
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(ValueError, match="only 4 GPU"):
        from_pretrained_kwargs()
