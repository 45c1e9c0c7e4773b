"""Finding the image / audio / text spans of a multimodal prompt in the sequence the language model sees.

A *span* is a half-open interval ``(start, end)`` of positions (``end`` exclusive) in the language
model's input sequence. Which positions are perceptual follows the model family, as in the LIME
reference code (see ``reference/lime-method.md``):

Which config fields and tokens mark them is a family fact, declared in the family's canonizer file
(:class:`~lime_attr.canonizers.facts.FamilyFacts`); a model without a registered family gets the
generic field names. The built-in families:

* LLaVA-style (``llava``, ``llava_next``, ...; any config with ``image_token_id`` /
  ``image_token_index``): the runs of the image placeholder after the processor's expansion. Two
  images written back to back form one run; it is cut into images of ``tokens_per_item`` tokens
  (``config.image_seq_length`` by default).
* Qwen2-VL / Qwen2.5-VL: ``<|vision_start|>`` .. ``<|vision_end|>`` *inclusive* (the markers belong to
  the image; a run that holds video tokens is reported as ``"video"``).
* Qwen2-Audio: ``<|audio_bos|>`` .. ``<|audio_eos|>`` inclusive.

Every other non-padding position is ``"text"``; positions whose ``attention_mask`` is 0 (left or right
padding) belong to no span.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .canonizers.facts import FamilyFacts, facts_for

__all__ = ["ModalitySpec", "modality_spec", "find_spans", "span_mask", "split_inputs", "check_perceptual_inputs",
           "check_finite_inputs", "modality_share", "split_pixel_relevance",
           "PERCEPTUAL", "PERCEPTUAL_INPUTS"]

#: span kinds that hold perceptual (non-text) tokens
PERCEPTUAL = ("image", "video", "audio")

#: the processor output that carries each perceptual kind's features
PERCEPTUAL_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}


def split_inputs(inputs: Any, caller: str) -> tuple[dict, Tensor, Tensor]:
    """A processor's output as ``(other_inputs, input_ids [B, S], attention_mask [B, S])``.

    Accepts a mapping or a ``BatchFeature`` / ``BatchEncoding``; a missing mask means all ones. ``caller``
    names the function in the error raised for anything else.
    """
    from collections.abc import Mapping

    data = inputs if isinstance(inputs, Mapping) else getattr(inputs, "data", None)
    if not isinstance(data, Mapping):
        raise TypeError(f"{caller} takes the processor's output mapping (input_ids, attention_mask, "
                        f"pixel_values, ...), got {type(inputs).__name__}")
    rest = dict(data.items())
    if "input_ids" not in rest:
        raise ValueError(f"{caller}: inputs need 'input_ids' (the processor's output, with placeholders expanded)")
    ids = rest.pop("input_ids")
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{caller}: input_ids must be an integer tensor of token ids, got "
                        f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
    ids = ids if ids.dim() == 2 else ids[None]
    mask = rest.pop("attention_mask", None)
    mask = torch.ones_like(ids) if mask is None else (mask if mask.dim() == 2 else mask[None])
    return rest, ids, mask

Span = tuple[int, int]


@dataclass(frozen=True)
class ModalitySpec:
    """How one model family marks perceptual tokens in its input ids.

    Attributes
    ----------
    family : str
        ``config.model_type``.
    placeholders : dict
        ``{token_id: kind}`` for the placeholder ids the model's features replace (``kind`` is
        ``"image"``, ``"video"`` or ``"audio"``).
    markers : dict
        ``{start_id: (end_id, kind)}``: spans run from a start marker to the next end marker, inclusive
        (Qwen2-VL, Qwen2-Audio); ``kind`` names the span unless the placeholders inside say otherwise
        (video tokens between vision markers). Empty for run-based families (LLaVA).
    tokens_per_item : dict
        ``{kind: n}``: tokens per image / audio, used to cut back-to-back placeholder runs (run-based
        families only; ``None`` leaves runs whole).
    needs_feature_mask : bool
        Whether audio features must come with their ``feature_attention_mask`` (Qwen2-Audio).
    """

    family: str
    placeholders: dict[int, str]
    markers: dict[int, tuple[int, str]] = field(default_factory=dict)
    tokens_per_item: dict[str, Optional[int]] = field(default_factory=dict)
    needs_feature_mask: bool = False

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.placeholders.values())))


def _cfg_get(config: Any, *names: str) -> Optional[int]:
    for n in names:
        v = getattr(config, n, None)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return None


def _tok_id(tokenizer: Any, token: Optional[str]) -> Optional[int]:
    if tokenizer is None or not token:
        return None
    try:
        i = tokenizer.convert_tokens_to_ids(token)
    except Exception:  # pragma: no cover - exotic tokenizers
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    if i is None or (unk is not None and i == unk and token != getattr(tokenizer, "unk_token", None)):
        return None
    return int(i)


def modality_spec(model_or_config: Any, processor: Any = None) -> ModalitySpec:
    """The :class:`ModalitySpec` of a multimodal model, from its config (and processor where needed).

    Parameters
    ----------
    model_or_config : PreTrainedModel or PretrainedConfig
    processor : optional
        The model's processor (or tokenizer). Needed for Qwen2-Audio's ``<|audio_bos|>`` /
        ``<|audio_eos|>`` ids, which its config does not store.

    Raises
    ------
    ValueError
        If the config names no image or audio placeholder token.
    """
    config = getattr(model_or_config, "config", model_or_config)
    family = getattr(config, "model_type", "?")
    facts = facts_for(config)
    tok = getattr(processor, "tokenizer", processor)
    ids = {kind: _cfg_get(config, *names) for kind, names in facts.placeholder_fields.items()}
    placeholders = {i: kind for kind, i in ids.items() if i is not None}
    if not placeholders:
        fields = " / ".join(n for names in facts.placeholder_fields.values() for n in names)
        raise ValueError(f"cannot find the perceptual placeholder tokens of model_type {family!r}: its config has "
                         f"no {fields}")
    markers: dict[int, tuple[int, str]] = {}
    if facts.vision_marker_fields is not None:
        vs, ve = (_cfg_get(config, f) for f in facts.vision_marker_fields)
        if vs is not None and ve is not None:
            markers[vs] = (ve, "image")
    if ids.get("audio") is not None:
        markers.update(_audio_markers(facts, processor, tok))
    per_item: dict[str, Optional[int]] = {}
    if not markers and ids.get("image") is not None and getattr(config, "image_grid_pinpoints", None) is None:
        # fixed tokens per image (LLaVA); LLaVA-NeXT-style any-resolution tiling varies per image
        n = _cfg_get(config, "image_seq_length")
        n = n if n is not None else getattr(processor, "num_image_tokens", None)
        per_item["image"] = int(n) if isinstance(n, int) and n > 0 else None
    return ModalitySpec(family, placeholders, markers, per_item, needs_feature_mask=facts.audio_feature_mask)


def _audio_markers(facts: FamilyFacts, processor: Any, tok: Any) -> dict[int, tuple[int, str]]:
    """``{bos_id: (eos_id, "audio")}`` from the tokenizer, for the family's audio marker tokens."""
    if facts.audio_marker_tokens is None:
        return {}
    bos_name, eos_name = facts.audio_marker_tokens
    bos = _tok_id(tok, getattr(processor, "audio_bos_token", None) or bos_name)
    eos = _tok_id(tok, getattr(processor, "audio_eos_token", None) or eos_name)
    if facts.audio_markers_required and (bos is None or eos is None) and tok is not None:
        raise ValueError(f"the processor does not match the model: its tokenizer has no {bos_name} / "
                         f"{eos_name} tokens, which delimit this model's audio spans")
    if facts.audio_markers_required and (bos is None or eos is None):
        raise ValueError(f"this model's audio spans run from {bos_name} to {eos_name}, whose ids are not in the "
                         "config: pass the model's processor (or tokenizer) so they can be looked up")
    if bos is None or eos is None:
        return {}
    return {bos: (eos, "audio")}


