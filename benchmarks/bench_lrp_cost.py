"""Cost of ``LRP.attribute`` relative to a plain gradient x input pass on the same model, same run.

Run ``python -m benchmarks.bench_lrp_cost`` (``--help`` for options). It prints a table and writes
``docs/benchmarks/lrp_cost.json`` with the machine and library versions.

What is measured
----------------
* **time**: median wall time and median process CPU time of one attribution (forward + one backward,
  relevance returned) over ``--repeats`` runs after ``--warmup`` runs; the methods of one model are
  interleaved round-robin so that drifting machine load affects them alike. Ratios are
  ``median(method) / median(gradient)``. On a shared, oversubscribed CPU the wall time is dominated by
  other processes; run with ``--threads 1`` and read the CPU-time ratios there.
* **peak memory**: on CUDA, ``torch.cuda.max_memory_allocated`` during one attribution minus the
  memory allocated before it. On CPU, each (model, method) runs in a fresh subprocess with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (so that freed tensors go back to the OS); after building the model,
  one small and one full-size warm-up attribution, the peak resident set size (``VmHWM``, reset through
  ``/proc/self/clear_refs``) of one attribution minus the resident set size just before it is the
  method's peak memory. Ratios are against the plain gradient measured the same way.

Like with like: the parameters of every model are frozen (``requires_grad=False``) for all methods, so
that neither the baseline nor LRP builds or keeps anything for weight gradients; the baseline is one
forward and one input-gradient backward (``torch.autograd.grad`` w.r.t. the input only).

Convolution bound (CNNs, CPU): the CPU time of every kind of layer evaluation a rule needs (forward,
input-gradient, with two weight variants stacked, ...) is measured per convolution of the model on its
real input; ``bound`` is the baseline's time with its convolutions replaced by the ones the rule needs at
least (everything else assumed free). A measured ratio can approach it but not go below it.

Models
------
* ``llama``: a :class:`~transformers.LlamaForCausalLM` from a config (hidden 256, 4 layers, 4 heads,
  intermediate 688, sequence 256, batch 1, float32, SDPA attention), explained w.r.t. its input
  embeddings at the last position -- composites ``attnlrp`` (epsilon -> 0), ``attnlrp-eps``
  (epsilon 1e-6 on every linear layer) and ``cp-lrp``;
* ``mlp``: a 6-layer ReLU MLP (width 1024, batch 256) -- ``epsilon`` (1e-6);
* ``cnn``: a VGG-style ReLU CNN (5 convolutions with 32-32-64-64-128 channels, batch 8, 64x64) --
  ``gamma``, ``zplus``, ``alpha_beta`` (2, 1) on the convolutions with epsilon on the dense layers,
  ``epsilon-gamma`` (z-box first layer) and ``epsilon-plus``; each also with zennit's equivalent
  composite (a layer map with the same rules, ``EpsilonAlpha2Beta1``, ``EpsilonGammaBox``,
  ``EpsilonPlus``; zennit's hooks, autograd inside ``composite.context``);
* ``cnn-wide``: the same with 64-64-128-128-256 channels, batch 4 (convolutions dominate even more).

Allocator (CPU): glibc serves large tensors from freshly mapped pages by default, and the first touch of
each page is a page fault; how many a method takes depends on the allocator's state, which moves single
ratios by up to ~0.15. ``--malloc reuse`` reruns the timing with glibc set to keep and reuse freed memory
(``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_TOP_PAD_``), as jemalloc and tcmalloc
do by default, so that the ratios measure the computation; the memory children keep their own setting.
The JSON records which one was used.

Goals (reported, not enforced): epsilon and AttnLRP <= 1.1x time and <= 1.05x memory; gamma / zplus /
alpha-beta on a CNN <= 1.5x time and >= 3x faster than zennit.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from benchmarks._common import cost_machine_info, cpu_median, render_table, rss_peak_bytes, write_json


ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "lrp_cost.json"
# glibc: no mmap for large blocks, no trimming, and a generous top pad: freed tensor memory is reused
REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32),
             "MALLOC_TOP_PAD_": str(2**28)}

LOW, HIGH = -3.0, 3.0

# model -> methods (the first is the baseline)
_CNN_METHODS = ["gradient", "lrp:gamma", "zennit:gamma", "lrp:zplus", "zennit:zplus", "lrp:alpha_beta",
                "zennit:alpha_beta", "lrp:epsilon-gamma", "zennit:epsilon-gamma", "lrp:epsilon-plus",
                "zennit:epsilon-plus"]
METHODS: dict[str, list[str]] = {
    "llama": ["gradient", "lrp:attnlrp", "lrp:attnlrp-eps", "lrp:cp-lrp"],
    "mlp": ["gradient", "lrp:epsilon"],
    "cnn": list(_CNN_METHODS),
    "cnn-wide": list(_CNN_METHODS),
}

GOALS = {
    "lrp:attnlrp": dict(time=1.1, memory=1.05), "lrp:attnlrp-eps": dict(time=1.1, memory=1.05),
    "lrp:cp-lrp": dict(time=1.1, memory=1.05), "lrp:epsilon": dict(time=1.1, memory=1.05),
    "lrp:gamma": dict(time=1.5, vs_zennit=3.0), "lrp:zplus": dict(time=1.5, vs_zennit=3.0),
    "lrp:alpha_beta": dict(time=1.5, vs_zennit=3.0), "lrp:epsilon-gamma": dict(time=1.5, vs_zennit=3.0),
    "lrp:epsilon-plus": dict(time=1.5, vs_zennit=3.0),
}


# ------------------------------------------------------------------------------------------ models


def build(name: str, device: torch.device, small: bool = False) -> tuple[nn.Module, torch.Tensor, int]:
    """(model, input, target) for one benchmark model; ``small`` gives a tiny input for warm-up.

    The parameters are frozen (``requires_grad=False``) for every method alike: an attribution needs no
    weight gradients, and a parameter that requires grad makes autograd keep each linear layer's input
    for a weight gradient nobody asks for, which would inflate the baseline's memory and hide the cost
    of a rule's own saved tensors.
    """
    model, x, target = _build(name, device, small)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, x, target


def _build(name: str, device: torch.device, small: bool = False) -> tuple[nn.Module, torch.Tensor, int]:
    torch.manual_seed(0)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg).eval().to(device)
        ids = torch.randint(0, 1000, (1, 8 if small else 256), device=device)
        with torch.no_grad():
            x = model.get_input_embeddings()(ids).detach()
        return model, x, 7
    if name == "mlp":
        layers: list[nn.Module] = []
        d = 512
        for _ in range(5):
            layers += [nn.Linear(d, 1024), nn.ReLU()]
            d = 1024
        layers.append(nn.Linear(d, 10))
        model = nn.Sequential(*layers).eval().to(device)
        return model, torch.randn(4 if small else 256, 512, device=device), 3
    if name in ("cnn", "cnn-wide"):
        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]

        # cnn: 32-64-128 channels, 64x64, batch 8; cnn-wide: 64-128-256 channels (4x the convolution work
        # per pixel), 64x64, batch 4 -- there the convolutions dominate even more than Python overhead
        c1, c2, c3, batch = (32, 64, 128, 8) if name == "cnn" else (64, 128, 256, 4)
        model = nn.Sequential(*block(3, c1), *block(c1, c1), nn.MaxPool2d(2), *block(c1, c2), *block(c2, c2),
                              nn.MaxPool2d(2), *block(c2, c3), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(c3 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10)).eval().to(device)
        x = (torch.rand(1 if small else batch, 3, 64, 64, device=device) * (HIGH - LOW) + LOW)
        return model, x, 4
    raise KeyError(name)


def our_composite(rule: str) -> Any:
    from lime_attr import Composite, get_composite
    from lime_attr.rules import AlphaBeta, Epsilon, Gamma, ZPlus

    if rule == "attnlrp-eps":
        return get_composite("attnlrp", epsilon=1e-6)
    if rule in ("attnlrp", "cp-lrp"):
        return get_composite(rule)
    if rule == "epsilon-gamma":
        return get_composite("epsilon-gamma", low=LOW, high=HIGH)
    if rule == "epsilon-plus":
        return get_composite("epsilon-plus")
    conv = {"gamma": Gamma(0.25), "zplus": ZPlus(), "alpha_beta": AlphaBeta(2.0, 1.0), "epsilon": Epsilon()}[rule]
    return Composite([(nn.Conv2d, conv), ("site:layer", Epsilon()), ("site:activation", "identity")], name=rule)


def zennit_composite(rule: str) -> Any:
    from zennit import rules as zr
    from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus, LayerMapComposite

    if rule == "epsilon-gamma":
        return EpsilonGammaBox(low=LOW, high=HIGH)
    if rule == "epsilon-plus":
        return EpsilonPlus()
    if rule == "alpha_beta":  # zennit's named composite: AlphaBeta(2, 1) on convolutions, epsilon on dense layers
        return EpsilonAlpha2Beta1()
    conv = {"gamma": lambda: zr.Gamma(0.25), "zplus": zr.ZPlus}[rule]()
    return LayerMapComposite([(nn.Conv2d, conv), (nn.Linear, zr.Epsilon()), (nn.ReLU, zr.Pass())])


def is_hf(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) is not None


def runner(method: str, model: nn.Module, x: torch.Tensor, target: int) -> Callable[[], torch.Tensor]:
    """A function computing one attribution of ``x`` for ``target`` with ``method``."""
    hf = is_hf(model)

    def forward(inp: torch.Tensor) -> torch.Tensor:
        if hf:
            return model(inputs_embeds=inp, use_cache=False).logits[:, -1, target]
        return model(inp)[:, target]

    if method == "gradient":
        def run() -> torch.Tensor:
            inp = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(forward(inp).sum(), inp)
            return inp.detach() * g
        return run
    kind, rule = method.split(":")
    if kind == "lrp":
        from lime_attr import LRP

        lrp = LRP(model, our_composite(rule))
        return lambda: lrp.attribute(x, target=target)
    if kind == "zennit":
        comp = zennit_composite(rule)

        def run_zennit() -> torch.Tensor:
            inp = x.detach().requires_grad_(True)
            with comp.context(model):
                out = model(inp)
                seed = torch.zeros_like(out)
                seed[:, target] = out[:, target].detach()
                (rel,) = torch.autograd.grad(out, inp, seed)
            return rel
        return run_zennit
    raise KeyError(method)


# -------------------------------------------------------------------------------------------- time


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_model(name: str, methods: list[str], device: torch.device, repeats: int,
               warmup: int) -> tuple[dict[str, list], dict[str, list]]:
    """Wall-clock and process-CPU seconds of each method, ``repeats`` runs each, interleaved."""
    model, x, target = build(name, device)
    runs = {m: runner(m, model, x, target) for m in methods}
    wall: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(warmup):
        for m in methods:
            runs[m]()
    for _ in range(repeats):
        for m in methods:  # interleaved: load drift hits every method alike
            gc.collect()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            runs[m]()
            sync(device)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.process_time() - c0)
    return wall, cpu


# ------------------------------------------------------------------------------- convolution bound

# Layer evaluations each rule needs per convolution, in the minimal forms lime_attr implements (see
# docs/benchmarks.rst): F = one forward evaluation, B = one input-gradient (transposed) evaluation; "o2"
# doubles the output channels (two weight variants stacked), "i2" the input channels ([x+, x-] stacked),
# "io2" both. The model's own forward (F) is always there; the plain gradient adds B.
_CONV_COUNTS = {
    "gradient": dict(first=["F", "B"], other=["F", "B"]),
    "lrp:zplus": dict(first=["F", "Fi2", "Bi2"], other=["F", "F", "B"]),
    "lrp:epsilon-plus": dict(first=["F", "Fi2", "Bi2"], other=["F", "F", "B"]),
    # gamma: the second transposed evaluation (outputs with y < 0) is skipped when a ReLU zeroes its gradient
    "lrp:gamma": dict(first=["F", "Fio2", "Bi2"], other=["F", "F", "B"]),
    "lrp:alpha_beta": dict(first=["F", "Fio2", "Bio2"], other=["F", "Fo2", "Bo2"]),
    # z-box: the layer's own backward for x, one evaluation each for the bounds l (W+) and h (W-), and their backward
    "lrp:epsilon-gamma": dict(first=["F", "F", "F", "B", "B", "B"], other=["F", "F", "B"]),
    # zennit (0.5): the model's forward and the layer's own backward (its result is replaced), plus, inside
    # the backward hook, one re-evaluation and one autograd gradient per (input, parameter) modifier pair:
    # 2 pairs for ZPlus, 4 for AlphaBeta and Gamma, 3 for ZBox
    "zennit:zplus": dict(first=["F", "B"] + ["F", "B"] * 2, other=["F", "B"] + ["F", "B"] * 2),
    "zennit:epsilon-plus": dict(first=["F", "B"] + ["F", "B"] * 2, other=["F", "B"] + ["F", "B"] * 2),
    "zennit:gamma": dict(first=["F", "B"] + ["F", "B"] * 4, other=["F", "B"] + ["F", "B"] * 4),
    "zennit:alpha_beta": dict(first=["F", "B"] + ["F", "B"] * 4, other=["F", "B"] + ["F", "B"] * 4),
    "zennit:epsilon-gamma": dict(first=["F", "B"] + ["F", "B"] * 3, other=["F", "B"] + ["F", "B"] * 4),
}


def _cpu_median(fn: Callable[[], Any], repeats: int) -> float:
    return cpu_median(fn, repeats, warmup=1)


def conv_costs(name: str, device: torch.device, repeats: int) -> list[dict[str, float]]:
    """CPU seconds of each kind of layer evaluation (``F``, ``B``, ``Fo2``, ...) for every convolution."""
    from torch.nn.grad import conv2d_input

    model, x, _ = build(name, device)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    inputs: dict[nn.Module, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, o: inputs.__setitem__(mod, a[0].detach())) for m in convs]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    out = []
    for m in convs:
        xi, w = inputs[m], m.weight.detach()
        x2, w_o2, w_i2 = torch.cat([xi, xi], 1), torch.cat([w, w]), torch.cat([w, w], 1)
        w_io2 = torch.cat([w_i2, w_i2])
        kw = dict(stride=m.stride, padding=m.padding)
        g = torch.ones_like(m(xi))
        g2 = torch.cat([g, g], 1)
        with torch.no_grad():
            out.append({
                "F": _cpu_median(lambda: m._conv_forward(xi, w, None), repeats),
                "Fo2": _cpu_median(lambda: m._conv_forward(xi, w_o2, None), repeats),
                "Fi2": _cpu_median(lambda: m._conv_forward(x2, w_i2, None), repeats),
                "Fio2": _cpu_median(lambda: m._conv_forward(x2, w_io2, None), repeats),
                "B": _cpu_median(lambda: conv2d_input(xi.shape, w, g, **kw), repeats),
                "Bo2": _cpu_median(lambda: conv2d_input(xi.shape, w_o2, g2, **kw), repeats),
                "Bi2": _cpu_median(lambda: conv2d_input(x2.shape, w_i2, g, **kw), repeats),
                "Bio2": _cpu_median(lambda: conv2d_input(x2.shape, w_io2, g2, **kw), repeats),
            })
    return out


def conv_time(method: str, costs: list[dict[str, float]]) -> float | None:
    """CPU seconds of the convolution evaluations ``method`` needs at least (None if not counted)."""
    counts = _CONV_COUNTS.get(method)
    if counts is None:
        return None
    return sum(sum(c[k] for k in counts["first" if i == 0 else "other"]) for i, c in enumerate(costs))


# ------------------------------------------------------------------------------------------ memory


def measure_memory_here(name: str, method: str, device: torch.device) -> int:
    """Peak memory (bytes) of one attribution, in this process (see the module docstring)."""
    model, x, target = build(name, device)
    small_model_input = build(name, device, small=True)[1] if not name.startswith("cnn") else x[:1]
    runner(method, model, small_model_input, target)()  # warm-up: lazy initialisation, op check
    run = runner(method, model, x, target)
    run()  # one full-size call for every method (the scope's first forward also runs the op check)
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return rss_peak_bytes(run)


def measure_memory(name: str, method: str, device: torch.device) -> int:
    if device.type == "cuda":
        return measure_memory_here(name, method, device)
    env = {k: v for k, v in os.environ.items() if k not in REUSE_ENV}  # the memory method's own setting
    env.update(MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=f"{ROOT / 'src'}:{ROOT}")
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_lrp_cost", "--memory-child", name, method],
                         cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- main


def machine_info(device: torch.device) -> dict:
    """The machine and library versions recorded in the JSON (:func:`benchmarks._common.cost_machine_info`)."""
    return cost_machine_info(device)


_TABLE_HEADER = ["model", "method", "wall ms", "wall x", "cpu ms", "cpu x", "bound", "mem MiB", "mem x",
                 "zennit/ours", "at bound", " goal"]
_TABLE_WIDTHS = [8, 22, 9, 7, 9, 6, 6, 8, 6, 11, 8, 0]
_TABLE_ALIGN = "llrrrrrrrrrl"


def table_lines(rows: list[tuple[str, str, dict]]) -> list[str]:
    """The printed table: one line per (model, method, entry), ratios to the gradient."""
    cells = []
    for name, m, e in rows:
        zen = f"{e['zennit_over_ours_cpu']:5.2f} ({e['zennit_over_ours']:4.2f})" if "zennit_over_ours" in e else ""
        goal = ", ".join(f"{k}{'>=' if k == 'vs_zennit' else '<='}{v}" for k, v in e.get("goals", {}).items())
        cells.append([
            name, m, f"{e['median_s'] * 1e3:.1f}", f"{e['time_ratio']:.2f}", f"{e['cpu_median_s'] * 1e3:.1f}",
            f"{e['cpu_time_ratio']:.2f}", f"{e['conv_bound_ratio']:.2f}" if "conv_bound_ratio" in e else "",
            f"{e['peak_bytes'] / 2**20:.1f}" if "peak_bytes" in e else "-",
            f"{e['memory_ratio']:.2f}" if e.get("memory_ratio") is not None else "-", zen,
            f"{e['zennit_over_ours_at_bound_cpu']:.2f}" if "zennit_over_ours_at_bound_cpu" in e else "",
            " " + goal])
    return render_table(_TABLE_HEADER, cells, style="text", widths=_TABLE_WIDTHS, align=_TABLE_ALIGN)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's); 1 makes CPU time robust on a busy machine")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--malloc", choices=["default", "reuse"], default="default",
                        help="glibc allocator setting for the timing (see the module docstring)")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.malloc == "reuse" and not args.memory_child and any(os.environ.get(k) != v for k, v in REUSE_ENV.items()):
        # glibc reads these once, at start-up: run again with them set
        env = dict(os.environ, **REUSE_ENV)
        raw = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.bench_lrp_cost", *raw], env)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        print(measure_memory_here(args.memory_child[0], args.memory_child[1], device))
        return {}

    results: dict[str, Any] = {"machine": machine_info(device), "malloc": args.malloc,
                               "repeats": args.repeats, "warmup": args.warmup,
                               "threads": torch.get_num_threads(),
                               "memory_method": ("cuda max_memory_allocated" if device.type == "cuda" else
                                                 "fresh subprocess per method, VmHWM - VmRSS around one call"),
                               "models": {}}
    rows = []
    for name in args.models:
        methods = METHODS[name]
        times, cpu = time_model(name, methods, device, args.repeats, args.warmup)
        base_t = statistics.median(times["gradient"])
        base_c = statistics.median(cpu["gradient"])
        mems = {} if args.no_memory else {m: measure_memory(name, m, device) for m in methods}
        costs = conv_costs(name, device, args.repeats) if name.startswith("cnn") and device.type == "cpu" else []
        base_conv = conv_time("gradient", costs) if costs else None
        entry: dict[str, Any] = {}
        for m in methods:
            med, med_c = statistics.median(times[m]), statistics.median(cpu[m])
            e = {"median_s": med, "times_s": times[m], "time_ratio": med / base_t,
                 "cpu_median_s": med_c, "cpu_times_s": cpu[m], "cpu_time_ratio": med_c / base_c}
            if mems:
                e["peak_bytes"] = mems[m]
                e["memory_ratio"] = mems[m] / mems["gradient"] if mems["gradient"] else None
            zen = m.replace("lrp:", "zennit:")
            if m.startswith("lrp:") and zen in times:
                e["zennit_over_ours"] = statistics.median(times[zen]) / med
                e["zennit_over_ours_cpu"] = statistics.median(cpu[zen]) / med_c
                if base_conv is not None and conv_time(m, costs) is not None:
                    # the most a rule at its convolution bound could gain on zennit as measured here
                    bound_s = base_c - base_conv + conv_time(m, costs)
                    e["zennit_over_ours_at_bound_cpu"] = statistics.median(cpu[zen]) / bound_s
            if base_conv is not None and conv_time(m, costs) is not None:
                # lower bound: the baseline's measured time with its convolutions replaced by the ones the
                # rule needs (everything else -- pooling, ReLU, dense layers, Python -- assumed free)
                e["conv_cpu_s"] = conv_time(m, costs)
                e["conv_bound_ratio"] = (base_c - base_conv + e["conv_cpu_s"]) / base_c
            if m in GOALS:
                e["goals"] = GOALS[m]
            entry[m] = e
            rows.append((name, m, e))
        results["models"][name] = entry
        if costs:
            results.setdefault("conv_costs_cpu_s", {})[name] = costs

    for line in table_lines(rows):
        print(line)
    print("(cpu: process CPU time; bound: the CPU-time ratio if only the convolutions the rule needs cost anything "
          "extra; zennit/ours: CPU-time ratio, wall-time ratio in brackets; at bound: zennit's measured CPU time "
          "over ours at that bound)")
    write_json(args.out, results, indent=2)
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
