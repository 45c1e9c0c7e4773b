"""Time and peak memory of attribution calls, relative to one plain gradient pass.

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

import gc
import logging
import statistics
import time
from typing import Callable, Optional

import torch

logger = logging.getLogger(__name__)


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
