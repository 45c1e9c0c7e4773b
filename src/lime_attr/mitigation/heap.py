"""Return freed heap memory to the operating system: glibc's ``malloc_trim``, for LIME's activation checkpoint.

On CPU, torch allocates through the C library. glibc raises its mmap threshold after the first large
free (up to 32 MB), so the many 5-30 MB buffers of a layer's recomputation then come from the heap, and
what is freed stays resident, fragmented between longer-lived tensors. On the 1B benchmark model of
``docs/lime.rst`` ("Memory") that was about 1 GB of the checkpointed run's peak. ``malloc_trim(0)`` hands
the free pages back (``madvise``) and changes no allocator setting: nothing global is configured, and a
later allocation simply faults the pages in again.

Elsewhere (another C library, macOS, Windows) :func:`release_freed_heap` does nothing and says so.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Callable, Optional

__all__ = ["release_freed_heap", "heap_release_available"]

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim`` of this process, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        log.info("malloc_trim is not available in this C library: freed heap memory is not released early")
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def heap_release_available() -> bool:
    """Whether :func:`release_freed_heap` can release anything here (glibc's ``malloc_trim`` exists)."""
    return _malloc_trim() is not None


def release_freed_heap() -> bool:
    """Give the pages of freed heap memory back to the operating system (``malloc_trim(0)``).

    Returns
    -------
    bool
        True if glibc released memory, False if there was none to release or no ``malloc_trim``.
    """
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
