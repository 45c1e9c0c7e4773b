"""Attribution faithfulness and cost benchmark: lime_attr's LRP against Captum, zennit and rollout.

For three small models trained here (:mod:`benchmarks.bench_models`: a BatchNorm CNN and a ViT on
scikit-learn's digits, a Llama on a synthetic key-value retrieval task) every method explains the
model's own prediction on held-out examples. Then

* faithfulness: features are removed most-relevant-first (MoRF) and least-relevant-first (LeRF),
  recording the explained logit (and its softmax probability); the areas under both curves and the
  area between them, ABPC = AUC(LeRF) - AUC(MoRF), are averaged over the examples
  (:mod:`benchmarks._perturbation`);
* on the retrieval task also the share of absolute relevance on the known evidence tokens and the
  pointing accuracy;
* cost: time and peak memory of one call on a fixed batch, relative to one plain gradient pass
  (:mod:`benchmarks._common`).

Run ``python -m benchmarks.faithfulness`` (full, writes ``docs/benchmarks/faithfulness.json``, the
figures next to it and ``docs/benchmarks_faithfulness.rst``) or ``--quick`` (a tiny version, written
to ``outputs/benchmarks_quick`` unless ``--out`` is given).

Layout of ``faithfulness.json``::

    schema_version, runtime_seconds
    settings                  Settings of the run (examples, steps, batch, repeats, threads, device)
    machine                   cpu, cores, torch threads, gpu, library versions, load average
    methods.<name>            family, settings
    models.<cnn|vit|llama>
        n_examples, n_features, feature_unit, removal_baseline, explained, accuracy_on_examples
        model                 training metadata of the checkpoint (accuracy, recipe, seed, size)
        gradient_reference    cost entry of the plain gradient (the unit of the ratios)
        agreement             [{methods: [a, b], cosine_min, cosine_mean}] for AGREEMENT_PAIRS
        methods.<name>
            status            ok | skipped (the method raised; reason) | not_applicable (reason)
            faithfulness.<logit|probability>
                              auc_morf, auc_lerf, abpc, abpc_sem, morf_curve, lerf_curve
            evidence          evidence_mass, pointing_accuracy, chance_mass (retrieval task)
            cost              batch, seconds_median (clock), wall/cpu medians, samples, peak_bytes,
                              time_ratio, wall_time_ratio, memory_ratio
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence

import torch

from . import _common
from ._methods import AGREEMENT_PAIRS, Method, MethodUnavailable, all_methods, applicable, plain_gradient
from ._perturbation import (
    CurveResult,
    evidence_metrics,
    feature_scores,
    perturbation_curve,
    removal_order,
    tie_break_permutations,
)
from ._tasks import INSTANCE_BUILDERS, BenchInstance
from .bench_models import MODEL_NAMES, get_model

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "benchmarks"
QUICK_OUT = REPO_ROOT / "outputs" / "benchmarks_quick"


@dataclass(frozen=True)
class Settings(_common.PresetSettings):
    """Knobs of one benchmark run (recorded in the json).

    Attributes
    ----------
    n_examples : int
        Held-out examples explained per model.
    steps : int or None
        Removal steps K of the perturbation curves (None: one feature per step).
    chunk : int
        Examples per attribution call in the faithfulness part.
    cost_batch : int
        Batch size of the timed calls.
    repeats, warmup : int
        Timed / untimed calls per method in the cost part.
    threads : int
        ``torch.set_num_threads``.
    device : str
        ``cpu`` or ``cuda``.
    quick : bool
        Whether this is the tiny ``--quick`` run.
    """

    n_examples: int = 200
    steps: Optional[int] = None
    chunk: int = 50
    cost_batch: int = 32
    repeats: int = 7
    warmup: int = 2
    threads: int = 1
    device: str = "cpu"
    quick: bool = False

    #: ``quick``: the tiny ``--quick`` run (:meth:`~benchmarks._common.PresetSettings.quick_run`)
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "quick": dict(n_examples=16, steps=8, chunk=16, cost_batch=8, repeats=2, warmup=1, quick=True),
    }


# --------------------------------------------------------------------------------------------------
# one model
# --------------------------------------------------------------------------------------------------
def _attribute_all(method: Method, fn, inst: BenchInstance, chunk: int) -> torch.Tensor:
    """Feature scores ``[N, F]`` of a method over all examples."""
    if not method.timed:  # references score the whole set at once
        return fn(inst.inputs, inst.targets).to(torch.float64).cpu()
    parts = []
    for start in range(0, len(inst.inputs), chunk):
        sl = slice(start, start + chunk)
        out = fn(inst.inputs[sl], inst.targets[sl])
        if not method.feature_level:
            out = feature_scores(out.cpu(), inst.groups.cpu(), inst.n_features)
        parts.append(out.to(torch.float64).cpu())
    return torch.cat(parts)


def _faithfulness(inst: BenchInstance, scores: torch.Tensor, tie_break: torch.Tensor, steps: Optional[int],
                  chunk: int) -> dict[str, Any]:
    curves = {}
    for direction, descending in (("morf", True), ("lerf", False)):
        order = removal_order(scores, descending, tie_break).to(inst.inputs.device)
        curves[direction] = perturbation_curve(
            inst.forward, inst.inputs, inst.baseline, inst.groups, order, inst.targets, steps,
            batch_size=max(chunk, 64),
        )
    return {
        "logit": CurveResult(curves["morf"][0], curves["lerf"][0]).summary(),
        "probability": CurveResult(curves["morf"][1], curves["lerf"][1]).summary(),
    }


def evaluate_instance(inst: BenchInstance, methods: Sequence[Method], settings: Settings) -> dict[str, Any]:
    """Faithfulness and cost of every method on one model.

    Parameters
    ----------
    inst : BenchInstance
        The model and its examples.
    methods : sequence of Method
        The methods to run; those that do not apply are recorded as skipped with the reason.
    settings : Settings
        Run settings.

    Returns
    -------
    dict
        The model's entry of the json (layout in the module docstring).
    """
    n = len(inst.inputs)
    accuracy = float((inst.targets == inst.labels).double().mean())
    logger.info("[%s] %d examples, %d features, accuracy on them %.3f", inst.name, n, inst.n_features, accuracy)
    tie_break = tie_break_permutations(n, inst.n_features)
    results: dict[str, Any] = {}
    built: dict[str, Any] = {}
    all_scores: dict[str, torch.Tensor] = {}

    for method in methods:
        entry: dict[str, Any] = {"family": method.family, "settings": method.settings}
        results[method.name] = entry
        reason = applicable(method, inst)
        if reason is not None:
            entry.update(status="not_applicable", reason=reason)
            continue
        start = time.perf_counter()
        try:
            fn = method.build(inst)
            scores = _attribute_all(method, fn, inst, settings.chunk)
        except MethodUnavailable as exc:
            entry.update(status="not_applicable", reason=str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - any library failure skips the method, with its reason
            entry.update(status="skipped", reason=f"{type(exc).__name__}: {exc}".strip()[:500])
            logger.warning("[%s] %s skipped: %s", inst.name, method.name, entry["reason"])
            continue
        seconds = time.perf_counter() - start
        finite = torch.isfinite(scores)
        if not bool(finite.all()):
            entry["n_nonfinite_scores"] = int((~finite).sum())
            logger.warning("[%s] %s: %d non-finite feature scores, set to 0", inst.name, method.name,
                           entry["n_nonfinite_scores"])
            scores = torch.where(finite, scores, torch.zeros_like(scores))
        entry.update(status="ok", attribution_seconds=round(seconds, 3))
        all_scores[method.name] = scores
        entry["faithfulness"] = _faithfulness(inst, scores, tie_break, settings.steps, settings.chunk)
        if inst.evidence is not None:
            entry["evidence"] = evidence_metrics(scores, inst.evidence.cpu())
        if method.timed:
            built[method.name] = fn
        logger.info("[%s] %-28s ABPC(logit) %8.3f  (%.1f s)", inst.name, method.name,
                    entry["faithfulness"]["logit"]["abpc"], seconds)

    cost = _cost_of(inst, built, settings)
    for name, c in cost.items():
        if name in results:
            results[name]["cost"] = c
    return {
        "n_examples": n,
        "n_features": inst.n_features,
        "feature_unit": inst.feature_unit,
        "removal_baseline": inst.baseline_note,
        "explained": "the model's predicted class / token (its logit; probability = its softmax)",
        "accuracy_on_examples": accuracy,
        "model": inst.info,
        "gradient_reference": cost.get("gradient"),
        "methods": results,
        "agreement": _agreement(all_scores),
    }


def _agreement(scores: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Per-example cosine similarity of the feature scores of :data:`AGREEMENT_PAIRS` that both ran.

    Cosine is blind to a positive per-example scale (lime_attr seeds the backward pass with 1 at
    the logit, so its relevance sums to about the logit; zennit's seed makes it sum to about 1).
    """
    out = []
    for a, b in AGREEMENT_PAIRS:
        if a in scores and b in scores:
            cos = torch.nn.functional.cosine_similarity(scores[a], scores[b], dim=1, eps=1e-30)
            out.append({"methods": [a, b], "cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())})
    return out


def _cost_of(inst: BenchInstance, built: dict[str, Any], settings: Settings) -> dict[str, dict[str, Any]]:
    """Median time and peak memory of each method on one batch, and ratios to the plain gradient."""
    batch = min(settings.cost_batch, len(inst.inputs))
    x, target = inst.inputs[:batch], inst.targets[:batch]
    fns = {"gradient": plain_gradient(inst), **built}
    calls = {name: (lambda fn=fn: fn(x, target)) for name, fn in fns.items()}
    logger.info("[%s] timing %d methods on a batch of %d (%d repeats after %d warm-up)", inst.name,
                len(calls), batch, settings.repeats, settings.warmup)
    samples = _common.timed_round_robin(calls, settings.repeats, settings.warmup)
    device = inst.inputs.device
    clock = "cpu" if device.type == "cpu" else "wall"
    out: dict[str, dict[str, Any]] = {}
    for name, call in calls.items():
        s = samples[name]
        out[name] = {
            "batch": batch,
            "seconds_median": _common.median(s[clock]),
            "clock": "process CPU time" if clock == "cpu" else "wall clock",
            "wall_seconds_median": _common.median(s["wall"]),
            "cpu_seconds_median": _common.median(s["cpu"]),
            "seconds_samples": [round(v, 7) for v in s[clock]],
            "calls_per_sample": s["calls_per_sample"][0],
            "peak_bytes": _common.peak_bytes(call, device),
        }
    ref = out["gradient"]
    for entry in out.values():
        entry["time_ratio"] = entry["seconds_median"] / ref["seconds_median"]
        entry["wall_time_ratio"] = entry["wall_seconds_median"] / ref["wall_seconds_median"]
        if entry["peak_bytes"] is not None and ref["peak_bytes"]:
            entry["memory_ratio"] = entry["peak_bytes"] / ref["peak_bytes"]
        else:
            entry["memory_ratio"] = None
    return out


# --------------------------------------------------------------------------------------------------
# whole run
# --------------------------------------------------------------------------------------------------
def machine_info(device: str) -> dict[str, Any]:
    """CPU / GPU, cores, threads and library versions (:func:`benchmarks._common.machine_info`)."""
    return _common.machine_info(device, ("torch", "transformers", "captum", "zennit", "lime_attr", "numpy"))


def _to_device(inst: BenchInstance, device: str) -> BenchInstance:
    if device == "cpu":
        return inst
    inst.model.to(device)
    for name in ("inputs", "targets", "labels", "groups", "baseline", "background", "evidence"):
        value = getattr(inst, name)
        if isinstance(value, torch.Tensor):
            setattr(inst, name, value.to(device))
    return inst


def run_benchmark(
    instances: Sequence[BenchInstance],
    settings: Settings,
    out_dir: Path | str,
    methods: Sequence[Method] | None = None,
    figures: bool = True,
) -> dict[str, Any]:
    """Evaluate every method on every instance and write the json, the figures and the page.

    Parameters
    ----------
    instances : sequence of BenchInstance
        Models with their examples (see :mod:`benchmarks._tasks`).
    settings : Settings
        Run settings.
    out_dir : path
        Folder of ``faithfulness.json`` and the PNG figures; the page is written to
        ``out_dir.parent / "benchmarks_faithfulness.rst"``.
    methods : sequence of Method, optional
        Default: :func:`benchmarks._methods.all_methods`.
    figures : bool
        Draw the figures (and the page referencing them).

    Returns
    -------
    dict
        What was written to ``faithfulness.json``.
    """
    from ._report import write_figures, write_rst

    start = time.perf_counter()
    methods = list(methods or all_methods())
    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "settings": asdict(settings),
        "machine": machine_info(settings.device),
        "methods": {m.name: {"family": m.family, "settings": m.settings} for m in methods},
        "models": {},
    }
    for inst in instances:
        inst = _to_device(inst, settings.device)
        report["models"][inst.name] = evaluate_instance(inst, methods, settings)
    report["runtime_seconds"] = round(time.perf_counter() - start, 1)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _common.write_json(out_dir / "faithfulness.json", report, indent=1)
    if figures:
        names = write_figures(report, out_dir)
        write_rst(report, out_dir.parent / "benchmarks_faithfulness.rst", out_dir.name, names)
    logger.info("wrote %s (%.0f s)", out_dir / "faithfulness.json", report["runtime_seconds"])
    return report


def build_instances(names: Sequence[str], n_examples: int, retrain: bool = False) -> list[BenchInstance]:
    """Load (or train) the benchmark models and wrap each with its held-out examples."""
    instances = []
    for name in names:
        trained = get_model(name, retrain=retrain)
        inst = INSTANCE_BUILDERS[name](trained.model, n_examples)
        inst.info = trained.metadata
        instances.append(inst)
    return instances


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line entry point (``python -m benchmarks.faithfulness``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (16 examples, 8 steps, 2 repeats)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default {DEFAULT_OUT.relative_to(REPO_ROOT)}, or "
                             f"{QUICK_OUT.relative_to(REPO_ROOT)} with --quick); the page goes to its parent")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--n-examples", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads make timings unstable)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--retrain", action="store_true", help="retrain the models even if cached")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    overrides: dict[str, Any] = {"threads": args.threads, "device": args.device}
    if args.n_examples:
        overrides["n_examples"] = args.n_examples
    settings = Settings.quick_run(**overrides) if args.quick else Settings(**overrides)
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    instances = build_instances(args.models, settings.n_examples, retrain=args.retrain)
    return run_benchmark(instances, settings, out)


if __name__ == "__main__":
    main()