def _runs(flags: Sequence[bool]) -> list[Span]:
    out, start = [], None
    for i, f in enumerate(list(flags) + [False]):
        if f and start is None:
            start = i
        elif not f and start is not None:
            out.append((start, i))
            start = None
    return out


def _row_spans(ids: list[int], valid: list[bool], spec: ModalitySpec) -> dict[str, list[Span]]:
    spans: dict[str, list[Span]] = {}
    perceptual = [False] * len(ids)
    if spec.markers:
        i = 0
        while i < len(ids):
            if valid[i] and ids[i] in spec.markers:
                end_id, default_kind = spec.markers[ids[i]]
                j = i + 1
                while j < len(ids) and not (valid[j] and ids[j] == end_id):
                    j += 1
                if j == len(ids):
                    raise ValueError(f"unterminated perceptual span: start marker id {ids[i]} at position {i} has no "
                                     f"end marker id {end_id} after it (truncated prompt?)")
                inside = {spec.placeholders.get(t) for t in ids[i + 1:j] if t in spec.placeholders}
                kind = "video" if "video" in inside else default_kind
                spans.setdefault(kind, []).append((i, j + 1))
                for p in range(i, j + 1):
                    perceptual[p] = True
                i = j + 1
            else:
                i += 1
        # placeholders outside any marker pair still count (e.g. a processor that dropped the markers)
        stray = [valid[p] and not perceptual[p] and ids[p] in spec.placeholders for p in range(len(ids))]
        for s, e in _runs(stray):
            spans.setdefault(spec.placeholders[ids[s]], []).append((s, e))
            for p in range(s, e):
                perceptual[p] = True
    else:
        for kind in spec.kinds:
            flags = [valid[p] and spec.placeholders.get(ids[p]) == kind for p in range(len(ids))]
            n = spec.tokens_per_item.get(kind)
            for s, e in _runs(flags):
                if n and (e - s) > n and (e - s) % n == 0:
                    spans.setdefault(kind, []).extend((a, a + n) for a in range(s, e, n))
                else:
                    spans.setdefault(kind, []).append((s, e))
                for p in range(s, e):
                    perceptual[p] = True
    text = [valid[p] and not perceptual[p] for p in range(len(ids))]
    spans["text"] = _runs(text)
    for k in spans:
        spans[k].sort()
    return spans


