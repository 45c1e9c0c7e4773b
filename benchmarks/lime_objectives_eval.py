"""The pre-registered evaluation of LIME's objectives on the prior testbed (``docs/lime_evaluation.rst``).

Two stages, each a run of this script:

* ``--split validation``: every objective x lr factor x second order (the grid) and greedy, on the
  validation probes; writes the rows and the settings the selection rule picks.
* ``--split test --selection V.json``: greedy, the published algorithm, every objective's selected setting
  (and the recommended one) on the test probes, with sign tests and Holm's correction, gate rates, reliance,
  KL and cost.

Run (one process per model, so that two cores run both models):
``python -m benchmarks.lime_objectives_eval --split validation --models digits-llava --json V_digits.json``
then ``python -m benchmarks.lime_objectives_eval --split test --models digits-llava --selection V_digits.json
--json T_digits.json``.
"""
from __future__ import annotations

import argparse
import logging
import contextlib
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from tqdm import tqdm

from benchmarks import _common
from benchmarks._report import holm, sign_test

log = logging.getLogger(__name__)

OBJECTIVES = ("paper", "decision", "logprob", "evidence", "scaled")
LR_FACTORS = (1.0, 10.0, 100.0)
SECOND_ORDERS = ("autograd", "exact")
INCREMENTAL_ORDERS = ("autograd", "frozen")  # the cheap mode's: its first variant, the first-order one
CONDITIONS = ("conflict", "consistent_yes", "consistent_no", "control")
TARGETS = ("conflict", "control")  # where net fixes are counted
CONSISTENT = ("consistent_yes", "consistent_no")
N_ITEMS = {"validation": 60, "test": 200}
CONFIDENCE_GATE = 0.99
SHARE_GATES = (0.25, 0.5)


@dataclass(frozen=True)
class Setting:
    """One LIME configuration of the grid (or the published algorithm, ``mode="reference"``)."""

    objective: str
    lr_factor: float
    second_order: str
    mode: str = "fast"
    fast_updates: Optional[int] = None  # None: the config's default schedule ("auto")

    @property
    def name(self) -> str:
        base = f"{self.objective}@x{self.lr_factor:g}/{self.second_order}"
        if self.fast_updates is not None:
            base += f"/u{self.fast_updates}"
        if self.mode == "reference":
            return "published-reference"
        return base if self.mode == "fast" else f"{self.mode}:{base}"

    def config(self, model: Any) -> Any:
        from lime_attr.mitigation import LimeConfig

        base = LimeConfig.for_model(model)
        if self.mode == "reference":
            return base.replace(mode="reference")
        extra = {"temperature": 1.0} if self.objective == "scaled" else {}  # (relative; docs/lime_evaluation.rst)
        if self.fast_updates is not None:
            extra["fast_updates"] = self.fast_updates
        return base.replace(mode=self.mode, confidence_gate=None, objective=self.objective, lr=base.lr * self.lr_factor,
                            second_order=self.second_order, **extra)


PUBLISHED = Setting("paper", 1.0, "autograd", mode="reference")


def grid(mode: str = "fast", second_order: Optional[str] = None, fast_updates: Optional[int] = None) -> list[Setting]:
    """The validation grid: objectives x lr factors x second orders (``docs/lime_evaluation.rst``); the cheap
    ``"incremental"`` mode has one second order per grid (``"autograd"``, or ``"frozen"``: the second cheap
    variant); ``fast_updates`` fixes the number of updates per token (default: the config's schedule)."""
    if mode == "fast":
        orders = SECOND_ORDERS if second_order is None else (second_order,)
    else:
        orders = (second_order or "autograd",)
    return [Setting(o, f, s, mode, fast_updates) for o in OBJECTIVES for f in LR_FACTORS for s in orders]


@dataclass
class Row:
    """One item under one method."""

    answer: str
    correct: bool
    cpu: float
    p_top: Optional[float] = None
    share_before: Optional[float] = None
    share_after: Optional[float] = None
    kl: Optional[float] = None
    n_tokens: int = 1


def _load(model_name: str) -> tuple[Any, Any]:
    from lime_attr.models import load_builtin

    model, processor = load_builtin(model_name, attn_implementation="eager")
    return model.eval(), processor


