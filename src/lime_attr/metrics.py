"""Reading a :class:`~lime_attr.ModalityResult`: modality reliance, grounding, top tokens, breakdowns.

Definitions (``R_i`` = relevance of language-model position ``i``, ``M`` = perceptual positions -- image,
video and audio spans, markers included --, all sums over non-padding positions):

* modality reliance (LIME paper, reference/lime-method.md): ``sum_{i in M} |R_i| / sum_i |R_i|``
  (absolute, default; in [0, 1]) or ``sum_{i in M} R_i / sum_i R_i`` (signed; can leave [0, 1] when
  relevance of both signs cancels);
* grounding: the share of one image's (clip's) relevance that falls inside the queried region -- a box
  or mask on the image, or a time span of the audio -- again absolute by default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .modality import PERCEPTUAL

__all__ = ["modality_reliance", "grounding_score", "top_tokens", "breakdown", "TopTokens", "Breakdown", "check_result",
           "row_index"]


def modality_reliance(result: Any, signed: bool = False, kinds: Sequence[str] = PERCEPTUAL) -> Tensor:
    r"""Share of the explained relevance that falls on perceptual tokens, per batch row.

    Parameters
    ----------
    result : ModalityResult
    signed : bool
        ``False`` (default): :math:`\sum_{i\in M}|R_i| / \sum_i |R_i|`, in [0, 1].
        ``True``: :math:`\sum_{i\in M}R_i / \sum_i R_i` (the signed share; negative or above 1 when
        positive and negative relevance cancel).
    kinds : sequence of str
        Which span kinds count as perceptual (default image, video, audio).

    Returns
    -------
    Tensor
        ``[batch]``.
    """
    check_result(result, "modality_reliance")
    shares = result.shares if signed else result.shares_abs
    zero = torch.zeros(len(result), dtype=result.token_relevance.dtype, device=result.token_relevance.device)
    return sum((shares[k] for k in kinds if k in shares), zero)


def check_result(result: Any, caller: str) -> None:
    """Refuse anything but a :class:`~lime_attr.ModalityResult` (what the metrics and plots read).

    Raises
    ------
    TypeError
        Naming ``caller`` and what it was given.
    """
    if not all(hasattr(result, a) for a in ("token_relevance", "spans", "heatmaps", "shares_abs")):
        raise TypeError(f"{caller} takes the ModalityResult returned by ModalityAttribution.attribute, got "
                        f"{type(result).__name__}")


def row_index(result: Any, row: Any) -> int:
    """``row`` as an index into the result's batch (negative counts from the end).

    Raises
    ------
    IndexError
        When the row does not exist, naming the number of rows.
    """
    n_rows = int(result.token_relevance.shape[0])
    if isinstance(row, bool) or not isinstance(row, (int, np.integer)) or not -n_rows <= int(row) < n_rows:
        raise IndexError(f"row {row!r} does not exist: the result has {n_rows} row(s) (0..{n_rows - 1})")
    return int(row) % n_rows


def _region_share(rel: Tensor, inside: Tensor, signed: bool) -> float:
    rel = rel.detach().double().cpu()
    inside = inside.to(torch.bool).cpu()
    if inside.shape != rel.shape:
        raise ValueError(f"the region has shape {tuple(inside.shape)} but the relevance map has {tuple(rel.shape)}")
    vals = rel if signed else rel.abs()
    den = float(vals.sum())
    if den == 0.0:
        return float("nan")
    return float(vals[inside].sum()) / den


def _box_mask(shape: tuple, box: Sequence[float], scale: tuple = (1.0, 1.0)) -> Tensor:
    """Cells whose centre lies inside ``box = (x0, y0, x1, y1)`` (pixel coordinates, x = column)."""
    x0, y0, x1, y1 = [float(v) for v in box]
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty box {tuple(box)}: expected (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    h, w = shape
    sy, sx = scale
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) * sy
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * sx
    return ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]


def _resize_mask(mask: Any, shape: tuple) -> Tensor:
    m = torch.as_tensor(np.asarray(mask)).to(torch.bool)
    if tuple(m.shape) == tuple(shape):
        return m
    if m.dim() != 2:
        raise ValueError(f"a mask must be 2-D [H, W], got shape {tuple(m.shape)}")
    # nearest-neighbour by cell centres
    h, w = shape
    ys = ((torch.arange(h) + 0.5) * m.shape[0] / h).long().clamp(max=m.shape[0] - 1)
    xs = ((torch.arange(w) + 0.5) * m.shape[1] / w).long().clamp(max=m.shape[1] - 1)
    return m[ys][:, xs]


def grounding_score(result: Any, box: Optional[Sequence[float]] = None, mask: Any = None,
                    time_span: Optional[Sequence[float]] = None, row: int = 0, item: int = 0,
                    level: str = "pixels", signed: bool = False) -> float:
    r"""Share of one image's / clip's relevance inside a region: :math:`\sum_{p\in B}|R_p| / \sum_p |R_p|`.

    Parameters
    ----------
    result : ModalityResult
    box : tuple of float, optional
        ``(x0, y0, x1, y1)``: an image region in the coordinates of the processed image
        (``pixel_values``), ``x`` = column, ``x1`` / ``y1`` exclusive; it must overlap the image. A pixel / patch / token counts when its centre is inside.
    mask : numpy.ndarray, optional
        ``[H, W]``: a boolean image region, at any resolution (resampled nearest-neighbour to the map).
    time_span : tuple of float, optional
        ``(t0, t1)``: an audio region in seconds: frames (tokens) whose centre lies in ``[t0, t1)``.
    row, item : int
        Which batch row, and which image / clip of that row (prompt order).
    level : {"pixels", "patches", "tokens"}
        Measure on the pixel / mel-frame relevance (default), the vision-patch grid, or the language
        model's image / audio tokens (their relevance laid out on the token grid or time axis).
    signed : bool
        Use signed instead of absolute relevance.

    Returns
    -------
    float
        In [0, 1] when ``signed`` is False; NaN when the item carries no relevance at all.
    """
    check_result(result, "grounding_score")
    if sum(x is not None for x in (box, mask, time_span)) != 1:
        raise ValueError("give exactly one of box, mask or time_span")
    if level not in ("pixels", "patches", "tokens"):
        raise ValueError(f"level must be 'pixels', 'patches' or 'tokens', got {level!r}")
    row = row_index(result, row)
    items = result.heatmaps[row]
    if not items:
        raise ValueError(f"row {row} has no image/audio heatmap")
    if not 0 <= item < len(items):
        raise IndexError(f"row {row} has {len(items)} image/audio item(s); item {item} does not exist")
    hm = items[item]
    if hm.kind == "audio":
        if time_span is None:
            raise ValueError("this item is audio: give time_span=(t0, t1) in seconds")
        t0, t1 = [float(v) for v in time_span]
        if level == "tokens":
            rel = hm.token_relevance
            step = hm.relevance.shape[-1] * hm.seconds_per_frame / max(rel.shape[-1], 1)
        else:
            rel, step = hm.relevance, hm.seconds_per_frame
        centres = (torch.arange(rel.shape[-1], dtype=torch.float64) + 0.5) * step
        inside = (centres >= t0) & (centres < t1)
        if not bool(inside.any()):
            duration = rel.shape[-1] * step
            unit = "token" if level == "tokens" else "frame"
            raise ValueError(f"time_span {(t0, t1)} contains no {unit} of the clip (duration {duration:.3f} s, "
                             f"{rel.shape[-1]} {unit}s): give a span inside [0, {duration:.3f}) with t1 > t0")
        return _region_share(rel, inside, signed)
    if time_span is not None:
        raise ValueError(f"this item is an {hm.kind}: give a box or a mask")
    height, width = hm.relevance.shape
    if level == "pixels":
        rel = hm.relevance
    elif level == "patches":
        if hm.patches is None:
            raise ValueError("no patch grid for this model (patch size unknown); use level='pixels'")
        rel = hm.patches
    else:
        rel = _token_grid(hm)
    scale = (height / rel.shape[0], width / rel.shape[1])
    if box is not None:
        _check_box(box, height, width)
        region = _box_mask(tuple(rel.shape), box, scale)
    else:
        region = _resize_mask(mask, tuple(rel.shape))
    if not bool(region.any()):
        raise ValueError(f"the {'box' if box is not None else 'mask'} selects no cell of the {tuple(rel.shape)} "
                         f"{level} map (the share would be 0 by construction): give a larger region, or "
                         "level='pixels'")
    return _region_share(rel, region, signed)


def _check_box(box: Sequence[float], height: int, width: int) -> None:
    """A box must be four numbers and overlap the processed image ``[0, width) x [0, height)``."""
    try:
        x0, y0, x1, y1 = [float(v) for v in box]
    except (TypeError, ValueError):
        raise ValueError(f"box must be (x0, y0, x1, y1), four numbers, got {box!r}") from None
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        raise ValueError(f"box {tuple(box)} lies outside the image ({width} x {height} pixels, x = column in "
                         f"[0, {width}), y = row in [0, {height})): give it in the processed image's coordinates "
                         "(pixel_values)")


def _token_grid(hm: Any) -> Tensor:
    """The image-token relevance laid out on its grid (the patch grid, merged for Qwen2-VL)."""
    n = hm.token_relevance.shape[-1]
    if hm.patches is not None:
        gh, gw = hm.patches.shape
        for m in (1, 2, 3, 4):
            if gh % m == 0 and gw % m == 0 and (gh // m) * (gw // m) == n:
                return hm.token_relevance.reshape(gh // m, gw // m)
    side = int(round(n ** 0.5))
    if side * side == n:
        return hm.token_relevance.reshape(side, side)
    raise ValueError(f"cannot lay {n} image tokens out on a grid; use level='pixels'")


# ------------------------------------------------------------------------------------------ printable


@dataclass
class TopTokens:
    """The ``k`` most relevant positions of one row (see :func:`top_tokens`)."""

    entries: list  # (position, token, kind, relevance)
    row: int
    target: str

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __str__(self) -> str:
        lines = [f"top {len(self.entries)} tokens for {self.target!r} (row {self.row})",
                 f"{'rank':>4}  {'pos':>4}  {'kind':<9}  {'token':<16}  relevance"]
        for r, (pos, tok, kind, rel) in enumerate(self.entries, 1):
            lines.append(f"{r:>4}  {pos:>4}  {kind:<9}  {tok[:16]:<16}  {rel:+.4f}")
        return "\n".join(lines)

    __repr__ = __str__


def _kind_of(spans: dict, length: int) -> list[str]:
    kinds = ["pad"] * length
    for k, sp in spans.items():
        for s, e in sp:
            for p in range(s, e):
                kinds[p] = k
    return kinds


def top_tokens(result: Any, k: int = 10, tokenizer: Any = None, row: int = 0, absolute: bool = True) -> TopTokens:
    """The ``k`` positions with the largest relevance (by magnitude when ``absolute``), printable.

    Parameters
    ----------
    result : ModalityResult
    k : int
    tokenizer : optional
        For token strings (default: the result's processor tokenizer, if any).
    row : int
        Batch row.
    absolute : bool
        Rank by ``|R|`` (default) or by signed ``R`` (most positive first).
    """
    check_result(result, "top_tokens")
    row = row_index(result, row)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int (how many tokens), got {k!r}")
    tok = tokenizer if tokenizer is not None else getattr(result, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)
    rel = result.token_relevance[row].detach().double().cpu()
    valid = result.attention_mask[row].bool().cpu()
    score = rel.abs() if absolute else rel
    score = torch.where(valid, score, torch.full_like(score, -float("inf")))
    k = min(int(k), int(valid.sum()))
    idx = torch.topk(score, k).indices.tolist()
    ids = result.input_ids[row].tolist()
    names = tok.convert_ids_to_tokens([ids[i] for i in idx]) if tok is not None else [str(ids[i]) for i in idx]
    kinds = _kind_of(result.spans[row], len(ids))
    entries = [(i, str(n), kinds[i], float(rel[i])) for i, n in zip(idx, names)]
    tgt_ids = result.target_ids[row].tolist()
    target = " ".join(tok.convert_ids_to_tokens(tgt_ids)) if tok is not None else " ".join(map(str, tgt_ids))
    return TopTokens(entries, row, target)


@dataclass
class Breakdown:
    """Per-modality relevance of one row (see :func:`breakdown`)."""

    rows: list  # (kind, n_tokens, total, total_abs, share, share_abs)
    row: int
    logit: float

    def as_dict(self) -> dict:
        return {r[0]: dict(tokens=r[1], total=r[2], total_abs=r[3], share=r[4], share_abs=r[5]) for r in self.rows}

    def __str__(self) -> str:
        lines = [f"relevance by modality (row {self.row}, explained logit {self.logit:+.4f})",
                 f"{'kind':<10} {'tokens':>6} {'total':>10} {'|total|':>9} {'share':>8} {'|share|':>8}"]
        for kind, n, tot, tabs, sh, sha in self.rows:
            lines.append(f"{kind:<10} {n:>6} {tot:>+10.4f} {tabs:>9.4f} {sh:>+8.3f} {sha:>8.3f}")
        s = [r for r in self.rows]
        lines.append(f"{'all':<10} {sum(r[1] for r in s):>6} {sum(r[2] for r in s):>+10.4f} "
                     f"{sum(r[3] for r in s):>9.4f} {sum(r[4] for r in s):>+8.3f} {sum(r[5] for r in s):>8.3f}")
        return "\n".join(lines)

    __repr__ = __str__


def breakdown(result: Any, row: int = 0) -> Breakdown:
    """Tokens, signed / absolute totals and shares per span kind for one row, printable."""
    check_result(result, "breakdown")
    row = row_index(result, row)
    tot, tabs, sh, sha = result.totals, result.totals_abs, result.shares, result.shares_abs
    rows = []
    for k in result.kinds:
        n = sum(e - s for s, e in result.spans[row].get(k, []))
        rows.append((k, n, float(tot[k][row]), float(tabs[k][row]), float(sh[k][row]), float(sha[k][row])))
    return Breakdown(rows, row, float(result.logit[row].detach().sum()))
