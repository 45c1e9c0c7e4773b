"""Smoke test of the hallucination report (``benchmarks/hallucination_report.py``) on a few questions."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import hallucination_report as hr
from benchmarks._hallucination_page import render_rst


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("halluc") / "benchmarks"
    settings = hr.Settings(limit=2, n_descriptions=1, conditions=("clean",), models=("digits-llava",),
                           splits=("adversarial",), sweep_limit=2, sweep_grid=((1.0, 3), (100.0, 2)))
    rep = hr.run_report(settings, out, figures=False)
    return rep, out


def test_json_structure(report: tuple[dict, Path]) -> None:
    rep, out = report
    on_disk = json.loads((out / hr.JSON_NAME).read_text())
    assert on_disk == rep
    assert json.loads(hr.dumps(rep)) == rep
    for key in ("schema_version", "generated", "settings", "machine", "methods", "conditions", "models", "runtime"):
        assert key in rep
    assert rep["machine"]["cpu"] and rep["machine"]["versions"]["torch"]
    assert rep["runtime"]["wall_seconds"] > 0 and rep["runtime"]["cpu_seconds"] > 0
    assert set(rep["methods"]) == set(hr.METHOD_NAMES)
    model = rep["models"]["digits-llava"]
    assert model["lime_config"]["lime-reference"]["mode"] == "reference"
    assert model["lime_config"]["lime-fast"]["mode"] == "fast"
    assert model["lime_config"]["lime-fast"]["objective"] == "paper"  # the objective by name, not its fields
    cond = model["conditions"]["clean"]
    assert cond["status"] == "ok"
    assert set(cond["pope"]) == {"adversarial"}
    for split, per in cond["pope"].items():
        for method in hr.METHOD_NAMES:
            entry = per[method]
            assert set(entry["metrics"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
            assert entry["parser"]["name"] == "llava_pope"
            assert entry["config"]["split"] == split and entry["config"]["decoding"]
            assert len(entry["answers"]) == entry["n"] == 2
    assert set(cond["chair"]["greedy"]["metrics"]) == {"chair_s", "chair_i", "recall", "length"}
    for method in hr.METHOD_NAMES:
        t = cond["timing"][method]
        assert t["n_tokens"] > 0 and t["cpu_s_per_token"] > 0 and t["wall_s_per_token"] > 0
        r = cond["relevance"][method]
        assert 0 <= r["reliance_before"] <= 1
    assert cond["timing"]["greedy"]["cpu_ratio_to_greedy"] == 1.0
    for method in ("lime-reference", "lime-fast"):
        r = cond["relevance"][method]
        assert 0 <= r["reliance_after"] <= 1 and 0 <= r["grounding_after"] <= 1
        assert r["n_optimised"] <= r["n"]
        if r["n_optimised"]:  # LIME's own share_before == ModalityAttribution's reliance of the same token
            assert r["share_before_check"] < 1e-4
    assert cond["relevance"]["lime-reference"]["n_optimised"] == cond["relevance"]["lime-reference"]["n"]
    assert set(cond["changes"]["adversarial"]) == set(hr.METHOD_NAMES) - {"greedy"}
    inv = model["investigation"]
    assert [p["lr_factor"] for p in inv["sweep"]] == [1.0, 100.0]
    assert inv["diagnostics"]["kv"]["key_rms_mean"] > 0
    assert 0 < inv["diagnostics"]["confidence"]["p_top_median"] <= 1
    # only the requested conditions appear
    assert set(rep["conditions"]) == {"clean"}


def test_metrics_agree_with_the_scorers(report: tuple[dict, Path]) -> None:
    """Recompute accuracy from the stored answers and labels, and rescore with the project's scorer."""
    from lime_attr.evaluation import get_parser, score_pope
    from lime_attr.models import pope_questions

    rep, _ = report
    cond = rep["models"]["digits-llava"]["conditions"]["clean"]
    entry = cond["pope"]["adversarial"]["lime-reference"]
    labels = cond["labels"]["adversarial"]
    parse = get_parser("llava_pope")
    acc = sum(parse(a) == y for a, y in zip(entry["answers"], labels)) / entry["n"]
    assert math.isclose(entry["metrics"]["accuracy"], acc)
    qs = pope_questions("digits-llava", "adversarial")[: entry["n"]]
    assert [q.label for q in qs] == labels
    assert score_pope(qs, entry["answers"]).metrics == entry["metrics"]
    chair = rep["models"]["digits-llava"]["conditions"]["clean"]["chair"]["greedy"]
    again = hr.score_descriptions("digits-llava", [type("I", (), {"objects": gt})() for gt in chair["ground_truth"]],
                                  chair["answers"], {})
    assert again.metrics == chair["metrics"]