DESCRIPTION = "description"  # broken-pair descriptions (prior_descriptions): correct = the absent partner unnamed
DESCRIPTION_TOKENS = 8


def encoded_items(model: Any, processor: Any, model_name: str, split: str, n: int,
                  conditions: Sequence[str] = CONDITIONS) -> dict[str, list]:
    """``{condition: [(item, processor outputs)]}`` of the prior probes (and ``"description"``: the
    broken-pair description requests)."""
    from benchmarks.hallucination_report import encode
    from lime_attr.models import prior_descriptions, prior_probe

    def load(c: str) -> list:
        return prior_descriptions(model_name, n=n, split=split) if c == DESCRIPTION else prior_probe(
            model_name, c, n=n, split=split)

    return {c: [(it, encode(model, processor, it)) for it in load(c)] for c in conditions}


def _correct(model_name: str, item: Any, text: str) -> bool:
    """Yes/no: the parsed answer equals the label; descriptions: the absent partner is not named."""
    from benchmarks.hallucination_report import _correct_yes_no

    if getattr(item, "condition", None) == DESCRIPTION:
        return item.partner not in text.lower().split()
    return _correct_yes_no(model_name, item, text)


def greedy_rows(model: Any, processor: Any, model_name: str, items: list) -> list[Row]:
    """Greedy's answers and the top probability of the first token: yes/no answers as one forward (the argmax
    of the last logits); descriptions with ``generate`` (KV cache), CPU time per generated token."""
    tok = getattr(processor, "tokenizer", processor)
    rows = []
    for item, enc in items:
        with _common.Stopwatch() as clock, torch.no_grad():
            if getattr(item, "condition", None) == DESCRIPTION:
                out = model.generate(**enc, max_new_tokens=DESCRIPTION_TOKENS, do_sample=False,
                                     output_scores=True, return_dict_in_generate=True)
                new = out.sequences[0, enc["input_ids"].shape[1]:].tolist()
                logits, n_tok = out.scores[0].float(), max(len(new), 1)
            else:
                logits = model(**enc).logits[:, -1, :].float()
                new, n_tok = [int(logits.argmax(-1))], 1
        text = tok.decode(new, skip_special_tokens=True).strip()
        rows.append(Row(text, _correct(model_name, item, text), clock.cpu / n_tok,
                        p_top=float(torch.softmax(logits, -1).max())))
    return rows


def lime_rows(model: Any, processor: Any, model_name: str, items: list, setting: Setting,
              reuse_attribution: bool = False, session: bool = False) -> list[Row]:
    """Answers of a LIME setting (CPU time per generated token), with the first token's reliance before /
    after and its final KL. ``reuse_attribution``: one ``LRP(model)`` for all the items (its op-coverage check
    runs on the first item only) instead of ``lime_generate``'s default, a new one per call. ``session``: all the
    items in one :class:`~lime_attr.mitigation.LimeSession` (the scope installed once); its entry and exit are
    shared out equally over the items' CPU times."""
    from lime_attr import LRP
    from lime_attr.mitigation import LimeSession, lime_generate

    cfg = setting.config(model)
    extra = {"attribution": LRP(model)} if reuse_attribution else {}
    rows, own = [], 0.0
    with _common.Stopwatch() as whole, contextlib.ExitStack() as stack:
        runner = stack.enter_context(LimeSession(model, processor, cfg)) if session else None
        for item, enc in items:
            n_new = DESCRIPTION_TOKENS if getattr(item, "condition", None) == DESCRIPTION else 1
            with _common.Stopwatch() as clock:
                res = (runner.generate(enc, max_new_tokens=n_new) if runner is not None else
                       lime_generate(model, processor, enc, cfg, max_new_tokens=n_new, **extra))
            own += clock.cpu
            text = res.texts[0].strip()
            rec = res.records[0]
            rows.append(Row(text, _correct(model_name, item, text), clock.cpu / max(len(res.records), 1),
                            share_before=rec.share_before[0], share_after=rec.share_after[0],
                            kl=rec.kl[-1][0] if rec.kl else None, n_tokens=max(len(res.records), 1)))
    shared = max(whole.cpu - own, 0.0) / max(len(rows), 1) if session else 0.0  # the session's entry and exit
    for row in rows:
        row.cpu += shared / row.n_tokens
    return rows


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """The mean of the values that are not None / NaN (None when there are none)."""
    kept = [v for v in values if v is not None and v == v]
    return sum(kept) / len(kept) if kept else None


