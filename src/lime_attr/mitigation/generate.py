r"""``lime_generate``: decoding with LIME (one inner optimisation per generated token).

Per token: the unperturbed next-token logits come from an incremental KV-cache step (fast mode) or from
the first inner forward (reference mode, where the perturbation is still zero); the token to explain and
the token to emit are decoded with transformers' logits processors (repetition penalty, temperature,
top-k, top-p) and, when sampling, one Gumbel draw per token and row, shared by the unperturbed and the
perturbed distributions so that "did LIME change the token" is meaningful; the
:class:`~lime_attr.mitigation.optimizer.LimeOptimizer` runs the inner loop; the emitted token is appended
and every perturbation, optimiser state and graph is dropped.

In fast mode the LRP scope is entered at the first token that is optimised (not before the prompt pass):
the rules change only the backward pass, so the no-grad cached steps give the same logits outside it, and
a generation whose tokens are all gated never installs it. Pass ``attribution=`` to reuse one
attribution (and its scope's one-time op-coverage check) across calls, or run the calls in one
:class:`~lime_attr.mitigation.session.LimeSession` to install the scope once for all of them.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from .config import LimeConfig
from ..model_checks import check_autograd_mode, forward_error
from ..modality import split_inputs
from ..canonizers.facts import uses_mrope
from .attention import switch_attention
from .cache import cache_kwargs, output_cache
from .incremental import IncrementalOptimizer, KVCacheState
from .optimizer import LimeOptimizer, language_decoder
from ..strict_json import jsonable
from .records import TokenRecord

__all__ = ["lime_generate", "LimeOutput", "modality_positions", "check_sampling_params", "GENERATION_KEYS", "checked_call",
           "inner_engine", "decode_loop", "run_decode_loop", "prompt_embeddings", "prompt_inputs"]

log = logging.getLogger(__name__)

#: the generation arguments ``lime_generate`` takes
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "eos_token_id",
             "pad_token_id", "stop_strings", "generator", "modality_mask", "attribution", "callback",
             "record_events")


@dataclass
class LimeOutput:
    """Result of :func:`lime_generate`.

    Attributes
    ----------
    tokens : Tensor
        ``[batch, n]`` generated ids only (rows that stopped early are padded with ``pad_token_id``).
    texts : list of str
        Decoded answer per row (special tokens skipped).
    records : list of TokenRecord
        One per generated position: modality share before / after, losses per step, changed tokens...
    events : list or None
        The inner loop's step events (``record_events=True``).
    """

    tokens: Tensor
    texts: list
    records: list = field(default_factory=list)
    events: Optional[list] = None

    @property
    def text(self) -> Union[str, list]:
        """The answer (a string for one row, a list of strings for a batch)."""
        return self.texts[0] if len(self.texts) == 1 else list(self.texts)

    @property
    def changed(self) -> Tensor:
        """``[batch, n]`` bool: where LIME changed the emitted token."""
        if not self.records:
            return torch.zeros(self.tokens.shape, dtype=torch.bool)
        return torch.tensor([r.changed for r in self.records], dtype=torch.bool).T

    @property
    def share_before(self) -> Tensor:
        """``[batch, n]`` perceptual share of relevance without the perturbation (nan where not computed)."""
        return torch.tensor([r.share_before for r in self.records], dtype=torch.float64).T

    @property
    def share_after(self) -> Tensor:
        """``[batch, n]`` perceptual share under the last perturbation whose relevance was computed."""
        return torch.tensor([r.share_after for r in self.records], dtype=torch.float64).T

    def to_dict(self) -> dict:
        """Strict-JSON form: tokens, texts and every token's record (step records included; NaN as null)."""
        return {"tokens": self.tokens.tolist(), "texts": list(self.texts),
                "records": [r.to_dict() for r in self.records],
                "events": None if self.events is None else jsonable(self.events)}