def test_grounding_helper_matches_grounding_score() -> None:
    """The region rule applied to LIME's relevance vectors equals lime_attr.metrics.grounding_score."""
    from lime_attr import ModalityAttribution
    from lime_attr.metrics import grounding_score
    from lime_attr.models import load_builtin, pope_questions

    torch.manual_seed(0)
    model, processor = load_builtin("digits-llava")
    attr = ModalityAttribution(model, processor)
    q = next(q for q in pope_questions("digits-llava", "random")[:8] if q.region is not None)
    enc = hr.encode(model, processor, q)
    res = attr.attribute(enc)
    pos = hr.placeholder_positions(model, enc["input_ids"], "digits-llava")
    assert len(pos) == 16
    mine = hr.grounding_of(res.token_relevance[0], pos, hr.region_mask(len(pos), q))
    assert math.isclose(mine, grounding_score(res, box=q.region, level="tokens"), rel_tol=1e-9, abs_tol=1e-12)


def test_changes_and_page() -> None:
    c = hr.changes_against(["yes", "no", "no", "yes"], ["yes", "yes", "no buzz", "no"],
                           [True, False, True, True], [True, True, True, False],
                           ["yes", "no", "no", "yes"], ["yes", "yes", "no", "no"])
    assert c == {"n": 4, "changed": 2, "fixed": 1, "introduced": 1, "other": 0, "text_changed": 3}


def test_page_renders_from_json(report: tuple[dict, Path]) -> None:
    rep, _ = report
    page = render_rst(rep, "benchmarks", {})
    assert page == render_rst(rep, "benchmarks", {})  # a pure function of the json
    acc = rep["models"]["digits-llava"]["conditions"]["clean"]["pope"]["adversarial"]["greedy"]["metrics"]["accuracy"]
    assert f"{acc:.3f}" in page
    assert "What the numbers say" in page and "Investigation" in page


@pytest.fixture(scope="module")
def prior_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("halluc_prior") / "benchmarks"
    settings = hr.Settings(n_probe=3, n_probe_descriptions=2, conditions=("prior",), models=("tones-qwen2audio",),
                           methods=("greedy", "lime-reference", "lime-reference-lr100x"), sweep_limit=0)
    return hr.run_report(settings, out, figures=False)


def test_prior_condition_runs_on_the_probe_sets(prior_report: dict) -> None:
    from lime_attr.models import prior_descriptions, prior_probe

    cond = prior_report["models"]["tones-qwen2audio"]["conditions"]["prior"]
    assert set(cond["pope"]) == set(hr.PROBE_BENCHES)
    for bench in hr.PROBE_BENCHES:
        assert cond["labels"][bench] == [it.label for it in prior_probe("tones-qwen2audio", bench, n=3)]
        for method in ("lime-reference", "lime-reference-lr100x"):
            c = cond["changes"][bench][method]
            assert c["sign_p"] == hr.sign_test(c["fixed"], c["introduced"])
            assert c["sign_p"] <= c["holm_p"] <= 1.0 and c["holm_family"] == 2 * (len(hr.PROBE_BENCHES) + 1)
    assert cond["relevance"]["lime-reference"]["kl_last"] >= 0.0
    items = prior_descriptions("tones-qwen2audio", n=2)
    for method, entry in cond["chair"].items():
        named = [it.partner in a.split() for it, a in zip(items, entry["answers"])]
        assert entry["partner_hallucination"] == sum(named) / len(named)
    lr = prior_report["models"]["tones-qwen2audio"]["lime_config"]
    assert math.isclose(lr["lime-reference-lr100x"]["lr"], 100 * lr["lime-reference"]["lr"])
    page = render_rst(prior_report, "benchmarks", {})
    assert "Prior-driven hallucination on clean inputs" in page and "not the paper's settings" in page
    acc = cond["pope"]["conflict"]["greedy"]["metrics"]["accuracy"]
    assert f"conflict accuracy {acc:.3f}" in page


def test_sign_test_and_holm_against_written_out_values() -> None:
    assert hr.sign_test(0, 0) == 1.0
    assert math.isclose(hr.sign_test(8, 0), 2 / 2**8)
    assert math.isclose(hr.sign_test(1, 9), 2 * (1 + 10) / 2**10)
    assert hr.sign_test(5, 5) == 1.0
    assert hr.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert hr.holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])
    with pytest.raises(ValueError, match="-lr<factor>x"):
        hr.lr_factor_of("lime-reference-lr10")


def test_merge_combines_per_model_runs(report: tuple[dict, Path], prior_report: dict, tmp_path: Path) -> None:
    rep, out = report
    merged = hr.merge([out / hr.JSON_NAME, out / hr.JSON_NAME], tmp_path / "benchmarks")
    assert merged["models"] == rep["models"] and len(merged["parts"]) == 2
    assert math.isclose(merged["runtime"]["cpu_seconds"], round(2 * rep["runtime"]["cpu_seconds"], 1), abs_tol=0.11)
    assert json.loads((tmp_path / "benchmarks" / hr.JSON_NAME).read_text()) == merged
    page = (tmp_path / hr.PAGE_NAME).read_text()
    acc = rep["models"]["digits-llava"]["conditions"]["clean"]["pope"]["adversarial"]["greedy"]["metrics"]["accuracy"]
    assert f"{acc:.3f}" in page and "hallucination_pope.png" in page
    other = tmp_path / "other.json"
    other.write_text(json.dumps(prior_report))
    with pytest.raises(ValueError, match="different settings"):
        hr.merge([out / hr.JSON_NAME, other], tmp_path / "x")
