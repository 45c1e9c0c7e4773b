"""Smoke test of the LIME diagnosis (``benchmarks/lime_diagnosis.py``) on a tiny probe set, and its invariants."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import lime_diagnosis as ld


def _strict(text: str) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("diagnosis")
    settings = ld.Settings.quick_run(models=("digits-llava",), n_items=1)
    rep = ld.write_outputs(ld.run(settings), out)
    return rep, out


@pytest.fixture(scope="module")
def digits() -> tuple:
    from lime_attr import ModalityAttribution
    from lime_attr.models import load_builtin, prior_probe

    model, processor = load_builtin("digits-llava")
    item = prior_probe("digits-llava", "conflict", n=1, split="validation")[0]
    return model, processor, ModalityAttribution(model, processor), item, ld.encode(model, processor, item)


def test_json_structure(report: tuple[dict, Path]) -> None:
    rep, out = report
    on_disk = _strict((out / ld.JSON_NAME).read_text())
    assert on_disk == json.loads(json.dumps(rep, allow_nan=False))
    assert rep["settings"]["split"] == "validation"
    for name in rep["figures"]:
        assert (out / name).stat().st_size > 0
    assert ".. list-table::" in (out / ld.TABLES_NAME).read_text()
    entry = rep["models"]["digits-llava"]
    n = rep["settings"]["n_items"]
    assert set(entry["items"]) == {"conflict", "consistent_yes", "consistent_no", "control"}
    for cond, rows in entry["items"].items():
        assert len(rows) == n
        summary = entry["summary"][cond]
        assert summary["all"]["n"] == n == summary["correct"]["n"] + summary["wrong"]["n"]
        for row in rows:
            assert row["answer"] in ("yes", "no", "other") and row["correct"] == (row["answer"] == row["label"])
            shares = [row["flow"][f"pos_{g}"] for g in ld.FLOW_GROUPS]
            assert math.isclose(sum(shares), 1.0, rel_tol=1e-9)
            assert 0.0 <= row["answer_logit"]["share_abs"] <= 1.0 and 0.0 < row["one_hot"]["max_mass"] <= 1.0
    assert set(entry["trajectories"]) == set(ld.TRAJECTORY_SETTINGS)
    for setting, traj in entry["trajectories"].items():
        assert traj["second_order"] == ld.TRAJECTORY_SETTINGS[setting][1]
        for cond in ld.TRAJECTORY_CONDITIONS:
            steps = traj["conditions"][cond]["per_step"]
            assert [s["step"] for s in steps] == list(range(traj["steps"]))
            assert steps[0]["delta_k_ratio"] == 0.0 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_decision_relevance_is_linear_in_the_seed(digits: tuple) -> None:
    """R(z_yes - z_no) from one backward of the difference equals R(z_yes) - R(z_no)."""
    _, processor, attr, _, enc = digits
    yes, no = ld.answer_ids(processor)
    direct = ld.direct_difference_relevance(attr, enc, yes, no)
    parts = ld.logit_relevance(attr, enc, yes) - ld.logit_relevance(attr, enc, no)
    assert float(direct.abs().max()) > 1e-3  # not trivially zero
    torch.testing.assert_close(direct, parts, rtol=1e-5, atol=1e-5 * float(direct.abs().max()))


def test_groups_partition_the_sequence(digits: tuple) -> None:
    model, processor, _, item, enc = digits
    g = ld.position_groups(model, processor, enc, item, "digits-llava")
    real = enc["attention_mask"][0].bool()
    parts = torch.stack([g[k] for k in ld.FLOW_GROUPS]).long()
    assert torch.equal(parts.sum(0), real.long())  # every real position in exactly one group
    assert torch.equal(g["perceptual"] | g["text"], real) and not bool((g["perceptual"] & g["text"]).any())
    assert int(g["member"].sum()) >= 1  # the present member's glyph covers at least one cell
    tok = processor.tokenizer
    word = tok.convert_ids_to_tokens(enc["input_ids"][0][g["object_word"]].tolist())
    assert word == tok.convert_ids_to_tokens(tok.encode(item.object, add_special_tokens=False))


def test_measures_against_written_out_formulas() -> None:
    a = torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=torch.float64)
    assert ld.common_fraction(a, a)["common"] == 1.0 and ld.common_fraction(a, -a)["common"] == 0.0
    b = torch.tensor([0.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    expect = 1 - (1 + 3 + 0 + 3) / (3.5 + 4.5)
    assert ld.common_fraction(a, b)["common"] == pytest.approx(expect)
    groups = {"perceptual": torch.tensor([True, True, False, False]), "text": torch.tensor([False, False, True, True])}
    oh = ld.one_hotness(a, groups, torch.ones(4, dtype=torch.bool), 0.1)
    p = [math.exp(v / 0.1) for v in a.tolist()]
    assert oh["max_mass"] == pytest.approx(max(p) / sum(p)) and oh["argmax_perceptual"]
    assert oh["focus"] == pytest.approx((p[0] + p[1]) / sum(p))
    s = ld.split(a, groups)
    assert s["share_abs"] == pytest.approx(3 / 3.5) and s["sum_perceptual"] == -1.0 and s["sum_text"] == 0.5


def test_changes_against_a_loop() -> None:
    runs = [{"greedy": g, "emitted": e} for g, e in [("yes", "no"), ("no", "yes"), ("no", "no"), ("yes", "yes")]]
    labels = ["no", "no", "no", "yes"]
    ch = ld.changes(runs, labels)
    assert (ch["fixed"], ch["introduced"], ch["no_to_yes"], ch["yes_to_no"], ch["changed"]) == (1, 1, 1, 1, 2)
    assert ch["greedy_accuracy"] == 0.75 and ch["lime_accuracy"] == 0.75 and ch["sign_test_p"] == 1.0


def test_first_adam_step_is_at_most_lr(digits: tuple) -> None:
    """One Adam update moves every entry of Delta by at most lr, so its RMS is at most lr."""
    model, processor, _, _, enc = digits
    kv = ld.layer_kv_rms(model, processor, [enc])
    cfg = ld.lime_config(model, 100.0, "autograd", 8).replace(steps=2)
    steps = ld.trajectory(model, processor, enc, cfg, kv)["steps"]
    for ratio, rms in zip(steps[1]["delta_k_ratio_per_layer"], kv["key"]):
        assert 0.5 * cfg.lr < ratio * rms <= cfg.lr * (1 + 1e-6)
