"""The pre-registered evaluation's rules (``benchmarks/lime_objectives_eval.py``, ``docs/lime_evaluation.rst``):
the selection rule, the recommendation, the counts and the corrections, on made-up counts where the
answer is known; and one item end to end on a demo model."""
from __future__ import annotations

import pytest

from benchmarks import lime_objectives_eval as ev
from benchmarks._report import sign_test

pytestmark = pytest.mark.usefixtures("one_thread")


def _cell(net_conflict=0, net_control=0, net_yes=0, net_no=0, cost=1.0) -> dict:
    nets = {"conflict": net_conflict, "control": net_control, "consistent_yes": net_yes, "consistent_no": net_no}
    return {c: {"net": n, "cpu_per_token": cost} for c, n in nets.items()}


def test_selection_takes_the_largest_net_fixes_among_settings_that_keep_the_consistent_conditions():
    settings = [s for s in ev.grid() if s.objective == "decision"]
    per = {s.name: _cell() for s in settings}
    a, b, c = settings[0], settings[2], settings[4]  # x1, x10, x100 (autograd)
    per[a.name] = _cell(net_conflict=2, net_control=1)
    per[b.name] = _cell(net_conflict=5, net_control=3, net_yes=-1)  # allowed: -1
    per[c.name] = _cell(net_conflict=20, net_control=9, net_no=-2)  # excluded: -2 on consistent_no
    assert ev.select(per, settings) == b


def test_selection_breaks_ties_by_smaller_lr_then_autograd_and_refuses_no_gain():
    settings = [s for s in ev.grid() if s.objective == "paper"]
    per = {s.name: _cell(net_conflict=3) for s in settings}
    chosen = ev.select(per, settings)
    assert chosen.lr_factor == 1.0 and chosen.second_order == "autograd"
    per = {s.name: _cell(net_conflict=1, net_control=-1) for s in settings}  # net 0: nothing to select
    assert ev.select(per, settings) is None


def test_recommendation_is_the_selected_setting_with_most_net_fixes():
    grid = ev.grid()
    per = {s.name: _cell(cost=1.0) for s in grid}
    sel = {o: None for o in ev.OBJECTIVES}
    sel["paper"] = ev.Setting("paper", 10.0, "autograd")
    sel["evidence"] = ev.Setting("evidence", 1.0, "exact")
    per[sel["paper"].name] = _cell(net_conflict=4, cost=1.0)
    per[sel["evidence"].name] = _cell(net_conflict=6, cost=3.0)
    assert ev.recommend(per, sel) == sel["evidence"]
    per[sel["evidence"].name] = _cell(net_conflict=4, cost=3.0)  # a tie goes to the cheaper
    assert ev.recommend(per, sel) == sel["paper"]
    assert ev.recommend(per, {o: None for o in ev.OBJECTIVES}) is None


def test_counts_and_holm_over_every_cell():
    g = [ev.Row("no", True, 1.0), ev.Row("yes", False, 1.0), ev.Row("yes", False, 1.0)]
    m = [ev.Row("yes", False, 2.0, kl=0.1), ev.Row("no", True, 4.0, kl=0.3), ev.Row("no", True, 3.0)]
    c = ev.counts(g, m)
    assert (c["fixed"], c["introduced"], c["net"]) == (2, 1, 1)
    assert c["accuracy"] == pytest.approx(2 / 3) and c["greedy_accuracy"] == pytest.approx(1 / 3)
    assert c["cpu_ratio"] == pytest.approx(3.0) and c["kl"] == pytest.approx(0.2)
    results = {"a": {"conflict": {"fixed": 9, "introduced": 0}}, "b": {"control": {"fixed": 1, "introduced": 1}}}
    ev.add_tests(results)
    p = sign_test(9, 0)
    assert results["a"]["conflict"]["holm_p"] == pytest.approx(min(1.0, 2 * p))
    assert results["b"]["control"]["holm_p"] == 1.0 and results["a"]["conflict"]["holm_family"] == 2


def test_one_item_end_to_end_on_the_demo_model():
    from lime_attr.models import available_builtins

    if "digits-llava" not in available_builtins():
        pytest.skip("demo weights not installed")
    model, processor = ev._load("digits-llava")
    items = ev.encoded_items(model, processor, "digits-llava", "validation", 1)
    greedy = ev.greedy_rows(model, processor, "digits-llava", items["conflict"])
    none = ev.lime_rows(model, processor, "digits-llava", items["conflict"], ev.Setting("decision", 0.0, "exact"))
    assert greedy[0].answer in ("yes", "no") and 0 < greedy[0].p_top <= 1
    assert none[0].answer == greedy[0].answer  # lr 0: the greedy answer
    assert 0 <= none[0].share_before <= 1
    from lime_attr.mitigation import LimeConfig

    assert LimeConfig.recommendation(model).evaluated  # the loaded demo model is recognised


