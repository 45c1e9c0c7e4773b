"""Figures and the reStructuredText page of the faithfulness benchmark, drawn from its json.

The page is a pure function of the json (no clock, no environment), so re-rendering the same json
gives the same file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import fmt, heading, render_table

MODEL_TITLES = {
    "cnn": "CNN with BatchNorm on digits (8x8)",
    "vit": "ViT on digits (HF ViTForImageClassification)",
    "llama": "Llama on key-value retrieval (HF LlamaForCausalLM)",
}


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
def _style(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A fixed colour and line style per method (same in every figure)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    styles = {}
    for i, (name, meta) in enumerate(report["methods"].items()):
        family = meta["family"]
        style: dict[str, Any] = {"color": cmap(i % 20), "lw": 1.3, "ls": "-"}
        if family == "lime_attr":
            style.update(lw=2.2)
        elif family == "reference":
            style.update(color="0.45" if name == "random" else "0.15", ls=":", lw=1.6)
        elif family == "attention":
            style.update(ls="-.")
        styles[name] = style
    return styles


def _ok(model: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in model["methods"].items() if v.get("status") == "ok"}


def write_figures(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Draw the perturbation curves (one PNG per model), the ABPC bars and the cost bars.

    Returns
    -------
    dict
        ``{"curves": {model: file}, "abpc": file, "cost": file}`` (file names inside ``out_dir``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = _style(report)
    names: dict[str, Any] = {"curves": {}}
    save_kwargs = dict(dpi=110, metadata={"Software": None})
    for model_name, model in report["models"].items():
        methods = _ok(model)
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), sharey=True)
        for direction, ax, title in (("morf", axes[0], "MoRF (lower is better)"),
                                     ("lerf", axes[1], "LeRF (higher is better)")):
            for name, entry in methods.items():
                curve = entry["faithfulness"]["logit"][f"{direction}_curve"]
                xs = [i / (len(curve) - 1) for i in range(len(curve))]
                ax.plot(xs, curve, label=name, **styles[name])
            ax.set_title(title)
            ax.set_xlabel(f"fraction of features removed ({model['feature_unit'].split(' (')[0]})")
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("target logit (mean over examples)")
        handles, labels = axes[0].get_legend_handles_labels()
        fig.suptitle(MODEL_TITLES.get(model_name, model_name) + " (identical curves overlap)")
        fig.tight_layout(rect=(0, 0, 0.84, 1))
        fig.legend(handles, labels, fontsize=7.5, loc="center right")
        file = f"faithfulness_{model_name}.png"
        fig.savefig(out_dir / file, **save_kwargs)
        plt.close(fig)
        names["curves"][model_name] = file

    models = list(report["models"].items())
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 4.6), squeeze=False)
    for ax, (model_name, model) in zip(axes[0], models):
        methods = sorted(_ok(model).items(), key=lambda kv: kv[1]["faithfulness"]["logit"]["abpc"])
        labels = [n for n, _ in methods]
        values = [e["faithfulness"]["logit"]["abpc"] for _, e in methods]
        errors = [e["faithfulness"]["logit"]["abpc_sem"] or 0.0 for _, e in methods]
        ax.barh(labels, values, xerr=errors, color=[styles[n]["color"] for n in labels])
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(model_name)
        ax.set_xlabel("ABPC on the logit (higher is better)")
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    names["abpc"] = "faithfulness_abpc.png"
    fig.savefig(out_dir / names["abpc"], **save_kwargs)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 7.5), squeeze=False)
    for col, (model_name, model) in enumerate(models):
        timed = [(n, e["cost"]) for n, e in model["methods"].items() if e.get("cost")]
        for row, (key, label) in enumerate((("time_ratio", "time / plain gradient"),
                                            ("memory_ratio", "peak memory / plain gradient"))):
            ax = axes[row][col]
            rows = [(n, c[key]) for n, c in timed if c.get(key) is not None]
            ax.barh([n for n, _ in rows], [v for _, v in rows], color=[styles[n]["color"] for n, _ in rows])
            ax.axvline(1.0, color="k", lw=0.8)
            ax.set_xscale("log")
            ax.set_xlabel(label + " (log)")
            ax.set_title(model_name)
            ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    names["cost"] = "faithfulness_cost.png"
    fig.savefig(out_dir / names["cost"], **save_kwargs)
    plt.close(fig)
    return names


# --------------------------------------------------------------------------------------------------
# page
# --------------------------------------------------------------------------------------------------
def _model_table(model: dict[str, Any]) -> list[str]:
    ok = sorted(_ok(model).items(), key=lambda kv: -kv[1]["faithfulness"]["logit"]["abpc"])
    has_evidence = any("evidence" in e for _, e in ok)
    header = ["method", "AUC MoRF (lower)", "AUC LeRF (higher)", "ABPC (higher)", "ABPC, probability"]
    if has_evidence:
        header += ["evidence mass", "pointing acc."]
    header += ["time / grad", "memory / grad"]
    rows = []
    for name, entry in ok:
        logit, prob = entry["faithfulness"]["logit"], entry["faithfulness"]["probability"]
        cost = entry.get("cost") or {}
        row = [f"``{name}``", fmt(logit["auc_morf"]), fmt(logit["auc_lerf"]),
               f"{fmt(logit['abpc'])} ± {fmt(logit['abpc_sem'])}", fmt(prob["abpc"])]
        if has_evidence:
            ev = entry.get("evidence") or {}
            row += [fmt(ev.get("evidence_mass")), fmt(ev.get("pointing_accuracy"), ".2f")]
        row += [fmt(cost.get("time_ratio"), ".2f") if cost else "-", fmt(cost.get("memory_ratio"), ".2f") if cost else "-"]
        rows.append(row)
    lines = render_table(header, rows)
    not_run = [(n, e) for n, e in model["methods"].items() if e.get("status") != "ok"]
    skipped = [(n, e) for n, e in not_run if e["status"] == "skipped"]
    if skipped:
        lines += ["Skipped (the method raised on this model; nothing was substituted):", ""]
        lines += [f"- ``{n}``: {e['reason']}" for n, e in skipped]
        lines.append("")
    na = [n for n, e in not_run if e["status"] == "not_applicable"]
    if na:
        lines += ["Not applicable by design: " + ", ".join(f"``{n}``" for n in na) + ".", ""]
    return lines


def render_rst(report: dict[str, Any], figure_dir: str, figures: dict[str, Any]) -> str:
    """The page text for ``report`` (pure function of its arguments).

    Parameters
    ----------
    report : dict
        The benchmark json.
    figure_dir : str
        Folder of the figures, relative to the page.
    figures : dict
        File names returned by :func:`write_figures`.
    """
    s, m = report["settings"], report["machine"]
    lines: list[str] = [
        ":orphan:",
        "",
        ".. This page is generated by ``python -m benchmarks.faithfulness`` from",
        "   ``docs/benchmarks/faithfulness.json``; edit ``benchmarks/_report.py``, not this file.",
        "",
    ]
    lines += heading("Attribution faithfulness and cost", "=")
    lines += [
        "How faithful are lime_attr's LRP attributions compared with gradient-based methods, "
        "Captum's and zennit's LRP and attention rollout, and what do they cost relative to one "
        "plain gradient? Three small models are trained for this from a fixed seed "
        "(``benchmarks/bench_models.py``); every method explains the model's own prediction on "
        f"{s['n_examples']} held-out examples per model"
        + (" (**quick run**: a smoke-sized version, not the reference numbers)" if s["quick"] else "")
        + ". Regenerate everything with ``python -m benchmarks.faithfulness``.",
        "",
    ]
    lines += heading("What is measured", "-")
    lines += [
        "**Perturbation curves.** Per example, the features are ranked by their (signed) relevance, "
        "summed over the elements of the feature. They are then removed one step at a time, "
        "most relevant first (MoRF) and least relevant first (LeRF), and the explained logit is "
        "recorded after every step. Ties are broken by one fixed random permutation per example, "
        "the same for all methods. AUC is the trapezoidal area over the removed fraction in [0, 1], "
        "per example, averaged over the examples; ABPC = AUC(LeRF) - AUC(MoRF) (AttnLRP, Achtibat "
        "et al. 2024): a faithful attribution makes the logit fall fast under MoRF and stay up "
        "under LeRF, so higher ABPC is better. The tables give the mean ± its standard error over "
        "the examples, on raw logits (not normalised); ABPC on the softmax probability of the "
        "explained class is given alongside.",
        "",
        "**Evidence (retrieval task).** Evidence mass = share of *absolute* relevance on the three "
        "evidence tokens (the queried key in the context, its value, the query key), averaged over "
        "examples; pointing accuracy = share of examples whose top (signed) relevance is on an "
        "evidence token. The random reference gives the chance level; ``oracle:evidence`` ranks "
        "the evidence tokens first (a reference, not a method).",
        "",
        "**Cost.** One call on a fixed batch of "
        f"{s['cost_batch']} examples, median of {s['repeats']} samples after {s['warmup']} warm-up "
        "calls (a sample repeats very short calls to last about 20 ms), methods timed round-robin, "
        "relative to one plain gradient pass (``torch.autograd.grad`` of the target logits w.r.t. "
        "the input, forward included). Time is "
        + ("wall-clock time." if s["device"] == "cuda" else
           "the process's CPU time (``time.process_time``), which unlike wall-clock time does not "
           "count waiting for a core on a shared machine; the json also has the wall-clock "
           "ratios.")
        + " Peak memory: "
        + ("``torch.cuda.max_memory_allocated`` above the memory before the call."
           if s["device"] == "cuda" else
           "the torch profiler's CPU allocation trace (``profile_memory=True``) during one call; the "
           "peak of live tensor bytes allocated by the call. It counts every tensor (activations "
           "kept for backward, gradients, copies, Integrated Gradients' batched inputs, the result) "
           "but not non-tensor memory (Python objects, allocator caching) nor tensors that existed "
           "before the call (weights, inputs).")
        + " Construction of the attribution object is not timed; entering and leaving an LRP "
        "scope or a zennit composite context is (it happens in every call).",
        "",
    ]
    rows = []
    for name, model in report["models"].items():
        info = model.get("model") or {}
        acc = info.get("test_accuracy")
        rows.append([
            MODEL_TITLES.get(name, name), str(info.get("n_params", "n/a")),
            fmt(acc, ".3f") if acc is not None else "untrained",
            model["feature_unit"], model["removal_baseline"], str(model["n_examples"]),
        ])
    lines += heading("Models", "-")
    lines += render_table(["model", "parameters", "held-out accuracy", "feature", "removal", "examples"], rows)
    lines += [
        "The LM is a 2-layer Llama (d=64, 4 heads, 2 KV heads) trained on prompts like "
        "``<bos> k3 = 7 k1 = 2 ... ? k1`` (6 distinct keys out of 16, values 0-9) to predict ``2`` as "
        "the next token; 10% of the non-evidence tokens were replaced by ``<mask>`` in training, so "
        "that ``<mask>`` is an in-distribution symbol for a removed token. The explained input of "
        "the LM is its ``inputs_embeds``; relevance is summed over the embedding dimension.",
        "",
    ]
    lines += heading("Methods", "-")
    lines += render_table(["method", "settings"],
                    [[f"``{n}``", meta["settings"]] for n, meta in report["methods"].items()])

    for name, model in report["models"].items():
        lines += heading(MODEL_TITLES.get(name, name), "-")
        grad = model.get("gradient_reference") or {}
        lines += [
            f"{model['n_examples']} examples; model accuracy on them {fmt(model['accuracy_on_examples'], '.3f')}. "
            f"Plain gradient on a batch of {grad.get('batch', 'n/a')}: "
            f"{fmt((grad.get('seconds_median') or 0) * 1e3, '.2f')} ms ({grad.get('clock', 'n/a')}), "
            f"peak {fmt((grad.get('peak_bytes') or 0) / 2**20, '.2f')} MiB.",
            "",
        ]
        lines += _model_table(model)
        if model.get("agreement"):
            lines += ["Agreement of feature scores between methods that should (or may) coincide, cosine "
                      "similarity per example (1 = the same up to a positive scale):", ""]
            lines += render_table(["methods", "min cosine", "mean cosine"],
                            [[" vs ".join(f"``{n}``" for n in a["methods"]), fmt(a["cosine_min"], ".6f"),
                              fmt(a["cosine_mean"], ".6f")] for a in model["agreement"]])
        if name in figures.get("curves", {}):
            lines += [f".. image:: {figure_dir}/{figures['curves'][name]}",
                      f"   :alt: perturbation curves, {name}", ""]

    lines += heading("Summary figures", "-")
    for key, alt in (("abpc", "ABPC per method and model"), ("cost", "time and memory relative to a gradient")):
        if key in figures:
            lines += [f".. image:: {figure_dir}/{figures[key]}", f"   :alt: {alt}", ""]

    lines += heading("Machine and settings", "-")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines += [
        f"- CPU: {m['cpu']}, {m['cpu_cores_visible']} cores visible, torch threads {m['torch_threads']}"
        + (f"; GPU: {m['gpu']}" if m.get("gpu") else ""),
        f"- {versions}; Python {m['python']}",
        f"- settings: {', '.join(f'{k}={v}' for k, v in s.items())}",
        f"- load average at start: {m.get('load_average_at_start', 'n/a')} "
        "(the machine may be shared: absolute times vary, the round-robin ratios less so)",
        f"- total runtime: {report['runtime_seconds']:.0f} s",
        "",
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_rst(report: dict[str, Any], path: Path, figure_dir: str, figures: dict[str, Any]) -> Path:
    """Write :func:`render_rst` to ``path``."""
    path.write_text(render_rst(report, figure_dir, figures), encoding="utf-8")
    return path


def sign_test(fixed: int, introduced: int) -> float:
    """Two-sided exact sign test of ``fixed`` against ``introduced`` changes (1 when nothing changed)."""
    n, k = fixed + introduced, min(fixed, introduced)
    if n == 0:
        return 1.0
    return min(1.0, 2.0 * sum(math.comb(n, j) for j in range(k + 1)) / 2.0 ** n)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted = [1.0] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
