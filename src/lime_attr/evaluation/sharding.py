"""Data-parallel evaluation under ``torchrun``: process group set-up, sharding, gathering, loading.

The evaluation loop of :func:`~lime_attr.evaluation.run_eval` runs unchanged in one process and under
``torchrun --nproc_per_node N``. Under torchrun (the ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` environment variables are set) :func:`init_distributed` starts the default process
group -- NCCL when CUDA is available, gloo otherwise -- and every rank answers the items
:func:`shard_indices` gives it: indices ``rank, rank + N, rank + 2N, ...`` (strided, so the shards
are disjoint, cover every item, differ in size by at most one, and do not depend on timing).
:func:`gather_in_order` collects ``(index, answer)`` pairs from all ranks with
``torch.distributed.all_gather_object`` and puts them back in the original order, so the merged
answers -- and the report computed from them -- are identical to a single-process run.

Models
------
Under torchrun each rank normally holds a full replica of the model on its own GPU
(``device_map={"": local_rank}``). A model too large for one GPU is split across several GPUs with
accelerate's ``device_map="auto"``; :func:`from_pretrained_kwargs` builds the ``from_pretrained``
arguments for both cases, giving each rank a disjoint group of GPUs when ``gpus_per_rank > 1``
(run ``torchrun --nproc_per_node <gpus / gpus_per_rank>``).
"""
from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

__all__ = [
    "DistInfo",
    "dist_env_present",
    "init_distributed",
    "shutdown_distributed",
    "current_dist",
    "shard_indices",
    "merge_shards",
    "gather_in_order",
    "all_gather_objects",
    "broadcast_from_main",
    "from_pretrained_kwargs",
    "load_model_distributed",
]

logger = logging.getLogger(__name__)

_ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_INITIALISED_HERE = False


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes
    ----------
    rank, world_size, local_rank
        As set by torchrun (0, 1, 0 in a single process).
    backend
        ``"gloo"`` / ``"nccl"`` when a process group is active, else ``None``.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_distributed(self) -> bool:
        """True when a process group with more than one rank is active."""
        return self.backend is not None and self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that scores and writes reports)."""
        return self.rank == 0


def dist_env_present() -> bool:
    """True when the torchrun environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) are set."""
    return all(v in os.environ for v in _ENV_VARS)


def _dist_available() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover - torch always ships it on supported platforms
        return False
    return dist.is_available()


def current_dist() -> DistInfo:
    """Describe the active process group (or the single process) without initialising anything."""
    if _dist_available():
        import torch.distributed as dist

        if dist.is_initialized():
            return DistInfo(
                rank=dist.get_rank(),
                world_size=dist.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                backend=str(dist.get_backend()),
            )
    return DistInfo()


def init_distributed(backend: Optional[str] = None, timeout_s: Optional[float] = None) -> DistInfo:
    """Initialise the default process group when running under torchrun; otherwise do nothing.

    Parameters
    ----------
    backend
        Force a backend; by default ``"nccl"`` when CUDA is available, else ``"gloo"``.
    timeout_s
        Collective timeout in seconds (torch's default when ``None``).

    Returns
    -------
    DistInfo
        Rank, world size, local rank and backend. An already initialised group is used as is. With
        ``WORLD_SIZE=1`` no group is created.

    Notes
    -----
    A group created here is destroyed at interpreter exit (or by :func:`shutdown_distributed`). With
    NCCL the current CUDA device is set to ``LOCAL_RANK``.
    """
    global _INITIALISED_HERE
    info = current_dist()
    if info.backend is not None or not dist_env_present():
        return info
    world_size = int(os.environ["WORLD_SIZE"])
    if world_size <= 1:
        return DistInfo(rank=int(os.environ["RANK"]), world_size=1, local_rank=int(os.environ.get("LOCAL_RANK", 0)))
    if not _dist_available():
        raise RuntimeError("torchrun environment found but torch.distributed is not available in this build")
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    kwargs: dict[str, Any] = {"backend": backend}
    if timeout_s is not None:
        kwargs["timeout"] = _dt.timedelta(seconds=timeout_s)
    dist.init_process_group(**kwargs)
    if not _INITIALISED_HERE:
        atexit.register(shutdown_distributed)
    _INITIALISED_HERE = True
    info = current_dist()
    logger.info("process group initialised: rank %d of %d, backend %s", info.rank, info.world_size, backend)
    return info


def shutdown_distributed() -> None:
    """Destroy the process group if :func:`init_distributed` created it (no-op otherwise)."""
    global _INITIALISED_HERE
    if not _INITIALISED_HERE:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    _INITIALISED_HERE = False


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of the items answered by ``rank``: ``rank, rank + world_size, ...`` below ``n``.

    Raises
    ------
    ValueError
        For a negative ``n``, ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))


def merge_shards(shards: Sequence[Sequence[tuple[int, Any]]], n: int) -> list[Any]:
    """Merge per-rank ``(index, value)`` lists into one list in index order.

    Raises
    ------
    RuntimeError
        If an index repeats, is out of range, or is missing -- i.e. the shards were not a partition
        of ``range(n)`` (ranks saw different item lists).
    """
    out: list[Any] = [None] * n
    seen = [False] * n
    for shard in shards:
        for idx, value in shard:
            if not 0 <= idx < n:
                raise RuntimeError(f"gathered index {idx} outside range({n}); ranks disagree on the items")
            if seen[idx]:
                raise RuntimeError(f"index {idx} answered twice; ranks disagree on the sharding")
            seen[idx] = True
            out[idx] = value
    missing = [i for i, s in enumerate(seen) if not s]
    if missing:
        raise RuntimeError(f"{len(missing)} item(s) unanswered after gathering (first: {missing[:5]})")
    return out


def all_gather_objects(obj: Any, info: Optional[DistInfo] = None) -> list[Any]:
    """``[obj_of_rank_0, obj_of_rank_1, ...]``; ``[obj]`` in a single process."""
    info = info or current_dist()
    if not info.is_distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any, info: Optional[DistInfo] = None) -> Any:
    """Return rank 0's ``obj`` on every rank (identity in a single process)."""
    info = info or current_dist()
    if not info.is_distributed:
        return obj
    import torch.distributed as dist

    box = [obj if info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_in_order(local: Sequence[tuple[int, Any]], n: int, info: Optional[DistInfo] = None) -> list[Any]:
    """Gather every rank's ``(index, value)`` pairs and return all values in index order."""
    shards = all_gather_objects(list(local), info)
    return merge_shards(shards, n)


def from_pretrained_kwargs(
    device_map: Union[str, Mapping[str, Any], None] = "replica",
    *,
    gpus_per_rank: int = 1,
    max_memory_per_gpu: Optional[Union[int, str]] = None,
    dtype: Any = None,
) -> dict[str, Any]:
    """Keyword arguments for ``transformers`` ``from_pretrained`` in a (possibly sharded) evaluation.

    Parameters
    ----------
    device_map
        * ``"replica"`` (default): one full copy per process, on ``cuda:<LOCAL_RANK>`` (``cuda:0`` in
          a single process); no device map on a machine without CUDA.
        * ``"auto"``: a model too large for one GPU, spread by accelerate over this process's GPUs.
          In a single process that is every visible GPU; under torchrun each rank gets GPUs
          ``[local_rank * gpus_per_rank, (local_rank + 1) * gpus_per_rank)`` through ``max_memory``,
          so ranks never share a GPU.
        * anything else (``None``, ``"cpu"``, a dict) is passed through unchanged.
    gpus_per_rank
        GPUs per process with ``"auto"`` under torchrun (launch ``gpus // gpus_per_rank`` processes).
    max_memory_per_gpu
        Memory cap per GPU for ``"auto"`` (e.g. ``"70GiB"``); default: what accelerate detects.
    dtype
        Passed as ``dtype`` (e.g. ``torch.bfloat16``) when given.

    Returns
    -------
    dict
        e.g. ``{"device_map": {"": 1}}`` or ``{"device_map": "auto", "max_memory": {2: "70GiB", 3: "70GiB"}}``.

    Raises
    ------
    ImportError
        ``"auto"`` without accelerate installed (``pip install accelerate``).
    ValueError
        When the GPUs requested for this rank do not exist.
    """
    import torch

    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1)) if dist_env_present() else 1
    if device_map == "replica":
        if torch.cuda.is_available():
            if local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible; launch fewer "
                    "processes"
                )
            kwargs["device_map"] = {"": local_rank}
        return kwargs
    if device_map == "auto":
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise ImportError(
                "device_map='auto' needs accelerate (pip install accelerate, or lime_attr[dist])"
            ) from None
        kwargs["device_map"] = "auto"
        if not torch.cuda.is_available():
            return kwargs
        n_gpu = torch.cuda.device_count()
        if world > 1 or max_memory_per_gpu is not None:
            if gpus_per_rank < 1:
                raise ValueError(f"gpus_per_rank must be >= 1, got {gpus_per_rank}")
            first = local_rank * gpus_per_rank if world > 1 else 0
            count = gpus_per_rank if world > 1 else n_gpu
            if first + count > n_gpu:
                raise ValueError(
                    f"rank {local_rank} needs GPUs {first}..{first + count - 1} but {n_gpu} are visible; use "
                    f"torchrun --nproc_per_node {max(1, n_gpu // gpus_per_rank)}"
                )
            cap: Union[int, str]
            if max_memory_per_gpu is not None:
                cap = max_memory_per_gpu
            else:
                cap = int(torch.cuda.get_device_properties(first).total_memory * 0.9)
            kwargs["max_memory"] = {i: cap for i in range(first, first + count)}
        return kwargs
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def load_model_distributed(
    model_cls: Any,
    name_or_path: str,
    *,
    device_map: Union[str, Mapping[str, Any], None] = "replica",
    gpus_per_rank: int = 1,
    max_memory_per_gpu: Optional[Union[int, str]] = None,
    dtype: Any = None,
    **kwargs: Any,
) -> Any:
    """``model_cls.from_pretrained(name_or_path, **from_pretrained_kwargs(...), **kwargs)``.

    A thin convenience over :func:`from_pretrained_kwargs`; extra keyword arguments win. Loads from
    a local path or the local cache only when the caller passes ``local_files_only=True``.
    """
    fp = from_pretrained_kwargs(
        device_map, gpus_per_rank=gpus_per_rank, max_memory_per_gpu=max_memory_per_gpu, dtype=dtype
    )
    fp.update(kwargs)
    logger.info("loading %s with %s", name_or_path, {k: v for k, v in fp.items() if k != "dtype"})
    return model_cls.from_pretrained(name_or_path, **fp)
