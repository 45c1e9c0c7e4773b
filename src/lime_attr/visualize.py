"""Image / audio / token heatmaps of a :class:`~lime_attr.ModalityResult` (matplotlib, Agg backend).

Array layouts follow ``captum.attr.visualization`` so that both libraries' plots take each other's
arrays:

* images: ``[H, W, C]`` numpy arrays (channels last) -- :func:`image_arrays` returns ``(attr, image)``
  ready for ``visualize_image_attr(attr, image, method="blended_heat_map", sign="all")``, and
  :func:`image_overlay` accepts the same ``[H, W, C]`` / ``[H, W]`` attributions;
* audio: ``[N, C]`` time series (channels last) -- :func:`audio_arrays` returns ``(attr, data, x)``
  for ``visualize_timeseries_attr``;
* text: :func:`visualization_record` builds a ``VisualizationDataRecord`` for ``visualize_text``;
  :func:`text_html` / :func:`text_ansi` render the token relevance without IPython.

Figures are built as :class:`matplotlib.figure.Figure` objects on an Agg canvas, without pyplot: the
global backend is left alone (nothing global is touched), figures need no ``plt.close`` and render in
notebooks as usual.

Colours: signed relevance on a diverging map (red positive, blue negative), symmetric around 0 and
scaled to the largest magnitude (optionally clipped at a percentile, as Captum's ``outlier_perc``).
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .metrics import check_result, row_index

__all__ = ["image_arrays", "image_overlay", "audio_arrays", "audio_plot", "text_html", "text_ansi",
           "visualization_record", "token_strings", "lime_trajectory"]

PathLike = Union[str, Path]


def _np(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _scale(values: np.ndarray, outlier_perc: float = 0.0) -> float:
    a = np.abs(values[np.isfinite(values)])
    if a.size == 0:
        return 1.0
    m = float(np.percentile(a, 100 - outlier_perc)) if outlier_perc > 0 else float(a.max())
    return m if m > 0 else 1.0


def _figure(size: tuple) -> Figure:
    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Optional[PathLike], dpi: int) -> None:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


# ----------------------------------------------------------------------------------------------- images


def image_arrays(heatmap: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """``(attr [H, W, 1], image [H, W, C] or None)``: Captum's ``visualize_image_attr`` layout.

    The attribution is the pixel relevance summed over colour channels (one channel); the image is
    the un-normalised input in [0, 1].
    """
    if heatmap.kind not in ("image", "video"):
        raise ValueError(f"image_arrays needs an image heatmap, got {heatmap.kind!r}")
    attr = _np(heatmap.relevance)[..., None]
    img = heatmap.input
    if img is not None and tuple(img.shape[:2]) != tuple(attr.shape[:2]):
        img = None
    return attr, img


def image_overlay(heatmap: Any, path: Optional[PathLike] = None, image: Optional[np.ndarray] = None,
                  level: str = "pixels", alpha: float = 0.55, cmap: str = "bwr", outlier_perc: float = 1.0,
                  title: Optional[str] = None, dpi: int = 100, show_colorbar: bool = True) -> Figure:
    """Relevance overlaid on the image (signed, symmetric colour scale); saved as PNG when ``path`` is given.

    Parameters
    ----------
    heatmap : Heatmap or array
        A :class:`~lime_attr.attribution.modality.Heatmap`, or an attribution array ``[H, W]`` /
        ``[H, W, C]`` (Captum layout; channels are summed).
    path : str or Path, optional
        Where to write the figure (format from the suffix, e.g. ``.png``).
    image : numpy.ndarray, optional
        ``[H, W, C]`` or ``[H, W]``: the background (default: the heatmap's input image).
    level : {"pixels", "patches"}
        Pixel relevance, or the patch grid upsampled to the image size.
    """
    if level not in ("pixels", "patches"):
        raise ValueError(f"level must be 'pixels' or 'patches', got {level!r}")
    if hasattr(heatmap, "relevance"):
        rel = _np(heatmap.patches if level == "patches" and heatmap.patches is not None else heatmap.relevance)
        image = image if image is not None else heatmap.input
        title = title if title is not None else f"{heatmap.kind} relevance (total {heatmap.total:+.3g})"
    else:
        rel = _np(heatmap)
        if rel.ndim == 3:
            rel = rel.sum(-1)
    if rel.ndim != 2:
        raise ValueError(f"expected a 2-D relevance map, got shape {rel.shape}")
    fig = _figure((4.2, 4.2))
    ax = fig.subplots()
    if image is not None:
        img = np.asarray(image, dtype=np.float64)
        if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
            img = img.transpose(1, 2, 0)  # CHW -> HWC
        img = (img - img.min()) / (img.max() - img.min() + 1e-12)
        extent = (0, img.shape[1], img.shape[0], 0)
        ax.imshow(img.squeeze(), cmap="gray" if img.ndim == 2 or img.shape[-1] == 1 else None, extent=extent)
    else:
        extent = (0, rel.shape[1], rel.shape[0], 0)
    v = _scale(rel, outlier_perc)
    im = ax.imshow(rel, cmap=cmap, vmin=-v, vmax=v, alpha=alpha if image is not None else 1.0, extent=extent,
                   interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if show_colorbar:
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    _save(fig, path, dpi)
    return fig


# ----------------------------------------------------------------------------------------------- audio


def audio_arrays(heatmap: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(attr [frames, 1], data [frames, 1], x [frames])``: Captum's ``visualize_timeseries_attr``
    layout (channels last). ``data`` is the mean log-mel energy per frame, ``x`` the time in seconds."""
    if heatmap.kind != "audio":
        raise ValueError(f"audio_arrays needs an audio heatmap, got {heatmap.kind!r}")
    attr = _np(heatmap.relevance)[:, None]
    mel = heatmap.input
    data = np.asarray(mel, dtype=np.float64).mean(0)[:, None] if mel is not None else np.zeros_like(attr)
    return attr, data, _np(heatmap.times)


def audio_plot(heatmap: Any, path: Optional[PathLike] = None, waveform: Optional[np.ndarray] = None,
               sampling_rate: int = 16000, title: Optional[str] = None, dpi: int = 100) -> Figure:
    """Waveform (when given) and log-mel spectrogram with the relevance over time beneath.

    The relevance panel shows the per-frame relevance (summed over mel bins; red positive, blue
    negative bars, left axis) and the relevance of the language model's audio tokens as a black step
    line over the time each token covers (right axis).
    """
    if heatmap.kind != "audio":
        raise ValueError(f"audio_plot needs an audio heatmap, got {heatmap.kind!r}")
    rel = _np(heatmap.relevance)
    times = _np(heatmap.times)
    dur = len(rel) * heatmap.seconds_per_frame
    panels = (1 if waveform is not None else 0) + (1 if heatmap.input is not None else 0) + 1
    fig = _figure((6.5, 1.6 * panels + 0.4))
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)
    axes = axes[:, 0]
    i = 0
    if waveform is not None:
        w = np.asarray(waveform, dtype=np.float64).ravel()
        axes[i].plot(np.arange(len(w)) / sampling_rate, w, lw=0.5, color="0.3")
        axes[i].set_ylabel("wave", fontsize=8)
        i += 1
    if heatmap.input is not None:
        mel = np.asarray(heatmap.input, dtype=np.float64)
        axes[i].imshow(mel, origin="lower", aspect="auto", extent=(0, dur, 0, mel.shape[0]), cmap="magma")
        axes[i].set_ylabel("mel", fontsize=8)
        i += 1
    ax = axes[i]
    v = _scale(rel)
    ax.bar(times + heatmap.seconds_per_frame / 2, rel, width=heatmap.seconds_per_frame,
           color=np.where(rel >= 0, "tab:red", "tab:blue"), alpha=0.75, lw=0)
    ax.axhline(0, color="0.5", lw=0.5)
    tok = _np(heatmap.token_relevance)
    if tok.size:
        width = dur / tok.size
        ax2 = ax.twinx()
        ax2.step(np.append(_np(heatmap.token_times), dur), np.append(tok, tok[-1]), where="post", color="k", lw=0.9)
        t = _scale(tok)
        ax2.set_ylim(-t * 1.1, t * 1.1)
        ax2.set_ylabel("token R", fontsize=8)
    ax.set_ylim(-v * 1.1, v * 1.1)
    ax.set_xlim(0, dur)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("frame R", fontsize=8)
    fig.suptitle(title if title is not None else f"audio relevance (total {heatmap.total:+.3g})", fontsize=9)
    _save(fig, path, dpi)
    return fig


