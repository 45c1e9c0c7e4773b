"""Greedy decoding: transformers' own ``generate(do_sample=False)``, registered as ``"greedy"``."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .decoding import DecodingMethod, DecodingMethodConfig, GenerationResult, register_decoding_method

__all__ = ["GreedyConfig", "greedy_generate", "transformers_generate", "GREEDY"]


@dataclass(frozen=True)
class GreedyConfig(DecodingMethodConfig):
    """Greedy decoding: only ``max_new_tokens`` (see :class:`~lime_attr.mitigation.DecodingMethodConfig`)."""


def transformers_generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any], max_new_tokens: int,
                          **generate_kwargs: Any) -> GenerationResult:
    """``model.generate(**inputs, ...)`` without gradients; the new tokens and their stripped texts.

    Parameters
    ----------
    model, processor
        The model and its processor (or tokenizer), which decodes the answers.
    inputs : Mapping
        Processor outputs of a left-padded batch.
    max_new_tokens : int
        Passed to ``generate``.
    **generate_kwargs
        Further ``generate`` arguments (``do_sample``, ``logits_processor`` ...).
    """
    tok = getattr(processor, "tokenizer", processor)
    enc = dict(inputs.items())
    n_prompt = enc["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, **generate_kwargs)
    new = out[:, n_prompt:]
    texts = [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return GenerationResult(texts, [row.tolist() for row in new])


def greedy_generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any],
                    config: GreedyConfig) -> GenerationResult:
    """Greedy answers of a left-padded batch (transformers' ``generate``, ``do_sample=False``)."""
    return transformers_generate(model, processor, inputs, config.max_new_tokens, do_sample=False)


def _from_options(options: Mapping[str, Any]) -> GreedyConfig:
    if options.get("do_sample"):
        raise ValueError("greedy decoding does not sample: use method='sample' (or vcd / lime with do_sample=True)")
    return GreedyConfig(**({"max_new_tokens": options["max_new_tokens"]} if "max_new_tokens" in options else {}))


GREEDY = register_decoding_method(DecodingMethod(
    "greedy", GreedyConfig, greedy_generate, description="transformers generate(), do_sample=False",
    from_options=_from_options))