def grounding(model: Any, processor: Any, model_name: str, items: list, setting: Setting) -> dict[str, Any]:
    """Grounding of the answer token before / after a LIME setting on ``consistent_yes`` items: the share of
    the placeholder tokens' absolute relevance on the queried object's region (the hallucination report's rule,
    :func:`benchmarks.hallucination_report.grounding_of`)."""
    from benchmarks.hallucination_report import grounding_of, placeholder_positions, region_mask
    from lime_attr.mitigation import lime_generate

    cfg = setting.config(model).replace(record_relevance=True)
    before, after = [], []
    for item, enc in items:
        rec = lime_generate(model, processor, enc, cfg, max_new_tokens=1).records[0]
        if rec.relevance_before is None:
            continue
        positions = placeholder_positions(model, enc["input_ids"], model_name)
        inside = region_mask(len(positions), item)
        before.append(grounding_of(rec.relevance_before[0], positions, inside))
        after.append(grounding_of(rec.relevance_after[0], positions, inside))
    pairs = [(b, a) for b, a in zip(before, after) if b == b and a == a]
    return {"n": len(pairs), "before": _mean([b for b, _ in pairs]), "after": _mean([a for _, a in pairs]),
            "higher": sum(a > b for b, a in pairs), "lower": sum(a < b for b, a in pairs)}


def _extra_setting(spec: str) -> Setting:
    """``objective:lr_factor:second_order:mode[:fast_updates]`` as a :class:`Setting`."""
    parts = spec.split(":")
    if len(parts) not in (4, 5):
        raise SystemExit(f"--extra {spec!r}: expected objective:lr_factor:second_order:mode[:fast_updates]")
    o, f, s, m = parts[:4]
    return Setting(o, float(f), s, m, int(parts[4]) if len(parts) == 5 else None)


def test_methods(validations: Sequence[dict], extra: Sequence[Setting] = (), published: bool = True) -> dict:
    """``{name: Setting}``: the published algorithm, every validation run's selected settings, ``extra``."""
    methods = {PUBLISHED.name: PUBLISHED} if published else {}
    for validation in validations:
        for s in validation["selected"].values():
            if s is not None:
                setting = Setting(**s)
                methods[setting.name] = setting
    methods.update({setting.name: setting for setting in extra})
    return methods


def run_grounding(model_name: str, n: int, validations: Sequence[dict]) -> dict[str, Any]:
    """:func:`grounding` of every tested method on the test split's ``consistent_yes`` items."""
    model, processor = _load(model_name)
    items = encoded_items(model, processor, model_name, "test", n, ("consistent_yes",))["consistent_yes"]
    out = {name: grounding(model, processor, model_name, items, setting)
           for name, setting in tqdm(test_methods(validations).items(), desc=f"{model_name} grounding")}
    return {"model": model_name, "split": "test", "condition": "consistent_yes", "n_items": n, "grounding": out,
            "machine": _common.machine_info()}


def counts(greedy: Sequence[Row], rows: Sequence[Row]) -> dict[str, Any]:
    """Fixed / introduced against greedy, accuracy, and means of reliance, KL and CPU time."""
    fixed = sum(r.correct and not g.correct for g, r in zip(greedy, rows))
    introduced = sum(g.correct and not r.correct for g, r in zip(greedy, rows))
    mean = _mean
    return {"n": len(rows), "fixed": fixed, "introduced": introduced, "net": fixed - introduced,
            "accuracy": mean([float(r.correct) for r in rows]), "greedy_accuracy": mean([float(g.correct) for g in greedy]),
            "share_before": mean([r.share_before for r in rows]), "share_after": mean([r.share_after for r in rows]),
            "kl": mean([r.kl for r in rows]), "cpu_per_token": mean([r.cpu for r in rows]),
            "cpu_ratio": mean([r.cpu for r in rows]) / mean([g.cpu for g in greedy])}


