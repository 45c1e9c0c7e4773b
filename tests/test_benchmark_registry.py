"""The benchmark registry: the standard benchmarks, clear errors, and a custom benchmark through harness and CLI."""
from __future__ import annotations

import functools
import json

import pytest

from lime_attr.errors import UnknownNameError
from lime_attr.evaluation import (
    POPE_SPLITS,
    Benchmark,
    BenchmarkItems,
    BenchmarkRequest,
    UnknownBenchmarkError,
    available_benchmarks,
    get_benchmark,
    register_benchmark,
    score_pope,
    unregister_benchmark,
)


def test_standard_benchmarks_are_registered():
    assert available_benchmarks()[:3] == ["pope", "chair", "audio-qa"]
    assert get_benchmark("pope").splits == POPE_SPLITS == get_benchmark("audio-qa").splits
    assert get_benchmark("chair").splits == ()
    assert get_benchmark("pope").parser == "llava_pope" and get_benchmark("audio-qa").parser == "kuan2024"


def test_unknown_benchmark_lists_the_registered_ones():
    with pytest.raises(UnknownNameError, match="unknown benchmark 'nope'; use pope, chair, audio-qa") as exc:
        get_benchmark("nope")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, UnknownBenchmarkError)


def test_register_refuses_duplicates_and_non_benchmarks():
    pope = get_benchmark("pope")
    assert register_benchmark(pope) is pope  # the same object again: a no-op
    clone = Benchmark(name="pope", load_items=pope.load_items, make_scorer=pope.make_scorer)
    with pytest.raises(ValueError, match="already registered"):
        register_benchmark(clone)
    with pytest.raises(TypeError, match="expects a Benchmark"):
        register_benchmark("pope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        register_benchmark(Benchmark(name="", load_items=pope.load_items, make_scorer=pope.make_scorer))


def test_resolve_splits():
    pope, chair = get_benchmark("pope"), get_benchmark("chair")
    assert pope.resolve_splits("all") == POPE_SPLITS
    assert pope.resolve_splits("popular") == ("popular",)
    assert chair.resolve_splits("anything") == (None,)
    with pytest.raises(ValueError, match="unknown split 'weird'; use random, popular, adversarial or all"):
        pope.resolve_splits("weird")


def test_request_names_the_missing_flag():
    req = BenchmarkRequest(benchmark="pope", model_spec="some/model", files={"questions": None})
    assert req.builtin is None
    with pytest.raises(ValueError, match="pope on a non-builtin model needs --questions"):
        req.file("questions")
    assert BenchmarkRequest(benchmark="pope", model_spec="builtin:digits-llava").builtin == "digits-llava"


# ------------------------------------------------------------------------------- a custom toy benchmark

models = pytest.importorskip("lime_attr.models")


def _toy_items(request: BenchmarkRequest) -> BenchmarkItems:
    """Only the "yes" questions of the held-out demo set: a toy benchmark in a few lines."""
    if request.builtin != "digits-llava":
        raise ValueError("toy-yes runs on builtin:digits-llava only")
    qs = models.pope_questions("digits-llava", "random", n_items=6, corruption=request.corruption)
    return BenchmarkItems([q for q in qs if q.label == "yes"], config={"toy": request.split})


TOY = Benchmark(
    name="toy-yes",
    load_items=_toy_items,
    make_scorer=lambda request, items: functools.partial(score_pope, parser=request.parser, keep_items=False),
    parser="llava_pope",
    description="the yes questions of the held-out digits set",
    splits=("only",),
)


@pytest.fixture
def toy():
    register_benchmark(TOY)
    yield TOY
    unregister_benchmark(TOY.name)
    assert TOY.name not in available_benchmarks()


needs_weights = pytest.mark.skipif("digits-llava" not in models.available_builtins(),
                                   reason="demo weights not installed")


@needs_weights
def test_custom_benchmark_runs_through_the_harness(toy):
    from lime_attr.evaluation.harness import run_benchmark
    from lime_attr.generation import DecodingConfig

    (res,) = run_benchmark("toy-yes", "builtin:digits-llava", DecodingConfig(max_new_tokens=2), limit=3,
                           progress=False)
    d = res.to_dict()
    assert d["config"]["benchmark"] == "toy-yes" and d["config"]["split"] == "only"
    assert d["config"]["n"] == 3 and d["config"]["toy"] == "only"
    assert d["parser"]["name"] == "strict"  # the builtin models' parser, as for POPE
    assert d["counts"]["n"] == 3
    with pytest.raises(ValueError, match="unknown split 'random'; use only or all"):
        run_benchmark("toy-yes", "builtin:digits-llava", DecodingConfig(), split="random", progress=False)
    with pytest.raises(ValueError, match="toy-yes runs on builtin:digits-llava only"):
        run_benchmark("toy-yes", "builtin:tones-qwen2audio", DecodingConfig(), progress=False)


@needs_weights
def test_custom_benchmark_runs_through_the_cli(toy, tmp_path, capsys):
    from lime_attr.cli import main

    out = tmp_path / "toy.json"
    rc = main(["eval", "toy-yes", "--model", "builtin:digits-llava", "--limit", "2", "--max-new-tokens", "2",
               "--no-progress", "--output", str(out)])
    assert rc == 0
    assert "only: accuracy=" in capsys.readouterr().out  # the scorer (score_pope) names the result "pope"
    report = json.loads(out.read_text())
    assert report["config"]["benchmark"] == "toy-yes" and report["counts"]["n"] == 2


def test_cli_offers_the_registered_benchmarks(toy, capsys):
    from lime_attr.cli import main

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = capsys.readouterr().out
    assert "toy-yes" in text and "audio-qa" in text
    with pytest.raises(SystemExit) as exc:
        main(["eval", "no-such-bench", "--model", "builtin:digits-llava"])
    assert exc.value.code == 2
    assert "invalid choice: 'no-such-bench'" in capsys.readouterr().err
