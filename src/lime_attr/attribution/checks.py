"""Checks shared by the relevance engine and its adapters: inputs, targets, finite relevance.

A bottom module of ``lime_attr.attribution``: it imports nothing from the package, so the engine,
the exact second order and every adapter can use it without import cycles.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["validate_inputs", "validate_target", "normalize_target", "check_finite"]


def validate_inputs(inputs: tuple) -> None:
    """Clear errors for non-tensor, non-float, empty or non-finite inputs."""
    for i, x in enumerate(inputs):
        if not isinstance(x, Tensor):
            raise TypeError(f"input {i} must be a torch.Tensor, got {type(x).__name__}; LRP explains "
                            "float tensors (for token ids pass the embeddings: model.get_input_embeddings()(ids))")
        if not x.is_floating_point():
            raise TypeError(f"input {i} has dtype {x.dtype}; LRP needs a floating-point tensor (relevance is "
                            "x * gradient). For token ids pass inputs_embeds instead")
        if x.dim() == 0:
            raise ValueError(f"input {i} is a scalar; inputs need a batch dimension (dim 0)")
        if x.numel() == 0:
            raise ValueError(f"input {i} is empty (shape {tuple(x.shape)})")
        if x.is_inference():
            raise ValueError(f"input {i} was created under torch.inference_mode(), so autograd cannot track it; "
                             "create it outside inference mode (or pass x.clone() made outside it)")
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(f"input {i} contains {bad} NaN/inf value(s); relevance of non-finite inputs is "
                             "undefined. Clean the input (e.g. torch.nan_to_num) before attributing")


def normalize_target(target: Any) -> Any:
    """Captum target with numpy integers turned into ``int`` (and numpy arrays into tensors).

    ``np.int64(3)`` (what indexing a numpy array gives) is accepted wherever an ``int`` is, at any depth
    of a list or tuple target.
    """
    import numpy as np

    if isinstance(target, np.ndarray):
        if not np.issubdtype(target.dtype, np.integer):
            raise TypeError(f"a numpy target must hold integer indices, got dtype {target.dtype}")
        return torch.as_tensor(target)
    if isinstance(target, np.integer):
        return int(target)
    if isinstance(target, (list, tuple)):
        return type(target)(normalize_target(t) for t in target)
    return target


def validate_target(output: Tensor, target: Any) -> None:
    """Check a Captum-format target against the model output shape, with a clear message."""
    if target is None:
        if output.dim() > 1 and output[0].numel() != 1:
            raise ValueError(f"target=None needs a scalar output per example, but the output has shape "
                             f"{tuple(output.shape)}; pass target=<class index> (or a tuple for >2-D outputs)")
        return
    n = output.shape[0]

    def check_index(idx: Any, dims: tuple, what: str) -> None:
        idx = idx if isinstance(idx, tuple) else (idx,)
        if len(idx) > len(dims):
            raise ValueError(f"target {what}{idx} has {len(idx)} indices but the output has only {len(dims)} "
                             f"non-batch dimensions (shape {tuple(output.shape)})")
        for i, d in zip(idx, dims):
            if isinstance(i, slice):
                continue
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"target indices must be ints, got {i!r}")
            if not -d <= i < d:
                raise IndexError(f"target {what}{i} is out of range for an output dimension of size {d} "
                                 f"(output shape {tuple(output.shape)})")

    dims = tuple(output.shape[1:])
    if isinstance(target, Tensor):
        if target.numel() == 1:
            check_index(int(target.item()), dims, "")
            return
        if target.dim() != 1 or target.numel() != n:
            raise ValueError(f"a tensor target must hold one index per example ({n}), got shape {tuple(target.shape)}")
        target = target.tolist()
    if isinstance(target, list):
        if len(target) != n:
            raise ValueError(f"a list target must hold one entry per example: {len(target)} targets for {n} examples")
        for t in target:
            check_index(t, dims, "")
        return
    if isinstance(target, (int, tuple)) and not isinstance(target, bool):
        check_index(target, dims, "")
        return
    raise TypeError(f"unsupported target {target!r}: use an int, a tuple, a list of ints/tuples or a tensor "
                    "(Captum's target formats)")


def check_finite(rel: tuple) -> None:
    """A non-finite relevance is an overflow (typically fp16 in the backward pass): say so, never return it."""
    for i, r in enumerate(rel):
        if not bool(torch.isfinite(r).all()):
            hint = (" float16's range (max 65504) overflowed in the backward pass; run the attribution in "
                    "bfloat16 or float32 (model.to(torch.bfloat16) / model.float(), inputs likewise)"
                    if r.dtype == torch.float16 else " check the model and its inputs")
            raise FloatingPointError(f"the relevance of input {i} contains NaN/inf ({r.dtype}):{hint}")
