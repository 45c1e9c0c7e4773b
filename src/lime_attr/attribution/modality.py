"""``ModalityAttribution``: how much of a multimodal LLM's answer rests on the image / audio, and where.

One forward and one backward pass (per explained token in ``mode="per_token"``) inside an LRP scope:

1. the model runs on the processor's output (``input_ids`` + ``pixel_values`` / ``input_features``...)
   exactly as usual; a forward pre-hook on its *language model* captures the ``inputs_embeds`` it
   receives -- the text embeddings with the image / audio features already scattered in by the model's
   own code (``get_image_features`` + ``get_placeholder_mask`` + ``masked_scatter`` in LLaVA and
   Qwen2-VL, the audio merge in Qwen2-Audio). Nothing of the merge is re-implemented, so it stays exact
   for every family whose language model takes ``inputs_embeds`` (Qwen2-VL's 3-D rope positions are
   computed by the model too);
2. the perceptual inputs (``pixel_values``, ``input_features``) are made to require grad, so the
   same backward pass also carries relevance through the projector and the vision / audio tower down
   to patches and pixels (or mel frames);
3. relevance of a position is ``sum_d x_d * g_d`` at the captured embeddings (``g`` = rule-modified
   gradient of the explained logit), the quantity LIME's objective uses (reference/lime-method.md).

Inside the perceptual encoder (every sibling of the language model: vision tower, projector, audio
tower) the *vision composite* applies, by default CP-LRP (attention weights constant): it is
conservative -- with zero biases and zero position / class embeddings the relevance that reaches the
image tokens arrives at the pixels without loss, which the tests check in float64 (to 1e-9 relative;
1e-6 for Qwen2.5-VL, whose RMSNorm computes in float32) -- and it is the rule Ali et al. (2022) found best on
vision transformers, where AttnLRP's softmax rule needs a tuned gamma on the patch embedding to avoid
noisy heatmaps. The language model keeps ``composite`` (AttnLRP by default).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from captum.attr import Attribution
from torch import Tensor, nn

from ..canonizers.facts import find_language_model
from ..composites import Composite, get_composite, matcher_matches
from ..modality import (PERCEPTUAL, ModalitySpec, check_perceptual_inputs, find_spans, modality_share, modality_spec,
                        span_mask, split_inputs, split_pixel_relevance)
from ..model_checks import check_autograd_mode, forward_error
from ..scope import LRPScope
from .checks import normalize_target
from .engine import relevance

__all__ = ["ModalityAttribution", "ModalityResult", "Heatmap", "EmbeddingCapture", "combined_composite"]

log = logging.getLogger(__name__)

Span = tuple[int, int]
KINDS = ("image", "video", "audio", "text", "generated")
_PERCEPTUAL_INPUTS = ("pixel_values", "pixel_values_videos", "input_features")


# ----------------------------------------------------------------------------------------------- results


@dataclass
class Heatmap:
    """Relevance of one image or audio clip, carried down to the perceptual input.

    Attributes
    ----------
    kind : str
        ``"image"``, ``"video"`` or ``"audio"``.
    row : int
        Batch row of the prompt this item belongs to.
    span : tuple of int
        Its span in the language model's sequence (markers included for Qwen families).
    relevance : Tensor
        Image: ``[H, W]`` pixel relevance (summed over colour channels, and over time for Qwen2-VL's
        temporal patches). Audio: ``[frames]`` relevance per mel frame (summed over mel bins),
        padding frames removed.
    patches : Tensor or None
        Image: ``[h, w]`` relevance per vision patch (``relevance`` summed over each patch). Audio:
        None.
    token_relevance : Tensor
        Relevance of the language-model positions that received this item's features (placeholder
        positions, markers excluded), in order.
    raw : Tensor
        Relevance at the perceptual input in the input's own layout (``[C, H, W]`` for LLaVA, the
        flattened ``[patches, C*T*P*P]`` block for Qwen2-VL, ``[mel, frames]`` for audio).
    seconds_per_frame : float or None
        Audio: duration of one mel frame.
    input : numpy.ndarray or None
        What was explained, for plotting: an image as ``[H, W, C]`` floats in [0, 1] (un-normalised with
        the processor's mean / std when known; LLaVA-style ``[C, H, W]`` inputs only), or the audio's
        log-mel features ``[mel, frames]``.
    """

    kind: str
    row: int
    span: Span
    relevance: Tensor
    patches: Optional[Tensor]
    token_relevance: Tensor
    raw: Tensor
    seconds_per_frame: Optional[float] = None
    input: Any = None

    @property
    def total(self) -> float:
        """Sum of the relevance at the perceptual input."""
        return float(self.relevance.detach().sum())

    @property
    def times(self) -> Optional[Tensor]:
        """For audio, the start time (s) of each frame of ``relevance`` (None for images)."""
        if self.seconds_per_frame is None:
            return None
        return torch.arange(self.relevance.shape[-1], dtype=torch.float64) * self.seconds_per_frame

    @property
    def token_times(self) -> Optional[Tensor]:
        """For audio, the start time (s) of each audio token (frames shared out evenly over the tokens)."""
        if self.seconds_per_frame is None:
            return None
        n = max(self.token_relevance.shape[-1], 1)
        dur = self.relevance.shape[-1] * self.seconds_per_frame
        return torch.arange(n, dtype=torch.float64) * (dur / n)

    def __repr__(self) -> str:
        shape = tuple(self.relevance.shape)
        return (f"Heatmap({self.kind}, row={self.row}, span={self.span}, relevance{list(shape)}, "
                f"total={self.total:.4g}, tokens={float(self.token_relevance.detach().sum()):.4g})")


@dataclass
class ModalityResult:
    """What :meth:`ModalityAttribution.attribute` returns.

    Attributes
    ----------
    token_relevance : Tensor
        ``[batch, seq]`` relevance of each position of the language model's input (summed over the
        hidden dimension; summed over the answer's tokens when several were explained). Padding
        positions are 0.
    spans : list of dict
        One dict per batch row: ``{"image" | "video" | "audio" | "text" | "generated": [(start, end), ...]}``,
        ``end`` exclusive. ``"generated"``: answer tokens appended to explain later answer tokens.
        Padding belongs to no span.
    target_ids : Tensor
        ``[batch, n]`` explained token ids (``n`` = 1 for a single token).
    logit : Tensor
        ``[batch, n]`` explained logits.
    heatmaps : list of list of Heatmap
        Per batch row, one :class:`Heatmap` per image / audio clip, in prompt order.
    per_token_relevance : Tensor or None
        ``[batch, n, seq]`` in ``mode="per_token"``: the relevance of each answer token separately.
    input_ids, attention_mask : Tensor
        The sequence that was explained (answer tokens appended).
    """

    token_relevance: Tensor
    spans: list
    target_ids: Tensor
    logit: Tensor
    heatmaps: list
    input_ids: Tensor
    attention_mask: Tensor
    per_token_relevance: Optional[Tensor] = None
    mode: str = "sum"
    composite: str = ""
    vision_composite: str = ""
    tokenizer: Any = field(default=None, repr=False)

    # -- totals and shares
    def _kind_sum(self, kind: str, absolute: bool) -> Tensor:
        rel = self.token_relevance.abs() if absolute else self.token_relevance
        out = []
        for b, spans in enumerate(self.spans):
            m = span_mask(spans.get(kind, []), rel.shape[1], rel.device)
            out.append(rel[b][m].sum())
        return torch.stack(out)

    @property
    def kinds(self) -> list[str]:
        """Span kinds present in at least one row, in a fixed order."""
        present = {k for s in self.spans for k, v in s.items() if v}
        return [k for k in KINDS if k in present]

    @property
    def totals(self) -> dict[str, Tensor]:
        """The signed relevance per kind, ``{kind: Tensor[batch]}`` (``sum_{i in kind} R_i``)."""
        return {k: self._kind_sum(k, False) for k in self.kinds}

    @property
    def totals_abs(self) -> dict[str, Tensor]:
        """The absolute relevance per kind, ``{kind: Tensor[batch]}`` (``sum_{i in kind} |R_i|``)."""
        return {k: self._kind_sum(k, True) for k in self.kinds}

    @property
    def total(self) -> Tensor:
        """``[batch]`` signed relevance over all non-padding positions (the explained logit minus what
        biases and non-conservative rules absorb)."""
        return sum(self.totals.values())

    def _shares(self, signed: bool) -> dict[str, Tensor]:
        rel, kinds = self.token_relevance, self.kinds
        out = {}
        for k in kinds:
            rows = []
            for spans in self.spans:
                inside = span_mask(spans.get(k, []), rel.shape[1], rel.device)
                valid = span_mask([sp for kk in kinds for sp in spans.get(kk, [])], rel.shape[1], rel.device)
                rows.append((inside, valid))
            inside = torch.stack([m for m, _ in rows])
            valid = torch.stack([v for _, v in rows])
            out[k] = modality_share(rel, inside, valid, signed=signed, eps=0.0)
        return out

    @property
    def shares(self) -> dict[str, Tensor]:
        """Signed shares ``sum_{i in kind} R_i / sum_i R_i`` (:func:`~lime_attr.modality.modality_share`): they
        sum to 1 over kinds, but a share can be negative or above 1 when relevance of both signs cancels (and
        is unstable when the total is near 0). Prefer :attr:`shares_abs` for a bounded reading."""
        return self._shares(signed=True)

    @property
    def shares_abs(self) -> dict[str, Tensor]:
        """Absolute shares ``sum_{i in kind} |R_i| / sum_i |R_i|`` (:func:`~lime_attr.modality.modality_share`):
        in [0, 1], summing to 1 over kinds."""
        return self._shares(signed=False)

    def __len__(self) -> int:
        return self.token_relevance.shape[0]

    def _token_str(self, ids: Sequence[int]) -> list[str]:
        tok = self.tokenizer
        if tok is None:
            return [str(i) for i in ids]
        return [str(t) for t in tok.convert_ids_to_tokens([int(i) for i in ids])]

    def __str__(self) -> str:
        lines = [f"ModalityResult(batch={len(self)}, seq={self.token_relevance.shape[1]}, mode={self.mode!r}, "
                 f"composite={self.composite!r}, vision={self.vision_composite!r})"]
        shares, shares_abs, totals = self.shares, self.shares_abs, self.totals
        for b in range(len(self)):
            tgt = " ".join(self._token_str(self.target_ids[b].tolist()))
            lg = ", ".join(f"{float(x):.3f}" for x in self.logit[b].detach())
            lines.append(f"  row {b}: target {tgt!r} (logit {lg})")
            for k in self.kinds:
                n = sum(e - s for s, e in self.spans[b].get(k, []))
                lines.append(f"    {k:<9} {n:>4} tokens  relevance {float(totals[k][b]):>+9.4f}  "
                             f"share {float(shares[k][b]):>+7.3f}  |share| {float(shares_abs[k][b]):.3f}")
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------------------------------- helpers


class EmbeddingCapture:
    """The ``inputs_embeds`` a language model receives, captured for the relevance engine (its ``latent``).

    A forward pre-hook on ``module`` records the first ``inputs_embeds`` it is called with -- the text
    embeddings with the image / audio features already scattered in by the model's own code -- making
    them require grad if they do not, so that the engine's one backward pass reads their gradient.

    Parameters
    ----------
    module : nn.Module
        The language model (:func:`~lime_attr.canonizers.facts.find_language_model`).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.embeds: Optional[Tensor] = None
        self._handle: Any = None

    def __enter__(self) -> "EmbeddingCapture":
        self.embeds = None
        self._handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, kw: dict) -> tuple[tuple, dict]:
        emb = kw.get("inputs_embeds")
        if emb is None:
            raise RuntimeError(f"the language model ({type(module).__name__}) was not called with inputs_embeds; "
                               "ModalityAttribution cannot see the merged multimodal embeddings")
        if not emb.requires_grad:
            emb = emb.detach().requires_grad_(True)
            kw = dict(kw, inputs_embeds=emb)
        if self.embeds is None:
            self.embeds = emb
        return args, kw

    def tensors(self) -> list[Tensor]:
        """``[inputs_embeds]``; a clear error if the language model did not run."""
        if self.embeds is None:
            raise RuntimeError("the model's forward never called its language model")
        return [self.embeds]

    def relevance(self, grads: Sequence[Optional[Tensor]], detach: bool = True) -> dict[str, Tensor]:
        """``{"inputs_embeds": x * g}`` ``[batch, seq, hidden]`` from the gradient of :meth:`tensors`."""
        h = self.embeds.detach() if detach else self.embeds
        g = grads[0]
        r = h * g if g is not None else h * 0
        return {"inputs_embeds": r.detach() if detach else r}


