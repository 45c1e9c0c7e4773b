"""Smoke test of the faithfulness benchmark (benchmarks/faithfulness.py) on tiny untrained models.

Runs the whole pipeline (every method, perturbation curves, cost, json, figures, page) on a few
examples in seconds, and checks on synthetic models with known evidence that a correct attribution
beats the random baseline. Not a timing test.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

pytest.importorskip("captum")
pytest.importorskip("zennit")
pytest.importorskip("matplotlib")

from benchmarks._methods import all_methods  # noqa: E402
from benchmarks._perturbation import (  # noqa: E402
    CurveResult,
    perturbation_curve,
    removal_order,
    tie_break_permutations,
)
from benchmarks._report import render_rst  # noqa: E402
from benchmarks._tasks import BenchInstance, cnn_instance, llama_instance, vit_instance  # noqa: E402
from benchmarks.bench_models import RetrievalTask, build_model  # noqa: E402
from benchmarks.faithfulness import Settings, evaluate_instance, run_benchmark  # noqa: E402

N = 6
STEPS = 4
STATUSES = {"ok", "skipped", "not_applicable"}


def test_pipeline_on_tiny_untrained_models(tmp_path):
    """Every method, curves, cost, json, figures and page, on three tiny untrained models."""
    torch.set_num_threads(1)
    out = tmp_path / "benchmarks"
    instances = [
        cnn_instance(build_model("cnn", width=4), N),
        vit_instance(build_model("vit", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32), N),
        llama_instance(build_model("llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1), N),
    ]
    settings = Settings(n_examples=N, steps=STEPS, chunk=4, cost_batch=4, repeats=1, warmup=0, quick=True)
    run_benchmark(instances, settings, out)

    data = json.loads((out / "faithfulness.json").read_text())
    assert set(data) >= {"schema_version", "settings", "machine", "methods", "models", "runtime_seconds"}
    assert set(data["models"]) == {"cnn", "vit", "llama"}
    assert data["machine"]["versions"]["torch"]
    for name in ("faithfulness_cnn.png", "faithfulness_vit.png", "faithfulness_llama.png",
                 "faithfulness_abpc.png", "faithfulness_cost.png"):
        assert (out / name).stat().st_size > 1000
    page = (tmp_path / "benchmarks_faithfulness.rst").read_text()
    assert "benchmarks/faithfulness_cnn.png" in page and "ABPC" in page
    figures = {"curves": {k: f"faithfulness_{k}.png" for k in data["models"]}}
    assert render_rst(data, "benchmarks", figures) == render_rst(data, "benchmarks", figures)

    for model_name, model in data["models"].items():
        assert model["n_examples"] == N
        assert model["gradient_reference"]["time_ratio"] == pytest.approx(1.0)
        assert set(model["methods"]) == {m.name for m in all_methods()}
        for method, entry in model["methods"].items():
            assert entry["status"] in STATUSES, (model_name, method)
            if entry["status"] != "ok":
                assert entry["reason"]
                continue
            for quantity in ("logit", "probability"):
                f = entry["faithfulness"][quantity]
                assert len(f["morf_curve"]) == len(f["lerf_curve"]) == STEPS + 1
                # both curves start from the same clean input
                assert f["morf_curve"][0] == pytest.approx(f["lerf_curve"][0])
                assert math.isfinite(f["abpc"]) and math.isfinite(f["auc_morf"])
                assert f["abpc"] == pytest.approx(f["auc_lerf"] - f["auc_morf"])
            if entry["family"] != "reference":
                assert entry["cost"]["seconds_median"] > 0 and entry["cost"]["time_ratio"] > 0
        # the methods that need nothing from lime_attr ran everywhere they apply
        ok = {k for k, v in model["methods"].items() if v["status"] == "ok"}
        assert {"captum:Saliency", "captum:InputXGradient", "captum:IntegratedGradients",
                "captum:GradientShap", "random"} <= ok
        if model_name == "cnn":
            assert {"captum:LRP", "zennit:EpsilonGammaBox", "zennit:EpsilonPlus"} <= ok
        else:
            assert "attention-rollout" in ok
    # the same rules in two libraries agree (BatchNorm merged in both; LRP-0 = Captum's LRP on ReLU nets)
    agreement = {tuple(a["methods"]): a["cosine_min"] for a in data["models"]["cnn"]["agreement"]}
    for pair in (("lime_attr:epsilon-plus+merge-bn", "zennit:EpsilonPlus"),
                 ("lime_attr:epsilon-gamma+merge-bn", "zennit:EpsilonGammaBox"),
                 ("lime_attr:attnlrp", "captum:LRP")):
        if pair in agreement:  # both ran
            assert agreement[pair] > 0.999, pair
    evidence = data["models"]["llama"]["methods"]["oracle:evidence"]["evidence"]
    assert evidence["evidence_mass"] == pytest.approx(1.0) and evidence["pointing_accuracy"] == 1.0


def test_exact_contributions_beat_random_on_a_linear_model():
    """For a linear model and a zero baseline, w * x is the exact effect of removing each feature."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 20, generator=gen)
    weight = torch.randn(20, 3, generator=gen)
    forward = lambda inputs: inputs @ weight  # noqa: E731
    target = torch.zeros(32, dtype=torch.long)
    groups = torch.arange(20)
    tie = tie_break_permutations(32, 20)
    exact = x * weight[:, 0]
    random_scores = torch.rand(32, 20, generator=gen, dtype=torch.float64)

    def abpc(scores):
        curves = [perturbation_curve(forward, x, torch.zeros(20), groups, removal_order(scores, d, tie), target)[0]
                  for d in (True, False)]
        summary = CurveResult(*curves).summary()
        return summary["abpc"], summary["morf_curve"]

    good, morf = abpc(exact.double())
    bad, _ = abpc(random_scores)
    assert good > bad
    # removing features with positive contribution first makes the MoRF curve fall monotonically at first
    assert morf[1] <= morf[0]