def find_spans(input_ids: Tensor, spec: ModalitySpec, attention_mask: Optional[Tensor] = None,
               sequence_length: Optional[int] = None) -> list[dict[str, list[Span]]]:
    """Spans of each batch row: ``[{"image": [(start, end), ...], "text": [...], ...}, ...]``.

    Parameters
    ----------
    input_ids : Tensor
        ``[batch, seq]`` (or ``[seq]``), after the processor's placeholder expansion.
    spec : ModalitySpec
        From :func:`modality_spec`.
    attention_mask : Tensor, optional
        Positions where it is 0 (padding, left or right) belong to no span.
    sequence_length : int, optional
        Length of the sequence the language model actually receives. A model that inserts its
        features inside the transformer and changes the sequence length (e.g. Qwen2-Audio's legacy
        un-expanded ``<|AUDIO|>`` path) makes spans computed on ``input_ids`` meaningless: a clear
        error is raised then.

    Returns
    -------
    list of dict
        One dict per row; ``end`` is exclusive; kinds without tokens are absent except ``"text"``.
    """
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if sequence_length is not None and sequence_length != ids.shape[1]:
        raise ValueError(f"the language model receives {sequence_length} positions but input_ids has {ids.shape[1]}: "
                         f"the model ({spec.family}) inserted its features inside the forward pass and changed the "
                         "sequence length. Expand the placeholders in the processor (the current processors do) so "
                         "that one placeholder token stands for one feature")
    if attention_mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    else:
        mask = (attention_mask if attention_mask.dim() == 2 else attention_mask[None]).bool()
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} does not match input_ids {tuple(ids.shape)}")
    return [_row_spans(r.tolist(), m.tolist(), spec) for r, m in zip(ids.cpu(), mask.cpu())]


def span_mask(spans: Sequence[Span], length: int, device: Union[str, torch.device, None] = None) -> Tensor:
    """Boolean ``[length]`` mask of the positions covered by ``spans``."""
    m = torch.zeros(length, dtype=torch.bool, device=device)
    for s, e in spans:
        m[s:e] = True
    return m


