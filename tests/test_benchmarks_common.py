"""The shared helpers of the benchmark scripts (benchmarks/_common.py)."""
from __future__ import annotations

import json
import math
import pathlib
import sys
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import _common  # noqa: E402


def test_rst_table_is_a_list_table():
    lines = _common.render_table(["a", "b"], [["1", "2"]], widths="30 70")
    assert lines == [".. list-table::", "   :header-rows: 1", "   :widths: 30 70", "",
                     "   * - a", "     - b", "   * - 1", "     - 2", ""]
    assert _common.render_table(["a", "b"], [], widths=[1, 2])[2] == "   :widths: 1 2"


def test_markdown_and_text_tables():
    assert _common.render_table(["x", "y"], [["1", "22"]], style="markdown", align="lr") == [
        "| x | y |", "| --- | ---: |", "| 1 | 22 |"]
    assert _common.render_table(["x", "yy"], [["10", "2"]], style="text", align="lr") == ["x  yy", "10  2"]
    assert _common.render_table(["x", "y"], [["1", "2"]], style="text", widths=[3, 0]) == ["x   y", "1   2"]
    with pytest.raises(ValueError, match="unknown table style"):
        _common.render_table(["x"], [], style="html")
    assert _common.fmt(None) == "n/a" and _common.fmt(0.12345, ".2f") == "0.12"
    assert _common.heading("Title", "=") == ["Title", "=====", ""]


def test_strict_json(tmp_path):
    obj = {"nan": float("nan"), "inf": math.inf, "tuple": (1, 2), "np": np.float32(0.5),
           "tensor": torch.tensor([1.0, float("nan")]), 3: "int key"}
    clean = _common.clean_json(obj)
    assert clean == {"nan": None, "inf": None, "tuple": [1, 2], "np": 0.5, "tensor": [1.0, None], "3": "int key"}
    path = _common.write_json(tmp_path / "sub" / "r.json", obj, indent=1)
    assert json.loads(path.read_text()) == clean and path.read_text().endswith("}\n")
    compact = _common.write_json(tmp_path / "c.json", {"answers": ["yes", "no"], "m": {"a": [1, 2]}}, compact=True)
    assert '"answers": ["yes", "no"]' in compact.read_text()
    assert json.loads(compact.read_text()) == {"answers": ["yes", "no"], "m": {"a": [1, 2]}}


@dataclass(frozen=True)
class _Knobs(_common.PresetSettings):
    n: int = 100
    names: tuple = ("a", "b")
    quick: bool = False
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"quick": dict(n=2, quick=True), "tiny": dict(n=1)}


def test_presets():
    assert _Knobs.quick_run() == _Knobs(n=2, quick=True)
    assert _Knobs.quick_run(n=5) == _Knobs(n=5, quick=True)
    assert _Knobs.preset("tiny").n == 1
    with pytest.raises(KeyError, match="unknown preset 'big' of _Knobs; use quick, tiny"):
        _Knobs.preset("big")
    assert _Knobs().to_dict() == {"n": 100, "names": ["a", "b"], "quick": False}


def test_machine_info_keys():
    info = _common.machine_info("cpu", ("torch", "no-such-dist"))
    assert list(info)[:7] == ["cpu", "cpu_cores_visible", "torch_threads", "platform", "python", "device", "gpu"]
    assert info["versions"] == {"torch": _common.dist_version("torch"), "no-such-dist": None}
    assert "gpu" not in _common.machine_info("cpu", (), gpu=False)
    cost = _common.cost_machine_info(torch.device("cpu"))
    assert list(cost)[:6] == ["platform", "cpu", "cpu_count", "torch_threads", "device", "versions"]
    assert list(cost["versions"]) == ["python", "torch", "transformers", "zennit", "captum", "lime_attr"]
    assert "logical cores" in _common.machine_line()


def test_timing_and_memory_helpers():
    calls = []
    assert _common.cpu_median(lambda: calls.append(1), repeats=3, warmup=2) >= 0 and len(calls) == 5
    with _common.Stopwatch() as clock:
        sum(range(10000))
    assert clock.wall >= 0 and clock.cpu >= 0
    samples = _common.timed_round_robin({"a": lambda: None}, repeats=2, warmup=1)
    assert len(samples["a"]["wall"]) == 2 and _common.median([3.0, 1.0, 2.0]) == 2.0
    big = _common.op_peak_bytes(lambda: torch.ones(1 << 18))
    assert big >= 4 << 18
    assert _common.rss_mb() > 0 and _common.max_rss_mb() > 0
