"""The cheap LIME variants' CPU time per one-token answer: one ``lime_generate`` per answer against one
:class:`~lime_attr.mitigation.session.LimeSession` for all of them, both as ratios to greedy in the same run.

On the trained demo models (``lime_attr.models.load_builtin``, eager attention, fp32, one CPU thread), on
``--items`` validation prior probes per condition (the four conditions of ``docs/lime_evaluation.rst``,
encoded as ``benchmarks/lime_objectives_eval.py`` does),
one generated token each. Decoders, interleaved in rounds (every decoder on every item, then the next
round), so that a shared machine's load affects them alike:

* ``greedy``: one no-grad forward of the prompt (``model(**inputs)``), the argmax of its last logits;
* ``call``: ``lime_generate(..., attribution=attribution)`` per answer, one attribution for all (so the
  scope's one-time op-coverage check runs once, as the evaluation's ``--reuse-attribution``);
* ``session``: every answer of the round inside one ``LimeSession`` (its entry and exit included).

For each ``--settings`` entry ``objective:lr_factor:second_order[:mode[:fast_updates]]``: the evaluation's
configuration of that setting (in incremental mode unless ``mode`` is given) (``lime_objectives_eval.Setting.config``: the model's preset with
``confidence_gate=None``, lr = preset lr x factor, ``scaled`` at temperature 1.0). Reported: the median over ``--rounds`` of the CPU ms per answer and its ratio to greedy's
median. With ``--no-session`` the session decoder is left out (to run the script on code without it).

Run: ``python -m benchmarks.bench_lime_session [--models digits-llava tones-qwen2audio] [--items 5]
[--rounds 7] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks import _common

log = logging.getLogger(__name__)

SETTINGS = ("logprob:10:frozen", "logprob:10:autograd", "scaled:10:autograd", "paper:10:autograd")


def _config(model: Any, setting: str) -> Any:
    """The evaluation's config of ``objective:lr_factor:second_order[:mode[:fast_updates]]`` (mode default
    ``incremental``)."""
    from benchmarks.lime_objectives_eval import Setting

    objective, factor, order, *rest = setting.split(":")
    mode = rest[0] if rest else "incremental"
    updates = int(rest[1]) if len(rest) > 1 else None
    return Setting(objective, float(factor), order, mode=mode, fast_updates=updates).config(model)


def _items(model: Any, processor: Any, name: str, n: int) -> list:
    """The processor outputs of ``n`` validation probes per condition, condition after condition."""
    from benchmarks.lime_objectives_eval import encoded_items

    return [enc for per in encoded_items(model, processor, name, "validation", n).values() for _, enc in per]


def decoders(model: Any, processor: Any, items: list, settings: Sequence[str],
             session: bool = True) -> dict[str, Callable[[], None]]:
    """``{name: run()}``: each runs one round (every item once)."""
    from lime_attr import LRP
    from lime_attr.mitigation import lime_generate

    def greedy() -> None:
        with torch.no_grad():
            for enc in items:
                model(**enc).logits[:, -1].argmax(-1)

    out: dict[str, Callable[[], None]] = {"greedy": greedy}
    for setting in settings:
        cfg, attribution = _config(model, setting), LRP(model)

        def call(cfg: Any = cfg, attribution: Any = attribution) -> None:
            for enc in items:
                lime_generate(model, processor, enc, cfg, max_new_tokens=1, attribution=attribution)

        out[f"{setting}/call"] = call
        if session:
            from lime_attr.mitigation import LimeSession

            def in_session(cfg: Any = cfg) -> None:
                with LimeSession(model, processor, cfg) as s:
                    for enc in items:
                        s.generate(enc, max_new_tokens=1)

            out[f"{setting}/session"] = in_session
    return out


def run_model(name: str, n: int, rounds: int, settings: Sequence[str], session: bool = True) -> dict[str, Any]:
    """Interleaved rounds of every decoder on one model: median ms per answer and the ratio to greedy."""
    from lime_attr.models import load_builtin

    model, processor = load_builtin(name, attn_implementation="eager")
    model.eval()
    items = _items(model, processor, name, n)
    return {"model": name, **time_rounds(decoders(model, processor, items, settings, session), len(items), rounds)}


def time_rounds(runs: dict[str, Callable[[], None]], n_items: int, rounds: int) -> dict[str, Any]:
    """A warm-up of every ``run`` (first-call costs, the op-coverage check), then ``rounds`` interleaved
    rounds: the median CPU ms per answer of each and its ratio to ``runs["greedy"]``'s."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            t0 = time.process_time()
            run()
            times[k].append((time.process_time() - t0) / n_items * 1000)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"items": n_items, "rounds": rounds, "ms_per_answer": med,
            "x_greedy": {k: v / med["greedy"] for k, v in med.items()}, "all_ms": times}


def parser(description: str, settings: Sequence[str]) -> argparse.ArgumentParser:
    """The options these timing scripts share: ``--models --items --rounds --settings --json``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", nargs="+", default=["digits-llava", "tones-qwen2audio"])
    ap.add_argument("--items", type=int, default=5, help="validation items per condition")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--settings", nargs="+", default=list(settings))
    ap.add_argument("--json")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = parser(__doc__.splitlines()[0], SETTINGS)
    ap.add_argument("--no-session", action="store_true", help="leave the LimeSession decoder out")
    args = ap.parse_args(argv)
    run_and_report(args, lambda m: run_model(m, args.items, args.rounds, args.settings, not args.no_session))


def run_and_report(args: argparse.Namespace, run_one: Callable[[Any], dict[str, Any]],
                   cases: Optional[Sequence[Any]] = None) -> None:
    """``run_one(case)`` for every case (default ``args.models``; one torch thread), each result's decoders
    logged under its ``"model"``, and all written to ``args.json`` with the start and end time, the load
    averages and the machine."""
    torch.set_num_threads(1)
    start = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": _common.load_average()}
    results = [run_one(c) for c in (args.models if cases is None else cases)]
    end = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load": _common.load_average()}
    for r in results:
        for k, ms in r["ms_per_answer"].items():
            log.info("%-18s %-28s %8.2f ms  %5.2fx greedy", r["model"], k, ms, r["x_greedy"][k])
    if args.json:
        _common.write_json(args.json, {"start": start, "end": end, "machine": _common.machine_info(),
                                       "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
