"""Every JSON file the project ships or writes parses with a strict parser (no bare NaN / Infinity; issue 16).

The CLI's outputs are checked in ``tests/test_bad_input_cli.py``; the evaluation reports use
``allow_nan=False`` (``tests/test_evaluation.py``). This checks the committed ones: the benchmark results
under ``docs/`` and the demo models' files under ``src/``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("docs", "src") for p in (ROOT / d).rglob("*.json") if "_build" not in p.parts)


def _refuse(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_json_file_is_strict(path):
    json.loads(path.read_text(), parse_constant=_refuse)


def test_jsonable_turns_non_finite_into_null():
    from lime_attr.evaluation import jsonable

    text = json.dumps(jsonable({"a": float("nan"), "b": [float("inf"), 1.0]}), allow_nan=False)
    assert json.loads(text, parse_constant=_refuse) == {"a": None, "b": [None, 1.0]}
