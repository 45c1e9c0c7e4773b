"""``lime-attr demo``: the README's main job, on the embedded vision model ``digits-llava``.

1. a prior-driven hallucination on a clean image (a ``conflict`` probe: a 3 without its 8, asked about
   the 8): greedy's answer, LIME's answer, the image share of the relevance before and after LIME's
   perturbation, and the relevance heatmaps before and after (PNG);
2. the greedy answer explained: modality shares, top tokens, a pixel heatmap PNG and a token HTML page;
3. LIME against greedy decoding on more ``conflict`` questions: answers and image shares before / after;
4. the prior probes (greedy accuracy per condition) and the mini-POPE table (first 60 questions of each
   split, 30 with ``--quick``; ``lime-attr eval pope`` runs them all), as JSON, CSV and a bar chart.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

__all__ = ["run_demo"]


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _image_token_grid(model: Any, processor: Any, enc: Any, relevance: Any) -> Any:
    """The relevance of the 16 image tokens as the 4 x 4 grid of image cells, upsampled to 32 x 32 pixels."""
    import numpy as np

    from .mitigation import modality_positions

    image = modality_positions(model, processor, enc["input_ids"], enc["attention_mask"])[0]
    grid = relevance[0, image].detach().double().cpu().numpy()
    side = int(round(len(grid) ** 0.5))
    return np.kron(grid.reshape(side, side), np.ones((32 // side, 32 // side)))


def _hallucination(model: Any, processor: Any, out: Path) -> Any:
    """Step 1: the first conflict probe greedy gets wrong, with LIME (reference mode, paper settings)."""
    from .generation import DecodingConfig, generate, prepare_inputs
    from .mitigation import LimeConfig, lime_generate
    from .models import prior_probe
    from .visualize import image_overlay

    items = prior_probe("digits-llava", "conflict", n=40)
    greedy_cfg = DecodingConfig("greedy", max_new_tokens=1)
    for item in items:
        enc = prepare_inputs(model, processor, [item.prompt], images=[item.image])
        greedy = generate(model, processor, enc, greedy_cfg).texts[0]
        if greedy.strip() == "yes":
            break
    else:
        print(f"(greedy answered none of the {len(items)} conflict questions wrongly; showing the last one)")
    lime = lime_generate(model, processor, enc, LimeConfig.for_model(model, mode="reference", record_relevance=True),
                         max_new_tokens=1)
    rec = lime.records[0]
    print(f"question: {item.question}   (digits present: {' '.join(item.present)}; label: {item.label}; the "
          f"prior pairs {item.pair[0]} with {item.pair[1]})")
    print(f"greedy: {greedy!r}   LIME (reference, paper settings): {lime.texts[0].strip()!r}")
    print(f"image share of |relevance|: before {rec.share_before[0]:.3f}, after {rec.share_after[0]:.3f}")
    for tag, rel in (("before", rec.relevance_before), ("after", rec.relevance_after)):
        image_overlay(_image_token_grid(model, processor, enc, rel), image=item.image,
                      path=out / f"heatmap_{tag}.png", title=f"image-token relevance, {tag} LIME")
    print(f"wrote {out / 'heatmap_before.png'} and {out / 'heatmap_after.png'}")
    return item, enc


def run_demo(output_dir: Path, quick: bool = False) -> int:
    """Run the demo, writing figures and tables into ``output_dir``; returns 0."""
    import torch

    from . import ModalityAttribution, top_tokens
    from .evaluation import jsonable, write_csv, write_json
    from .evaluation.harness import run_benchmark
    from .generation import DecodingConfig, generate, prepare_inputs
    from .metrics import breakdown
    from .models import PROBE_CONDITIONS, load_builtin, prior_probe
    from .models.accuracy import probe_accuracy
    from .visualize import image_overlay, text_html

    torch.manual_seed(0)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, processor = load_builtin("digits-llava")
    tok = processor.tokenizer
    print(f"model: builtin:digits-llava ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    _rule("1. A prior-driven hallucination on a clean image")
    item, enc = _hallucination(model, processor, out)

    _rule("2. Explaining greedy's answer")
    result = ModalityAttribution(model, processor).attribute(enc)
    answer = tok.convert_ids_to_tokens(int(result.target_ids.reshape(-1)[0]))
    print(f"model's next token: {answer!r}")
    print(breakdown(result))
    print(top_tokens(result, k=8, tokenizer=tok))
    heat = out / "heatmap.png"
    image_overlay(result.heatmaps[0][0], path=heat, title=f"relevance for {answer!r}")
    text_html(result, tokenizer=tok, path=out / "tokens.html")
    print(f"wrote {heat} and {out / 'tokens.html'}")

    _rule("3. LIME vs greedy decoding on conflict questions (clean images)")
    picked = prior_probe("digits-llava", "conflict", n=3 if quick else 6, seed=1)
    print("each question names the missing co-occurrence partner of a digit that is present (label: no); "
          "LIME reference mode at the paper's settings")
    rows = []
    greedy_cfg = DecodingConfig("greedy", max_new_tokens=1)
    lime_cfg = DecodingConfig("lime", max_new_tokens=1, lime_mode="reference")
    print(f"{'question':34s} {'label':5s} {'greedy':7s} {'LIME':7s} {'share before':>12s} {'share after':>12s}")
    for x in picked:
        enc = prepare_inputs(model, processor, [x.prompt], images=[x.image])
        g = generate(model, processor, enc, greedy_cfg)
        lm = generate(model, processor, enc, lime_cfg)
        before, after = lm.details["share_before"][0][0], lm.details["share_after"][0][0]
        rows.append({"question": x.question, "object": x.object, "present": x.present, "label": x.label,
                     "greedy": g.texts[0], "lime": lm.texts[0], "share_before": before, "share_after": after,
                     "seconds_greedy": g.seconds, "seconds_lime": lm.seconds})
        print(f"{x.question:34s} {x.label:5s} {g.texts[0]:7s} {lm.texts[0]:7s} {before:12.3f} {after:12.3f}")
    (out / "lime_vs_greedy.json").write_text(json.dumps(jsonable(rows), indent=2, allow_nan=False))

    n_probe = 50 if quick else 200
    _rule(f"4. Prior probes (greedy, clean images, {n_probe} per condition) and mini-POPE")
    probes = {c: probe_accuracy(model, processor, prior_probe("digits-llava", c, n=n_probe)) for c in PROBE_CONDITIONS}
    for c, acc in probes.items():
        print(f"{c:16s} accuracy {acc:.3f}")
    (out / "prior_probes.json").write_text(json.dumps({"n": n_probe, "accuracy": probes}, indent=2, allow_nan=False))
    limit = 30 if quick else 60
    results = run_benchmark("pope", "builtin:digits-llava", DecodingConfig("greedy", max_new_tokens=1),
                            limit=limit, model=model, processor=processor)
    print(f"{'split':12s} {'n':>4s} {'accuracy':>9s} {'precision':>9s} {'recall':>7s} {'f1':>7s} {'yes_ratio':>9s}")
    for r in results:
        d = r.to_dict()
        m = d["metrics"]
        print(f"{d['config']['split']:12s} {d['config']['n']:4d} {m['accuracy']:9.3f} {m['precision']:9.3f} "
              f"{m['recall']:7.3f} {m['f1']:7.3f} {m['yes_ratio']:9.3f}")
    write_json(results, out / "mini_pope.json")
    write_csv(results, out / "mini_pope.csv")
    _bar_chart(results, out / "mini_pope.png")
    print(f"wrote {out / 'prior_probes.json'}, {out / 'mini_pope.json'}, {out / 'mini_pope.csv'}, "
          f"{out / 'mini_pope.png'}")
    print("(all questions: lime-attr eval pope --model builtin:digits-llava --output pope.json)")
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f} s")
    return 0


def _bar_chart(results: list, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    keys = ["accuracy", "precision", "recall", "f1", "yes_ratio"]
    width = 0.8 / max(len(results), 1)
    for i, r in enumerate(results):
        d = r.to_dict()
        ax.bar([k + i * width for k in range(len(keys))], [d["metrics"][k] for k in keys], width,
               label=d["config"]["split"])
    ax.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(keys))], keys)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title("mini-POPE, digits-llava, greedy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