def select(per_setting: dict[str, dict[str, dict]], settings: Sequence[Setting]) -> Optional[Setting]:
    """The pre-registered selection rule over ``settings`` (one objective's grid) on validation counts."""
    def eligible(s: Setting) -> bool:
        return all(per_setting[s.name][c]["net"] >= -1 for c in CONSISTENT)

    def key(s: Setting) -> tuple:
        net = sum(per_setting[s.name][c]["net"] for c in TARGETS)
        return (-net, s.lr_factor, SECOND_ORDERS.index(s.second_order) if s.second_order in SECOND_ORDERS else 0)

    candidates = sorted((s for s in settings if eligible(s)), key=key)
    if not candidates or -key(candidates[0])[0] <= 0:
        return None
    return candidates[0]


def recommend(per_setting: dict[str, dict[str, dict]], selected: dict[str, Optional[Setting]]) -> Optional[Setting]:
    """The selected setting with the largest validation net fixes (ties: cheaper, then list order)."""
    chosen = [s for s in (selected[o] for o in OBJECTIVES) if s is not None]
    if not chosen:
        return None

    def key(s: Setting) -> tuple:
        c = per_setting[s.name]
        net = sum(c[t]["net"] for t in TARGETS)
        cost = sum(c[k]["cpu_per_token"] for k in CONDITIONS)
        return (-net, cost, OBJECTIVES.index(s.objective))

    return min(chosen, key=key)


def gate_rates(greedy: dict[str, list[Row]], published: dict[str, list[Row]]) -> dict[str, Any]:
    """How often the confidence gate and the share gates would skip hallucinated and correct answer tokens."""
    out: dict[str, Any] = {}
    rows = [(g, p, c) for c in CONDITIONS for g, p in zip(greedy[c], published[c])]
    groups = {"hallucinated (conflict, greedy wrong)": [(g, p) for g, p, c in rows if c == "conflict" and not g.correct],
              "wrong (all conditions)": [(g, p) for g, p, c in rows if not g.correct],
              "correct (all conditions)": [(g, p) for g, p, c in rows if g.correct]}
    for label, pairs in groups.items():
        n = len(pairs)
        entry: dict[str, Any] = {"n": n, f"confidence>={CONFIDENCE_GATE}": sum(g.p_top >= CONFIDENCE_GATE for g, _ in pairs)}
        for t in SHARE_GATES:
            entry[f"share>={t}"] = sum(p.share_before is not None and p.share_before >= t for _, p in pairs)
        out[label] = entry
    return out


def add_tests(results: dict[str, dict[str, dict]]) -> None:
    """Two-sided sign test per (method, condition) and Holm's correction over all of them, in place."""
    cells = [(m, c) for m in results for c in results[m]]
    raw = [sign_test(results[m][c]["fixed"], results[m][c]["introduced"]) for m, c in cells]
    for (m, c), p, q in zip(cells, raw, holm(raw)):
        results[m][c].update(sign_p=p, holm_p=q, holm_family=len(cells))


def _rows_dict(rows: Sequence[Row]) -> list[dict]:
    return [r.__dict__ for r in rows]


def run_validation(model_name: str, n: int, mode: str = "fast", second_order: Optional[str] = None,
                   reuse_attribution: bool = False, session: bool = False,
                   fast_updates: Optional[int] = None) -> dict[str, Any]:
    """Greedy and the whole grid on the validation probes; the selected settings and the recommendation."""
    model, processor = _load(model_name)
    items = encoded_items(model, processor, model_name, "validation", n)
    greedy = {c: greedy_rows(model, processor, model_name, items[c]) for c in CONDITIONS}
    per_setting: dict[str, dict[str, dict]] = {}
    settings = grid(mode, second_order, fast_updates)
    for setting in tqdm(settings, desc=f"{model_name} grid"):
        per_setting[setting.name] = {c: counts(greedy[c], lime_rows(model, processor, model_name, items[c], setting,
                                                                    reuse_attribution, session)) for c in CONDITIONS}
        log.info("%s %s: %s", model_name, setting.name,
                 {c: (v["fixed"], v["introduced"]) for c, v in per_setting[setting.name].items()})
    selected = {o: select(per_setting, [s for s in settings if s.objective == o]) for o in OBJECTIVES}
    best = recommend(per_setting, selected)
    return {"model": model_name, "split": "validation", "mode": mode, "second_order": second_order,
            "fast_updates": fast_updates, "reuse_attribution": reuse_attribution, "session": session, "n_per_condition": n,
            "machine": _common.machine_info(),
            "greedy_accuracy": {c: counts(greedy[c], greedy[c])["accuracy"] for c in CONDITIONS},
            "grid": per_setting, "selected": {o: (s.__dict__ if s else None) for o, s in selected.items()},
            "recommended": best.__dict__ if best else None}


