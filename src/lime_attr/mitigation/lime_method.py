"""LIME (Allouche and Keshet, 2026) as a decoding method, registered as ``"lime"``.

It calls LIME's public API only: :meth:`LimeConfig.for_model <lime_attr.mitigation.LimeConfig.for_model>`,
:func:`~lime_attr.mitigation.lime_generate` and, for many inputs,
:class:`~lime_attr.mitigation.session.LimeSession`.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import LimeConfig
from .decoding import DecodingMethod, GenerationResult, register_decoding_method
from .generate import LimeOutput, lime_generate
from .sampling import SamplingParams
from .session import LimeSession

__all__ = ["LimeMethodConfig", "lime_method_generate", "lime_method_session", "LIME_MODES", "LIME"]

#: The modes of :class:`~lime_attr.mitigation.LimeConfig` a decoding config may choose.
LIME_MODES = ("fast", "reference", "incremental")


@dataclass(frozen=True)
class LimeMethodConfig(SamplingParams):
    """LIME decoding: the model family's preset (:meth:`LimeConfig.for_model
    <lime_attr.mitigation.LimeConfig.for_model>`) in ``mode``, with ``overrides``.

    Parameters
    ----------
    mode : {"fast", "reference", "incremental"}
    overrides : mapping
        Further :class:`~lime_attr.mitigation.LimeConfig` fields (stored as a plain ``dict``).
    recommended : bool
        Start from :meth:`LimeConfig.recommended <lime_attr.mitigation.LimeConfig.recommended>` (the
        configuration the evaluation recommends for the model, its evidence logged) instead of the
        paper's preset :meth:`~lime_attr.mitigation.LimeConfig.for_model`; ``overrides`` apply on top.
    do_sample : bool
        Sample the emitted token with the :class:`~lime_attr.mitigation.sampling.SamplingParams`
        (default: greedy).
    """

    mode: str = "fast"
    overrides: Mapping = field(default_factory=dict)
    recommended: bool = False
    do_sample: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in LIME_MODES:
            raise ValueError(f"LIME mode must be 'fast', 'reference' or 'incremental', got {self.mode!r}")
        if not isinstance(self.overrides, Mapping):
            raise TypeError(f"LIME overrides must be a mapping of LimeConfig fields, got "
                            f"{type(self.overrides).__name__}")
        known = {f.name for f in dataclasses.fields(LimeConfig)}
        unknown = sorted(str(k) for k in self.overrides if k not in known)
        if unknown:
            raise ValueError(f"LIME overrides {unknown} are not LimeConfig fields; known: {', '.join(sorted(known))}")
        object.__setattr__(self, "overrides", dict(self.overrides))
        if not isinstance(self.recommended, bool):
            raise TypeError(f"LIME recommended must be a bool, got {self.recommended!r}")

    def lime_config(self, model: nn.Module) -> LimeConfig:
        """The :class:`~lime_attr.mitigation.LimeConfig` this decoding runs on ``model``."""
        start = LimeConfig.recommended if self.recommended else LimeConfig.for_model
        return start(model, **{"mode": self.mode, **self.overrides})


def lime_method_generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any],
                         config: LimeMethodConfig) -> GenerationResult:
    """LIME answers of a left-padded batch; ``details`` holds the per-token modality shares before and
    after the optimisation (``share_before``, ``share_after``) and where LIME changed the token
    (``changed``)."""
    return _result(lime_generate(model, processor, dict(inputs.items()), config.lime_config(model),
                                 **_generation_kwargs(config)))


@contextlib.contextmanager
def lime_method_session(model: nn.Module, processor: Any,
                        config: LimeMethodConfig) -> Iterator[Callable[[Mapping[str, Any]], GenerationResult]]:
    """The ``"lime"`` method's session: one :class:`~lime_attr.mitigation.session.LimeSession` (the LRP
    scope installed once); yields ``run(inputs)``, the answers :func:`lime_method_generate` gives."""
    with LimeSession(model, processor, config.lime_config(model)) as session:
        yield lambda inputs: _result(session.generate(dict(inputs.items()), **_generation_kwargs(config)))


def _generation_kwargs(config: LimeMethodConfig) -> dict:
    gen: dict[str, Any] = {"max_new_tokens": config.max_new_tokens}
    if config.do_sample:  # a new generator per call, seeded alike: the same draws as one call alone
        gen.update(config.generate_kwargs(), generator=torch.Generator().manual_seed(config.seed))
    return gen


def _result(res: LimeOutput) -> GenerationResult:
    details = {"share_before": res.share_before.tolist(), "share_after": res.share_after.tolist(),
               "changed": res.changed.tolist()}
    return GenerationResult([t.strip() for t in res.texts], [row.tolist() for row in res.tokens], details=details)


def _from_options(options: Mapping[str, Any]) -> LimeMethodConfig:
    names = {f.name for f in dataclasses.fields(LimeMethodConfig)}
    kw = {k: v for k, v in options.items() if k in names}
    for flat, name in (("lime_mode", "mode"), ("lime_overrides", "overrides")):
        if flat in options and name not in options:
            kw[name] = options[flat]
    return LimeMethodConfig(**kw)


LIME = register_decoding_method(DecodingMethod(
    "lime", LimeMethodConfig, lime_method_generate,
    description="LIME: relevance-guided key/value perturbation (Allouche and Keshet, 2026)",
    from_options=_from_options, session=lime_method_session))
