"""The prior-probe section of the hallucination report page, and its figure, drawn from the json.

The ``prior`` condition of :mod:`benchmarks.hallucination_report` runs every decoding method on the clean
prior probes of the demo models (:func:`lime_attr.models.prior_probe`, test split): ``conflict`` (the
prior says yes, the answer is no), the three conditions where the model must still see, and broken-pair
descriptions. This module renders that condition; like the rest of the page it is a pure function of
the json, and its verdict is written from the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._common import fmt, heading, render_table

PROBE_BENCHES = ("conflict", "consistent_yes", "consistent_no", "control")
#: Corrected two-sided p below which the verdict calls a difference significant.
ALPHA = 0.01


def _prior(model: dict[str, Any]) -> dict[str, Any] | None:
    data = model["conditions"].get("prior")
    return data if data and data.get("status") == "ok" else None


def prior_figure(report: dict[str, Any], out_dir: Path, titles: dict[str, str], colors: dict[str, str]) -> dict[str, str]:
    """Accuracy per probe condition and method, one panel per model (``hallucination_prior.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, d) for name, e in report["models"].items() if (d := _prior(e)) is not None]
    if not panels:
        return {}
    methods = list(report["methods"])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 3.6), squeeze=False, sharey=True)
    width = 0.8 / len(methods)
    for ax, (name, data) in zip(axes[0], panels):
        benches = [b for b in PROBE_BENCHES if b in data["pope"]]
        for j, meth in enumerate(methods):
            vals = [data["pope"][b][meth]["metrics"]["accuracy"] for b in benches]
            xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(benches))]
            ax.bar(xs, vals, width, label=titles.get(meth, meth), color=colors.get(meth, "0.6"))
        ax.set_xticks(range(len(benches)), [b.replace("_", " ") for b in benches], fontsize=8)
        ax.set_title(f"{name}, clean prior probes", fontsize=10)
        ax.set_ylim(0, 1.0)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(methods), 4))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(out_dir / "hallucination_prior.png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return {"prior": "hallucination_prior.png"}


def _rows(data: dict[str, Any], methods: list[str], titles: dict[str, str]) -> list[list[str]]:
    rows = []
    rel, tim = data["relevance"], data["timing"]
    for bench in PROBE_BENCHES:
        for m in methods:
            mt = data["pope"][bench][m]["metrics"]
            ch = data["changes"].get(bench, {}).get(m)
            r = rel[m]
            rows.append([
                bench, titles.get(m, m), fmt(mt["accuracy"]), fmt(mt.get("yes_ratio")),
                "--" if ch is None else f"{ch['fixed']} / {ch['introduced']}",
                "--" if ch is None else f"{ch['sign_p']:.2g}",
                "--" if ch is None else f"{ch['holm_p']:.2g}",
                f"{fmt(r.get('reliance_before'))} -> {fmt(r.get('reliance_after'))}" if "reliance_after" in r
                else fmt(r.get("reliance_before")),
                f"{fmt(r.get('grounding_before'))} -> {fmt(r.get('grounding_after'))}" if "grounding_after" in r
                else fmt(r.get("grounding_before")),
                fmt(r.get("kl_last"), ".2g") if "kl_last" in r else "--",
                fmt(tim[m].get("cpu_ratio_to_greedy"), ".1f"),
            ])
    return rows


def _description_rows(data: dict[str, Any], methods: list[str], titles: dict[str, str]) -> list[list[str]]:
    rows = []
    for m in methods:
        e = data["chair"][m]
        ch = data["changes"].get("chair", {}).get(m)
        rows.append([titles.get(m, m), fmt(e.get("partner_hallucination")), fmt(e["metrics"]["chair_i"]),
                     fmt(e["metrics"]["chair_s"]), fmt(e["metrics"]["recall"]),
                     "--" if ch is None else f"{ch['fixed']} / {ch['introduced']}",
                     "--" if ch is None else f"{ch['holm_p']:.2g}"])
    return rows


def _verdict(name: str, data: dict[str, Any], titles: dict[str, str]) -> list[str]:
    """One bullet per method: where it fixed significantly more than it introduced, and what it cost."""
    lines = []
    greedy = {b: data["pope"][b]["greedy"]["metrics"]["accuracy"] for b in PROBE_BENCHES}
    for m in data["changes"].get("conflict", {}):
        wins = [b for b in (*PROBE_BENCHES, "chair") if (c := data["changes"].get(b, {}).get(m))
                and c["holm_p"] < ALPHA and c["fixed"] > c["introduced"]]
        losses = [b for b in (*PROBE_BENCHES, "chair") if (c := data["changes"].get(b, {}).get(m))
                  and c["holm_p"] < ALPHA and c["introduced"] > c["fixed"]]
        drop = max(greedy[b] - data["pope"][b][m]["metrics"]["accuracy"] for b in ("consistent_yes", "consistent_no"))
        changed = sum(data["changes"][b][m]["changed"] for b in PROBE_BENCHES)
        conflict = data["changes"]["conflict"][m]
        text = (f"* {titles.get(m, m)}: conflict accuracy {greedy['conflict']:.3f} -> "
                f"{data['pope']['conflict'][m]['metrics']['accuracy']:.3f} ({conflict['fixed']} fixed / "
                f"{conflict['introduced']} introduced, Holm p = {conflict['holm_p']:.2g}); {changed} of "
                f"{sum(data['changes'][b][m]['n'] for b in PROBE_BENCHES)} yes/no answers changed. ")
        text += (f"Significantly more fixed than introduced (Holm p < {ALPHA}) on: {', '.join(wins)}. " if wins
                 else f"No condition with significantly more fixed than introduced errors (Holm p < {ALPHA}). ")
        if losses:
            text += f"Significantly more introduced than fixed on: {', '.join(losses)}. "
        text += f"Largest accuracy drop on the consistent conditions: {drop:+.3f}."
        lines.append(text)
    return lines


def prior_section(report: dict[str, Any], titles: dict[str, str], figures: dict[str, str], figure_dir: str) -> list[str]:
    """The reStructuredText of the prior-probe results (empty when the condition was not run)."""
    models = {n: d for n, e in report["models"].items() if (d := _prior(e)) is not None}
    if not models:
        return []
    methods = list(report["methods"])
    s = report["settings"]
    out = heading("Prior-driven hallucination on clean inputs (the main result)", "-")
    out += [
        "The demo models are trained the way LLaVA-style models are (a text-pretrained language model, then a "
        "brief alignment of the perception tower to the frozen language model; :ref:`prior-testbed`), so they "
        "answer from their co-occurrence prior on clean inputs. The probe sets "
        f"(:func:`lime_attr.models.prior_probe`, test split, {s.get('n_probe')} items per condition, and "
        f"{s.get('n_probe_descriptions')} broken-pair descriptions) separate the case a mitigation is for "
        "(``conflict``: one member of a pair present, asked about its missing partner; the prior says yes, the "
        "label is no) from the cases where the model must keep seeing (``consistent_yes``, ``consistent_no``, "
        "``control``: the conflict scenes asked about another absent object).",
        "",
        "*fixed / introduced*: answers a method changed against greedy on the same items that turned a wrong "
        "answer right / a right one wrong; *sign p*: two-sided exact sign test of those counts; *Holm p*: "
        "Holm's correction over every set x method of the model (the family size is in the json, "
        "``holm_family``). Reliance and grounding: first answer token, before -> after LIME's perturbation "
        "(grounding only on the ``consistent_yes`` questions, where the queried object has a region). KL: "
        "LIME's KL term at the last inner step (mean over the optimised first tokens). CPU x greedy: CPU time "
        "per generated token over all items of the condition, relative to greedy in the same run. Rows whose "
        "method ends in ``lr10x`` / ``lr100x`` are a learning-rate sweep, **not the paper's settings**.",
        "",
    ]
    if "prior" in figures:
        out += [f".. figure:: {figure_dir}/{figures['prior']}", "   :width: 100%", "",
                "   Accuracy per probe condition and method (clean inputs, test split).", ""]
    for name, data in models.items():
        out += [f"**{name}** -- yes/no probes:", ""]
        out += render_table(["condition", "method", "accuracy", "yes ratio", "fixed / introduced", "sign p", "Holm p",
                       "reliance", "grounding", "KL (last step)", "CPU x greedy"], _rows(data, methods, titles))
        if data.get("chair"):
            out += [f"**{name}** -- broken-pair descriptions (N={data['n_descriptions']}; *partner named*: the "
                    "absent partner is listed):", ""]
            out += render_table(["method", "partner named", "CHAIR_I", "CHAIR_S", "recall", "fixed / introduced",
                           "Holm p"], _description_rows(data, methods, titles))
        out += [f"**{name}** -- verdict, written from the numbers above:", ""]
        out += _verdict(name, data, titles) + [""]
    return out
