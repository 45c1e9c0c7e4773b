"""End-to-end: ``lime-attr eval`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) equals one process.

Runs the real CLI on the embedded ``digits-llava`` model: two ranks answer the strided shards of the
same eight mini-POPE questions, rank 0 merges, scores and writes the report. The merged JSON and CSV
must be identical to a single-process run, and only rank 0 may report.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lime_attr.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"
ARGS = ["eval", "pope", "--model", "builtin:digits-llava", "--method", "greedy", "--split", "random", "--limit", "8",
        "--no-progress"]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("torchrun")
    return [found] if found else [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU
    return env


@pytest.mark.slow
def test_cli_eval_under_torchrun_equals_single_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    # two processes
    multi = tmp_path / "multi.json"
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "lime_attr.cli", *ARGS, "--output", str(multi)]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # only rank 0 prints the metrics and writes the files
    assert proc.stdout.count("pope random:") == 1, proc.stdout
    assert proc.stdout.count("wrote ") == 1, proc.stdout

    # one process, same questions (in this interpreter; no torchrun variables)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    single = tmp_path / "single.json"
    assert main([*ARGS, "--output", str(single)]) == 0
    capsys.readouterr()

    report_multi = json.loads(multi.read_text())
    report_single = json.loads(single.read_text())
    assert report_multi == report_single
    assert report_single["counts"]["n"] == 8
    assert report_single["config"]["split"] == "random" and report_single["config"]["n"] == 8
    assert multi.with_suffix(".csv").read_text() == single.with_suffix(".csv").read_text()
