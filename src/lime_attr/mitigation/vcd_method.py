"""Visual Contrastive Decoding as a decoding method, registered as ``"vcd"``: transformers' ``generate``
with the :class:`~lime_attr.mitigation.VCDLogitsProcessor` (the contrast itself is in :mod:`.vcd`)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .decoding import DecodingMethod, GenerationResult, register_decoding_method
from .greedy import transformers_generate
from .sampling import SamplingParams
from .vcd import VCDLogitsProcessor, vcd_noise_level

__all__ = ["VCDConfig", "vcd_generate", "VCD"]


@dataclass(frozen=True)
class VCDConfig(SamplingParams):
    """VCD decoding (defaults of Leng et al., 2024).

    Parameters
    ----------
    alpha : float
        Contrast strength (>= 0; VCD: 1).
    beta : float
        Adaptive plausibility cut, in [0, 1] (VCD: 0.1).
    noise_step : int
        Diffusion step of the distorted image, in [0, 1000) (VCD: 500).
    do_sample : bool
        Sample the contrasted logits with the :class:`~lime_attr.mitigation.sampling.SamplingParams`
        (default: greedy).
    """

    alpha: float = 1.0
    beta: float = 0.1
    noise_step: int = 500
    do_sample: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.alpha, (int, float)) and self.alpha >= 0):
            raise ValueError(f"VCD alpha must be a number >= 0, got {self.alpha!r}")
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta <= 1):
            raise ValueError(f"VCD beta must be in [0, 1], got {self.beta!r}")
        if isinstance(self.noise_step, bool) or not isinstance(self.noise_step, int):
            raise ValueError(f"VCD noise_step must be an int, got {self.noise_step!r}")
        vcd_noise_level(self.noise_step)  # raises for a step outside the schedule


def vcd_generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any], config: VCDConfig) -> GenerationResult:
    """VCD answers of a left-padded batch; the image / audio noise is drawn from a generator seeded with
    ``config.seed``."""
    kw = config.generate_kwargs() if config.do_sample else {"do_sample": False}
    if config.do_sample:
        torch.manual_seed(config.seed)
    noise_gen = torch.Generator().manual_seed(config.seed)
    proc = VCDLogitsProcessor.from_inputs(model, inputs, alpha=config.alpha, beta=config.beta,
                                          noise_step=config.noise_step, generator=noise_gen)
    return transformers_generate(model, processor, inputs, config.max_new_tokens, logits_processor=[proc], **kw)


def _from_options(options: Mapping[str, Any]) -> VCDConfig:
    names = {f.name for f in dataclasses.fields(VCDConfig)}
    kw = {k: v for k, v in options.items() if k in names}
    kw.update({k[4:]: options[k] for k in ("vcd_alpha", "vcd_beta", "vcd_noise_step")
               if k in options and k[4:] not in options})
    return VCDConfig(**kw)


VCD = register_decoding_method(DecodingMethod(
    "vcd", VCDConfig, vcd_generate, description="Visual Contrastive Decoding (Leng et al., 2024)",
    from_options=_from_options))