def test_session_rows_give_the_same_answers_and_share_the_entry_cost():
    """``--session``: the answers and records of lime_generate's; every row's CPU time includes its share of the
    session's entry and exit (so the total is the whole block's)."""
    from lime_attr.models import available_builtins

    if "tones-qwen2audio" not in available_builtins():
        pytest.skip("demo weights not installed")
    model, processor = ev._load("tones-qwen2audio")
    items = ev.encoded_items(model, processor, "tones-qwen2audio", "validation", 3, ("conflict",))["conflict"]
    setting = ev.Setting("scaled", 10.0, "autograd", mode="incremental")
    plain = ev.lime_rows(model, processor, "tones-qwen2audio", items, setting)
    shared = ev.lime_rows(model, processor, "tones-qwen2audio", items, setting, session=True)
    assert [(r.answer, r.share_before, r.share_after, r.kl) for r in plain] == \
        [(r.answer, r.share_before, r.share_after, r.kl) for r in shared]
    assert all(r.cpu > 0 and r.n_tokens == 1 for r in shared)


def test_recommended_returns_the_papers_settings_with_the_evaluations_caveat():
    from lime_attr.mitigation import LimeConfig

    for name, model_type in (("digits-llava", "llava"), ("tones-qwen2audio", "qwen2_audio")):
        rec = LimeConfig.recommendation(name)
        assert rec.evaluated and "not met" in rec.evidence
        assert rec.config == LimeConfig.for_model(model_type)
    other = LimeConfig.recommendation("qwen2_vl")
    assert not other.evaluated and "not evaluated" in other.evidence
    assert other.config == LimeConfig.for_model("qwen2_vl")
    assert LimeConfig.recommended("digits-llava", steps=3).steps == 3


def _merged(control=(25, 1), conflict=(30, 2), drop_yes=0.0) -> dict:
    def cell(fi, acc0=0.5, acc1=0.5):
        return {"fixed": fi[0], "introduced": fi[1], "greedy_accuracy": acc0, "accuracy": acc1}

    per = {"conflict": cell(conflict), "control": cell(control), "consistent_yes": cell((0, 0), 1.0, 1.0 - drop_yes),
           "consistent_no": cell((0, 0), 1.0, 1.0)}
    parts = [{"model": m, "recommended": "x", "results": {"x": {k: dict(v) for k, v in per.items()}}}
             for m in ("digits-llava", "tones-qwen2audio")]
    return ev.merge_tests(parts)


def test_the_success_verdict_is_the_pre_registered_criterion():
    assert _merged()["verdict"]["success"]
    assert not _merged(control=(3, 1))["verdict"]["success"]  # control not significant after Holm
    assert not _merged(drop_yes=0.015)["verdict"]["success"]  # 1.5 points lost on consistent_yes
    assert _merged(drop_yes=0.01)["verdict"]["success"]  # 1 point is allowed
    assert _merged()["holm_family"] == 8


def test_a_session_run_of_a_setting_stays_a_separate_cell_in_the_merge():
    plain = _merged()
    again = {"model": "tones-qwen2audio", "recommended": None, "role": "extra", "session": True,
             "results": {"x": {"conflict": {"fixed": 1, "introduced": 0, "greedy_accuracy": 0.5, "accuracy": 0.5}}}}
    merged = ev.merge_tests([*plain["parts"], again])
    assert merged["holm_family"] == 9  # the earlier 8 cells and the new one
    assert merged["results"]["tones-qwen2audio|x"]["conflict"]["fixed"] == 30  # not overwritten
    assert merged["results"]["tones-qwen2audio|x+session"]["conflict"]["fixed"] == 1
    assert merged["verdict"]["success"]  # an "extra" part is judged on its own


def test_a_rerun_of_the_same_cells_is_kept_apart_in_the_merge():
    """A later plain run of an already merged setting (a cost reference) gets its own cells, so the
    earlier counts and costs stay; a description part still adds its cell to the same entry."""
    plain = _merged()
    cell = {"greedy_accuracy": 0.5, "accuracy": 0.5, "share_before": 0.1, "share_after": 0.2, "kl": 0.0,
            "cpu_ratio": 2.0}
    described = {"model": "tones-qwen2audio", "recommended": None, "role": "descriptions",
                 "conditions": ["description"], "results": {"x": {"description": {"fixed": 1, "introduced": 1,
                                                                                  **cell}}}}
    again = {"model": "tones-qwen2audio", "recommended": "x", "role": "extra", "conditions": ["conflict"],
             "n_per_condition": 2,
             "answers": {"x": {}}, "results": {"x": {"conflict": {"fixed": 2, "introduced": 0, **cell}}}}
    merged = ev.merge_tests([*plain["parts"], described, again])
    assert merged["results"]["tones-qwen2audio|x"]["conflict"]["fixed"] == 30
    assert merged["results"]["tones-qwen2audio|x+rerun"]["conflict"]["fixed"] == 2
    assert merged["results"]["tones-qwen2audio|x"]["description"]["fixed"] == 1
    assert merged["holm_family"] == 10
    assert all("answers" not in p for p in merged["parts"])  # they stay in the parts' own files
    assert merged["parts"][-1]["merged_keys"] == {"x": "tones-qwen2audio|x+rerun"}
    table = "\n".join(ev.render_test(merged, last=1))
    assert "``x+rerun``" in table and "2/0" in table  # the rerun's own cells are rendered
    assert "(recommended)" not in table  # an extra part's own selection is not the page's recommendation


