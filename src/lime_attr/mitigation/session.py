"""``LimeSession``: many LIME generations with the LRP scope installed once.

:func:`~lime_attr.mitigation.generate.lime_generate` enters the scope of its attribution (canonizer,
site discovery, rule plan, hooks, model-state check) at the first optimised token of every call and
leaves it at the end. On a small model that is a large part of a short answer's cost (about 0.5-0.7x
of a greedy answer on the demo models, ``docs/lime.rst``, "Sessions"). A session enters it once, with
the inner loop's attention implementation, frozen parameter flags and Delta transforms, and runs any
number of generations inside; on exit the model is restored exactly, as after ``lime_generate``.

Inside a session the prompt pass and the cached steps run with the scope installed. The scope changes
only the backward pass, so every generation's tokens and records are those ``lime_generate`` gives for
the same inputs and config (tested for every mode).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Optional

from torch import nn

from .config import LimeConfig
from .generate import GENERATION_KEYS, LimeOutput, checked_call, decode_loop, inner_engine, run_decode_loop

__all__ = ["LimeSession"]

log = logging.getLogger(__name__)

_PER_CALL_KEYS = tuple(k for k in GENERATION_KEYS if k != "attribution")


class LimeSession:
    """LIME generation for many inputs with one installation of the LRP scope.

    Parameters
    ----------
    model : PreTrainedModel
        As for :func:`~lime_attr.mitigation.generate.lime_generate`.
    processor : ProcessorMixin or PreTrainedTokenizerBase
        Decodes the answers and finds the perceptual spans.
    config : LimeConfig, optional
        One config for every generation of the session (default: the model's preset, as ``lime_generate``).
    attribution : LRP or ModalityAttribution, optional
        Its composite and canonizer are the session's rules (default ``LRP(model)``).

    Examples
    --------
    >>> from lime_attr.generation import prepare_inputs
    >>> from lime_attr.mitigation import LimeConfig, LimeSession
    >>> from lime_attr.models import load_builtin, prior_probe
    >>> model, processor = load_builtin("tones-qwen2audio", attn_implementation="eager")
    >>> items = prior_probe("tones-qwen2audio", "conflict", n=2, split="validation")
    >>> config = LimeConfig(mode="incremental", second_order="frozen", confidence_gate=None)
    >>> with LimeSession(model, processor, config) as session:
    ...     answers = [session.generate(prepare_inputs(model, processor, [it.prompt], audios=[it.audio],
    ...                                                sampling_rate=it.sampling_rate), max_new_tokens=1).texts[0]
    ...                for it in items]
    >>> len(answers)
    2
    """

    def __init__(self, model: nn.Module, processor: Any, config: Optional[LimeConfig] = None,
                 attribution: Any = None) -> None:
        self.model, self.processor = model, processor
        self.config, _ = checked_call(model, config, 0)
        self.optimizer = inner_engine(model, self.config, attribution)
        self._stack: Optional[contextlib.ExitStack] = None

    @property
    def active(self) -> bool:
        """Whether the session is entered (its scope installed)."""
        return self._stack is not None

    def __enter__(self) -> "LimeSession":
        if self._stack is not None:
            raise RuntimeError("this LimeSession is already entered; nest generations inside one `with` block")
        stack = contextlib.ExitStack()
        stack.enter_context(self.optimizer.session())
        self._stack = stack
        log.debug("LimeSession entered (mode=%s)", self.config.mode)
        return self

    def __exit__(self, *exc: Any) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def generate(self, inputs: Any, **generation_kwargs: Any) -> LimeOutput:
        """One generation, as ``lime_generate(model, processor, inputs, config, **generation_kwargs)``.

        Parameters
        ----------
        inputs : Mapping or Tensor
            The processor's output for one prompt or a left-padded batch.
        **generation_kwargs
            Those of ``lime_generate`` except ``attribution`` (the session's).

        Returns
        -------
        LimeOutput
        """
        if self._stack is None:
            raise RuntimeError("LimeSession.generate needs the session entered: `with LimeSession(model, processor, "
                               "config) as session: session.generate(inputs)`")
        if "attribution" in generation_kwargs:
            raise TypeError("LimeSession.generate takes no `attribution`: the session's is installed; pass it to "
                            "LimeSession(..., attribution=...)")
        unknown = sorted(set(generation_kwargs) - set(_PER_CALL_KEYS))
        if unknown:
            raise TypeError(f"LimeSession.generate got unexpected keyword argument(s) {unknown}; supported: "
                            f"{', '.join(_PER_CALL_KEYS)}")
        _, max_new = checked_call(self.model, self.config, generation_kwargs.get("max_new_tokens", 32))
        loop = decode_loop(self.model, self.processor, inputs, self.config, generation_kwargs, self.optimizer)
        return run_decode_loop(loop, max_new)