def run_test(model_name: str, n: int, validations: Sequence[dict], extra: Sequence[Setting] = (),
             published: bool = True, conditions: Sequence[str] = CONDITIONS,
             reuse_attribution: bool = False, session: bool = False) -> dict[str, Any]:
    """Greedy, the published algorithm and every selected setting of each validation run on the test probes
    (the first validation run's recommendation is the recommended configuration)."""
    model, processor = _load(model_name)
    items = encoded_items(model, processor, model_name, "test", n, conditions)
    greedy = {c: greedy_rows(model, processor, model_name, items[c]) for c in conditions}
    methods = test_methods(validations, extra, published)
    results: dict[str, dict[str, dict]] = {}
    rows: dict[str, dict[str, list[Row]]] = {}
    for name, setting in tqdm(methods.items(), desc=f"{model_name} test"):
        rows[name] = {c: lime_rows(model, processor, model_name, items[c], setting, reuse_attribution, session)
                      for c in conditions}
        results[name] = {c: counts(greedy[c], rows[name][c]) for c in conditions}
    rec = validations[0].get("recommended")
    return {"model": model_name, "split": "test", "n_per_condition": n, "machine": _common.machine_info(),
            "reuse_attribution": reuse_attribution, "session": session,
            "role": ("main" if published else "extra") if tuple(conditions) == CONDITIONS else "descriptions",
            "conditions": list(conditions),
            "greedy": {c: counts(greedy[c], greedy[c]) for c in conditions}, "results": results,
            "recommended": Setting(**rec).name if rec else None, "selected_from": "validation",
            "gates": gate_rates(greedy, rows[PUBLISHED.name]) if published and tuple(conditions) == CONDITIONS else None,
            "answers": {m: {c: _rows_dict(r) for c, r in per.items()} for m, per in rows.items()},
            "greedy_answers": {c: _rows_dict(r) for c, r in greedy.items()}}


def method_label(method: str, part: dict) -> str:
    """A method's name in the merged results: a ``--session`` run's is marked, so that it does not merge with
    the earlier run of the same setting."""
    return f"{method}+session" if part.get("session") else method


_ANSWER_KEYS = ("answers", "greedy_answers")


def merge_tests(parts: Sequence[dict]) -> dict[str, Any]:
    """Both models' test results, with Holm's correction over every (model x method x condition); the parts
    are kept without their per-item answers (those stay in each part's own file)."""
    results: dict[str, dict[str, dict]] = {}
    stripped = []
    for p in parts:  # (a method's description part adds its "description" cell to the same entry)
        keys = {}
        for m, per in p["results"].items():
            key = f"{p['model']}|{method_label(m, p)}"
            while set(results.get(key, ())) & set(per):  # a later run of the same cells: kept apart, not overwritten
                key += "+rerun"
            results.setdefault(key, {}).update(per)
            keys[m] = key
        # answers stay in the parts' own files; merged_keys: where each method's cells are in "results"
        stripped.append({**{k: v for k, v in p.items() if k not in _ANSWER_KEYS}, "merged_keys": keys})
    add_tests(results)
    merged = {"parts": stripped, "results": results, "holm_family": sum(len(v) for v in results.values())}
    merged["verdict"] = verdict(merged)
    return merged


def _fi(c: dict) -> str:
    return f"{c['fixed']}/{c['introduced']}"


def _p(x: Optional[float]) -> str:
    return "" if x is None else (f"{x:.1e}" if x < 1e-3 else f"{x:.3f}")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    out = [".. list-table::", "   :header-rows: 1", ""]
    for row in [header, *rows]:
        out += [f"   * - {row[0]}"] + [f"     - {v}" for v in row[1:]]
    return out + [""]