def test_the_recommendations_evidence_quotes_the_committed_results():
    """Every count and p-value the evidence strings quote is in docs/benchmarks/lime_eval_test.json."""
    import json
    import re
    from pathlib import Path

    from lime_attr.mitigation.recommended import RECOMMENDATIONS

    merged = json.loads((Path(__file__).parents[1] / "docs/benchmarks/lime_eval_test.json").read_text())
    cells = {(key.split("|")[0], key.split("|")[1], cond): cell for key, per in merged["results"].items()
             for cond, cell in per.items() if isinstance(cell, dict) and "fixed" in cell}
    tones = RECOMMENDATIONS["tones-qwen2audio"][2]
    fi = re.search(r"fixed (\d+) and introduced (\d+) conflict errors.*?Holm p=([0-9.e-]+)", tones)
    cell = cells[("tones-qwen2audio", "paper@x10/autograd", "conflict")]
    assert (int(fi[1]), int(fi[2])) == (cell["fixed"], cell["introduced"])
    assert float(fi[3]) == float(f"{cell['holm_p']:.1e}")
    assert re.search(r"introduced (\d+) on consistent_yes", tones)[1] == \
        str(cells[("tones-qwen2audio", "paper@x10/autograd", "consistent_yes")]["introduced"])
    pub = cells[("tones-qwen2audio", "published-reference", "conflict")]
    assert f"published settings fixed {pub['fixed']}/{pub['introduced']} conflict" in tones
    digits = cells[("digits-llava", "published-reference", "conflict")]
    assert f"changed {digits['fixed']}/{digits['introduced']} (fixed/introduced) conflict" in \
        RECOMMENDATIONS["digits-llava"][2]
    assert merged["verdict"]["success"] is False  # the caveat the evidence strings state


def test_the_frozen_grid_is_the_first_cheap_variants_lrs_and_selects_like_it():
    frozen = ev.grid("incremental", "frozen")
    assert [(s.objective, s.lr_factor) for s in frozen] == [(s.objective, s.lr_factor) for s in ev.grid("incremental")]
    assert {s.second_order for s in frozen} == {"frozen"} and frozen[0].name == "incremental:paper@x1/frozen"
    cfg = frozen[0].config("llava")
    assert cfg.mode == "incremental" and cfg.second_order == "frozen" and cfg.placement == "before_rule"
    per = {s.name: _cell(net_conflict=3) for s in frozen}
    assert ev.select(per, [s for s in frozen if s.objective == "paper"]).lr_factor == 1.0  # ties: the smaller lr


def _cheap_merged(net_conflict, net_control, cost):
    cells = {c: {"net": 0, "cpu_ratio": cost} for c in ev.CONDITIONS}
    cells["conflict"]["net"], cells["control"]["net"] = net_conflict, net_control
    return {"results": {"tones-qwen2audio|m": cells, "digits-llava|m": cells}}


@pytest.mark.parametrize("net_conflict, net_control, cost, within, keeps", [
    (44, 0, 3.0, True, True),  # 44 >= 0.9 * 48 = 43.2, and exactly 3x
    (43, 0, 2.0, True, False),
    (40, 5, 3.01, False, True),
])
def test_the_cheap_variants_judgement(net_conflict, net_control, cost, within, keeps):
    j = ev.cheap_judgement(_cheap_merged(net_conflict, net_control, cost), "tones-qwen2audio", "m")
    assert (j["within_cost"], j["keeps_fixes"], j["meets"]) == (within, keeps, within and keeps)
    assert j["needed_net"] == pytest.approx(43.2)
    d = ev.cheap_judgement(_cheap_merged(0, 0, 2.0), "digits-llava", "m")
    assert d["keeps_fixes"] and d["meets"]  # the best objective's net on digits-llava is 0


def test_a_setting_with_fixed_updates_runs_that_schedule_and_keeps_its_name_and_round_trip():
    """``fast_updates=1``: one update carrying the total step; named apart; stored settings (with or without
    the field) load back."""
    import dataclasses

    from lime_attr.models import load_builtin

    model, _ = load_builtin("digits-llava")
    one = ev.Setting("paper", 10.0, "autograd", fast_updates=1)
    default = ev.Setting("paper", 10.0, "autograd")
    n1, lr1 = one.config(model).schedule
    n2, lr2 = default.config(model).schedule
    assert (n1, n2) == (1, 2) and lr1 == pytest.approx(2 * lr2)
    assert one.name == "paper@x10/autograd/u1" and default.name == "paper@x10/autograd"
    assert ev.Setting(**dataclasses.asdict(one)) == one
    stored = {k: v for k, v in dataclasses.asdict(default).items() if k != "fast_updates"}  # an earlier run's
    assert ev.Setting(**stored) == default
    assert {s.fast_updates for s in ev.grid("fast", fast_updates=1)} == {1} and len(ev.grid("fast", fast_updates=1)) == 30
    assert ev._extra_setting("paper:10:autograd:fast:1") == one
    with pytest.raises(SystemExit, match="expected objective"):
        ev._extra_setting("paper:10")