def check_perceptual_inputs(spec: "ModalitySpec", spans: Sequence[dict], inputs: dict, caller: str,
                            config: Any = None) -> None:
    """Refuse inputs whose perceptual tokens have no features behind them, or whose features are unusable.

    A LLaVA prompt without ``pixel_values`` (or a Qwen2-Audio prompt without ``input_features``) runs: the
    model simply embeds the placeholder tokens. Any share or LIME update computed on it is over
    placeholders, with no image / audio seen, so it is an error. So are features of a kind the model
    does not take (another model's processor output), Qwen2-Audio features without their
    ``feature_attention_mask``, and non-finite features.

    Parameters
    ----------
    spec : ModalitySpec
        The model's spec (:func:`modality_spec`).
    spans : list of dict
        :func:`find_spans` of the input ids.
    inputs : dict
        The processor's output without ``input_ids`` / ``attention_mask`` (:func:`split_inputs`).
    caller : str
        Named in the messages.
    config : PretrainedConfig, optional
        The model's config: with it, LLaVA-style ``[images, C, H, W]`` pixel values are checked against the
        number of image spans and the vision tower's ``image_size``.

    Raises
    ------
    ValueError
        Naming the missing, foreign, mis-shaped or non-finite input and the fix.
    TypeError
        For perceptual features that are not floating point.
    """
    present = {k for row in spans for k in PERCEPTUAL if row.get(k)}
    for kind in sorted(present):
        key = PERCEPTUAL_INPUTS[kind]
        if inputs.get(key) is None:
            raise ValueError(f"{caller}: the prompt has {kind} placeholder tokens but the inputs hold no {key!r}, so "
                             f"no {kind} would be seen (the model would embed the placeholders themselves). Pass the "
                             f"processor's full output for the {kind} (processor(text=..., {kind}s=...))")
    for kind, key in PERCEPTUAL_INPUTS.items():
        if inputs.get(key) is not None and kind not in spec.kinds:
            raise ValueError(f"{caller}: the inputs hold {key!r} ({kind}) but the model ({spec.family}) takes no "
                             f"{kind}s ({', '.join(spec.kinds)} only): is this another model's processor output? "
                             "Use the processor saved with this model")
    for key in PERCEPTUAL_INPUTS.values():
        value = inputs.get(key)
        if isinstance(value, Tensor) and not value.is_floating_point():
            raise TypeError(f"{caller}: {key!r} has dtype {value.dtype}; it must be the processor's floating-point "
                            "(normalised) output, e.g. processor(images=..., text=..., return_tensors='pt')")
    _check_image_layout(spec, spans, inputs, caller, config)
    if "audio" in present and spec.needs_feature_mask and inputs.get("feature_attention_mask") is None:
        raise ValueError(f"{caller}: Qwen2-Audio inputs need 'feature_attention_mask' with 'input_features' (which "
                         "mel frames are audio, which padding); pass the processor's full output")
    check_finite_inputs(inputs, caller)


def _check_image_layout(spec: "ModalitySpec", spans: Sequence[dict], inputs: dict, caller: str, config: Any) -> None:
    """LLaVA-style ``[images, C, H, W]`` pixels: one image per image span, at the vision tower's size."""
    pixels = inputs.get("pixel_values")
    if not isinstance(pixels, Tensor) or spec.markers or spec.tokens_per_item.get("image") is None:
        return  # Qwen families (flattened patches) and any-resolution tiling are checked by the model
    if pixels.dim() != 4:
        raise ValueError(f"{caller}: pixel_values has shape {tuple(pixels.shape)}; this model takes "
                         "[images, channels, height, width] (a batch dimension first, even for one image)")
    n_spans = sum(len(row.get("image", [])) for row in spans)
    if pixels.shape[0] != n_spans:
        raise ValueError(f"{caller}: pixel_values holds {pixels.shape[0]} image(s) but the prompt(s) have {n_spans} "
                         "image placeholder run(s): give one image per placeholder (the processor expands each "
                         "<image> of the text into the image's tokens)")
    size = getattr(getattr(config, "vision_config", None), "image_size", None)
    if isinstance(size, int) and tuple(pixels.shape[-2:]) != (size, size):
        raise ValueError(f"{caller}: pixel_values are {tuple(pixels.shape[-2:])} pixels but the vision tower takes "
                         f"{size} x {size}: pass images through this model's processor")


def check_finite_inputs(inputs: dict, caller: str) -> None:
    """Refuse NaN / inf in any floating-point tensor of ``inputs`` (``pixel_values``, ``input_features``...).

    Raises
    ------
    ValueError
        Naming the input and the number of non-finite values.
    """
    for key, value in inputs.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(f"{caller}: input {key!r} contains {bad} NaN/inf value(s); relevance and LIME updates "
                             "of non-finite inputs are undefined. Clean the input (e.g. torch.nan_to_num) first")