def render_validation(v: dict) -> list[str]:
    """The validation grid of one model as an rst table (selected settings marked)."""
    chosen = {Setting(**s).name for s in v["selected"].values() if s}
    rec = Setting(**v["recommended"]).name if v["recommended"] else None
    rows = []
    for name, per in v["grid"].items():
        net = sum(per[t]["net"] for t in TARGETS)
        ok = all(per[c]["net"] >= -1 for c in CONSISTENT)
        mark = "**recommended**" if name == rec else ("selected" if name in chosen else "")
        rows.append([f"``{name}``", *(_fi(per[c]) for c in CONDITIONS), net, "yes" if ok else "no",
                     f"{per['conflict']['cpu_ratio']:.1f}", mark])
    head = ["setting", *(f"{c} f/i" for c in CONDITIONS), "net (conflict+control)", "consistent kept", "CPU x greedy",
            ""]
    order = f", ``second_order={v['second_order']!r}``" if v.get("second_order") else ""
    return [f"**{v['model']}**, validation, ``mode={v.get('mode', 'fast')!r}``{order} grid, {v['n_per_condition']} items per "
            "condition; greedy accuracy "
            + ", ".join(f"{c} {a:.3f}" for c, a in v["greedy_accuracy"].items()) + ".", "", *_table(head, rows)]


def render_test(merged: dict, last: Optional[int] = None) -> list[str]:
    """Every test-split result of both models as rst tables (``last``: only the last parts of the merge, e.g.
    a later run's, with Holm's correction over the whole merge)."""
    lines: list[str] = []
    for part in merged["parts"][-last:] if last else merged["parts"]:
        model, conds = part["model"], part.get("conditions", CONDITIONS)
        rows = []
        for name, per in part["results"].items():
            key = part.get("merged_keys", {}).get(name, f"{model}|{method_label(name, part)}")
            cells = merged["results"][key]
            mark = " (recommended)" if name == part["recommended"] and part.get("role") in (None, "main") else ""
            rows.append([f"``{key.split('|', 1)[1]}``{mark}", *(f"{_fi(cells[c])} p={_p(cells[c]['holm_p'])} acc "
                                                 f"{cells[c]['greedy_accuracy']:.3f}->{cells[c]['accuracy']:.3f}"
                                                 for c in conds),
                         f"{cells[conds[0]]['share_before']:.3f}->{cells[conds[0]]['share_after']:.3f}",
                         _p(cells[conds[0]]["kl"]),
                         f"{sum(cells[c]['cpu_ratio'] for c in conds) / len(conds):.{2 if last else 1}f}"])
        head = ["method", *(f"{c}: fixed/introduced, Holm p, accuracy" for c in conds),
                f"reliance ({conds[0]})", f"KL ({conds[0]})", "CPU x greedy"]
        what = {"extra": "a later variant's selected settings (and the references named with ``--extra``)",
                "descriptions": "broken-pair descriptions (accuracy ="
                " the absent partner not named)"}.get(part.get("role"), "main methods")
        lines += [f"**{model}**, test, {what}, {part['n_per_condition']} items per condition.", "",
                  *_table(head, rows)]
        if part.get("gates"):
            lines += ["Gates (greedy's answer token, test split; ``share`` from the published run's unperturbed "
                      "relevance):", "", *_table(["answers", "n", *list(next(iter(part["gates"].values())))[1:]],
                                                 [[k, *v.values()] for k, v in part["gates"].items()])]
    return lines


#: the best objective's test net fixes on conflict + control (fast mode; docs/lime_evaluation.rst): what the cheap
#: variants must keep 90% of (digits-llava: no objective had a selected setting, so 0)
BEST_NET = {"digits-llava": 0, "tones-qwen2audio": 48}
CHEAP_COST = 3.0
CHEAP_SHARE = 0.9


def cheap_judgement(merged: dict, model: str, method: str) -> dict[str, Any]:
    """The pre-registered judgement of a cheap variant's test cells: CPU time per token at most 3x greedy's
    (the mean over the four conditions of the per-condition ratio) and net fixes on conflict + control at
    least 90% of :data:`BEST_NET`."""
    cells = merged["results"][f"{model}|{method}"]
    cost = sum(cells[c]["cpu_ratio"] for c in CONDITIONS) / len(CONDITIONS)
    net = sum(cells[c]["net"] for c in TARGETS)
    need = CHEAP_SHARE * BEST_NET[model]
    return {"cpu_ratio": cost, "within_cost": cost <= CHEAP_COST, "net": net, "best_net": BEST_NET[model],
            "needed_net": need, "keeps_fixes": net >= need, "meets": cost <= CHEAP_COST and net >= need}