# ----------------------------------------------------------------------------------------------- text


def token_strings(result: Any, row: int = 0, tokenizer: Any = None) -> list[str]:
    """Token strings of one row (padding included), from ``tokenizer`` or the result's tokenizer."""
    check_result(result, "lime_attr.visualize")
    row = row_index(result, row)
    tok = tokenizer if tokenizer is not None else getattr(result, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)
    ids = result.input_ids[row].tolist()
    if tok is None:
        return [str(i) for i in ids]
    return [str(t) for t in tok.convert_ids_to_tokens(ids)]


def _rows(result: Any, row: int, tokenizer: Any, collapse: bool) -> tuple[list[str], np.ndarray]:
    """Visible tokens and their relevance; runs of perceptual tokens collapsed into one item."""
    words = token_strings(result, row, tokenizer)
    rel = _np(result.token_relevance[row])
    valid = result.attention_mask[row].bool().tolist()
    spans = result.spans[row]
    starts = {}
    if collapse:
        for k in ("image", "video", "audio"):
            for s, e in spans.get(k, []):
                starts[s] = (e, k)
    out_w, out_r, p = [], [], 0
    while p < len(words):
        if not valid[p]:
            p += 1
            continue
        if p in starts:
            e, k = starts[p]
            out_w.append(f"[{k} x{e - p}]")
            out_r.append(float(rel[p:e].sum()))
            p = e
            continue
        out_w.append(words[p])
        out_r.append(float(rel[p]))
        p += 1
    return out_w, np.asarray(out_r)


