"""Figures and the reStructuredText page of the hallucination report, drawn from its json.

The page is a pure function of the json (no clock, no environment), so re-rendering the same json gives
the same file. Every number on it comes from the json; the interpretation paragraphs are written from
the numbers (the wording branches on them), so they cannot contradict the tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ._prior_page import prior_figure, prior_section
from ._common import fmt, heading, render_table
from ._report import sign_test

METHOD_TITLES = {
    "greedy": "greedy",
    "sample": "sampling",
    "vcd": "VCD",
    "lime-reference": "LIME reference",
    "lime-fast": "LIME fast",
    "lime-reference-lr10x": "LIME reference, lr x10 (not the paper's)",
    "lime-reference-lr100x": "LIME reference, lr x100 (not the paper's)",
}
MODEL_TITLES = {"digits-llava": "digits-llava (image)", "tones-qwen2audio": "tones-qwen2audio (audio)"}
COLORS = {"greedy": "0.35", "sample": "#8fb0d8", "vcd": "#e3a34b", "lime-reference": "#2e8b57",
          "lime-fast": "#7fcf9a", "lime-reference-lr10x": "#1f5f3a", "lime-reference-lr100x": "#0b2e1a"}


_CORRUPTION_GLOSS = {
    "noise": "additive Gaussian noise of s.d. {} of the intensity range",
    "contrast": "contrast scaled by {}",
    "blur": "Gaussian blur of s.d. {} pixels",
    "occlude": "4x4 blocks cut out with probability {}",
    "snr": "white Gaussian noise at {} dB signal-to-noise ratio",
    "attenuate": "{} dB attenuation",
    "dropout": "20 ms frames muted with probability {}",
    "seed": "noise seed {}",
}


def _gloss(spec: Any) -> str:
    """``"noise:0.3"`` -> ``"noise:0.3" (additive Gaussian noise ...)`` for the spec strings of
    ``lime_attr.models.corruption``."""
    if not isinstance(spec, str):
        return json.dumps(spec)
    parts = []
    for step in spec.split("+"):
        name, _, value = step.partition(":")
        if name in _CORRUPTION_GLOSS and value:
            parts.append(_CORRUPTION_GLOSS[name].format(value))
    return f"``{spec}``" + (f" ({'; '.join(parts)})" if parts else "")


def _ok_conditions(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The POPE / description conditions that ran (the ``prior`` probes have a section of their own)."""
    return {c: v for c, v in model["conditions"].items() if v.get("status") == "ok" and c != "prior"}