def _encoder_prefixes(model: nn.Module, lm_name: str) -> list[str]:
    parent_name = lm_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    lm_leaf = lm_name.rpartition(".")[2]
    return [f"{parent_name}.{n}" if parent_name else n for n in parent._modules if n != lm_leaf]


def combined_composite(text: Union[str, Composite], vision: Union[str, Composite],
                       prefixes: Sequence[str]) -> Composite:
    """``vision``'s rules inside the modules named by ``prefixes``, ``text``'s rules everywhere else."""
    text_c, vision_c = get_composite(text), get_composite(vision)
    prefixes = tuple(prefixes)

    def inside(site: Any) -> bool:
        name = site.name or ""
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    def wrap(matcher: Any):
        return lambda site: inside(site) and matcher_matches(matcher, site)

    entries = [(wrap(m), r) for m, r in vision_c.entries] + list(text_c.entries)
    return Composite(entries, tuple(text_c.canonizers) + tuple(vision_c.canonizers),
                     name=f"{text_c.name}+{vision_c.name}@encoder")


# ----------------------------------------------------------------------------------------------- main class


class ModalityAttribution(Attribution):
    r"""Relevance of image / audio / text tokens for a multimodal LLM's next token or answer.

    Parameters
    ----------
    model : PreTrainedModel
        An image/audio-text model whose language model takes ``inputs_embeds`` (LLaVA, Qwen2-VL,
        Qwen2.5-VL, Qwen2-Audio; a canonizer for its ``model_type`` must be registered).
    processor : ProcessorMixin, optional
        The model's processor: used to look up marker ids (Qwen2-Audio), frame durations (audio),
        normalisation (image overlays), tokens for printing, and checked against the model.
    composite : str or Composite
        Rules of the language model (default ``"attnlrp"``).
    vision_composite : str or Composite, optional
        Rules inside the perceptual encoder (vision / audio tower and projector); default ``"cp-lrp"``
        (see the module docstring for why).
    canonizer : "auto", None, str or Canonizer
        Passed to :class:`~lime_attr.LRPScope`.

    Examples
    --------
    >>> attr = ModalityAttribution(model, processor)                        # doctest: +SKIP
    >>> res = attr.attribute(processor(images=img, text=prompt, return_tensors="pt"))  # doctest: +SKIP
    >>> print(res.shares_abs["image"])                                       # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, processor: Any = None, composite: Union[str, Composite] = "attnlrp",
                 vision_composite: Union[str, Composite, None] = None, canonizer: Any = "auto") -> None:
        if not isinstance(model, nn.Module) or getattr(getattr(model, "config", None), "model_type", None) is None:
            raise TypeError("ModalityAttribution needs a Hugging Face multimodal model (an nn.Module with a config)")
        super().__init__(model)
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.spec: ModalitySpec = modality_spec(model, processor)
        self.lm_name, self.language_model = find_language_model(model)
        self.encoder_prefixes = _encoder_prefixes(model, self.lm_name)
        self.composite = composite
        self.vision_composite = vision_composite if vision_composite is not None else "cp-lrp"
        self.canonizer = canonizer
        self._scope: Optional[LRPScope] = None
        self._check_processor()

    @property
    def multiplies_by_inputs(self) -> bool:  # noqa: D401
        """Whether relevance is multiplied by the inputs; always True (input times modified gradient)."""
        return True

    def scope(self) -> LRPScope:
        """The (reusable) scope: ``composite`` in the language model, ``vision_composite`` in the encoder."""
        if self._scope is None:
            comp = combined_composite(self.composite, self.vision_composite, self.encoder_prefixes)
            self._scope = LRPScope(self.model, comp, self.canonizer)
        return self._scope

    # ------------------------------------------------------------------ checks
    def vocab_size(self) -> int:
        emb = self.model.get_input_embeddings()
        return int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])

    def _check_processor(self) -> None:
        tok = self.tokenizer
        if tok is None:
            return
        vocab = self.vocab_size()
        try:
            n_tok = len(tok)
        except TypeError:
            n_tok = None
        if n_tok is not None and n_tok > vocab:
            raise ValueError(f"the processor does not match the model: its tokenizer has {n_tok} tokens but the "
                             f"model's embedding has {vocab} rows. Use the processor saved with this model")
        is_processor = getattr(self.processor, "tokenizer", None) is not None
        for tid, kind in self.spec.placeholders.items():
            if n_tok is not None and tid >= n_tok:
                raise ValueError(f"the processor does not match the model: the model's {kind} token id {tid} is not in "
                                 f"the tokenizer (it has {n_tok} tokens)")
            if kind == "video":
                continue
            name = getattr(self.processor, f"{kind}_token", None) or getattr(tok, f"{kind}_token", None)
            if name is None:
                if is_processor and kind in self.spec.kinds:
                    raise ValueError(f"the processor does not match the model: {type(self.processor).__name__} has no "
                                     f"{kind} token, but the model ({self.spec.family}) takes {kind}s "
                                     f"({kind}_token_id {tid})")
                continue
            got = tok.convert_tokens_to_ids(name)
            if got != tid:
                raise ValueError(f"the processor does not match the model: the processor's {kind} token {name!r} has "
                                 f"id {got} but the model's config expects {tid} ({kind}_token_id)")

    # ------------------------------------------------------------------ main
    def attribute(self, inputs: Any, target: Any = None, additional_forward_args: Optional[dict] = None,
                  mode: str = "sum", create_graph: bool = False) -> ModalityResult:
        r"""Explain the next token (or an answer) of a multimodal prompt.

        Parameters
        ----------
        inputs : Mapping
            The processor's output (``input_ids``, ``attention_mask``, ``pixel_values``,
            ``image_grid_thw``, ``input_features``, ``feature_attention_mask``, ...), batch on dim 0.
            Batches must be *left*-padded when an answer is explained (answer tokens are appended).
        target : None, int, sequence of int, or Tensor
            ``None``: the greedy next token (argmax of the last logit; the token LIME explains). An int:
            that token id at the last position, for every row. A sequence of ids: an *answer*; token
            ``k`` is explained at the position after the prompt and the answer's first ``k`` tokens
            (appended to the input: one forward pass, since the model is causal). A ``[batch]`` tensor
            gives one token per row, a ``[batch, n]`` tensor (or list of lists) one answer per row.
        additional_forward_args : dict, optional
            Further keyword arguments for the model's forward.
        mode : {"sum", "per_token"}
            ``"sum"``: the answer's logits are explained together (one backward pass; by linearity of
            the modified backward pass this equals the sum of per-token relevances). ``"per_token"``:
            one backward pass per answer token; ``per_token_relevance`` holds them.
        create_graph : bool
            Keep the graph so the relevance can be differentiated (LIME).

        Returns
        -------
        ModalityResult
        """
        if mode not in ("sum", "per_token"):
            raise ValueError(f"mode must be 'sum' or 'per_token', got {mode!r}")
        check_autograd_mode("ModalityAttribution.attribute")
        target = normalize_target(target)
        inp, ids, mask, spans, answers = self._prepare(inputs, target)
        leaves = {}
        for key in _PERCEPTUAL_INPUTS:
            v = inp.get(key)
            if isinstance(v, Tensor) and v.is_floating_point():
                leaves[key] = v.detach().clone().requires_grad_(True)
                inp[key] = leaves[key]
        kwargs = dict(inp)
        kwargs.update(additional_forward_args or {})
        kwargs.setdefault("use_cache", False)
        capture = EmbeddingCapture(self.language_model)
        chosen: dict[str, Tensor] = {}

        def forward(*pixels: Tensor) -> Tensor:
            """The model on the prompt (the perceptual inputs as given): the explained logits ``[B, n]``."""
            try:
                out = self.model(input_ids=ids, attention_mask=mask, **dict(kwargs, **dict(zip(leaves, pixels))))
            except Exception as exc:  # noqa: BLE001 - re-raised with the context (lime_attr's own errors unchanged)
                raise forward_error(exc, "ModalityAttribution.attribute: the model's forward failed on these inputs "
                                         "(are they this model's processor output?)") from exc
            sel, chosen["answers"] = self._explained_logits(out, ids, mask, capture, answers)
            return sel

        per_output = mode == "per_token" and answers is not None and answers.shape[1] > 1
        res = relevance(self.scope(), forward, list(leaves.values()), create_graph=create_graph, latent=capture,
                        per_output=per_output)
        per_token = None
        if per_output:
            per_token = torch.stack([p.latent["inputs_embeds"].sum(-1) for p in res.parts], dim=1)  # [B, n, S]
            rel = per_token.sum(1)
        else:
            rel = res.latent["inputs_embeds"].sum(-1)
        mask_b = mask.to(rel.device).bool()
        rel = torch.where(mask_b, rel, torch.zeros_like(rel))
        if per_token is not None:
            per_token = torch.where(mask_b[:, None], per_token, torch.zeros_like(per_token))
        heatmaps = self._heatmaps(ids, spans, rel, dict(zip(leaves.keys(), res.inputs)), inp)
        sel = res.output
        return ModalityResult(
            token_relevance=rel, spans=spans, target_ids=chosen["answers"].detach(),
            logit=sel if create_graph else sel.detach(), heatmaps=heatmaps, input_ids=ids, attention_mask=mask,
            per_token_relevance=per_token, mode=mode, composite=get_composite(self.composite).name,
            vision_composite=get_composite(self.vision_composite).name, tokenizer=self.tokenizer,
        )

    def _prepare(self, inputs: Any, target: Any) -> tuple[dict, Tensor, Tensor, list, Optional[Tensor]]:
        """The checked inputs, with an answer's tokens appended: ``(other inputs, ids, mask, spans, answers)``."""
        inp, ids, mask = split_inputs(inputs, "ModalityAttribution.attribute")
        batch, length = ids.shape
        vocab = self.vocab_size()
        if int(ids.max()) >= vocab or int(ids.min()) < 0:
            raise ValueError(f"input_ids contain ids outside the model's vocabulary [0, {vocab}): the processor "
                             "does not match the model")
        if bool((mask[:, -1] == 0).any()):
            raise ValueError("the input is right-padded: the explained token follows the last position of every row, "
                             "which needs left padding (processor.tokenizer.padding_side = 'left')")
        answers = self._answers(target, batch, vocab, ids.device)
        if answers is not None and answers.shape[1] > 1:
            extra = answers[:, :-1]
            ids = torch.cat([ids, extra], dim=1)
            mask = torch.cat([mask, torch.ones_like(extra, dtype=mask.dtype)], dim=1)
            for key, v in list(inp.items()):  # per-token inputs (e.g. Qwen2-VL's mm_token_type_ids): text type 0
                if isinstance(v, Tensor) and key not in _PERCEPTUAL_INPUTS and tuple(v.shape[:2]) == (batch, length):
                    inp[key] = torch.cat([v, torch.zeros((batch, extra.shape[1], *v.shape[2:]), dtype=v.dtype,
                                                         device=v.device)], dim=1)
        spans = find_spans(ids, self.spec, mask)
        for b, s in enumerate(spans):
            if not any(s.get(k) for k in PERCEPTUAL):
                names = ", ".join(f"{k} id {i}" for i, k in self.spec.placeholders.items())
                raise ValueError(f"row {b} of the input has no image/audio tokens ({names}): nothing perceptual to "
                                 "attribute to. Pass the processor's output for a prompt with an image/audio "
                                 "(the processor expands the placeholder), or use LRP for text-only prompts")
        check_perceptual_inputs(self.spec, spans, inp, "ModalityAttribution.attribute", self.model.config)
        if answers is not None and answers.shape[1] > 1:
            gen = (length, ids.shape[1])
            for s in spans:
                s["text"] = _subtract(s["text"], gen)
                s["generated"] = [gen]
        return inp, ids, mask, spans, answers

    def _explained_logits(self, out: Any, ids: Tensor, mask: Tensor, capture: "EmbeddingCapture",
                          answers: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """``(logits of the answer tokens [B, n], answer ids [B, n])`` from the model's output."""
        logits = out.logits if hasattr(out, "logits") else out[0]
        emb = capture.tensors()[0]
        find_spans(ids, self.spec, mask, sequence_length=emb.shape[1])  # clear error if the length changed
        if logits.shape[1] != ids.shape[1]:
            raise ValueError(f"the model returned logits for {logits.shape[1]} positions, input_ids has {ids.shape[1]}")
        if answers is None:
            answers = logits[:, -1].detach().argmax(-1, keepdim=True)
        n = answers.shape[1]
        pos = torch.arange(ids.shape[1] - n, ids.shape[1], device=logits.device)
        sel = logits[:, pos, :].gather(-1, answers[..., None].to(logits.device)).squeeze(-1)  # [B, n]
        if not bool(torch.isfinite(sel).all()):
            raise FloatingPointError("the explained logit is NaN/inf; check the model's dtype and inputs")
        return sel, answers

    # ------------------------------------------------------------------ targets
    @staticmethod
    def _answers(target: Any, batch: int, vocab: int, device: Any) -> Optional[Tensor]:
        if target is None:
            return None
        if isinstance(target, bool):
            raise TypeError("target must be None, a token id, a sequence of ids or a tensor, not a bool")
        if isinstance(target, int):
            t = torch.full((batch, 1), target, dtype=torch.long)
        elif isinstance(target, Tensor):
            if target.is_floating_point():
                raise TypeError("a tensor target must hold integer token ids")
            t = target.long()
            if t.dim() == 0:
                t = t.expand(batch)[:, None]
            elif t.dim() == 1:
                t = t[:, None] if (t.numel() == batch and batch > 1) else t[None].expand(batch, -1)
            elif t.dim() != 2 or t.shape[0] != batch:
                raise ValueError(f"a 2-D tensor target must be [batch={batch}, n], got {tuple(t.shape)}")
        elif isinstance(target, (list, tuple)):
            if not target:
                raise ValueError("target is an empty answer")
            if all(isinstance(x, (list, tuple)) for x in target):
                if len(target) != batch or len({len(x) for x in target}) != 1:
                    raise ValueError("a list-of-lists target needs one answer per row, all of the same length")
                t = torch.tensor([list(x) for x in target], dtype=torch.long)
            elif all(isinstance(x, int) and not isinstance(x, bool) for x in target):
                t = torch.tensor(list(target), dtype=torch.long)[None].expand(batch, -1)
            else:
                raise TypeError(f"target must hold token ids (ints), got {target!r}")
        else:
            raise TypeError(f"unsupported target {target!r}: None, an int, a sequence of ints or a tensor")
        if t.numel() == 0:
            raise ValueError("target is an empty answer")
        bad = t[(t < 0) | (t >= vocab)]
        if bad.numel():
            raise ValueError(f"target token id(s) {bad.unique().tolist()} outside the model's vocabulary [0, {vocab})")
        return t.to(device).contiguous()

    # ------------------------------------------------------------------ heatmaps
    def _heatmaps(self, ids: Tensor, spans: list, rel: Tensor, leaf_rel: dict, inp: dict) -> list:
        out: list[list[Heatmap]] = [[] for _ in range(ids.shape[0])]
        items = {"image": [], "video": [], "audio": []}
        for b, s in enumerate(spans):
            for kind in items:
                for sp in s.get(kind, []):
                    items[kind].append((b, sp))
        ph = {k: [i for i, kk in self.spec.placeholders.items() if kk == k] for k in ("image", "video", "audio")}

        def tokens_of(b: int, sp: Span, kind: str) -> Tensor:
            seg = ids[b, sp[0]:sp[1]]
            keep = torch.zeros_like(seg, dtype=torch.bool)
            for i in ph[kind]:
                keep |= seg == i
            return rel[b, sp[0]:sp[1]][keep.to(rel.device)]

        for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            r = leaf_rel.get(key)
            if r is None or not items[kind]:
                continue
            blocks = split_pixel_relevance(r, inp, self.model.config, kind)
            if len(blocks) != len(items[kind]):
                log.warning("%d %s inputs but %d %s spans: heatmaps not assigned", len(blocks), kind,
                            len(items[kind]), kind)
                continue
            for k, ((b, sp), (pix, patches, raw)) in enumerate(zip(items[kind], blocks)):
                img = self._image_array(inp.get(key), k) if kind == "image" else None
                out[b].append(Heatmap(kind, b, sp, pix, patches, tokens_of(b, sp, kind), raw, input=img))
        r = leaf_rel.get("input_features")
        if r is not None and items["audio"]:
            fam = inp.get("feature_attention_mask")
            fe = getattr(self.processor, "feature_extractor", None)
            hop = getattr(fe, "hop_length", 160)
            sr = getattr(fe, "sampling_rate", 16000)
            if r.shape[0] != len(items["audio"]):
                log.warning("%d audio inputs but %d audio spans: heatmaps not assigned", r.shape[0],
                            len(items["audio"]))
            else:
                for k, (b, sp) in enumerate(items["audio"]):
                    n_frames = int(fam[k].sum()) if fam is not None else r.shape[-1]
                    raw = r[k][:, :n_frames]
                    mel = inp["input_features"][k][:, :n_frames].detach().cpu().numpy()
                    out[b].append(Heatmap("audio", b, sp, raw.sum(0), None, tokens_of(b, sp, "audio"), raw,
                                          seconds_per_frame=hop / sr, input=mel))
        return out

    def _image_array(self, pixels: Optional[Tensor], k: int) -> Any:
        if pixels is None or pixels.dim() != 4:
            return None
        x = pixels[k].detach().double().cpu()
        ip = getattr(self.processor, "image_processor", None)
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is not None and std is not None and len(mean) == x.shape[0]:
            x = x * torch.tensor(std, dtype=x.dtype)[:, None, None] + torch.tensor(mean, dtype=x.dtype)[:, None, None]
        else:
            x = (x - x.min()) / (x.max() - x.min() + 1e-12)
        return x.clamp(0, 1).permute(1, 2, 0).numpy()


def _subtract(spans: list, cut: Span) -> list:
    out = []
    for s, e in spans:
        if e <= cut[0] or s >= cut[1]:
            out.append((s, e))
        else:
            if s < cut[0]:
                out.append((s, cut[0]))
            if e > cut[1]:
                out.append((cut[1], e))
    return out
