"""Sampling: transformers' own ``generate(do_sample=True)``, registered as ``"sample"``.

:class:`SamplingParams` (temperature, top-k, top-p, seed) is also the base of the VCD and LIME configs,
which sample with the same parameters when ``do_sample`` is set.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .decoding import DecodingMethod, DecodingMethodConfig, GenerationResult, register_decoding_method
from .greedy import transformers_generate

__all__ = ["check_sampling", "SamplingParams", "SampleConfig", "sample_generate", "SAMPLE"]


def check_sampling(temperature: Any = None, top_k: Any = None, top_p: Any = None) -> None:
    """Refuse sampling parameters outside their range (temperature finite and > 0, ``top_k >= 1``,
    ``0 < top_p <= 1``; ``None`` skips a check).

    Raises
    ------
    ValueError
        Naming the parameter, its value and the valid range.
    """
    if temperature is not None and not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                                        and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool)
                                  and 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filter), got {top_p!r}")


@dataclass(frozen=True)
class SamplingParams(DecodingMethodConfig):
    """Sampling parameters shared by the sampling, VCD and LIME configs.

    Parameters
    ----------
    max_new_tokens : int
    temperature : float
        Finite and > 0.
    top_k : int, optional
        Keep the ``top_k`` most likely tokens (>= 1).
    top_p : float, optional
        Nucleus filter, in (0, 1].
    seed : int
        Seed of the sampling generator.
    """

    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sampling(self.temperature, self.top_k, self.top_p)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def generate_kwargs(self) -> dict:
        """``do_sample=True`` and the set filters, as ``model.generate`` keywords."""
        kw: dict[str, Any] = {"do_sample": True, "temperature": self.temperature}
        if self.top_k is not None:
            kw["top_k"] = self.top_k
        if self.top_p is not None:
            kw["top_p"] = self.top_p
        return kw


@dataclass(frozen=True)
class SampleConfig(SamplingParams):
    """Multinomial sampling (see :class:`SamplingParams`)."""


def sample_generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any],
                    config: SampleConfig) -> GenerationResult:
    """Sampled answers of a left-padded batch (transformers' ``generate``, torch seeded with ``config.seed``)."""
    torch.manual_seed(config.seed)
    return transformers_generate(model, processor, inputs, config.max_new_tokens, **config.generate_kwargs())


SAMPLE = register_decoding_method(DecodingMethod(
    "sample", SampleConfig, sample_generate, description="transformers generate(), do_sample=True"))