def _rgb(v: float, scale: float) -> tuple[int, int, int]:
    x = max(-1.0, min(1.0, v / scale))
    if x >= 0:
        return 255, int(255 * (1 - x)), int(255 * (1 - x))
    return int(255 * (1 + x)), int(255 * (1 + x)), 255


def text_html(result: Any, row: int = 0, tokenizer: Any = None, path: Optional[PathLike] = None,
              collapse: bool = True) -> str:
    """Token-level highlighting as a standalone HTML snippet (red positive, blue negative).

    Perceptual spans are shown as one item (``[image x576]``) carrying their summed relevance unless
    ``collapse=False``. Written to ``path`` when given.
    """
    words, rel = _rows(result, row, tokenizer, collapse)
    scale = _scale(rel)
    tgt = " ".join(token_strings_for(result, row, tokenizer))
    parts = [f'<div class="lime-attr-text" style="font-family:monospace;line-height:2">'
             f'<div><b>explained:</b> {html.escape(tgt)}</div>']
    for w, r in zip(words, rel):
        c = "#%02x%02x%02x" % _rgb(r, scale)
        parts.append(f'<span title="{r:+.4g}" style="background-color:{c};padding:1px 2px;margin:1px;'
                     f'border-radius:3px">{html.escape(w)}</span>')
    parts.append("</div>")
    out = "".join(parts)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"<!doctype html><meta charset='utf-8'><body>{out}</body>\n", encoding="utf-8")
    return out


def token_strings_for(result: Any, row: int, tokenizer: Any = None) -> list[str]:
    tok = tokenizer if tokenizer is not None else getattr(result, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)
    ids = result.target_ids[row].tolist()
    return [str(t) for t in tok.convert_ids_to_tokens(ids)] if tok is not None else [str(i) for i in ids]


