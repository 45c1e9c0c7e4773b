r"""Visual Contrastive Decoding (Leng et al., CVPR 2024) as a transformers ``LogitsProcessor``.

At every decoding step

.. math::

    \ell_\mathrm{cd} = (1 + \alpha)\,\ell(y \mid v, x) - \alpha\,\ell(y \mid v', x),
    \qquad \ell_\mathrm{cd}[y] = -\infty \text{ where } p(y \mid v, x) < \beta \max_w p(w \mid v, x)

with :math:`v'` the image distorted by the forward diffusion process, and the *adaptive plausibility
constraint* (last condition) computed on the clean distribution. Defaults follow the VCD paper:
:math:`\alpha = 1`, :math:`\beta = 0.1`, noise step 500 of a 1000-step schedule.

The noise (:func:`vcd_noise`) is the VCD code's ``add_diffusion_noise``, re-derived: betas on a sigmoid
schedule ``sigmoid(linspace(-6, 6, T)) * (5e-3 - 1e-5) + 1e-5``, :math:`\bar\alpha_t = \prod_{s\le t}(1-\beta_s)`,
and :math:`v' = \sqrt{\bar\alpha_t}\,v + \sqrt{1-\bar\alpha_t}\,\epsilon`, applied to the *processed*
(normalised) ``pixel_values`` as the VCD code does. At ``t = 500``, :math:`\bar\alpha_t \approx 0.745`: the
image is scaled by 0.86 and gets Gaussian noise of standard deviation 0.50 (in normalised pixel units,
i.e. about half the data's spread): fine detail is gone, the coarse layout survives. For audio models
the same noise is applied to ``input_features`` (an extension; VCD is defined for images).

The noised pass runs the same model (no copy) with its own KV cache: on the first call it sees the
whole prompt, afterwards only the tokens appended since the previous call.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor

from ..canonizers.facts import uses_mrope
from .cache import cache_kwargs, output_cache

__all__ = ["VCDLogitsProcessor", "vcd_noise", "vcd_noise_level"]

_NOISED_KEYS = ("pixel_values", "pixel_values_videos", "input_features")


def vcd_noise_level(step: int = 500, num_steps: int = 1000) -> float:
    r""":math:`\bar\alpha_t` of VCD's sigmoid beta schedule at ``step`` (0-based)."""
    if not 0 <= step < num_steps:
        raise ValueError(f"noise step must be in [0, {num_steps}), got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return float(torch.cumprod(1 - betas, 0)[step])


def vcd_noise(x: Tensor, step: int = 500, num_steps: int = 1000, generator: Optional[torch.Generator] = None) -> Tensor:
    r"""Forward diffusion noise of VCD: :math:`\sqrt{\bar\alpha_t}\,x + \sqrt{1-\bar\alpha_t}\,\epsilon`."""
    a = vcd_noise_level(step, num_steps)
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    return math.sqrt(a) * x + math.sqrt(1 - a) * eps


class VCDLogitsProcessor(LogitsProcessor):
    r"""Contrast the clean-image logits with those of a noised image (Visual Contrastive Decoding).

    Parameters
    ----------
    model : PreTrainedModel
        The same model ``generate`` runs.
    noised_inputs : Mapping
        Model inputs of the *prompt* with the distorted image: ``input_ids``, ``attention_mask``,
        ``pixel_values`` (noised) and whatever else the model needs (``image_sizes``,
        ``image_grid_thw``...). :meth:`from_inputs` builds it from the clean inputs.
    alpha : float
        Contrast strength (VCD: 1).
    beta : float
        Adaptive plausibility cut: keep tokens with :math:`p \ge \beta \max p` under the clean image
        (VCD: 0.1).

    Notes
    -----
    Pass it as ``model.generate(**inputs, logits_processor=LogitsProcessorList([vcd]))``. transformers
    applies custom processors after its own processors (repetition penalty) and before the sampling
    warpers (temperature, top-k, top-p), so the contrast acts on logits, as in VCD. Use a new processor
    per ``generate`` call (it holds the noised pass's cache).

    Examples
    --------
    >>> vcd = VCDLogitsProcessor.from_inputs(model, inputs, alpha=1.0, beta=0.1)   # doctest: +SKIP
    >>> model.generate(**inputs, logits_processor=[vcd], do_sample=False)          # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, noised_inputs: Mapping[str, Any], alpha: float = 1.0,
                 beta: float = 0.1) -> None:
        if alpha < 0:
            raise ValueError(f"VCD alpha must be >= 0, got {alpha}")
        if not 0 <= beta <= 1:
            raise ValueError(f"VCD beta must be in [0, 1], got {beta}")
        inp = dict(noised_inputs.items())
        if "input_ids" not in inp:
            raise ValueError("noised_inputs need the prompt's input_ids")
        self.model = model
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.prompt_ids: Tensor = inp.pop("input_ids")
        mask = inp.pop("attention_mask", None)
        self.mask: Tensor = torch.ones_like(self.prompt_ids) if mask is None else mask
        self.extra = inp
        self.cache: Any = None
        self.seen = 0
        self.last_noised_logits: Optional[Tensor] = None
        self.rope_deltas: Optional[Tensor] = None  # M-RoPE models: the noised prompt's rope delta

    @classmethod
    def from_inputs(cls, model: nn.Module, inputs: Mapping[str, Any], alpha: float = 1.0, beta: float = 0.1,
                    noise_step: int = 500, generator: Optional[torch.Generator] = None) -> "VCDLogitsProcessor":
        """Noise the perceptual tensors of ``inputs`` (:func:`vcd_noise`) and build the processor."""
        data = getattr(inputs, "data", inputs)
        noised = dict(data.items())
        hit = False
        for k in _NOISED_KEYS:
            v = noised.get(k)
            if isinstance(v, Tensor) and v.is_floating_point():
                noised[k] = vcd_noise(v, noise_step, generator=generator)
                hit = True
        if not hit:
            raise ValueError(f"VCD needs an image (or audio) input to distort; inputs have none of {_NOISED_KEYS}")
        return cls(model, noised, alpha, beta)

    def _rope_owner(self) -> Optional[nn.Module]:
        """The module computing M-RoPE positions (the family's rope fact), or None for 1-D positions."""
        if not uses_mrope(self.model):
            return None
        for m in (self.model, getattr(self.model, "model", None)):
            if m is not None and callable(getattr(m, "get_rope_index", None)):
                return m
        return None

    def _position_ids(self, mask: Tensor, n: int, first: bool) -> Optional[Tensor]:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)[:, -n:]
        owner = self._rope_owner()
        if owner is None:
            return pos
        if first:
            return None  # the model computes its multimodal (M-RoPE) positions of the prompt itself
        # text after the prompt: the same position on the three M-RoPE axes, shifted by the prompt's rope delta
        pos = pos.masked_fill(mask[:, -n:] == 0, 0)
        if self.rope_deltas is not None:
            pos = pos + self.rope_deltas.to(pos.device)
        return pos[None].expand(3, -1, -1)

    @torch.no_grad()
    def noised_logits(self, input_ids: Tensor) -> Tensor:
        """Next-token logits ``[B, V]`` of the noised-image pass for the sequence ``input_ids``."""
        P = self.prompt_ids.shape[1]
        if input_ids.shape[1] < P or not torch.equal(input_ids[:, :P].cpu(), self.prompt_ids.cpu()):
            raise ValueError("VCDLogitsProcessor: the sequence being generated does not start with the prompt it was "
                             "built for; build one processor per generate call")
        mask = torch.cat([self.mask.to(input_ids.device),
                          torch.ones(input_ids.shape[0], input_ids.shape[1] - P, dtype=self.mask.dtype,
                                     device=input_ids.device)], 1)
        first = self.cache is None
        if first:
            new, kwargs = input_ids, dict(self.extra)
        else:
            new, kwargs = input_ids[:, self.seen:], {}
        pos = self._position_ids(mask, new.shape[1], first)
        if pos is not None:
            kwargs["position_ids"] = pos
        out = self.model(input_ids=new, attention_mask=mask, use_cache=True, **cache_kwargs(self.cache), **kwargs)
        if first:
            owner = self._rope_owner()
            deltas = getattr(owner, "rope_deltas", None) if owner is not None else None
            self.rope_deltas = deltas.detach().clone() if isinstance(deltas, Tensor) else None
        self.cache = output_cache(out)
        self.seen = input_ids.shape[1]
        logits = out.logits[:, -1, :].float()
        self.last_noised_logits = logits
        return logits

    def contrast(self, scores: Tensor, noised: Tensor) -> Tensor:
        """The VCD formula on one step's clean ``scores`` and ``noised`` logits (both ``[B, V]``)."""
        clean = scores.float()
        cd = (1 + self.alpha) * clean - self.alpha * noised.to(clean.device).float()
        logp = torch.log_softmax(clean, -1)
        cutoff = math.log(self.beta) + logp.max(-1, keepdim=True).values if self.beta > 0 else None
        if cutoff is not None:
            cd = cd.masked_fill(logp < cutoff, float("-inf"))
        return cd.to(scores.dtype)

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return self.contrast(scores, self.noised_logits(input_ids))
