"""Per-family cost of ``LRP.attribute`` relative to a plain gradient x input pass (issue: canonizers).

For every registered family, on the tiny randomly initialised models the test suite builds (float32,
sdpa where the family has it), this measures, in the same run:

* time: median CPU time of one call over ``--repeats`` calls after warm-up (CPU time, because wall time on a
  shared machine mostly measures other processes), for AttnLRP and for plain gradient x input;
* peak memory: the peak of the tensor bytes allocated during one call, from ``torch.profiler``'s memory
  events (allocations and frees of every op, in order, summed; tensor granularity, so it works for tiny
  models where resident-set measurements only see page noise).

The models are tiny, so Python overhead (hooks, the scope) weighs far more than on real models; the
ratios are an upper bound of what a real model sees. Run ``python -m benchmarks.bench_families``; it
prints a table and writes ``docs/benchmarks/families_cost.json``.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from benchmarks._common import cost_machine_info, op_peak_bytes, write_json  # noqa: E402
from lime_attr import LRP  # noqa: E402


def _text_case(family: str):
    import test_canonizers_text as T

    model = T.make(family, attn="eager" if family in T.NO_SDPA else "sdpa", dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 24, T.H, generator=g)
    return model, x, {}, T.target_of(family)


def _mm_case(family: str):
    import test_canonizers_multimodal as M

    torch.manual_seed(0)
    case = M.BUILDERS[family]()
    model = case.model.float().eval()
    kwargs = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in case.kwargs.items()}
    if case.other is not None:
        kwargs[case.other[0]] = case.other[1].float()
    out = case.output()
    target = int(out[0].abs().argmax())
    return model, case.x.float(), dict(kwargs, _canonizer=case.canonizer), target


def cases() -> dict[str, Callable]:
    import test_canonizers_multimodal as M
    import test_canonizers_text as T

    out = {f: (lambda f=f: _text_case(f)) for f in T.ALL}
    out.update({f: (lambda f=f: _mm_case(f)) for f in M.FAMILIES})
    return out


def runner(method: str, model, x, kwargs, target) -> Callable[[], torch.Tensor]:
    kwargs = dict(kwargs)
    canonizer = kwargs.pop("_canonizer", "auto")
    if method == "attnlrp":
        lrp = LRP(model, composite="attnlrp", canonizer=canonizer)
        return lambda: lrp.attribute(x, target=target, **({} if canonizer != "auto" else kwargs))
    from lime_attr.attribution._forward import hf_input_name, model_output_tensor

    def gxi() -> torch.Tensor:
        xr = x.detach().requires_grad_(True)
        if canonizer != "auto":
            out = model(xr)
        else:
            out = model_output_tensor(model(**{hf_input_name(model): xr}, **kwargs))
        out = out[:, -1] if out.dim() == 3 else out
        (g,) = torch.autograd.grad(out[:, target].sum(), xr)
        return xr.detach() * g

    return gxi


def time_family(family: str, repeats: int) -> dict:
    model, x, kwargs, target = cases()[family]()
    runs = {m: runner(m, model, x, kwargs, target) for m in ("gradient", "attnlrp")}
    for run in runs.values():
        run()
        run()
    cpu = {m: [] for m in runs}
    for _ in range(repeats):
        for m, run in runs.items():
            c0 = time.process_time()
            run()
            cpu[m].append(time.process_time() - c0)
    med = {m: statistics.median(v) for m, v in cpu.items()}
    return {"cpu_median_s": med, "time_ratio": med["attnlrp"] / med["gradient"]}


def peak_bytes(run: Callable[[], torch.Tensor]) -> int:
    """Peak of live tensor bytes allocated during ``run()`` (:func:`benchmarks._common.op_peak_bytes`)."""
    return op_peak_bytes(run)


def memory(family: str, method: str) -> int:
    model, x, kwargs, target = cases()[family]()
    run = runner(method, model, x, kwargs, target)
    run()
    run()
    gc.collect()
    return peak_bytes(run)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--families", nargs="*", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "families_cost.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    families = args.families or list(cases())
    rows = {}
    print(f"{'family':22s} {'time ratio':>10s} {'memory ratio':>12s}")
    for fam in families:
        try:
            t = time_family(fam, args.repeats)
            mem = {m: memory(fam, m) for m in ("gradient", "attnlrp")}
        except Exception as exc:  # noqa: BLE001 - the baseline call may not fit a tower's wrapper; say so
            rows[fam] = {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            print(f"{fam:22s} skipped ({rows[fam]['skipped']})", flush=True)
            continue
        t["peak_bytes"] = mem
        t["memory_ratio"] = mem["attnlrp"] / max(mem["gradient"], 1)
        rows[fam] = t
        print(f"{fam:22s} {t['time_ratio']:10.2f} {t['memory_ratio']:12.2f}", flush=True)
    report = {"machine": cost_machine_info(torch.device("cpu")), "threads": args.threads, "repeats": args.repeats,
              "method": __doc__, "families": rows}
    write_json(args.out, report, indent=2)
    return report


if __name__ == "__main__":
    main()
