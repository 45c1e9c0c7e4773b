"""Why LIME fails where it fails, on the embedded demo models (issue #15, part 1).

For both builtins (``digits-llava``, ``tones-qwen2audio``) and every prior-probe condition
(:data:`lime_attr.models.PROBE_CONDITIONS`), on the *validation* split, this measures:

* the greedy answer and the relevance of its logit (AttnLRP, :class:`lime_attr.ModalityAttribution`),
  split into perceptual positions ``M`` (LIME's set: placeholders and, for Qwen2-Audio, the markers) and
  text positions ``T`` -- share of ``|R|`` and signed sums -- for correct against wrong answers;
* the *decision relevance* ``D = R(z_yes - z_no) = R(z_yes) - R(z_no)`` (gradient-form LRP is linear in
  the output seed; checked against a direct backward of ``z_yes - z_no`` on the first items), its
  ``M`` / ``T`` split, and how much of the answer logit's relevance is common to "yes" and "no";
* where the prior's evidence flows: the positive part of ``D`` split over the present pair member's
  cell / time span, the other perceptual tokens, the queried object's word and the other text tokens;
* magnitudes: the RMS of keys / values per layer against the RMS of LIME's ``Delta_K`` / ``Delta_V``
  after 6 Adam steps at the paper lr, 10x and 100x; the largest mass of ``softmax(R / tau)``;
* per-step trajectories of LIME's reference mode (``record="steps"``) at the paper lr, 100x, and 100x
  with ``second_order="exact"`` on the conflict and control conditions: loss terms, the yes-minus-no
  logit margin, the explained token, averaged over items; and the answers it changes against greedy.

Run ``python -m benchmarks.lime_diagnosis`` (writes ``docs/benchmarks/lime_diagnosis.json``, the tables
``docs/benchmarks/lime_diagnosis.inc`` that ``docs/lime_diagnosis.rst`` includes, and the figures
``docs/benchmarks/lime_diagnosis_*.png``); ``--quick`` for a smoke run into ``outputs/lime_diagnosis_quick``.

Layout of ``lime_diagnosis.json``::

    schema_version, generated, machine, settings, runtime {wall_seconds, cpu_seconds}
    models.<model>
        info                      class, parameters, layers, heads, head_dim, token ids of yes / no
        linearity                 n, max_abs_diff, max_abs (of R(z_yes - z_no) computed directly)
        items.<condition>         list of per-item dicts (see analyse_item)
        summary.<condition>.<outcome>   means over items, outcome in {all, correct, wrong}
        magnitude                 kv_rms per layer, delta_rms per setting and layer, ratios
        trajectories.<setting>.<condition>   per-step means, changes against greedy
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch

from . import _common
from ._report import sign_test
from .hallucination_report import encode, kv_rms, placeholder_positions, region_mask

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
QUICK_OUT = REPO_ROOT / "outputs" / "lime_diagnosis_quick"
JSON_NAME = "lime_diagnosis.json"
TABLES_NAME = "lime_diagnosis.inc"
MODEL_NAMES = ("digits-llava", "tones-qwen2audio")
#: Flow groups of the decision relevance, in report order.
FLOW_GROUPS = ("member", "other_perceptual", "object_word", "other_text")
#: LIME settings of the trajectories: name -> (lr factor over the paper's, second_order).
TRAJECTORY_SETTINGS: dict[str, tuple[float, str]] = {
    "paper": (1.0, "autograd"), "lr10x": (10.0, "autograd"), "lr100x": (100.0, "autograd"),
    "lr100x-exact": (100.0, "exact"),
}
TRAJECTORY_CONDITIONS = ("conflict", "control")


@dataclass(frozen=True)
class Settings(_common.PresetSettings):
    """Knobs of one run (recorded in the json).

    Attributes
    ----------
    n_items : int
        Validation items per probe condition for the relevance analysis.
    n_trajectory : int
        Items (the first of each set) per trajectory condition and LIME setting.
    n_linearity : int
        Items per model on which ``R(z_yes - z_no)`` is also computed directly.
    n_kv : int
        Prompts over which the key / value RMS is measured.
    tau : float
        Temperature of the one-hotness check (the paper's 0.1).
    seed : int
        Probe seed (:func:`lime_attr.models.prior_probe`) and ``torch.manual_seed``.
    split : str
        Probe split (``"validation"``: this page makes no claims about methods).
    models : tuple of str
    """

    n_items: int = 60
    n_trajectory: int = 60
    n_linearity: int = 4
    n_kv: int = 8
    tau: float = 0.1
    seed: int = 0
    split: str = "validation"
    models: tuple = MODEL_NAMES

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "full": {},
        "quick": {"n_items": 2, "n_trajectory": 1, "n_linearity": 1, "n_kv": 1},
    }


# --------------------------------------------------------------------------------------------------
# positions
# --------------------------------------------------------------------------------------------------
def answer_ids(processor: Any) -> tuple[int, int]:
    """Token ids of ``"yes"`` and ``"no"`` (each one token in the demo tokenizers)."""
    tok = getattr(processor, "tokenizer", processor)
    out = []
    for word in ("yes", "no"):
        ids = tok.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{word!r} is {len(ids)} tokens in this tokenizer; the diagnosis needs one token")
        out.append(int(ids[0]))
    return out[0], out[1]


def _last_occurrence(seq: list, sub: list) -> Optional[int]:
    for start in range(len(seq) - len(sub), -1, -1):
        if seq[start:start + len(sub)] == sub:
            return start
    return None


def position_groups(model: Any, processor: Any, enc: dict, item: Any, model_name: str) -> dict[str, torch.Tensor]:
    """Boolean ``[S]`` masks of the position groups of one item.

    ``perceptual``: LIME's ``M`` (:func:`lime_attr.mitigation.generate.modality_positions`); ``text``:
    every other position. ``member``: the placeholder tokens in the region of the one present member
    of the focus pair (same rule as :func:`benchmarks.hallucination_report.region_mask`; empty when
    none or both are present); ``other_perceptual``: ``M`` without it; ``object_word``: the tokens of
    the queried object's name in the question; ``other_text``: ``T`` without it.
    """
    from lime_attr.mitigation.generate import modality_positions

    ids, mask = enc["input_ids"], enc["attention_mask"]
    perceptual = modality_positions(model, processor, ids, mask)[0]
    text = ~perceptual & mask[0].bool()
    member = torch.zeros_like(perceptual)
    present = [o for o in item.pair if o in item.present]
    if len(present) == 1:
        places = placeholder_positions(model, ids, model_name)
        shim = SimpleNamespace(region=item.regions[present[0]], image=item.image, audio=item.waveform,
                               sampling_rate=item.sampling_rate)
        member[places[region_mask(len(places), shim)]] = True
    word = torch.zeros_like(perceptual)
    tok = getattr(processor, "tokenizer", processor)
    sub = tok.encode(str(item.object), add_special_tokens=False)
    start = _last_occurrence(ids[0].tolist(), sub)
    if start is not None:
        word[start:start + len(sub)] = True
    return {"perceptual": perceptual, "text": text, "member": member, "other_perceptual": perceptual & ~member,
            "object_word": word & text, "other_text": text & ~word}


# --------------------------------------------------------------------------------------------------
# relevance measures
# --------------------------------------------------------------------------------------------------
def logit_relevance(attr: Any, enc: dict, token: int) -> torch.Tensor:
    """``[S]`` float64 relevance of each position for the next-token logit of ``token``."""
    return attr.attribute(enc, target=int(token)).token_relevance[0].detach().double()


def direct_difference_relevance(attr: Any, enc: dict, a: int, b: int) -> torch.Tensor:
    """``[S]`` relevance of ``z_a - z_b`` from one backward of the difference (no linearity assumed)."""
    from lime_attr.attribution import relevance
    from lime_attr.attribution.modality import EmbeddingCapture

    capture = EmbeddingCapture(attr.language_model)
    inputs = {k: v for k, v in enc.items()}

    def forward() -> torch.Tensor:
        logits = attr.model(**inputs, use_cache=False).logits[:, -1]
        return logits[:, a] - logits[:, b]

    res = relevance(attr.scope(), forward, [], latent=capture)
    return res.latent["inputs_embeds"].sum(-1)[0].detach().double() * enc["attention_mask"][0].double()


def common_fraction(r_a: torch.Tensor, r_b: torch.Tensor) -> dict[str, float]:
    r"""How much relevance two logits share: ``common = 1 - ||R_a - R_b||_1 / (||R_a||_1 + ||R_b||_1)``
    (1: identical, 0: disjoint or opposite) and the cosine of the two vectors."""
    den = float(r_a.abs().sum() + r_b.abs().sum())
    norm = float(r_a.norm() * r_b.norm())
    return {"common": 1.0 - float((r_a - r_b).abs().sum()) / den if den > 0 else float("nan"),
            "cosine": float(r_a @ r_b) / norm if norm > 0 else float("nan")}


def split(r: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perceptual share of ``|R|`` and the signed sums over ``M`` and ``T``."""
    total = float(r.abs().sum())
    return {"share_abs": float(r[groups["perceptual"]].abs().sum()) / total if total > 0 else float("nan"),
            "sum_perceptual": float(r[groups["perceptual"]].sum()), "sum_text": float(r[groups["text"]].sum())}


def flow(d: torch.Tensor, groups: dict[str, torch.Tensor]) -> dict[str, float]:
    """Where positive decision relevance lies: the share of ``sum(max(D, 0))`` in each of
    :data:`FLOW_GROUPS` (``pos_<group>``) and the signed sum of ``D`` over each (``sum_<group>``)."""
    pos = d.clamp(min=0)
    total = float(pos.sum())
    out: dict[str, float] = {}
    for g in FLOW_GROUPS:
        out[f"pos_{g}"] = float(pos[groups[g]].sum()) / total if total > 0 else float("nan")
        out[f"sum_{g}"] = float(d[groups[g]].sum())
    out["n_member_tokens"] = int(groups["member"].sum())
    return out


def one_hotness(r: torch.Tensor, groups: dict[str, torch.Tensor], mask: torch.Tensor, tau: float) -> dict[str, Any]:
    """The largest mass of ``softmax(R / tau)`` over the real positions, where it lies, and the mass on ``M``
    (the objective's focus)."""
    p = torch.softmax(r[mask] / tau, dim=0)
    full = torch.zeros_like(r)
    full[mask] = p
    top = int(full.argmax())
    return {"max_mass": float(p.max()), "argmax_position": top, "argmax_perceptual": bool(groups["perceptual"][top]),
            "focus": float(full[groups["perceptual"]].sum())}


def parse_answer(processor: Any, token: int) -> str:
    """``"yes"``, ``"no"`` or ``"other"`` for the first answer token."""
    yes, no = answer_ids(processor)
    return "yes" if token == yes else "no" if token == no else "other"


def analyse_item(attr: Any, processor: Any, enc: dict, item: Any, groups: dict, tau: float) -> dict[str, Any]:
    """Relevance measures of one probe item (see the module docstring)."""
    yes, no = answer_ids(processor)
    with torch.no_grad():
        logits = attr.model(**enc).logits[0, -1].double()
    top2 = [int(t) for t in logits.topk(2).indices]
    r_yes, r_no = logit_relevance(attr, enc, yes), logit_relevance(attr, enc, no)
    by_token = {yes: r_yes, no: r_no}
    r_top = by_token.get(top2[0])
    if r_top is None:
        r_top = logit_relevance(attr, enc, top2[0])
    d = r_yes - r_no
    answer = parse_answer(processor, top2[0])
    mask = enc["attention_mask"][0].bool()
    return {
        "item_id": item.item_id, "label": item.label, "answer": answer, "correct": answer == item.label,
        "top2_is_yes_no": set(top2) == {yes, no}, "margin_yes_no": float(logits[yes] - logits[no]),
        "answer_logit": split(r_top, groups), "decision": split(d, groups),
        "common": common_fraction(r_yes, r_no), "flow": flow(d, groups),
        "one_hot": one_hotness(r_top, groups, mask, tau),
    }


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------
def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def mean_fields(rows: Sequence[dict]) -> dict[str, Any]:
    """``{"n": len(rows)}`` and the mean of every numeric (and boolean) field over ``rows`` (NaN skipped)."""
    flat = [_flatten(r) for r in rows]
    out: dict[str, Any] = {"n": len(rows)}
    for key in (flat[0] if flat else {}):
        if key in ("item_id", "one_hot.argmax_position"):
            continue
        vals = [float(f[key]) for f in flat if isinstance(f.get(key), (int, float, bool))
                and not (isinstance(f[key], float) and math.isnan(f[key]))]
        if vals:
            out[key] = float(np.mean(vals))
    return out


def summarise(items: Sequence[dict]) -> dict[str, dict[str, Any]]:
    """Means over all items of a condition, over its correct and over its wrong answers."""
    return {"all": mean_fields(items), "correct": mean_fields([r for r in items if r["correct"]]),
            "wrong": mean_fields([r for r in items if not r["correct"]])}


# --------------------------------------------------------------------------------------------------
# LIME: magnitudes and per-step trajectories
# --------------------------------------------------------------------------------------------------
def lm_shape(model: Any) -> dict[str, int]:
    """Layers, query heads and head dimension of the language model."""
    cfg = getattr(model.config, "text_config", model.config)
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    return {"layers": int(cfg.num_hidden_layers), "heads": heads, "head_dim": head_dim}


def layer_kv_rms(model: Any, processor: Any, encs: Sequence[dict]) -> dict[str, list[float]]:
    """Per language-model layer, the RMS of the keys and of the values over ``encs``
    (:func:`benchmarks.hallucination_report.kv_rms`)."""
    per = kv_rms(model, processor, encs)["per_module"]
    n = lm_shape(model)["layers"]
    out: dict[str, list[float]] = {"key": [float("nan")] * n, "value": [float("nan")] * n}
    for name, v in per.items():
        layer = int(name.split(".layers.")[1].split(".")[0])
        out["key" if name.endswith("k_proj") else "value"][layer] = v
    return out


def lime_config(model: Any, factor: float, second_order: str, top_k: int) -> Any:
    """Reference-mode LIME with the model's paper preset, ``lr`` times ``factor``, per-step records."""
    from lime_attr.mitigation import LimeConfig

    lr = LimeConfig.for_model(model).lr * factor
    return LimeConfig.for_model(model, mode="reference", record="steps", lr=lr, second_order=second_order,
                                top_k_logits=top_k)


def _margin(tokens: list, logits: list, yes: int, no: int) -> float:
    if yes in tokens and no in tokens:
        return float(logits[tokens.index(yes)] - logits[tokens.index(no)])
    return float("nan")


def trajectory(model: Any, processor: Any, enc: dict, cfg: Any, kv: dict[str, list[float]]) -> dict[str, Any]:
    """One item's first answer token under LIME: per inner step the loss terms, the yes-minus-no margin,
    whether the explained token is "yes", share and focus, and the RMS of ``Delta_K`` / ``Delta_V``
    relative to the keys' / values' RMS (mean over layers); the greedy and the emitted token."""
    from lime_attr.mitigation import lime_generate

    yes, no = answer_ids(processor)
    res = lime_generate(model, processor, enc, cfg, max_new_tokens=1)
    rec = res.records[0]
    shape = lm_shape(model)
    numel = shape["heads"] * shape["head_dim"] * int(enc["input_ids"].shape[1])
    steps = []
    for s in rec.step_records:
        dk = [v / math.sqrt(numel) / kv["key"][i] for i, v in enumerate(s.delta_k_norm[0])]
        dv = [v / math.sqrt(numel) / kv["value"][i] for i, v in enumerate(s.delta_v_norm[0])]
        steps.append({"step": s.step, "loss": s.loss[0], "rel_loss": s.rel_loss[0], "kl": s.kl[0],
                      "margin_yes_no": _margin(s.top_tokens[0], s.top_logits[0], yes, no),
                      "explained_yes": s.explained[0] == yes, "share": s.share[0], "focus": s.focus[0],
                      "delta_k_ratio": float(np.mean(dk)) if dk else float("nan"),
                      "delta_v_ratio": float(np.mean(dv)) if dv else float("nan"),
                      "delta_k_ratio_per_layer": dk, "delta_v_ratio_per_layer": dv})
    return {"greedy": parse_answer(processor, int(rec.unperturbed_tokens[0])),
            "emitted": parse_answer(processor, int(res.tokens[0][0])), "steps": steps}


def changes(runs: Sequence[dict], labels: Sequence[str]) -> dict[str, Any]:
    """Answers LIME changed against greedy: fixed / introduced errors, flips by direction, sign test."""
    fixed = sum(r["greedy"] != lab and r["emitted"] == lab for r, lab in zip(runs, labels))
    introduced = sum(r["greedy"] == lab and r["emitted"] != lab for r, lab in zip(runs, labels))
    return {"n": len(runs), "fixed": fixed, "introduced": introduced,
            "no_to_yes": sum(r["greedy"] == "no" and r["emitted"] == "yes" for r in runs),
            "yes_to_no": sum(r["greedy"] == "yes" and r["emitted"] == "no" for r in runs),
            "changed": sum(r["greedy"] != r["emitted"] for r in runs),
            "greedy_accuracy": float(np.mean([r["greedy"] == lab for r, lab in zip(runs, labels)])) if runs else None,
            "lime_accuracy": float(np.mean([r["emitted"] == lab for r, lab in zip(runs, labels)])) if runs else None,
            "sign_test_p": sign_test(fixed, introduced)}


def step_means(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """Per inner step, the mean over items of every scalar field of :func:`trajectory`'s steps."""
    if not runs:
        return []
    out = []
    for k in range(len(runs[0]["steps"])):
        rows = [{key: v for key, v in r["steps"][k].items() if not isinstance(v, list)} for r in runs]
        out.append(mean_fields(rows))
    return out


def run_trajectories(model: Any, processor: Any, items: dict[str, list], encs: dict[str, list],
                     kv: dict[str, list[float]], settings: Settings) -> dict[str, Any]:
    """Every setting of :data:`TRAJECTORY_SETTINGS` on the first ``n_trajectory`` items of each
    trajectory condition."""
    top_k = int(model.get_input_embeddings().weight.shape[0])
    out: dict[str, Any] = {}
    for name, (factor, order) in TRAJECTORY_SETTINGS.items():
        cfg = lime_config(model, factor, order, top_k)
        out[name] = {"lr": cfg.lr, "second_order": order, "steps": cfg.steps, "kl_weight": cfg.kl_weight,
                     "temperature": cfg.temperature, "conditions": {}}
        for cond in TRAJECTORY_CONDITIONS:
            n = min(settings.n_trajectory, len(items[cond]))
            runs = []
            with _common.Stopwatch() as clock:
                for enc in encs[cond][:n]:
                    torch.manual_seed(settings.seed)
                    runs.append(trajectory(model, processor, enc, cfg, kv))
            labels = [it.label for it in items[cond][:n]]
            out[name]["conditions"][cond] = {"changes": changes(runs, labels), "per_step": step_means(runs),
                                             "delta_ratio_last_step_per_layer": _last_step_layers(runs),
                                             "cpu_seconds": clock.cpu, "wall_seconds": clock.wall}
            logger.info("%s %s: %s", name, cond, out[name]["conditions"][cond]["changes"])
    return out


def _last_step_layers(runs: Sequence[dict]) -> dict[str, list[float]]:
    """Per layer, the mean ``Delta`` RMS ratio at the last step (after ``steps - 1`` updates)."""
    if not runs:
        return {"key": [], "value": []}
    return {"key": np.mean([r["steps"][-1]["delta_k_ratio_per_layer"] for r in runs], axis=0).tolist(),
            "value": np.mean([r["steps"][-1]["delta_v_ratio_per_layer"] for r in runs], axis=0).tolist()}


# --------------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------------
def linearity(attr: Any, processor: Any, encs: Sequence[dict]) -> dict[str, Any]:
    """``max |R(z_yes - z_no) - (R(z_yes) - R(z_no))|`` over ``encs``, the direct relevance computed by
    :func:`direct_difference_relevance` (gradient-form LRP is linear in the output seed)."""
    yes, no = answer_ids(processor)
    diff, scale = 0.0, 0.0
    for enc in encs:
        direct = direct_difference_relevance(attr, enc, yes, no)
        by_parts = logit_relevance(attr, enc, yes) - logit_relevance(attr, enc, no)
        diff = max(diff, float((direct - by_parts).abs().max()))
        scale = max(scale, float(direct.abs().max()))
    return {"n": len(encs), "max_abs_diff": diff, "max_abs": scale}


def model_info(model: Any, processor: Any) -> dict[str, Any]:
    yes, no = answer_ids(processor)
    return {"class": type(model).__name__, "parameters": int(sum(p.numel() for p in model.parameters())),
            **lm_shape(model), "yes_id": yes, "no_id": no}


def run_model(model_name: str, settings: Settings) -> dict[str, Any]:
    """Every measurement of the module docstring for one builtin."""
    from lime_attr import ModalityAttribution
    from lime_attr.models import PROBE_CONDITIONS, load_builtin, prior_probe

    model, processor = load_builtin(model_name)
    model.eval()
    attr = ModalityAttribution(model, processor)
    items = {c: prior_probe(model_name, c, n=settings.n_items, seed=settings.seed, split=settings.split)
             for c in PROBE_CONDITIONS}
    encs = {c: [encode(model, processor, it) for it in its] for c, its in items.items()}
    entry: dict[str, Any] = {"info": model_info(model, processor), "items": {}, "summary": {}}
    for cond in PROBE_CONDITIONS:
        rows = []
        for it, enc in zip(items[cond], encs[cond]):
            groups = position_groups(model, processor, enc, it, model_name)
            rows.append(analyse_item(attr, processor, enc, it, groups, settings.tau))
        entry["items"][cond] = rows
        entry["summary"][cond] = summarise(rows)
    entry["linearity"] = linearity(attr, processor, encs["conflict"][:settings.n_linearity])
    kv = layer_kv_rms(model, processor, encs["conflict"][:settings.n_kv])
    entry["trajectories"] = run_trajectories(model, processor, items, encs, kv, settings)
    entry["magnitude"] = {"kv_rms": kv, "delta_over_kv_after_6_steps": {
        name: t["conditions"]["conflict"]["delta_ratio_last_step_per_layer"] for name, t in entry["trajectories"].items()}}
    return entry


def run(settings: Settings) -> dict[str, Any]:
    """The whole report (json-ready)."""
    torch.manual_seed(settings.seed)
    start = time.time()
    cpu0 = time.process_time()
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {**_common.machine_info(), "load_average_start": _common.load_average()},
        "settings": settings.to_dict(), "models": {},
    }
    for name in settings.models:
        logger.info("model %s", name)
        report["models"][name] = run_model(name, settings)
    report["machine"]["load_average_end"] = _common.load_average()
    report["runtime"] = {"wall_seconds": time.time() - start, "cpu_seconds": time.process_time() - cpu0}
    return report


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------
OUTCOMES = ("correct", "wrong")


def _subplots(ncols: int, nrows: int = 1, size: tuple = (5.0, 3.4)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def figure_relevance(report: dict, path: Path) -> Path:
    """Perceptual share of |R| of the answer logit and of the decision, correct vs wrong, per condition."""
    models = list(report["models"])
    fig, axes = _subplots(len(models))
    bars = [("answer_logit.share_abs", "correct"), ("answer_logit.share_abs", "wrong"),
            ("decision.share_abs", "correct"), ("decision.share_abs", "wrong")]
    for ax, name in zip(axes[0], models):
        summary = report["models"][name]["summary"]
        conds = list(summary)
        for k, (key, outcome) in enumerate(bars):
            vals = [summary[c][outcome].get(key, np.nan) for c in conds]
            ax.bar(np.arange(len(conds)) + (k - 1.5) * 0.2, vals, 0.2,
                   label=f"{key.split('.')[0].replace('_', ' ')}, {outcome}", hatch="//" if outcome == "wrong" else "")
        ax.set_xticks(range(len(conds)), [c.replace("_", "\n") for c in conds])
        ax.set_ylabel("perceptual share of |R|")
        ax.set_title(name)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def figure_flow(report: dict, path: Path) -> Path:
    """Stacked shares of the positive decision relevance toward "yes" by group."""
    models = list(report["models"])
    fig, axes = _subplots(len(models))
    for ax, name in zip(axes[0], models):
        summary = report["models"][name]["summary"]
        rows = [(c, o) for c in summary for o in OUTCOMES if summary[c][o]["n"] > 0]
        left = np.zeros(len(rows))
        for g in FLOW_GROUPS:
            vals = np.nan_to_num([summary[c][o].get(f"flow.pos_{g}", np.nan) for c, o in rows])
            ax.barh(range(len(rows)), vals, left=left, label=g.replace("_", " "))
            left += vals
        ax.set_yticks(range(len(rows)), [f"{c} {o} (n={summary[c][o]['n']})" for c, o in rows], fontsize=7)
        ax.set_xlabel("share of positive R(z_yes - z_no)")
        ax.set_title(name)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=len(FLOW_GROUPS))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    return path


def figure_trajectories(report: dict, path: Path) -> Path:
    """Per inner step (mean over items): relevance loss, KL, yes-minus-no margin, share explaining "yes"."""
    models = list(report["models"])
    keys = ("rel_loss", "kl", "margin_yes_no", "explained_yes", "focus")
    fig, axes = _subplots(len(keys), len(models), size=(3.2, 2.8))
    for r, name in enumerate(models):
        traj = report["models"][name]["trajectories"]
        for k, key in enumerate(keys):
            ax = axes[r][k]
            for s, (setting, entry) in enumerate(traj.items()):
                for cond, style in zip(TRAJECTORY_CONDITIONS, ("-", "--")):
                    steps = entry["conditions"][cond]["per_step"]
                    ax.plot([p["step"] for p in steps], [p.get(key, np.nan) for p in steps], style, color=f"C{s}",
                            marker=".", label=f"{setting} {cond}")
            ax.set_title(f"{name}: {key}", fontsize=8)
            ax.set_xlabel("inner step", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def write_figures(report: dict, out_dir: Path) -> list[str]:
    """The three PNG figures next to the json; their file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [figure_relevance(report, out_dir / "lime_diagnosis_relevance.png"),
             figure_flow(report, out_dir / "lime_diagnosis_flow.png"),
             figure_trajectories(report, out_dir / "lime_diagnosis_trajectories.png")]
    import matplotlib.pyplot as plt

    plt.close("all")
    return [p.name for p in paths]


# --------------------------------------------------------------------------------------------------
# tables (included by docs/lime_diagnosis.rst)
# --------------------------------------------------------------------------------------------------
def _f(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table_relevance(entry: dict) -> list[str]:
    """Answer-logit and decision relevance by condition and outcome."""
    keys = ("answer_logit.share_abs", "answer_logit.sum_perceptual", "answer_logit.sum_text", "decision.share_abs",
            "decision.sum_perceptual", "decision.sum_text", "common.common", "common.cosine", "margin_yes_no")
    rows = [[c, o, str(s[o]["n"]), *[_f(s[o].get(k), ".2f") for k in keys]]
            for c, s in entry["summary"].items() for o in OUTCOMES if s[o]["n"] > 0]
    header = ["condition", "answer", "n", "answer share M", "answer sum M", "answer sum T", "decision share M",
              "decision sum M", "decision sum T", "common", "cosine", "z_yes - z_no"]
    return _common.render_table(header, rows)


def table_flow(entry: dict) -> list[str]:
    """Shares of the positive decision relevance (toward "yes") by group, and signed sums."""
    rows = [[c, o, str(s[o]["n"]), *[_f(s[o].get(f"flow.pos_{g}"), ".2f") for g in FLOW_GROUPS],
             _f(s[o].get("flow.sum_member"), ".2f"), _f(s[o].get("flow.sum_object_word"), ".2f")]
            for c, s in entry["summary"].items() for o in OUTCOMES if s[o]["n"] > 0]
    header = ["condition", "answer", "n", "member", "other M", "object word", "other T", "sum D member",
              "sum D object word"]
    return _common.render_table(header, rows)


def table_magnitude(report: dict) -> list[str]:
    """K / V RMS, Delta RMS relative to them after 6 updates, and the one-hotness of softmax(R / tau)."""
    rows = []
    for name, entry in report["models"].items():
        kv, ratio = entry["magnitude"]["kv_rms"], entry["magnitude"]["delta_over_kv_after_6_steps"]
        items = [r for rows_ in entry["items"].values() for r in rows_]
        mass = [r["one_hot"]["max_mass"] for r in items]
        cells = [name, " / ".join(_f(v, ".2f") for v in kv["key"]), " / ".join(_f(v, ".2f") for v in kv["value"])]
        cells += [_f(float(np.mean(ratio[s]["key"] + ratio[s]["value"])) * 100, ".2f") + " %"
                  for s in ("paper", "lr10x", "lr100x")]
        cells += [_f(float(np.median(mass)), ".3f"), _f(float(np.mean([m > 0.99 for m in mass])), ".2f"),
                  _f(float(np.mean([r["one_hot"]["argmax_perceptual"] for r in items])), ".2f"),
                  _f(float(np.mean([r["one_hot"]["focus"] for r in items])), ".3f")]
        rows.append(cells)
    header = ["model", "key RMS per layer", "value RMS per layer", "Delta/RMS paper lr", "10x", "100x",
              "median max mass", "share > 0.99", "argmax on M", "mass on M"]
    return _common.render_table(header, rows)


def table_trajectories(entry: dict) -> list[str]:
    """Per LIME setting and condition: answers changed against greedy, and the first and last step."""
    rows = []
    for setting, t in entry["trajectories"].items():
        for cond, c in t["conditions"].items():
            ch, first, last = c["changes"], c["per_step"][0], c["per_step"][-1]
            rows.append([setting, cond, str(ch["n"]), _f(ch["greedy_accuracy"], ".2f"), _f(ch["lime_accuracy"], ".2f"),
                         f"{ch['fixed']} / {ch['introduced']}", f"{ch['no_to_yes']} / {ch['yes_to_no']}",
                         _f(ch["sign_test_p"], ".2g"), f"{_f(first.get('rel_loss'), '.2f')} -> {_f(last.get('rel_loss'), '.2f')}",
                         f"{_f(first.get('margin_yes_no'), '.2f')} -> {_f(last.get('margin_yes_no'), '.2f')}",
                         f"{_f(first.get('focus'), '.3f')} -> {_f(last.get('focus'), '.3f')}"])
    header = ["setting", "condition", "n", "greedy acc", "LIME acc", "fixed / introduced", "no->yes / yes->no",
              "sign test p", "rel. loss step 0 -> 6", "z_yes - z_no step 0 -> 6", "focus step 0 -> 6"]
    return _common.render_table(header, rows)


def render_tables(report: dict) -> str:
    """The rst fragment with every table and the run's conditions."""
    m, s = report["machine"], report["settings"]
    def load(key: str) -> str:
        return ", ".join(f"{v:.2f}" for v in m.get(key) or []) or "n/a"

    lines = [f"Run {report['generated']}; {m.get('cpu', '')} ({m.get('cpu_cores_visible', 'n/a')} visible cores, "
             f"torch threads {m.get('torch_threads', 'n/a')}, {m.get('platform', '')}); load average (1, 5, 15 min) "
             f"at the start {load('load_average_start')}, at the end {load('load_average_end')}; wall {report['runtime']['wall_seconds']:.0f} s, CPU "
             f"{report['runtime']['cpu_seconds']:.0f} s. Settings: {s['n_items']} items per condition, "
             f"{s['n_trajectory']} per trajectory condition, split ``{s['split']}``, seed {s['seed']}, tau {s['tau']}.",
             ""]
    for name, entry in report["models"].items():
        lin = entry["linearity"]
        lines += _common.heading(f"{name}: relevance of the answer and of the decision", "~")
        lines += [f"Linearity check: the largest absolute difference between ``R(z_yes - z_no)`` (one backward pass of "
                  f"the difference) and ``R(z_yes) - R(z_no)`` is {lin['max_abs_diff']:.1e} over {lin['n']} items "
                  f"(largest absolute relevance {lin['max_abs']:.2f}; float32).", ""]
        lines += table_relevance(entry)
        lines += _common.heading(f"{name}: where the decision relevance toward \"yes\" lies", "~")
        lines += table_flow(entry)
        lines += _common.heading(f"{name}: LIME per step", "~")
        lines += table_trajectories(entry)
    lines += _common.heading("Magnitudes and one-hotness", "~")
    lines += table_magnitude(report)
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out_dir: Path) -> dict[str, Any]:
    """The json, the tables fragment and the figures under ``out_dir``."""
    report["figures"] = write_figures(report, out_dir)
    _common.write_json(out_dir / JSON_NAME, report, compact=True)
    (out_dir / TABLES_NAME).write_text(render_tables(report), encoding="utf-8")
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (2 items per condition)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default docs/benchmarks)")
    parser.add_argument("--n-items", type=int, default=None)
    parser.add_argument("--n-trajectory", type=int, default=None)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the tables and figures from the json already in --out (no measurement)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render_only:
        out = args.out or DEFAULT_OUT
        report = json.loads((out / JSON_NAME).read_text(encoding="utf-8"))
        write_figures(report, out)
        (out / TABLES_NAME).write_text(render_tables(report), encoding="utf-8")
        return 0
    overrides = {k: v for k, v in (("n_items", args.n_items), ("n_trajectory", args.n_trajectory)) if v is not None}
    settings = Settings.quick_run(**overrides) if args.quick else Settings.preset("full", **overrides)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    report = write_outputs(run(settings), out)
    logger.info("wrote %s (%.0f s)", out / JSON_NAME, report["runtime"]["wall_seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