def check_sampling_params(top_k: Any = None, top_p: Any = None, repetition_penalty: Any = None,
                          temperature: Any = None) -> None:
    """Refuse sampling parameters outside their range (``top_k >= 1``, ``0 < top_p <= 1``, penalty and
    temperature finite and > 0).

    Raises
    ------
    ValueError
        Naming the parameter, its value and the valid range.
    """
    for name, value in (("temperature", temperature), ("repetition_penalty", repetition_penalty)):
        if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (or None for no top-k filter), got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 < float(top_p) <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] (or None for no nucleus filter), got {top_p!r}")


class _Decoder:
    """Processors + greedy / fixed-noise sampling; ``pick(logits) -> ids`` for the current token."""

    def __init__(self, do_sample: bool, temperature: float, top_k: Optional[int], top_p: Optional[float],
                 repetition_penalty: Optional[float], generator: Optional[torch.Generator]) -> None:
        check_sampling_params(top_k, top_p, repetition_penalty, temperature if do_sample else None)
        procs = LogitsProcessorList()
        if repetition_penalty is not None and repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        if do_sample:
            if temperature is None or temperature <= 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r}")
            if temperature != 1.0:
                procs.append(TemperatureLogitsWarper(temperature))
            if top_k:
                procs.append(TopKLogitsWarper(int(top_k)))
            if top_p is not None and top_p < 1.0:
                procs.append(TopPLogitsWarper(float(top_p)))
        self.procs = procs
        self.do_sample = do_sample
        self.generator = generator
        self.ids: Optional[Tensor] = None
        self.noise: Optional[Tensor] = None

    def new_token(self, ids: Tensor, vocab: int) -> None:
        self.ids = ids
        if self.do_sample:
            u = torch.rand((ids.shape[0], vocab), generator=self.generator, dtype=torch.float64)
            u = u.to(ids.device)
            self.noise = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12))).float()

    def scores(self, logits: Tensor) -> Tensor:
        return self.procs(self.ids.to(logits.device), logits.float().clone())

    def __call__(self, logits: Tensor) -> Tensor:
        s = self.scores(logits)
        if self.do_sample:
            s = s + self.noise.to(s.device)
        return s.argmax(-1)


def checked_call(model: nn.Module, config: Optional[LimeConfig], max_new: Any) -> tuple[LimeConfig, int]:
    """``lime_generate``'s checks before any forward: autograd mode, the config and ``max_new_tokens``.

    Parameters
    ----------
    model : nn.Module
    config : LimeConfig or None
        None: the model's preset (``LimeConfig()`` for a family without one).
    max_new : int

    Returns
    -------
    tuple
        ``(config, max_new)``, validated.
    """
    check_autograd_mode("lime_generate")
    if config is not None and not isinstance(config, LimeConfig):
        raise TypeError(f"config must be a LimeConfig (or None for the model's preset), got {type(config).__name__}; "
                        "e.g. LimeConfig(steps=7, lr=3e-4)")
    if config is None:
        from .config import PRESETS

        mt = getattr(getattr(model, "config", None), "model_type", None)
        config = LimeConfig.for_model(mt) if mt in PRESETS else LimeConfig()
    config.validate()
    if isinstance(max_new, bool) or not isinstance(max_new, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new!r}")
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
    return config, int(max_new)


def _check_multimodal_inputs(model: nn.Module, processor: Any, inp: dict, ids: Tensor, mask: Tensor) -> None:
    """The shared perceptual-input check (:func:`lime_attr.modality.check_perceptual_inputs`); a model without
    a modality spec (a text-only LM) gets the finiteness check only."""
    from ..modality import check_finite_inputs, check_perceptual_inputs, find_spans, modality_spec

    try:
        spec = modality_spec(model, processor)
    except ValueError:
        check_finite_inputs(inp, "lime_generate")
        return
    check_perceptual_inputs(spec, find_spans(ids, spec, mask), inp, "lime_generate", getattr(model, "config", None))