class _EvidenceReader(nn.Module):
    """Logit 0 = sum over positions of embedding dim 0, which is 1 exactly on evidence tokens."""

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        score = embeds[..., 0].sum(dim=1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def test_evidence_attribution_beats_random_on_a_synthetic_retrieval_model():
    task = RetrievalTask()
    batch = task.sample(24, torch.Generator().manual_seed(5))
    seq, dim = task.seq_len, 4
    embeds = torch.randn(24, seq, dim, generator=torch.Generator().manual_seed(6)) * 0.1
    embeds[..., 0] = batch.evidence.float()
    model = _EvidenceReader()
    inst = BenchInstance(
        name="synthetic", model=model, forward=model, inputs=embeds,
        targets=torch.zeros(24, dtype=torch.long), labels=torch.zeros(24, dtype=torch.long),
        groups=torch.arange(seq)[:, None].expand(seq, dim).contiguous(), n_features=seq,
        baseline=torch.zeros(seq, dim), background=embeds[:4], feature_unit="token",
        baseline_note="zero embedding", evidence=batch.evidence,
    )
    wanted = {"oracle:evidence", "random", "captum:InputXGradient"}
    methods = [m for m in all_methods() if m.name in wanted]
    settings = Settings(n_examples=24, chunk=8, cost_batch=4, repeats=1, warmup=0, quick=True)
    result = evaluate_instance(inst, methods, settings)["methods"]
    abpc = {k: result[k]["faithfulness"]["logit"]["abpc"] for k in wanted}
    assert abpc["oracle:evidence"] > abpc["random"] + 1.0
    assert abpc["captum:InputXGradient"] > abpc["random"] + 1.0
    assert result["captum:InputXGradient"]["evidence"]["pointing_accuracy"] == 1.0
    assert result["random"]["evidence"]["evidence_mass"] < 0.5


def test_lrp_cost_benchmark_runs_and_records_its_allocator_setting(tmp_path):
    """``bench_lrp_cost`` end to end on the MLP (one repeat), with ``--malloc reuse`` (it re-executes itself
    with glibc's reuse settings): the JSON has the ratios and says which allocator setting was used."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / "cost.json"
    env = dict(os.environ, PYTHONPATH=f"{root / 'src'}:{root}")
    subprocess.run([sys.executable, "-m", "benchmarks.bench_lrp_cost", "--models", "mlp", "--repeats", "1",
                    "--warmup", "0", "--no-memory", "--threads", "1", "--malloc", "reuse", "--out", str(out)],
                   cwd=root, env=env, check=True, capture_output=True, timeout=300)
    data = json.loads(out.read_text())
    assert data["malloc"] == "reuse"
    mlp = data["models"]["mlp"]
    assert mlp["gradient"]["cpu_time_ratio"] == 1.0 and mlp["lrp:epsilon"]["cpu_time_ratio"] > 0
