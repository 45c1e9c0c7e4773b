"""Typed site specifications: what a canonizer or the module discovery knows about a norm or a gated product.

A neutral bottom module: the rules read these specs, the site discovery and the canonizers build them,
and none of them imports another for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

__all__ = ["NormSpec", "ProductSpec"]


@dataclass(frozen=True)
class NormSpec:
    """How to recompute a normalisation with its scale held constant.

    Parameters
    ----------
    kind : {"layernorm", "rmsnorm"}
        LayerNorm subtracts the mean (kept linear); RMSNorm does not.
    weight, bias : Tensor or None
        The affine parameters (detached) applied after normalising.
    eps : float
        The variance epsilon.
    weight_offset : float
        Added to the weight (Gemma's RMSNorm multiplies by ``1 + weight``).
    dims : int
        Number of trailing dimensions normalised over (1 for transformer norms).
    upcast : bool
        Compute in float32 like Hugging Face norms do, then cast back.
    """

    kind: str
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    eps: float = 1e-6
    weight_offset: float = 0.0
    dims: int = 1
    upcast: bool = True


@dataclass(frozen=True)
class ProductSpec:
    """A gated product ``consumer(gate(x) * up(x))`` declared by a canonizer (a gated MLP).

    Parameters
    ----------
    consumer : nn.Module
        The layer that consumes the product (``down_proj``); its input gets the up factor's share.
    gate : nn.Module or None
        The gate's activation module (``act_fn``); its output gets the gate factor's share.
    up : nn.Module or None
        The up projection; detached when the product rule gives the up factor no relevance.
    """

    consumer: Any
    gate: Any = None
    up: Any = None