def verdict(merged: dict) -> dict[str, Any]:
    """The pre-registered success criterion, per model, for the recommended configuration."""
    out: dict[str, Any] = {}
    for part in merged["parts"]:
        if part.get("role", "main") != "main":  # (the cheap variant's part is judged on its own)
            continue
        rec = part["recommended"]
        if rec is None:
            out[part["model"]] = {"recommended": None, "success": False}
            continue
        cells = merged["results"][f"{part['model']}|{rec}"]
        sig = {c: cells[c]["fixed"] > cells[c]["introduced"] and cells[c]["holm_p"] < 0.01 for c in TARGETS}
        drop = {c: cells[c]["greedy_accuracy"] - cells[c]["accuracy"] for c in CONSISTENT}
        out[part["model"]] = {"recommended": rec, "significant": sig, "consistent_drop": drop,
                              "keeps_consistent": all(d <= 0.01 + 1e-12 for d in drop.values())}
    both_control = all(v.get("significant", {}).get("control", False) for v in out.values())
    any_conflict = any(v.get("significant", {}).get("conflict", False) for v in out.values())
    keeps = all(v.get("keeps_consistent", False) for v in out.values())
    out["success"] = bool(both_control and any_conflict and keeps)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    import json

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("validation", "test"))
    ap.add_argument("--models", nargs="+", default=["digits-llava", "tones-qwen2audio"])
    ap.add_argument("--n", type=int, help="items per condition (default: 60 validation, 200 test)")
    ap.add_argument("--selection", nargs="+", help="the validation jsons of the same model (test stage; the first "
                    "one's recommendation is the recommended configuration)")
    ap.add_argument("--extra", nargs="*", default=[], help="more settings for the test stage, as objective:lr:order:mode")
    ap.add_argument("--merge", nargs="*", help="test jsons to merge (Holm over both models)")
    ap.add_argument("--render", nargs="*", help="validation jsons, then the merged test json: writes --json as rst")
    ap.add_argument("--render-last", type=int, help="render only the last N parts of the merged test json")
    ap.add_argument("--no-published", action="store_true", help="test stage: leave out the published algorithm")
    ap.add_argument("--descriptions", action="store_true", help="test stage: the broken-pair descriptions only")
    ap.add_argument("--grounding", action="store_true", help="test stage: grounding before / after on consistent_yes")
    ap.add_argument("--mode", default="fast", choices=("fast", "incremental"), help="the validation grid's mode")
    ap.add_argument("--second-order", choices=("autograd", "exact", "frozen"),
                    help="the validation grid's one second order (default: fast mode both autograd and exact, "
                    "incremental mode autograd; 'frozen': the second cheap variant)")
    ap.add_argument("--fast-updates", type=int, help="the validation grid's updates per token (default: the "
                    "config's schedule, 2 in fast mode)")
    ap.add_argument("--reuse-attribution", action="store_true", help="one LRP(model) per setting and condition "
                    "(the op-coverage check runs once) instead of a new one per lime_generate call")
    ap.add_argument("--session", action="store_true", help="each setting's items of a condition in one LimeSession "
                    "(the scope installed once; its entry and exit shared out over the items' times)")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.render:
        *vals, merged = [json.load(open(p)) for p in args.render]
        lines = [line for v in vals for line in render_validation(v)] + render_test(merged, args.render_last)
        open(args.json, "w").write("\n".join(lines) + "\n")
        return
    if args.merge:
        parts = [json.load(open(p)) for p in args.merge]
        _common.write_json(args.json, merge_tests(parts))
        return
    out = []
    for name in args.models:
        n = args.n or N_ITEMS[args.split]
        if args.split == "validation":
            out.append(run_validation(name, n, args.mode, args.second_order, args.reuse_attribution, args.session,
                                      args.fast_updates))
        else:
            validations = [json.load(open(p)) for p in args.selection]
            if args.grounding:
                out.append(run_grounding(name, n, validations))
                continue
            extra = [_extra_setting(e) for e in args.extra]
            conds = (DESCRIPTION,) if args.descriptions else CONDITIONS
            out.append(run_test(name, n, validations, extra, published=not args.no_published, conditions=conds,
                                reuse_attribution=args.reuse_attribution, session=args.session))
    _common.write_json(args.json, out[0] if len(out) == 1 else out)


if __name__ == "__main__":
    main()
