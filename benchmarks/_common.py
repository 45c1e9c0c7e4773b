"""Shared helpers of the benchmark scripts: settings presets, machine info, strict JSON, timing, memory, tables.

Every report script (``bench_*.py``, :mod:`benchmarks.hallucination_report`, :mod:`benchmarks.faithfulness`)
takes these from here instead of rebuilding them:

* :class:`PresetSettings` -- a mixin giving a frozen settings dataclass its named presets (``--quick``);
* :func:`machine_info`, :func:`cost_machine_info`, :func:`machine_line` -- what a report records about
  the machine and the installed libraries (:func:`cpu_model`, :func:`dist_version`, :func:`load_average`);
* :func:`clean_json`, :func:`write_json`, :func:`compact_dumps` -- strict JSON (NaN / inf become null);
* :class:`Stopwatch`, :func:`cpu_median`, :func:`timed_round_robin`, :func:`median` -- timing;
* :func:`peak_bytes`, :func:`cpu_peak_bytes`, :func:`cuda_peak_bytes`, :func:`op_peak_bytes`,
  :func:`rss_peak_bytes`, :func:`rss_mb`, :func:`max_rss_mb` -- memory;
* :func:`render_table`, :func:`heading`, :func:`fmt` -- the one table renderer (rst list-table,
  markdown or aligned text) of the pages and printed tables.

Timing and peak memory of attribution calls
-------------------------------------------
Time and peak memory of attribution calls, relative to one plain gradient pass.

Time
    Seconds of one ``attribute(inputs, targets)`` call on a fixed batch, median over ``repeats``
    samples after ``warmup`` calls, both as wall-clock time and as the process's CPU time (see
    :func:`timed_round_robin`). The methods are timed round-robin (sample r of every method, then
    sample r + 1 ...), so slow drifts in machine load hit all methods alike. On CPU the ratios to
    the gradient are taken from the CPU time (robust to other processes on a shared machine), on
    CUDA from the wall time.

Peak memory
    On CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before the call. On CPU,
    the torch profiler with ``profile_memory=True`` records every allocation and free of the c10
    CPU allocator during one call; the peak is the maximum of their running sum. This counts all
    tensors torch allocates (activations kept for backward, gradients, the copies Captum's LRP makes,
    the batched inputs of Integrated Gradients, the result), but not memory that is not a tensor
    (Python objects, hooks, allocator caching or fragmentation), nor tensors that existed before
    the call (weights, inputs). It reads the profiler's event tree
    (``kineto_results.experimental_event_tree()``), an interface torch marks experimental; where it
    is missing the memory column is left empty rather than estimated another way.

"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union

import torch

from lime_attr.evaluation import jsonable

logger = logging.getLogger(__name__)

__all__ = [
    "PresetSettings",
    "dist_version", "cpu_model", "cpu_cores", "load_average", "machine_info", "cost_machine_info", "machine_line",
    "clean_json", "write_json", "compact_dumps",
    "Stopwatch", "cpu_median", "timed_round_robin", "median",
    "peak_bytes", "cpu_peak_bytes", "cuda_peak_bytes", "op_peak_bytes", "rss_peak_bytes", "rss_mb", "max_rss_mb",
    "render_table", "heading", "fmt",
]


# --------------------------------------------------------------------------------------------------
# settings presets
# --------------------------------------------------------------------------------------------------
class PresetSettings:
    """Mixin of a frozen settings dataclass with named presets.

    A subclass lists its presets in ``PRESETS`` (name -> field overrides); :meth:`preset` builds one,
    :meth:`quick_run` the ``--quick`` smoke run every report script offers.
    """

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Any:
        """The settings of preset ``name``, with ``overrides`` on top."""
        try:
            base = dict(cls.PRESETS[name])
        except KeyError:
            raise KeyError(f"unknown preset {name!r} of {cls.__name__}; use {', '.join(cls.PRESETS)}") from None
        base.update(overrides)
        return cls(**base)

    @classmethod
    def quick_run(cls, **overrides: Any) -> Any:
        """The ``--quick`` preset."""
        return cls.preset("quick", **overrides)

    def to_dict(self) -> dict[str, Any]:
        """The settings as strict-JSON types (tuples become lists), as the reports record them."""
        return clean_json(dataclasses.asdict(self))  # type: ignore[call-overload]


# --------------------------------------------------------------------------------------------------
# machine info
# --------------------------------------------------------------------------------------------------
def dist_version(dist: str) -> Optional[str]:
    """The installed version of distribution ``dist``, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> Optional[int]:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def load_average() -> Optional[tuple[float, float, float]]:
    """The 1 / 5 / 15 minute load averages, or None where the platform has none."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def machine_info(device: str = "cpu", libraries: Sequence[str] = ("torch", "transformers", "lime_attr", "numpy"),
                 gpu: bool = True) -> dict[str, Any]:
    """CPU / GPU, cores, threads, platform and library versions: the ``machine`` of the report JSONs.

    Parameters
    ----------
    device
        ``cpu`` or ``cuda``.
    libraries
        Distributions whose versions are recorded (``None`` for one not installed).
    gpu
        Record a ``gpu`` key (the device name on CUDA, else None).
    """
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores_visible": cpu_cores(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "device": device,
    }
    if gpu:
        info["gpu"] = torch.cuda.get_device_name(0) if device == "cuda" else None
    info["versions"] = {d: dist_version(d) for d in libraries}
    load = load_average()
    if load is not None:
        info["load_average_at_start"] = [round(v, 2) for v in load]
    return info


def cost_machine_info(device: torch.device) -> dict[str, Any]:
    """The ``machine`` of the cost JSONs (``lrp_cost.json``, ``families_cost.json``)."""
    versions: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    versions.update({d: dist_version(d) for d in ("transformers", "zennit", "captum", "lime_attr")})
    info: dict[str, Any] = {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(), "device": str(device), "versions": versions}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    load = load_average()
    if load is not None:
        info["load_average"] = load
    return info


def machine_line() -> str:
    """The machine in one printed line: CPU, logical cores, torch version and threads, python."""
    return (f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
            f"threads={torch.get_num_threads()}, python {platform.python_version()}")


# --------------------------------------------------------------------------------------------------
# strict JSON
# --------------------------------------------------------------------------------------------------
def clean_json(obj: Any) -> Any:
    """Plain JSON types, recursively: NaN / inf become None (null), tuples lists, numpy / torch values numbers.

    :func:`lime_attr.evaluation.jsonable`, so that the reports and the library write the same JSON.
    """
    return jsonable(obj)


def write_json(path: Union[str, Path], obj: Any, indent: Optional[int] = 2, compact: bool = False) -> Path:
    """Write ``obj`` as strict JSON (cleaned with :func:`clean_json`, ``allow_nan=False``) and a newline.

    ``compact``: :func:`compact_dumps` (lists of scalars on one line) instead of ``json.dumps``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = clean_json(obj)
    text = compact_dumps(data) if compact else json.dumps(data, indent=indent, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def compact_dumps(obj: Any, level: int = 0) -> str:
    """JSON with one-space indentation, lists of scalars (answers, labels) kept on one line."""
    pad, inner = " " * level, " " * (level + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(str(k))}: {compact_dumps(v, level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj, allow_nan=False)
        return "[\n" + ",\n".join(inner + compact_dumps(v, level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj, allow_nan=False)


# --------------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------------
class Stopwatch:
    """Wall-clock and process CPU time of a ``with`` block (``.wall``, ``.cpu`` in seconds).

    ``sync=True`` synchronises CUDA at both ends, so that queued kernels count.
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Stopwatch":
        if self.sync:
            _synchronize()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.sync:
            _synchronize()
        self.wall, self.cpu = time.perf_counter() - self._wall, time.process_time() - self._cpu


def cpu_median(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median process CPU seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_round_robin(
    calls: dict[str, Callable[[], object]], repeats: int, warmup: int, min_seconds: float = 0.02
) -> dict[str, dict[str, list[float]]]:
    """Time each call ``repeats`` times (after ``warmup`` untimed calls), interleaved.

    A timing sample of a method runs its call ``k`` times back to back and divides by ``k``, with
    ``k`` chosen from the last warm-up call so that a sample lasts about ``min_seconds`` (at least
    one call): very short calls are then not at the mercy of the timer and of single preemptions.
    Both wall-clock time and the process's CPU time (``time.process_time``: user + system time of all
    its threads) are recorded; on a shared machine the wall time also counts the time spent waiting
    for a core, the CPU time does not.

    Parameters
    ----------
    calls : dict of str to callable
        Zero-argument callables.
    repeats, warmup : int
        Timed samples and untimed calls per callable.
    min_seconds : float
        Target duration of one sample.

    Returns
    -------
    dict of str to dict
        Per call: ``{"wall": [seconds per call, one per sample], "cpu": [...], "calls_per_sample": [k]}``.
    """
    inner = {name: 1 for name in calls}
    for _ in range(max(warmup, 1)):
        for name, fn in calls.items():
            _synchronize()
            start = time.process_time()
            fn()
            _synchronize()
            inner[name] = max(1, int(min_seconds / max(time.process_time() - start, 1e-6)))
    samples: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "calls_per_sample": [inner[name]]} for name in calls
    }
    for _ in range(repeats):
        for name, fn in calls.items():
            k = inner[name]
            _synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(k):
                fn()
            _synchronize()
            samples[name]["wall"].append((time.perf_counter() - wall) / k)
            samples[name]["cpu"].append((time.process_time() - cpu) / k)
    return samples


def median(values: list[float]) -> float:
    """Median of a non-empty list."""
    return float(statistics.median(values))


def _walk(nodes):
    for node in nodes:
        yield node
        yield from _walk(node.children)


def cpu_peak_bytes(fn: Callable[[], object]) -> Optional[int]:
    """Peak of live CPU tensor bytes allocated during one call of ``fn`` (see the module notes).

    Returns
    -------
    int or None
        None where the profiler's allocation events are not available.
    """
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - depends on the torch build
        return None
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    try:
        tree = prof.profiler.kineto_results.experimental_event_tree()
    except AttributeError:  # pragma: no cover - depends on the torch build
        return None
    events = [
        (node.start_time_ns, node.extra_fields.alloc_size)
        for node in _walk(tree)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device).startswith("cpu")
    ]
    live = peak = 0
    for _, size in sorted(events, key=lambda e: e[0]):
        live += size
        peak = max(peak, live)
    return int(peak)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """``torch.cuda.max_memory_allocated`` during one call of ``fn``, above the memory before it."""
    gc.collect()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del result
    return int(peak)


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak extra memory of one call of ``fn`` on ``device`` (CUDA allocator or CPU profiler)."""
    if device.type == "cuda":
        return cuda_peak_bytes(fn)
    return cpu_peak_bytes(fn)


def op_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of live tensor bytes allocated during ``run()``, from the profiler's per-op memory events.

    The profiler's ``events()`` (self CPU memory of each op, in time order) rather than the allocation
    event tree of :func:`cpu_peak_bytes`; the method of ``families_cost.json``.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        del out
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def rss_peak_bytes(run: Callable[[], object]) -> int:
    """Resident-set growth of one ``run()``: the high-water mark ``VmHWM`` (reset first) minus ``VmRSS``.

    Linux only (``/proc/self/clear_refs``); run it in a fresh process for a number that does not
    depend on what the allocator kept from earlier calls.
    """
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    base = _proc_status("VmRSS")
    run()
    return _proc_status("VmHWM") - base


def rss_mb() -> float:
    """The process's current resident set, MiB (``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def max_rss_mb() -> float:
    """The process's peak resident set so far, MiB (``getrusage``)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------
def fmt(value: Optional[float], spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; ``n/a`` for None."""
    return "n/a" if value is None else format(value, spec)


def heading(text: str, char: str) -> list[str]:
    """An rst section heading (text, underline, blank line)."""
    return [text, char * len(text), ""]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], style: str = "rst",
                 widths: Union[str, Sequence[int], None] = None, align: Optional[str] = None,
                 sep: str = " ") -> list[str]:
    """The one table renderer of the benchmark pages and printed tables; returns the lines.

    Parameters
    ----------
    header, rows
        Cell strings (format numbers before, e.g. with :func:`fmt`).
    style
        ``rst`` (a ``list-table`` directive, then a blank line), ``markdown`` (a pipe table) or
        ``text`` (aligned columns for the terminal).
    widths
        ``rst``: the ``:widths:`` option (a string or numbers). ``text``: the minimum width of each
        column (default: the widest cell).
    align
        ``text`` / ``markdown``: one letter per column, ``l`` or ``r`` (default: all ``l``).
    sep
        ``text``: the separator between columns.
    """
    if style == "rst":
        lines = [".. list-table::", "   :header-rows: 1"]
        if widths:
            lines.append(f"   :widths: {widths if isinstance(widths, str) else ' '.join(map(str, widths))}")
        lines.append("")
        for row in [header, *rows]:
            lines.append(f"   * - {row[0]}")
            lines.extend(f"     - {cell}" for cell in row[1:])
        lines.append("")
        return lines
    align = align or "l" * len(header)
    if style == "markdown":
        rule = ["---:" if a == "r" else "---" for a in align]
        return ["| " + " | ".join(r) + " |" for r in [list(header), rule, *map(list, rows)]]
    if style != "text":
        raise ValueError(f"unknown table style {style!r}; use rst, markdown or text")
    if widths is None or isinstance(widths, str):
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return [sep.join(f"{cell:>{w}}" if a == "r" else f"{cell:<{w}}" for cell, w, a in zip(row, widths, align))
            for row in [header, *rows]]