def _is_lime(method: str) -> bool:
    return method.startswith("lime-")


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def write_figures(report: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """POPE accuracy bars, reliance / grounding bars and the investigation sweep (PNG files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    save = dict(dpi=100, metadata={"Software": None})
    names: dict[str, str] = {}
    models = report["models"]
    methods = list(report["methods"])
    panels = [(m, c, v) for m, e in models.items() for c, v in _ok_conditions(e).items()]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, sharey=True)
        for ax, (mname, cond, data) in zip(axes[0], panels):
            splits = list(data["pope"])
            width = 0.8 / len(methods)
            for j, meth in enumerate(methods):
                vals = [data["pope"][s][meth]["metrics"]["accuracy"] for s in splits]
                ax.bar([i + (j - (len(methods) - 1) / 2) * width for i in range(len(splits))], vals, width,
                       label=METHOD_TITLES[meth], color=COLORS[meth])
            ax.set_xticks(range(len(splits)), splits)
            ax.set_title(f"{mname}, {cond}", fontsize=10)
            lo = min(data["pope"][s][m]["metrics"]["accuracy"] for s in splits for m in methods)
            ax.set_ylim(max(0.0, lo - 0.1), 1.0)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("POPE accuracy")
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(methods))
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        names["pope"] = "hallucination_pope.png"
        fig.savefig(out_dir / names["pope"], **save)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, sharey=True)
        for ax, (mname, cond, data) in zip(axes[0], panels):
            rel = data["relevance"]
            xs, labels = [], []
            for j, meth in enumerate(methods):
                r = rel[meth]
                for k, (key, hatch) in enumerate((("reliance", ""), ("grounding", "//"))):
                    before = r.get(f"{key}_before")
                    after = r.get(f"{key}_after")
                    x = j + (k - 0.5) * 0.4
                    ax.bar(x - 0.1, before or 0.0, 0.2, color=COLORS[meth], hatch=hatch, edgecolor="k", lw=0.3)
                    if after is not None:
                        ax.bar(x + 0.1, after, 0.2, color=COLORS[meth], hatch=hatch, edgecolor="k", lw=0.3,
                               alpha=0.55)
                xs.append(j)
                labels.append(METHOD_TITLES[meth])
            ax.set_xticks(xs, labels, rotation=30, fontsize=8)
            ax.set_title(f"{mname}, {cond}", fontsize=10)
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("share of |relevance|")
        fig.suptitle("left pair: modality reliance, right pair (hatched): grounding; "
                     "pale bar: LIME after", fontsize=9)
        fig.tight_layout()
        names["relevance"] = "hallucination_relevance.png"
        fig.savefig(out_dir / names["relevance"], **save)
        plt.close(fig)

    names.update(prior_figure(report, out_dir, METHOD_TITLES, COLORS))
    inv = {m: e["investigation"] for m, e in models.items() if e.get("investigation")}
    if inv:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for mname, data in inv.items():
            pts = [p for p in data["sweep"] if p["steps"] == min(q["steps"] for q in data["sweep"])]
            xs = [p["lr_factor"] for p in pts]
            axes[0].plot(xs, [p["metrics"]["accuracy"] for p in pts], "o-", label=mname)
            axes[0].axhline(data["greedy"]["metrics"]["accuracy"], ls=":", color=axes[0].lines[-1].get_color())
            axes[1].plot(xs, [p["changes"]["changed"] / max(p["changes"]["n"], 1) for p in pts], "o-", label=mname)
        axes[0].set_ylabel("adversarial POPE accuracy (dotted: greedy)")
        axes[1].set_ylabel("share of answers changed vs greedy")
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xlabel(f"LIME learning rate / the paper's (reference mode, {pts[0]['steps']} steps)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        names["sweep"] = "hallucination_sweep.png"
        fig.savefig(out_dir / names["sweep"], **save)
        plt.close(fig)
    return names


# --------------------------------------------------------------------------------------------------
# page
# --------------------------------------------------------------------------------------------------
def _direction(before: Optional[float], after: Optional[float], tol: float = 5e-4, fmt: str = ".3f",
               relative: bool = False) -> str:
    """"rose from a to b" / "fell ..." / "stayed at a" (a change below ``tol``, relative if asked)."""
    if before is None or after is None:
        return "was not measured"
    scale = abs(before) if relative else 1.0
    if abs(after - before) <= tol * scale:
        what = "relative change" if relative else "change"
        return f"stayed at {before:{fmt}} ({what} at most {tol:g})"
    return f"{'rose' if after > before else 'fell'} from {before:{fmt}} to {after:{fmt}}"


def _pope_rows(data: dict[str, Any], methods: list[str]) -> list[list[str]]:
    rows = []
    for split, per in data["pope"].items():
        for m in methods:
            e = per[m]
            mt = e["metrics"]
            yes = mt.get("yes_ratio")
            unparsed = e["counts"].get("unparsed", 0)
            rows.append([split, METHOD_TITLES[m], fmt(mt["accuracy"]), fmt(mt["precision"]), fmt(mt["recall"]),
                         fmt(mt["f1"]), fmt(yes), str(unparsed)])
    return rows


def _sum_changes(data: dict[str, Any], method: str, pope_only: bool = False) -> dict[str, int]:
    tot = {"n": 0, "changed": 0, "fixed": 0, "introduced": 0, "other": 0, "text_changed": 0}
    for bench, per in data["changes"].items():
        if pope_only and bench == "chair":
            continue
        for k in tot:
            tot[k] += per[method].get(k, 0)
    return tot


def _acc_delta(data: dict[str, Any], method: str) -> list[str]:
    out = []
    for split, per in data["pope"].items():
        d = per[method]["metrics"]["accuracy"] - per["greedy"]["metrics"]["accuracy"]
        out.append(f"{split} {d:+.3f}")
    return out


def _effect(fixed: int, introduced: int) -> str:
    """"helps" / "hurts" only when a sign test on the changed answers says so (p < 0.05); the POPE splits
    share their images and "yes" questions, so one change can count up to three times and the test is, if
    anything, optimistic."""
    p = sign_test(fixed, introduced)
    if p >= 0.05:
        return (f"**no measurable effect** ({fixed} fixed vs {introduced} introduced: two-sided sign test "
                f"p = {p:.2g}; the three POPE splits share their images and \"yes\" questions, so one change "
                "can count up to three times)")
    return ("**it helps**" if fixed > introduced else "**it hurts**") + f" (sign test p = {p:.2g})"


def _interpret_condition(mname: str, cond: str, data: dict[str, Any], methods: list[str]) -> list[str]:
    lines: list[str] = []
    n_pope = sum(data["n_pope_per_split"].values())
    greedy_acc = {s: per["greedy"]["metrics"]["accuracy"] for s, per in data["pope"].items()} if "greedy" in methods else {}
    if greedy_acc:
        low = min(greedy_acc.values())
        lowest = [sp for sp, a in greedy_acc.items() if a == low]
        hardest = ("all splits are equal" if len(lowest) == len(greedy_acc)
                   else f"the lowest {'is' if len(lowest) == 1 else 'are'} {' and '.join(lowest)}")
        lines.append(f"* Greedy accuracy is {', '.join(f'{s} {a:.3f}' for s, a in greedy_acc.items())}; {hardest}.")
    for m in methods:
        if not _is_lime(m) or "greedy" not in methods:
            continue
        ch = _sum_changes(data, m, pope_only=True)
        chair = data["changes"].get("chair", {}).get(m)
        r = data["relevance"][m]
        if ch["changed"] == 0:
            verdict = (f"changed none of the {n_pope} parsed POPE answers against greedy, so its POPE scores equal "
                       "greedy's: at these settings **LIME does not help this model**")
        else:
            verdict = (f"changed {ch['changed']} of {n_pope} POPE answers against greedy ({ch['fixed']} fixed an "
                       f"error, {ch['introduced']} introduced one, {ch['other']} other); accuracy difference to "
                       f"greedy: {', '.join(_acc_delta(data, m))}; " + _effect(ch["fixed"], ch["introduced"]))
        text = f"* {METHOD_TITLES[m]} {verdict}."
        if ch["text_changed"] > ch["changed"]:
            text += (f" It changed the generated text of {ch['text_changed']} POPE answers in all, i.e. "
                     f"{ch['text_changed'] - ch['changed']} changes did not alter the yes / no the parser reads.")
        if chair is not None:
            text += (f" On the descriptions it changed {chair['changed']} of {chair['n']} "
                     f"({chair['fixed']} fixed, {chair['introduced']} introduced).")
        text += (f" Modality reliance of the first answer token {_direction(r.get('reliance_before'), r.get('reliance_after'))}; "
                 f"grounding {_direction(r.get('grounding_before'), r.get('grounding_after'))}; the softmax focus the "
                 f"objective raises"
                 + (f" (mean over the {r['n_optimised']} optimised first tokens)" if r.get("n_optimised", 0) < r["n"]
                    else "")
                 + f" {_direction(r.get('focus_before'), r.get('focus_after'), 1e-3, '.3g', True)}.")
        if r.get("n_skipped"):
            text += (f" {r['n_skipped']} of {r['n']} first tokens were not optimised "
                     f"({', '.join(r.get('skipped_reasons') or [])}).")
        lines.append(text)
    for m in ("sample", "vcd"):
        if m in methods and "greedy" in methods:
            ch = _sum_changes(data, m, pope_only=True)
            lines.append(f"* {METHOD_TITLES[m]} changed {ch['changed']} of {n_pope} POPE answers against greedy "
                         f"({ch['fixed']} fixed, {ch['introduced']} introduced); accuracy difference: "
                         f"{', '.join(_acc_delta(data, m))}.")
    t = data["timing"]
    if "greedy" in t:
        parts = [f"{METHOD_TITLES[m]} {t[m]['cpu_ratio_to_greedy']:.1f}x" for m in methods if m != "greedy"]
        lines.append(f"* CPU time per generated token relative to greedy ({t['greedy']['cpu_s_per_token'] * 1e3:.1f} "
                     f"ms): {', '.join(parts)}.")
    return lines


def _interpret_investigation(mname: str, inv: dict[str, Any]) -> list[str]:
    diag = inv["diagnostics"]
    conf, kv = diag["confidence"], diag["kv"]
    sweep = inv["sweep"]
    paper = next((p for p in sweep if p["lr_factor"] == 1.0), sweep[0])
    lines = [
        f"* **Size of the perturbation.** Adam moves each coordinate by at most about the learning rate per "
        f"update, so after {paper['updates_mean']:.0f} updates at the paper's lr = {paper['lr']:g} (of which the "
        f"emitted token sees {'all' if paper['delta_bound'] >= paper['lr'] * paper['updates_mean'] else 'all but the last'}) "
        f"no coordinate of Delta_K / Delta_V exceeds {paper['delta_bound']:.1e}. The keys of this model have an "
        f"RMS of {kv['key_rms_mean']:.2f} and the values {kv['value_rms_mean']:.2f} (mean over layers), so the "
        f"perturbation is at most {paper['delta_bound_over_key_rms']:.1e} of the keys' and "
        f"{paper['delta_bound_over_value_rms']:.1e} of the values' typical size.",
        f"* **Confidence of the answer.** The first answer token (yes / no) has median probability "
        f"{conf['p_top_median']:.4f} (minimum {conf['p_top_min']:.4f}; {100 * conf['share_p_top_ge_0_9']:.0f}% of "
        f"the questions at >= 0.9, {100 * conf['share_p_top_ge_0_99']:.0f}% at >= 0.99) and a median logit margin "
        f"of {conf['logit_margin_median']:.2f} over the runner-up (minimum {conf['logit_margin_min']:.2f}).",
    ]
    first_change = next((p for p in sweep if p["changes"]["changed"] > 0), None)
    rel_move = [f"{p['label']}: focus {fmt(p['focus_before'], '.3g')} -> {fmt(p['focus_after'], '.3g')}, reliance "
                f"{fmt(p['reliance_before'])} -> {fmt(p['reliance_after'])}" for p in sweep]
    lines.append("* **What the inner loop achieved** (means over the questions; focus = softmax mass on the "
                 "perceptual positions): " + "; ".join(rel_move) + ".")
    if paper.get("softmax_gap_median") is not None:
        lines.append(
            f"* **Why the objective barely moves at the paper's settings.** With tau = 0.1 the softmax over the "
            f"relevance of all positions is nearly one-hot: in the median question the largest text relevance "
            f"exceeds the largest perceptual one by {paper['softmax_gap_median']:.1f} tau, so each perceptual "
            f"position weighs at most e^-{paper['softmax_gap_median']:.1f} of the top position; the single most "
            f"relevant position is perceptual in {100 * paper['share_top_relevance_on_modality']:.0f}% of the "
            f"questions, and the focus before the first step has median {fmt(paper.get('focus_before_median'), '.2g')} "
            f"(mean {fmt(paper['focus_before'], '.3g')}). The relevance loss L_rel (mean over the "
            f"perceptual positions of -log softmax) starts at {fmt(paper.get('rel_loss_first_mean'), '.1f')} and "
            f"fell by {fmt(paper['rel_loss_drop_mean'], '.2e')} on average over the inner steps; L_rel averages "
            f"*log* weights, so it can fall while the focus (a sum of weights) does not rise.")
    if first_change is None:
        lines.append(f"* **Sweep.** No setting of the sweep (up to lr x{max(p['lr_factor'] for p in sweep):g}, "
                     f"{max(p['steps'] for p in sweep)} steps) changed a single answer of the {inv['n']} questions.")
    else:
        best = max(sweep, key=lambda p: p["metrics"]["accuracy"])
        lines.append(f"* **Sweep.** The first setting that changed an answer is {first_change['label']} "
                     f"({first_change['changes']['changed']} changed: {first_change['changes']['fixed']} fixed, "
                     f"{first_change['changes']['introduced']} introduced); the best accuracy of the sweep is "
                     f"{best['metrics']['accuracy']:.3f} ({best['label']}) against greedy's "
                     f"{inv['greedy']['metrics']['accuracy']:.3f}.")
    return lines


def _summary(report: dict[str, Any], methods: list[str]) -> list[str]:
    """The overall verdict on LIME, from the numbers."""
    lines: list[str] = []
    per_mode: dict[str, dict[str, int]] = {}
    for e in report["models"].values():
        for data in _ok_conditions(e).values():
            for m in methods:
                if _is_lime(m) and "-lr" not in m and data["changes"]:  # the paper's settings only
                    ch = _sum_changes(data, m)
                    tot = per_mode.setdefault(m, {"changed": 0, "fixed": 0, "introduced": 0, "n": 0})
                    for k in tot:
                        tot[k] += ch[k]
    if per_mode and all(t["n"] for t in per_mode.values()):
        if all(t["changed"] == 0 for t in per_mode.values()):
            n = next(iter(per_mode.values()))["n"]
            lines.append(f"**Verdict (held-out POPE and descriptions).** At the paper's hyper-parameters LIME (both "
                         f"modes) changed none of the {n} answers it gave on every model, condition and set above: "
                         "there **LIME does not help**, in either condition.")
        else:
            parts = [f"{METHOD_TITLES[m]} changed {t['changed']} of {t['n']} answers against greedy "
                     f"({100.0 * t['changed'] / t['n']:.2f}%; all models, conditions and sets added up): "
                     + _effect(t["fixed"], t["introduced"]) for m, t in per_mode.items()]
            lines.append("**Verdict (held-out POPE and descriptions).** At the paper's hyper-parameters "
                         + "; ".join(parts) + ".")
    invs = {k: v["investigation"] for k, v in report["models"].items() if v.get("investigation")}
    for mname, inv in invs.items():
        sw = inv["sweep"]
        fixed = sum(p["changes"]["fixed"] for p in sw)
        intro = sum(p["changes"]["introduced"] for p in sw)
        best = max(sw, key=lambda p: p["metrics"]["accuracy"])
        worst = min(sw, key=lambda p: p["metrics"]["accuracy"])
        if not any(p["changes"]["changed"] for p in sw):
            lines.append(f"**{mname}.** Even the largest learning rate of the sweep changed no answer.")
            continue
        top = max(sw, key=lambda p: p["focus_after"] or 0.0)
        lines.append(
            f"**{mname}.** Raising the learning rate does make LIME act: over the sweep its changes fixed {fixed} and "
            f"introduced {intro} errors on the adversarial questions; accuracy ranged from "
            f"{worst['metrics']['accuracy']:.3f} ({worst['label']}) to {best['metrics']['accuracy']:.3f} "
            f"({best['label']}) against greedy's {inv['greedy']['metrics']['accuracy']:.3f}. Where the objective is "
            f"met best ({top['label']}: mean focus {fmt(top['focus_before'], '.3g')} -> {fmt(top['focus_after'], '.3g')}, "
            f"median {fmt(top.get('focus_after_median'), '.3g')}; reliance {fmt(top['reliance_before'])} -> "
            f"{fmt(top['reliance_after'])}; KL to the unperturbed distribution {fmt(top['kl_last_mean'], '.2f')} at "
            f"the last step) the accuracy is {top['metrics']['accuracy']:.3f}: on these models, moving the relevance "
            f"onto the perceptual tokens does not by itself make the answers right.")
    if lines:
        lines = [x + "\n" for x in lines]
    return lines


def _command(s: dict[str, Any]) -> str:
    """The command line that reproduces these settings."""
    from .hallucination_report import Settings

    base = Settings.quick_run() if s.get("quick") else Settings()
    cmd = "python -m benchmarks.hallucination_report" + (" --quick" if s.get("quick") else "")
    flags = (("limit", "--limit"), ("n_descriptions", "--descriptions"), ("sweep_limit", "--sweep-limit"),
             ("n_probe", "--probe-items"), ("threads", "--threads"))
    for key, flag in flags:
        if key in s and s[key] != getattr(base, key):
            cmd += f" {flag} {s[key]}"
    if list(s.get("conditions", [])) != list(base.conditions):
        cmd += " --conditions " + ",".join(s["conditions"])
    if list(s.get("models", [])) != list(base.models):
        cmd += " --models " + " ".join(s["models"])
    return cmd


def render_rst(report: dict[str, Any], figure_dir: str, figures: dict[str, str]) -> str:
    """The page, from the json only."""
    s, m = report["settings"], report["machine"]
    methods = list(report["methods"])
    out: list[str] = [
        ".. This page is generated by ``python -m benchmarks.hallucination_report`` from",
        "   ``docs/benchmarks/hallucination.json``; edit ``benchmarks/_hallucination_page.py``, not this file.",
        "",
    ]
    out += heading("Hallucination benchmarks on the demo models", "=")
    out += [
        "Greedy decoding, sampling, VCD and LIME (``reference`` and ``fast`` modes, plus a learning-rate sweep that "
        "is not the paper's setting) on the embedded demo models (:doc:`demo_models`): first on the clean prior "
        "probes, where the models hallucinate from their language prior (the main result), then mini-POPE with its "
        "three negative-sampling splits and mini-CHAIR descriptions, clean and degraded; the "
        "modality reliance and grounding of the answer before and after LIME, and the time per generated token. "
        "Regenerate the json, the figures and this page with:",
        "",
        ".. code-block:: console",
        "",
        "   " + _command(s),
        "",
        f"Generated {report['generated']}; the run took {report['runtime']['wall_seconds']:.0f} s wall-clock "
        f"({report['runtime']['cpu_seconds']:.0f} s CPU). Raw numbers, every answer and the full configurations "
        "are in ``docs/benchmarks/hallucination.json``."
        + (f" Wall time was {report['runtime']['wall_seconds'] / report['runtime']['cpu_seconds']:.1f}x the CPU time: "
           "the machine was shared with other jobs during the run, so the wall-clock columns below include waiting "
           "for a core and the CPU-time columns are the ones to compare."
           if report["runtime"]["cpu_seconds"] and report["runtime"]["wall_seconds"] > 1.3 * report["runtime"]["cpu_seconds"]
           else ""),
        "",
    ]
    if s.get("quick"):
        out += [".. warning::", "", "   This is a ``--quick`` smoke run: a handful of questions, not a measurement.", ""]

    # ---------------------------------------------------------------- set-up
    out += heading("Set-up", "-")
    out += [
        f"* **Machine**: {m['cpu']}, {m['cpu_cores_visible']} visible cores, {m['torch_threads']} torch thread(s), "
        f"CPU only; Python {m['python']}, torch {m['versions'].get('torch')}, transformers "
        f"{m['versions'].get('transformers')}, lime_attr {m['versions'].get('lime_attr')}; load average at the "
        f"start {', '.join(str(v) for v in m.get('load_average_at_start', []))}.",
        (f"* **Questions**: the first {s['limit']} questions of each mini-POPE split " if s.get("limit") else
         "* **Questions**: every question of each mini-POPE split (N per split in the tables) ") +
        f"(:func:`lime_attr.models.pope_questions`, default seed; they alternate yes / no, so each set is "
        f"balanced; the three splits share their images / clips and their \"yes\" questions) and "
        f"{s['n_descriptions']} description items (:func:`lime_attr.models.description_items`) per model and "
        f"condition. At most {s['max_new_tokens_pope']} new tokens for yes/no answers, "
        f"{s['max_new_tokens_chair']} for descriptions; one item per call (batch 1).",
        "* **Conditions**: " + "; ".join(
            f"``{c}`` -- " + ("run on the clean prior probes (:func:`lime_attr.models.prior_probe`, test split)"
                              if c == "prior" and v["status"] == "ok" else
                              "run" + (" with the corruption ``lime_attr.models.DEFAULT_CORRUPTION`` gives each model, "
                                       "applied deterministically to every held-out item: " + ", ".join(
                                           f"{k}: {_gloss(x)}" for k, x in v["corruption"].items())
                                       if v.get("corruption") else " (the held-out inputs as generated)")
                              if v["status"] == "ok" else f"**not run**: {v['reason']}")
            for c, v in report["conditions"].items()) + ".",
        "",
    ]
    rows = []
    for name, info in ((k, v["info"]) for k, v in report["models"].items()):
        rows.append([f"``{name}``", info["class"], str(info["parameters"]), info["modality"],
                     f":func:`~lime_attr.evaluation.{info['scorer']}`", f"``{info['parser']}``",
                     f"\"{info['positive_class']}\""])
    out += render_table(["model", "class", "parameters", "input", "scorer", "parser", "positive class"], rows)
    rows = []
    for meth, meta in report["methods"].items():
        dec = dict(meta["decoding_pope"])
        dec.pop("max_new_tokens", None)
        samples = meth == "sample" or bool(dec.get("do_sample"))
        rows.append([METHOD_TITLES[meth], meta["description"], "yes" if samples else "no", f"``{json.dumps(dec)}``"])
    out += render_table(["method", "how", "samples", "DecodingConfig.to_dict() (POPE; descriptions differ only in "
                   "max_new_tokens; ``do_sample`` applies to vcd / lime, ``sample`` always samples)"], rows)
    for name, e in report["models"].items():
        cfgs = {meth: {k: v for k, v in cfg.items() if k != "record_relevance"} for meth, cfg in e["lime_config"].items()}
        if not cfgs:
            continue
        first_meth, first = next(iter(cfgs.items()))
        out += [f"LIME configuration on ``{name}`` (``LimeConfig.for_model(model, mode=...)`` plus "
                f"``record_relevance=True``), ``{first_meth}``:", "", ".. code-block:: text", "",
                "   " + json.dumps(first), ""]
        for meth, cfg in list(cfgs.items())[1:]:
            diff = {k: v for k, v in cfg.items() if first.get(k) != v}
            out += [f"``{meth}`` differs in: ``{json.dumps(diff)}``.", ""]
    out += [
        f"Sampling: temperature {s['temperature']}, top_p {s['top_p'] if s['top_p'] is not None else 'none (full distribution)'}, "
        f"``torch.manual_seed({s['seed']})`` before every answer. VCD: alpha {s['vcd_alpha']}, beta {s['vcd_beta']}, "
        f"noise step {s['vcd_noise_step']} of 1000 (see :doc:`lime`), noise seed {s['seed']}, greedy over the "
        "contrasted logits (the paper's VCD row is sampled; greedy keeps it comparable with the greedy LIME rows). "
        "LIME decodes greedily. Every method sees the same items in the same order.",
        "",
    ]

    # ---------------------------------------------------------------- metrics
    out += heading("What is measured", "-")
    out += [
        "**POPE** (:doc:`evaluation`): accuracy, precision, recall, F1 and yes-ratio (predicted \"yes\" / N). "
        "For the image model the positive class is \"yes\" (POPE); for the audio model it is **\"no\"**, as in "
        "the audio hallucination QA of Kuan et al. (2024), so its precision / recall / F1 are those of the "
        "\"no\" answers. The image answers are read with LLaVA's ``llava_pope`` rule; the audio answers with "
        "``strict`` (first word yes / no): the audio benchmark's own ``kuan2024`` rule is case-sensitive and "
        "reads the demo model's lower-case \"no\" as unparsed. \"unparsed\" counts answers the parser could "
        "not read (scored as wrong).",
        "",
        "**CHAIR** (:func:`~lime_attr.evaluation.score_chair`): CHAIR_S = share of descriptions with at least one "
        "object that is not there, CHAIR_I = share of object mentions that are not there, recall of the true "
        "objects, mean length in words. Vocabulary: the digits with their number words "
        "(``DIGIT_WORDS`` of :mod:`lime_attr.evaluation.harness`) or the six sound classes.",
        "",
        "**Modality reliance** (the LIME paper's measure, :func:`lime_attr.metrics.modality_reliance`): share of "
        "the absolute AttnLRP relevance of the *first answer token* that falls on the perceptual positions of "
        "the language model's input (the image / audio span, markers included). **Grounding**: share of the "
        "absolute relevance on the image / audio placeholder tokens that falls on the queried object's region "
        "-- for ``digits-llava`` each of the 16 image tokens is one 8x8 cell of the 4x4 grid and the region is "
        "the digit's cell (``PopeQuestion.region``); for ``tones-qwen2audio`` each of the 25 audio tokens is 80 "
        "ms and the region is the event's time span (a token counts when its centre is inside). Grounding "
        "exists only for \"yes\" questions (an absent object has no region). Both are averaged over the POPE "
        "questions of all splits of the condition.",
        "",
        "* *before*: the plain (unperturbed) model, :class:`~lime_attr.ModalityAttribution` (AttnLRP) explaining "
        "the method's own first answer token (for LIME: the token the unperturbed model would emit, the one "
        "LIME explains);",
        "* *after* (LIME only): LIME's record of the first token (``record_relevance=True``): the relevance under "
        "the last perturbation whose relevance LIME computed (in reference mode the forward before the final "
        "update, whose result the reference algorithm discards). Reliance after is ``TokenRecord.share_after``; "
        "grounding after applies the same region rule to ``TokenRecord.relevance_after``. Where LIME skipped "
        "the optimisation of a token (a gate), after = before (the emitted model is the unperturbed one). "
        "*focus* is what LIME's objective raises: the mass of softmax(R / 0.1) on the perceptual positions.",
        "",
        "**Time per token**: process CPU time and wall-clock time of the generation calls only (not the "
        "attribution, not the scoring), divided by the generated tokens (EOS included), over all POPE and "
        "description items; the ratio to greedy is from the same run and process. Cached greedy decoding is "
        "``transformers``' ``generate``; LIME runs its inner optimisation (whole-sequence forwards and a second-"
        "order backward per step) for every token.",
        "",
        "**Changes against greedy**: per item, whether the method's answer differs from greedy's -- the parsed "
        "yes / no for POPE, the set of mentioned objects for descriptions (\"text changed\" counts any "
        "difference of the generated text); a change *fixed* an error when greedy's answer was wrong and the method's right (yes/no: parsed answer = label; "
        "descriptions: the mentioned objects equal the true set), *introduced* one in the opposite case.",
        "",
    ]

    # ---------------------------------------------------------------- prior probes (main result)
    out += prior_section(report, METHOD_TITLES, figures, figure_dir)

    # ---------------------------------------------------------------- results
    out += heading("Held-out POPE and descriptions (secondary conditions)", "-")
    for fig_key, caption in (("pope", "POPE accuracy per split, method, model and condition."),
                             ("relevance", "Modality reliance and grounding of the first answer token; pale bars: "
                                           "LIME after its perturbation.")):
        if fig_key in figures:
            out += [f".. figure:: {figure_dir}/{figures[fig_key]}", "   :width: 100%", "", f"   {caption}", ""]
    for mname, e in report["models"].items():
        out += heading(MODEL_TITLES.get(mname, mname), "~")
        for cond, data in e["conditions"].items():
            if cond == "prior":
                continue
            if data.get("status") != "ok":
                out += [f"**{cond}**: not run -- {data['reason']}", ""]
                continue
            n = data["n_pope_per_split"]
            pos = e["info"]["positive_class"]
            out += [f"**{cond}** -- POPE ({', '.join(f'{k} N={v}' for k, v in n.items())}; positive class "
                    f"\"{pos}\", parser ``{e['info']['parser']}``):", ""]
            out += render_table(["split", "method", "accuracy", "precision", "recall", "F1", "yes ratio", "unparsed"],
                          _pope_rows(data, methods))
            if data["chair"]:
                out += [f"**{cond}** -- descriptions (N={data['n_descriptions']}):", ""]
                out += render_table(["method", "CHAIR_S", "CHAIR_I", "recall", "length"],
                              [[METHOD_TITLES[mm], fmt(data["chair"][mm]["metrics"]["chair_s"]),
                                fmt(data["chair"][mm]["metrics"]["chair_i"]), fmt(data["chair"][mm]["metrics"]["recall"]),
                                fmt(data["chair"][mm]["metrics"]["length"], ".2f")] for mm in methods])
            rel, tim = data["relevance"], data["timing"]
            rows = []
            for mm in methods:
                r, t = rel[mm], tim[mm]
                rows.append([METHOD_TITLES[mm], fmt(r.get("reliance_before")), fmt(r.get("reliance_after")),
                             fmt(r.get("grounding_before")), fmt(r.get("grounding_after")),
                             f"{t['cpu_s_per_token'] * 1e3:.2f}", f"{t['wall_s_per_token'] * 1e3:.2f}",
                             fmt(t.get("cpu_ratio_to_greedy"), ".1f"), fmt(t.get("wall_ratio_to_greedy"), ".1f"),
                             f"{r['n_optimised']} / {r['n']}" if "n_optimised" in r else "--"])
            n_rel = rel[methods[0]]
            out += [f"**{cond}** -- reliance and grounding (first answer token; reliance over {n_rel['n']} POPE "
                    f"questions, grounding over the {n_rel['n_grounding']} \"yes\" questions) and time per generated "
                    "token:", ""]
            out += render_table(["method", "reliance before", "reliance after", "grounding before", "grounding after",
                           "CPU ms/token", "wall ms/token", "CPU x greedy", "wall x greedy",
                           "first tokens LIME optimised"], rows)
            checks = [rel[mm].get("share_before_check") for mm in methods if rel[mm].get("share_before_check") is not None]
            if checks:
                out += [f"(Consistency: LIME's own ``share_before`` and :class:`~lime_attr.ModalityAttribution`'s "
                        f"reliance for the same token differ by at most {max(checks):.1e}.)", ""]
            if data["changes"]:
                rows = []
                for bench, per in data["changes"].items():
                    for mm, c in per.items():
                        rows.append([bench, METHOD_TITLES[mm], f"{c['changed']} / {c['n']}", str(c["fixed"]),
                                     str(c["introduced"]), str(c["other"]), str(c.get("text_changed", ""))])
                out += [f"**{cond}** -- answers changed against greedy (\"changed\": the parsed yes / no, or the set "
                        "of objects a description mentions; \"text changed\": any difference of the generated "
                        "text):", ""]
                out += render_table(["set", "method", "changed", "fixed", "introduced", "other", "text changed"], rows)

    # ---------------------------------------------------------------- investigation
    invs = {k: v["investigation"] for k, v in report["models"].items() if v.get("investigation")}
    if invs:
        out += heading("Investigation: why LIME does (not) change the answers", "-")
        first = next(iter(invs.values()))
        out += [
            f"A sweep, clearly *not* the paper's settings: LIME in reference mode on the first {first['n']} "
            f"questions of the adversarial split of the ``{first['condition']}`` condition, with the paper's "
            "learning rate multiplied by the factors below (lambda, tau and the rest as in the preset), and the "
            "measurements that explain what happens. \"bound / RMS\" is lr x effective updates (the largest "
            "change Adam can make to one coordinate of Delta) over the RMS of the model's keys (values in the "
            "json). Relevance loss drop: first minus last inner step of L_rel for the first answer token.",
            "",
        ]
        if any(v.get("note") for v in invs.values()):
            out += [f"Note: {first.get('note', '')}.", ""]
        if "sweep" in figures:
            out += [f".. figure:: {figure_dir}/{figures['sweep']}", "   :width: 90%", "",
                    "   Sweep of LIME's learning rate on the adversarial split.", ""]
        for mname, inv in invs.items():
            out += [f"**{mname}** (greedy accuracy {inv['greedy']['metrics']['accuracy']:.3f}, paper lr "
                    f"{inv['paper_lr']:g}, lambda {inv['kl_weight']:g}):", ""]
            rows = []
            for p in inv["sweep"]:
                c = p["changes"]
                rows.append([p["label"], f"{p['lr']:.1e}", fmt(p["metrics"]["accuracy"]), fmt(p["metrics"]["f1"]),
                             f"{c['changed']} / {c['n']}", str(c["fixed"]), str(c["introduced"]),
                             str(c.get("text_changed", "")),
                             f"{fmt(p['reliance_before'])} -> {fmt(p['reliance_after'])}",
                             f"{fmt(p['grounding_before'])} -> {fmt(p['grounding_after'])}",
                             f"{fmt(p['focus_before'], '.3g')} -> {fmt(p['focus_after'], '.3g')}", fmt(p["rel_loss_drop_mean"], ".2e"),
                             fmt(p.get("kl_last_mean"), ".2g"),
                             fmt(p["delta_bound_over_key_rms"], ".1e"), fmt(p["cpu_ratio_to_greedy"], ".1f")])
            out += render_table(["setting", "lr", "accuracy", "F1", "changed", "fixed", "introduced", "text changed",
                           "reliance",
                           "grounding", "focus (mean)", "L_rel drop", "KL (last step)", "bound / key RMS",
                           "CPU x greedy"], rows)
            out += _interpret_investigation(mname, inv) + [""]

    # ---------------------------------------------------------------- reading
    out += heading("What the numbers say", "-")
    out += ["Written from the json by the generator (the wording follows the numbers):", ""]
    out += _summary(report, methods)
    for mname, e in report["models"].items():
        for cond, data in _ok_conditions(e).items():
            out += [f"**{mname}, {cond}**", ""]
            out += _interpret_condition(mname, cond, data, methods) + [""]
    clean_acc = [per["greedy"]["metrics"]["accuracy"] for e in report["models"].values()
                 for c, d in _ok_conditions(e).items() if c == "clean" and "greedy" in methods
                 for per in d["pope"].values()]
    if clean_acc:
        rng = (f"{min(clean_acc):.3f} on every split" if min(clean_acc) == max(clean_acc)
               else f"between {min(clean_acc):.3f} and {max(clean_acc):.3f}")
        out += [f"Context: on the clean held-out POPE sets greedy accuracy is {rng}; these sets weaken the pair "
                "prior to 50 % and ask mostly about objects the prior says nothing about, so they dilute the prior "
                "failure that the prior probes isolate (see the section on prior-driven hallucination above). The "
                "paper's improvements are for 7B models; these are two small models on a CPU, and the numbers say "
                "nothing about large models.", ""]
    return "\n".join(out).rstrip() + "\n"


def write_rst(report: dict[str, Any], path: Path, figure_dir: str, figures: dict[str, str]) -> Path:
    """Write :func:`render_rst` to ``path``."""
    path.write_text(render_rst(report, figure_dir, figures), encoding="utf-8")
    return path