def text_ansi(result: Any, row: int = 0, tokenizer: Any = None, collapse: bool = True) -> str:
    """Token-level highlighting for a terminal (24-bit ANSI background colours)."""
    words, rel = _rows(result, row, tokenizer, collapse)
    scale = _scale(rel)
    out = []
    for w, r in zip(words, rel):
        red, green, blue = _rgb(r, scale)
        out.append(f"\x1b[48;2;{red};{green};{blue}m\x1b[38;2;0;0;0m{w}\x1b[0m")
    return " ".join(out)


def visualization_record(result: Any, row: int = 0, tokenizer: Any = None, collapse: bool = True,
                         true_class: Any = None) -> Any:
    """A ``captum.attr.visualization.VisualizationDataRecord`` for ``visualize_text`` (relevance scaled to
    [-1, 1], Captum's colour range)."""
    from captum.attr import visualization as captum_viz

    words, rel = _rows(result, row, tokenizer, collapse)
    scaled = torch.tensor(rel / _scale(rel))
    target = " ".join(token_strings_for(result, row, tokenizer))
    logit = float(result.logit[row].detach().sum())
    return captum_viz.VisualizationDataRecord(scaled, logit, target, true_class if true_class is not None else target,
                                   target, float(rel.sum()), words, 0.0)


# ------------------------------------------------------------------------------------ LIME trajectories


def lime_trajectory(record: Any, row: int = 0, path: Optional[PathLike] = None, dpi: int = 120) -> Figure:
    """The inner loop of one generated token, step by step (a :class:`~lime_attr.mitigation.TokenRecord`
    recorded with ``LimeConfig(record="steps")``, or its ``to_dict()``).

    Four panels against the inner step: the loss terms (total, relevance, KL); the modality share and the
    objective's focus; the margin between the explained token's logit and the best other logit (the
    decision the objective should move), with the steps where the explained token changed marked; and the
    norms of :math:`\\Delta_K` and :math:`\\Delta_V` summed over layers.

    Raises
    ------
    ValueError
        If the record holds no step records (LIME ran without ``record="steps"``, or a gate skipped it).
    """
    steps = record.get("step_records") if isinstance(record, dict) else getattr(record, "step_records", None)
    steps = [s if isinstance(s, dict) else s.to_dict() for s in (steps or [])]
    if not steps:
        raise ValueError("this token record has no step records: generate with LimeConfig(record='steps') (a token a "
                         "gate skipped has none either)")
    x = [s["step"] for s in steps]

    def col(key: str) -> list:
        return [np.nan if s[key][row] is None else s[key][row] for s in steps]

    explained = [s["explained"][row] for s in steps]
    margin = []
    for s in steps:
        tokens, logits = s["top_tokens"][row], s["top_logits"][row]
        own = logits[tokens.index(s["explained"][row])] if s["explained"][row] in tokens else np.nan
        other = max((v for t, v in zip(tokens, logits) if t != s["explained"][row]), default=np.nan)
        margin.append(own - other)
    fig = _figure((10, 6))
    axes = fig.subplots(2, 2)
    for key in ("loss", "rel_loss", "kl"):
        axes[0, 0].plot(x, col(key), marker="o", label=key)
    axes[0, 0].set_title("loss terms")
    axes[0, 1].plot(x, col("share"), marker="o", label="share")
    axes[0, 1].plot(x, col("focus"), marker="o", label="focus")
    axes[0, 1].set_title("perceptual share / focus")
    axes[1, 0].plot(x, margin, marker="o")
    for i in range(1, len(explained)):
        if explained[i] != explained[i - 1]:
            axes[1, 0].axvline(x[i], color="red", alpha=0.4)
    axes[1, 0].set_title("explained logit - best other (red: explained token changed)")
    for key, label in (("delta_k_norm", "|Delta_K|"), ("delta_v_norm", "|Delta_V|")):
        axes[1, 1].plot(x, [float(np.nansum(s[key][row])) if s[key][row] else np.nan for s in steps], marker="o",
                        label=label)
    axes[1, 1].set_title("perturbation norms (sum over layers)")
    for ax in axes.flat:
        ax.set_xlabel("inner step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, dpi)
    return fig