def modality_positions(model: nn.Module, processor: Any, input_ids: Tensor, attention_mask: Tensor,
                       modality_mask: Any = None) -> Tensor:
    """``[B, S]`` bool mask of the perceptual positions M.

    ``modality_mask`` may be a bool tensor ``[B, S]`` / ``[S]``, one ``(start, end)`` span (end
    exclusive) for every row, or a list of spans per row. By default the spans come from
    :mod:`lime_attr.modality` (image / video / audio placeholders and markers of the model family).
    """
    B, S = input_ids.shape
    if modality_mask is None:
        from ..modality import PERCEPTUAL, find_spans, modality_spec

        spec = modality_spec(model, processor)
        spans = find_spans(input_ids, spec, attention_mask)
        m = torch.zeros(B, S, dtype=torch.bool)
        for b, row in enumerate(spans):
            for kind in PERCEPTUAL:
                for s, e in row.get(kind, []):
                    m[b, s:e] = True
    elif isinstance(modality_mask, Tensor):
        m = modality_mask.bool().cpu()
        m = m[None].expand(B, -1) if m.dim() == 1 else m
        if tuple(m.shape) != (B, S):
            raise ValueError(f"modality_mask has shape {tuple(modality_mask.shape)}, expected [{B}, {S}] (or [{S}])")
    else:
        spans = modality_mask
        if isinstance(spans, tuple) and len(spans) == 2 and all(isinstance(x, int) for x in spans):
            spans = [[spans]] * B
        elif spans and isinstance(spans[0], tuple):
            spans = [list(spans)] * B
        if len(spans) != B:
            raise ValueError(f"modality_mask: {len(spans)} rows of spans for a batch of {B}")
        m = torch.zeros(B, S, dtype=torch.bool)
        for b, row in enumerate(spans):
            for s, e in row:
                if not (0 <= s < e <= S):
                    raise ValueError(f"modality span ({s}, {e}) is empty or outside the sequence of length {S}")
                m[b, s:e] = True
    m = m & attention_mask.bool().cpu()
    empty = (~m.any(-1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"the modality span is empty for batch row(s) {empty}: LIME needs the positions of the "
                         "image / audio tokens (pass the processor's output for a prompt with an image or audio, or "
                         "modality_mask=(start, end))")
    return m


def _ids_list(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, Tensor):
        return x.flatten().tolist()
    if isinstance(x, int):
        return [x]
    return list(x)


def _accepts(model: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def lime_generate(model: nn.Module, processor: Any, inputs: Any, config: Optional[LimeConfig] = None,
                  **generation_kwargs: Any) -> LimeOutput:
    r"""Generate with LIME.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM or an image/audio-text model whose language model takes ``inputs_embeds``.
    processor : ProcessorMixin or PreTrainedTokenizerBase
        Used to decode the answer, to find the perceptual spans, and for stop strings.
    inputs : Mapping
        The processor's output (``input_ids``, ``attention_mask``, ``pixel_values``...). Batches must be
        left-padded.
    config : LimeConfig, optional
        Default: :meth:`~lime_attr.mitigation.config.LimeConfig.for_model` when a preset exists, else ``LimeConfig()``.
    **generation_kwargs
        ``max_new_tokens`` (32), ``do_sample`` (False), ``temperature``, ``top_k``, ``top_p``,
        ``repetition_penalty``, ``eos_token_id`` / ``pad_token_id`` (default: the model's generation
        config), ``stop_strings``, ``generator`` (a ``torch.Generator`` for sampling),
        ``modality_mask`` (see :func:`modality_positions`), ``attribution`` (default ``LRP(model)``),
        ``callback`` (called with each :class:`TokenRecord`), ``record_events``.

    Returns
    -------
    LimeOutput
    """
    unknown = sorted(set(generation_kwargs) - set(GENERATION_KEYS))
    if unknown:
        raise TypeError(f"lime_generate got unexpected keyword argument(s) {unknown}; supported: "
                        f"{', '.join(GENERATION_KEYS)}")
    config, max_new = checked_call(model, config, generation_kwargs.get("max_new_tokens", 32))
    return run_decode_loop(decode_loop(model, processor, inputs, config, generation_kwargs), max_new)


def inner_engine(model: nn.Module, config: LimeConfig, attribution: Any = None) -> Any:
    """The inner-loop engine of ``config.mode``: :class:`IncrementalOptimizer` for ``"incremental"``, else
    :class:`LimeOptimizer`, on ``attribution`` (default ``LRP(model)``)."""
    if attribution is None:
        from ..attribution import LRP

        attribution = LRP(model)
    engine = IncrementalOptimizer if config.mode == "incremental" else LimeOptimizer
    return engine(attribution, config)


def decode_loop(model: nn.Module, processor: Any, inputs: Any, config: LimeConfig, generation_kwargs: dict,
                optimizer: Any = None) -> Any:
    """The decode loop of ``config.mode`` for one call, its inputs checked.

    Parameters
    ----------
    model, processor, inputs, config
        As for :func:`lime_generate` (``config`` validated).
    generation_kwargs : dict
        :data:`GENERATION_KEYS` only.
    optimizer : LimeOptimizer or IncrementalOptimizer, optional
        An inner-loop engine to use instead of a new :func:`inner_engine` (a
        :class:`~lime_attr.mitigation.session.LimeSession`'s, already in session).

    Returns
    -------
    object
        The loop (the prompt pass, one inner optimisation per token, the cache, stopping, records); run it
        with :func:`run_decode_loop`.
    """
    loop_class = _IncrementalLoop if config.mode == "incremental" else _DecodeLoop
    return loop_class(model, processor, inputs, config, generation_kwargs, optimizer)


def run_decode_loop(loop: Any, max_new: int) -> LimeOutput:
    """Run a decode loop for up to ``max_new`` tokens (no grad outside the inner loop).

    Parameters
    ----------
    loop : object
        From :func:`decode_loop`.
    max_new : int

    Returns
    -------
    LimeOutput
    """
    model, config = loop.model, loop.config
    with contextlib.ExitStack() as stack, torch.no_grad():
        # The attention implementation is switched for the whole generation (the unperturbed logits must come
        # from the same kernel as the inner forwards). The LRP scope is entered lazily, at the first token that
        # is optimised: it changes the backward pass only, so the no-grad prompt pass and cached steps before it
        # compute the same numbers outside it, and a generation whose tokens are all gated never installs it.
        if not loop.lime.in_session:  # a LimeSession's engine switched it before installing its scope
            stack.callback(switch_attention(model, config.attn_implementation))
        loop.stack = stack
        if loop.session_up_front and max_new > 0:
            loop.enter_session()  # reference mode (and kv_cache=False): every token runs the inner loop
        loop.prompt_pass()
        for t in range(max_new):
            new = loop.next_token(t)
            loop.append(new)
            if bool(loop.finished.all()) or t == max_new - 1:
                break
            loop.advance()
    loop.cache = None
    return loop.output()


class _DecodeLoop:
    """LIME's decode loop: the prompt pass, one inner optimisation per token, the KV cache, stopping, records."""

    def __init__(self, model: nn.Module, processor: Any, inputs: Any, config: LimeConfig, g: dict,
                 optimizer: Any = None) -> None:
        self.model, self.config = model, config
        self.tok = getattr(processor, "tokenizer", processor)
        self.eos, self.pad, self.stop_strings = _stopping(model, self.tok, g)
        self.decoder = _Decoder(bool(g.get("do_sample", False)), 1.0 if g.get("temperature") is None else g["temperature"],
                                g.get("top_k"), g.get("top_p"), g.get("repetition_penalty"), g.get("generator"))
        inp, ids, mask = split_inputs({"input_ids": inputs} if isinstance(inputs, Tensor) else inputs, "lime_generate")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding (the last position of a row is padding); set "
                             "tokenizer.padding_side = 'left'")
        _check_multimodal_inputs(model, processor, inp, ids, mask)
        self.inp, self.ids, self.mask = inp, ids, mask
        self.modality = modality_positions(model, processor, ids, mask, g.get("modality_mask")).to(ids.device)
        self.lime = optimizer if optimizer is not None else inner_engine(model, config, g.get("attribution"))
        self.events: Optional[list] = [] if g.get("record_events") else None
        self.lime.events = self.events
        self.callback: Optional[Callable] = g.get("callback")
        self.fast_cache = config.mode == "fast" and config.kv_cache
        self.gate = config.gate if self.fast_cache else None
        self.keep1 = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        self.records: list[TokenRecord] = []
        self.out_tokens: list[list[int]] = []
        self.finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.stack: Any = None
        self.in_session = self.refeed = False
        self.cache: Any = None
        self.ref_logits: Optional[Tensor] = None

    session_up_front = property(lambda self: not self.fast_cache, doc="Enter the LRP scope before the prompt pass.")

    def advance(self) -> None:
        """After a token is appended: the next position's unperturbed logits (fast mode's cached step; the
        prompt's forward with it when :meth:`prompt_pass` deferred it)."""
        if self.fast_cache:
            if self.cache is None:
                self.deferred_prompt_step()
            else:
                self.cached_step()

    def enter_session(self) -> None:
        if not self.in_session:
            self.stack.enter_context(self.lime.session())
            self.in_session = True

    @property
    def defers_prompt(self) -> bool:
        """Whether nothing needs the prompt's own forward before the first token's inner loop: no KV cache
        (reference mode, ``kv_cache=False``), or a cache with no confidence gate, no emission over the cache and
        at least one update (the first inner forward, at Delta = 0, gives the unperturbed logits)."""
        cfg = self.config
        return not self.fast_cache or (self.gate is None and cfg.emit_from != "cached" and cfg.schedule[0] > 0)

    def prompt_pass(self) -> None:
        """The language model's input embeddings and positions; with the KV cache and unless
        :attr:`defers_prompt`, one no-grad forward of the prompt for the cache and the unperturbed logits."""
        model, ids, mask = self.model, self.ids, self.mask
        pos2d = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        given = None if uses_mrope(model) else pos2d
        if self.defers_prompt:
            embeds, positions = prompt_inputs(model, ids, mask, given, self.inp)
            self.vocab = int(model.get_output_embeddings().weight.shape[0])
        else:
            embeds, positions, out = self._prompt_forward(given)
            self.cache, self.ref_logits = output_cache(out), out.logits[:, -1, :].float()
            self.vocab = int(out.logits.shape[-1])
        self.positions = (pos2d if positions is None or positions.dim() != 3 else positions).detach()
        self.embeds, self.all_ids = embeds.detach(), ids

    def _prompt_forward(self, positions: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Any]:
        """One no-grad forward of the prompt with the cache: ``(embeds, position_ids, output)``, the language
        model's inputs taken by a pre-hook."""
        model, ids, mask = self.model, self.ids, self.mask
        captured: dict[str, Any] = {}

        def capture(module: nn.Module, args: tuple, kw: dict) -> None:
            if "embeds" not in captured:
                captured["embeds"], captured["position_ids"] = kw.get("inputs_embeds"), kw.get("position_ids")

        handle = language_decoder(model).register_forward_pre_hook(capture, with_kwargs=True)
        try:
            kwargs = self.inp if positions is None else {**self.inp, "position_ids": positions}
            out = model(input_ids=ids, attention_mask=mask, use_cache=True, **self.keep1, **kwargs)
        except Exception as exc:  # noqa: BLE001 - re-raised with the context (lime_attr's own errors unchanged)
            raise forward_error(exc, "lime_generate: the model's forward failed on these inputs (are they this "
                                     "model's processor output?)") from exc
        finally:
            handle.remove()
        embeds = captured.get("embeds")
        embeds = model.get_input_embeddings()(ids) if embeds is None else embeds
        if embeds.shape[1] != ids.shape[1]:
            raise ValueError(f"the language model received {embeds.shape[1]} positions for {ids.shape[1]} input ids: "
                             "the model expands its features inside the forward; expand the placeholders in the processor")
        return embeds, captured.get("position_ids"), out

    def deferred_prompt_step(self) -> None:
        """The prompt's deferred forward, with the first emitted token: one no-grad forward of the language
        model on the input embeddings of all positions so far, filling the cache (the next position's
        unperturbed logits)."""
        o = self.model(inputs_embeds=self.embeds, attention_mask=self.mask, position_ids=self.positions,
                       use_cache=True, **self.keep1)
        self.cache = output_cache(o)
        self.ref_logits = o.logits[:, -1, :].float()

    def next_token(self, t: int) -> Tensor:
        """Decode token ``t`` of every row: gated (emitted from the unperturbed logits) or optimised."""
        self.decoder.new_token(self.all_ids, self.vocab)
        active, skipped, reason = ~self.finished, None, None
        if self.gate is not None and self.ref_logits is not None:
            conf = torch.softmax(self.decoder.scores(self.ref_logits), -1).max(-1).values
            active = active & (conf < self.gate)
            if not bool(active.any()):
                skipped = "confidence"
                reason = f"top probability {float(conf.min()):.4g} >= confidence_gate {self.gate}"
        if skipped is not None or (self.config.schedule[0] == 0 and self.ref_logits is not None):
            emit = ref = self.ref_logits
            nan = [float("nan")] * self.ids.shape[0]
            rec = TokenRecord(index=t, share_before=list(nan), share_after=list(nan), focus_before=list(nan),
                              focus_after=list(nan), skipped=skipped or "steps=0", skip_reason=reason)
            if self.events is not None:
                self.events.append(("emit", "unperturbed"))
        else:
            self.enter_session()
            model_kwargs = {"attention_mask": self.mask, "position_ids": self.positions, "use_cache": False,
                            **self.keep1}
            with torch.enable_grad():
                emit, ref, rec = self.lime.optimize(self.embeds, model_kwargs, _modality_full(self.modality, self.mask),
                                                    self.mask.bool(), self.decoder, ref_logits=self.ref_logits,
                                                    active=active, index=t, emit_fn=self._emit_fn())
        return self.finish_token(emit, ref, rec)

    def finish_token(self, emit: Tensor, ref: Tensor, rec: TokenRecord) -> Tensor:
        """The emitted and the unperturbed token from their logits; the token's record completed and kept."""
        new, base = self.decoder(emit), self.decoder(ref)
        new = torch.where(self.finished, torch.full_like(new, self.pad), new)
        rec.tokens, rec.unperturbed_tokens = new.tolist(), base.tolist()
        rec.changed = ((new != base) & ~self.finished).tolist()
        self.records.append(rec)
        if self.callback is not None:
            self.callback(rec)
        return new

    def _emit_fn(self) -> Optional[Callable[[], Tensor]]:
        """For ``emit="cached"``: the last position recomputed over the cache, with the final Delta on K/V."""
        if not (self.fast_cache and self.config.emit_from == "cached"):
            return None
        last, m, p, cache = self.all_ids[:, -1:], self.mask, self.positions, self.cache

        def emit_fn() -> Tensor:
            cache.crop(-1)
            o = self.model(input_ids=last, attention_mask=m, use_cache=True, position_ids=p[..., -1:], **self.keep1,
                           **cache_kwargs(cache))
            cache.crop(-1)  # drop its perturbed K/V again: the next cached step re-feeds it
            self.refeed = True
            return o.logits[:, -1, :]

        return emit_fn

    def append(self, new: Tensor) -> None:
        """Append the emitted tokens; rows that emitted EOS or a stop string are finished."""
        self.out_tokens.append(new.tolist())
        for b in range(new.shape[0]):
            if not self.finished[b] and int(new[b]) in self.eos:
                self.finished[b] = True
        if self.stop_strings:
            for b in range(new.shape[0]):
                if not self.finished[b]:
                    text = self.tok.decode([row[b] for row in self.out_tokens], skip_special_tokens=True)
                    if any(s in text for s in self.stop_strings):
                        self.finished[b] = True
        self.all_ids = torch.cat([self.all_ids, new[:, None]], 1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        emb = self.model.get_input_embeddings()(new[:, None]).detach().to(self.embeds.dtype)
        self.embeds = torch.cat([self.embeds, emb], 1)
        self.modality = torch.cat([self.modality, torch.zeros_like(self.modality[:, :1])], 1)
        self.positions = torch.cat([self.positions, self.positions[..., -1:] + 1], -1)

    def cached_step(self) -> None:
        """The unperturbed logits of the next position from one incremental step over the KV cache."""
        n_feed = 2 if self.refeed else 1
        self.refeed = False
        # positions of the new tokens: 2-D from the mask, or the model's own 3-D (M-RoPE) positions of the
        # prompt continued by +1 per text token (what Qwen2-VL computes for text after the prompt)
        o = self.model(input_ids=self.all_ids[:, -n_feed:], attention_mask=self.mask, use_cache=True,
                       position_ids=self.positions[..., -n_feed:], **self.keep1, **cache_kwargs(self.cache))
        self.cache = output_cache(o)
        self.ref_logits = o.logits[:, -1, :].float()

    def output(self) -> LimeOutput:
        B, device = self.ids.shape[0], self.ids.device
        tokens = (torch.tensor(self.out_tokens, dtype=torch.long, device=device).T.contiguous() if self.out_tokens
                  else torch.zeros(B, 0, dtype=torch.long, device=device))
        texts = [self.tok.decode(tokens[b].tolist(), skip_special_tokens=True) if self.tok is not None else ""
                 for b in range(B)]
        return LimeOutput(tokens=tokens, texts=texts, records=self.records, events=self.events)


class _IncrementalLoop(_DecodeLoop):
    """The decode loop of ``mode="incremental"``: the prompt but its last position fills the KV cache; then
    every token is one :meth:`IncrementalOptimizer.step` of the last position over the cache, which also
    appends that position's unperturbed keys / values."""

    session_up_front = False  # entered at the first optimised token (never with steps = 0)

    def advance(self) -> None:
        """Nothing to compute: the token's step already appended its position to the cache."""

    def prompt_pass(self) -> None:
        """The language model's input embeddings of the prompt (its perceptual encoders run, no grad); with
        ``prompt_pass="separate"`` a no-grad forward of all positions but the last fills the cache, with
        ``"fused"`` the cache stays empty: the first token's first inner forward computes the whole prompt and
        fills it."""
        model, ids, mask = self.model, self.ids, self.mask
        if uses_mrope(model):
            raise ValueError("LIME mode='incremental' does not support M-RoPE models (the Qwen2-VL family) yet; use "
                             "mode='fast'")
        if bool(self.modality[:, -1].any()):
            raise ValueError("LIME mode='incremental': the prompt's last position is perceptual; end the prompt with "
                             "text (the current query is the last prompt token)")
        self.positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.vocab = int(model.get_output_embeddings().weight.shape[0])
        self.all_ids, self.kv = ids, KVCacheState([])
        self.embeds = prompt_embeddings(model, ids, mask, self.positions, self.inp).detach()
        self.whole_prompt = self.config.prompt_pass == "fused" or ids.shape[1] == 1
        if not self.whole_prompt:
            out = model(inputs_embeds=self.embeds[:, :-1], attention_mask=mask[:, :-1],
                        position_ids=self.positions[:, :-1], use_cache=True, **self.keep1)
            self.kv = KVCacheState.from_cache(output_cache(out))

    def next_token(self, t: int) -> Tensor:
        """Token ``t`` of every row: one incremental LIME step of the last position (every token optimised)."""
        self.decoder.new_token(self.all_ids, self.vocab)
        if self.config.schedule[0] > 0:
            self.enter_session()
        n = self.embeds.shape[1] if self.whole_prompt else 1
        model_kwargs = {"attention_mask": self.mask, "position_ids": self.positions[:, -n:], "use_cache": True,
                        **self.keep1}
        self.whole_prompt = False
        with torch.enable_grad():
            emit, ref, self.next_kv, rec = self.lime.step(self.kv, self.embeds[:, -n:], model_kwargs,
                                                          _modality_full(self.modality, self.mask), self.mask.bool(),
                                                          self.decoder, active=~self.finished, index=t)
        return self.finish_token(emit, ref, rec)

    def append(self, new: Tensor) -> None:
        super().append(new)
        self.kv = self.next_kv


class _Embedded(Exception):
    """Raised by :func:`prompt_inputs`' hook: the language model's input embeddings, its forward skipped."""

    def __init__(self, embeds: Optional[Tensor], positions: Optional[Tensor]) -> None:
        super().__init__("prompt embeddings captured")
        self.embeds, self.positions = embeds, positions


def prompt_inputs(model: nn.Module, ids: Tensor, mask: Tensor, positions: Optional[Tensor],
                  inputs: dict) -> tuple[Tensor, Optional[Tensor]]:
    """What the language model receives as ``inputs_embeds`` and ``position_ids`` for this prompt, without
    running it.

    The model's own forward runs up to its language model (image / audio features merged, M-RoPE positions
    computed by its own code); a forward pre-hook on the language model takes its inputs and stops the call.

    Parameters
    ----------
    model : PreTrainedModel
    ids, mask : Tensor
        ``[B, S]`` input ids and attention mask.
    positions : Tensor or None
        ``[B, S]`` position ids to pass; ``None`` lets the model compute its own (M-RoPE).
    inputs : dict
        The processor's other outputs (``pixel_values``, ``input_features``...).

    Returns
    -------
    embeds : Tensor
        ``[B, S, D]``.
    position_ids : Tensor or None
        The ``position_ids`` the language model received (``None`` if it received none).
    """

    def stop(module: nn.Module, args: tuple, kw: dict) -> None:
        raise _Embedded(kw.get("inputs_embeds"), kw.get("position_ids"))

    embeds = received = None
    kwargs = inputs if positions is None else {**inputs, "position_ids": positions}
    handle = language_decoder(model).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
    except _Embedded as done:
        embeds, received = done.embeds, done.positions
    except Exception as exc:  # noqa: BLE001 - re-raised with the context
        raise forward_error(exc, "lime_generate: the model's forward failed on these inputs (are they this "
                                 "model's processor output?)") from exc
    finally:
        handle.remove()
    embeds = model.get_input_embeddings()(ids) if embeds is None else embeds
    if embeds.shape[:2] != ids.shape:
        raise ValueError(f"the language model received {embeds.shape[1]} positions for {ids.shape[1]} input ids: "
                         "the model expands its features inside the forward; expand the placeholders in the processor")
    return embeds, received


def prompt_embeddings(model: nn.Module, ids: Tensor, mask: Tensor, positions: Tensor, inputs: dict) -> Tensor:
    """What the language model receives as ``inputs_embeds`` for this prompt, without running it
    (:func:`prompt_inputs`' embeddings).

    Parameters
    ----------
    model : PreTrainedModel
    ids, mask, positions : Tensor
        ``[B, S]`` input ids, attention mask and position ids.
    inputs : dict
        The processor's other outputs (``pixel_values``, ``input_features``...).

    Returns
    -------
    Tensor
        ``[B, S, D]``.
    """
    return prompt_inputs(model, ids, mask, positions, inputs)[0]


def _stopping(model: nn.Module, tok: Any, g: dict) -> tuple[set, int, list]:
    """``(eos ids, pad id, stop strings)`` from the call's arguments and the model's generation config."""
    gen_cfg = getattr(model, "generation_config", None)
    eos = set(_ids_list(g.get("eos_token_id", getattr(gen_cfg, "eos_token_id", None))))
    pad = g.get("pad_token_id", getattr(gen_cfg, "pad_token_id", None))
    if pad is None:
        pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = min(eos) if eos else 0
    stop_strings = g.get("stop_strings") or []
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if stop_strings and tok is None:
        raise ValueError("stop_strings need a processor / tokenizer to decode the answer")
    return eos, pad, stop_strings


def _modality_full(modality: Tensor, mask: Tensor) -> Tensor:
    return modality.bool() & mask.bool()