def modality_share(relevance: Tensor, modality: Tensor, valid: Union[Tensor, float] = 1.0, *, signed: bool = False,
                   eps: float = 1e-30) -> Tensor:
    r"""The share of relevance on the positions ``modality``, per row: the paper's "modality reliance".

    .. math:: s = \frac{\sum_{i\in M} |R_i|}{\sum_{i\,\mathrm{valid}} |R_i|} \quad\text{or, signed,}\quad
              \frac{\sum_{i\in M} R_i}{\sum_{i\,\mathrm{valid}} R_i}

    The one definition that :class:`~lime_attr.ModalityResult` (``shares`` / ``shares_abs``),
    :func:`~lime_attr.modality_reliance`, LIME's records and the CLI read.

    Parameters
    ----------
    relevance : Tensor
        ``[..., seq]`` relevance per position.
    modality : Tensor
        ``[..., seq]`` (bool or 0/1) the positions ``M`` whose share is taken.
    valid : Tensor or float
        ``[..., seq]`` the positions that count (non-padding); 1 for all.
    signed : bool
        The signed share (it can be negative or above 1 when relevance of both signs cancels).
    eps : float
        Lower bound of the absolute share's denominator (a row without relevance gets 0, not nan).

    Returns
    -------
    Tensor
        ``[...]`` (the sequence dimension summed out).

    Examples
    --------
    >>> import torch
    >>> from lime_attr.modality import modality_share
    >>> modality_share(torch.tensor([[1.0, -3.0, 4.0]]), torch.tensor([[True, False, False]]))
    tensor([0.1250])
    """
    modality = modality.to(relevance.dtype) if isinstance(modality, Tensor) else modality
    valid = valid.to(relevance.dtype) if isinstance(valid, Tensor) else valid
    if signed:
        r = relevance * valid
        return (r * modality).sum(-1) / r.sum(-1)
    a = relevance.abs() * valid
    return (a * modality).sum(-1) / a.sum(-1).clamp_min(eps)


def split_pixel_relevance(relevance: Tensor, inputs: dict, config: Any, kind: str = "image",
                          layout: Optional[str] = None) -> list[tuple[Tensor, Optional[Tensor], Tensor]]:
    """Relevance at the pixel input, cut into one ``(pixels [H, W], patches [h, w] or None, raw)`` per image.

    Parameters
    ----------
    relevance : Tensor
        Relevance of ``pixel_values`` (or ``pixel_values_videos``), in the input's own layout.
    inputs : dict
        The processor's output (its ``image_grid_thw`` / ``video_grid_thw`` for flattened patches).
    config : PretrainedConfig
        The model's config (patch size, merge size, channels of its ``vision_config``).
    kind : {"image", "video"}
    layout : str, optional
        A :data:`~lime_attr.canonizers.facts.PIXEL_LAYOUTS` value; default: the family's
        :attr:`~lime_attr.canonizers.facts.FamilyFacts.pixel_layout`, else inferred from the tensor.

    Returns
    -------
    list of tuple
        Per image: relevance per pixel (summed over channels, and over time for temporal patches), per
        vision patch (None when the size is not a multiple of the patch), and the raw block.
    """
    layout = layout if layout is not None else facts_for(config).pixel_layout
    vcfg = getattr(config, "vision_config", None)
    grid = inputs.get("image_grid_thw" if kind == "image" else "video_grid_thw")
    if grid is not None and relevance.dim() == 2 and layout in (None, "flattened_patches"):
        return _split_flattened(relevance, grid, vcfg)
    if relevance.dim() == 4:  # [images, C, H, W]
        p = int(getattr(vcfg, "patch_size", 0) or 0)
        blocks = []
        for k in range(relevance.shape[0]):
            pix = relevance[k].sum(0)
            patches = None
            if p and pix.shape[0] % p == 0 and pix.shape[1] % p == 0:
                patches = pix.reshape(pix.shape[0] // p, p, pix.shape[1] // p, p).sum(dim=(1, 3))
            blocks.append((pix, patches, relevance[k]))
        return blocks
    if relevance.dim() == 5:  # [batch, tiles, C, H, W] (LLaVA-NeXT style): one block per row, tiles summed
        return [(relevance[k].sum(dim=(0, 1)), None, relevance[k]) for k in range(relevance.shape[0])]
    raise ValueError(f"unsupported pixel_values layout {tuple(relevance.shape)} for heatmaps")


def _split_flattened(r: Tensor, grid: Tensor, vcfg: Any) -> list:
    """Qwen2-VL's ``[patches, C*T*P*P]`` layout (merge-ordered patches), inverted per image of ``grid``."""
    p = int(getattr(vcfg, "patch_size", 14))
    m = int(getattr(vcfg, "spatial_merge_size", 2))
    tp = int(getattr(vcfg, "temporal_patch_size", 2))
    c = int(getattr(vcfg, "in_channels", getattr(vcfg, "in_chans", 3)))
    blocks, start = [], 0
    for t, h, w in grid.tolist():
        n = t * h * w
        raw = r[start:start + n]
        start += n
        x = raw.reshape(t, h // m, w // m, m, m, c, tp, p, p).sum(dim=(5, 6))  # [t, H/m, W/m, m, m, p, p]
        x = x.permute(0, 1, 3, 5, 2, 4, 6).reshape(t, h * p, w * p).sum(0)
        patches = x.reshape(h, p, w, p).sum(dim=(1, 3))
        blocks.append((x, patches, raw))
    return blocks
