"""Make the figures and the printed output of the modality tutorial (docs/modality.rst).

Run from the repository root::

    python docs/make_modality_figures.py

It uses the embedded demo models (``lime_attr.models.load_builtin``) when their weights are installed,
and otherwise freshly initialised (untrained) models of the same architecture, saying so in the
figures and in ``docs/_static/modality_output.txt``. Everything runs offline on a CPU in seconds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import patches as mpatches  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from lime_attr import visualize as viz  # noqa: E402
from lime_attr.attribution.modality import ModalityAttribution  # noqa: E402
from lime_attr.metrics import breakdown, grounding_score, modality_reliance, top_tokens  # noqa: E402
from lime_attr.models import available_builtins, load_builtin, make_clip, make_scene  # noqa: E402
from lime_attr.models.architectures import build_model  # noqa: E402
from lime_attr.models.processing import (build_digits_processor, build_tones_processor,  # noqa: E402
                                         description_question, existence_question, format_prompt)

OUT = ROOT / "_static"


def _load(name: str, build_processor):
    if name in available_builtins():
        model, proc = load_builtin(name)
        return model.eval(), proc, "trained"
    proc = build_processor()
    return build_model(name, proc.tokenizer, seed=0).eval(), proc, "untrained (random weights)"


def image_part(log: list[str]) -> None:
    model, proc, status = _load("digits-llava", build_digits_processor)
    scene = make_scene(np.random.default_rng(7))
    digit = scene.digits[0]
    prompt = format_prompt("digits-llava", existence_question("digits-llava", digit))
    inputs = proc(images=[scene.image], text=[prompt], return_tensors="pt")
    attr = ModalityAttribution(model, proc)

    res = attr.attribute(inputs)  # the greedy next token
    log += [f"# digits-llava ({status})", f"prompt: {prompt!r}", f"digits in the scene: {scene.digits}", "",
            "## print(result)", str(res), "", "## breakdown(result)", str(breakdown(res)), "",
            "## top_tokens(result, 8)", str(top_tokens(res, 8)), ""]

    # the box of the queried digit, in the processed image's pixels
    hm = res.heatmaps[0][0]
    h, w = hm.relevance.shape
    sy, sx = h / scene.image.shape[0], w / scene.image.shape[1]
    x0, y0, x1, y1 = scene.boxes[digit]
    box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    g_pix = grounding_score(res, box=box)
    g_tok = grounding_score(res, box=box, level="tokens")
    area = (box[2] - box[0]) * (box[3] - box[1]) / (h * w)
    log += [f"modality_reliance (absolute): {float(modality_reliance(res)):.3f}",
            f"modality_reliance (signed):   {float(modality_reliance(res, signed=True)):.3f}",
            f"grounding_score(box of {digit!r}): pixels {g_pix:.3f}, tokens {g_tok:.3f} (box covers {area:.3f} "
            "of the image)", ""]

    fig = viz.image_overlay(hm, title=f"'{digit}'? -> next token relevance ({status.split()[0]})")
    ax = fig.axes[0]
    ax.add_patch(mpatches.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                                    edgecolor="lime", lw=1.5))
    fig.savefig(OUT / "modality_image_heatmap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    fig = viz.image_overlay(hm, level="patches", title="patch relevance")
    fig.savefig(OUT / "modality_image_patches.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    # an answer, explained token by token
    answer = proc.tokenizer(["yes </s>"], add_special_tokens=False).input_ids[0]
    res_ans = attr.attribute(inputs, target=answer, mode="per_token")
    log += ["## answer 'yes </s>', mode='per_token'", str(res_ans), ""]
    viz.text_html(res_ans, path=OUT / "modality_tokens.html")

    words, rel = viz._rows(res_ans, 0, None, True)
    fig, ax = plt.subplots(figsize=(7.5, 2.4))
    colors = ["tab:red" if r >= 0 else "tab:blue" for r in rel]
    ax.bar(range(len(rel)), rel, color=colors)
    ax.set_xticks(range(len(rel)))
    ax.set_xticklabels(words, rotation=60, fontsize=7, ha="right")
    ax.axhline(0, color="0.5", lw=0.5)
    ax.set_ylabel("relevance")
    ax.set_title("relevance per position for the answer 'yes </s>' (image tokens summed)", fontsize=9)
    fig.savefig(OUT / "modality_tokens.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def audio_part(log: list[str]) -> None:
    model, proc, status = _load("tones-qwen2audio", build_tones_processor)
    clip = make_clip(np.random.default_rng(3))
    prompt = format_prompt("tones-qwen2audio", description_question("tones-qwen2audio"))
    inputs = proc(audio=[clip.audio], text=[prompt], return_tensors="pt", sampling_rate=clip.sampling_rate)
    res = ModalityAttribution(model, proc).attribute(inputs)
    hm = res.heatmaps[0][0]
    event = clip.events[0]
    span = clip.spans[event]
    log += [f"# tones-qwen2audio ({status})", f"prompt: {prompt!r}", f"events: {clip.spans}", "", str(res), "",
            f"grounding_score(time_span of {event!r} = {span[0]:.2f}-{span[1]:.2f} s): frames "
            f"{grounding_score(res, time_span=span):.3f}, "
            f"tokens {grounding_score(res, time_span=span, level='tokens'):.3f}",
            ""]
    fig = viz.audio_plot(hm, waveform=clip.audio, sampling_rate=clip.sampling_rate,
                         title=f"audio relevance for the next token ({status.split()[0]})")
    for ax in fig.axes:
        ax.axvspan(*span, color="lime", alpha=0.15)
    fig.savefig(OUT / "modality_audio.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    log: list[str] = []
    image_part(log)
    audio_part(log)
    (OUT / "modality_output.txt").write_text("\n".join(log) + "\n", encoding="utf-8")
    print("\n".join(log))


if __name__ == "__main__":
    main()
