"""``lime-attr demo``: the README's main job, on the embedded vision model ``digits-llava``.

1. explain an answer: modality shares, top tokens, a heatmap PNG and a token HTML page;
2. LIME against greedy decoding on adversarial questions: answers and modality shares before / after;
3. the mini-POPE table (greedy) on the three splits (first 200 questions of each; ``lime-attr eval pope``
   runs them all), as JSON, CSV and a bar chart.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

__all__ = ["run_demo"]


def _rule(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def run_demo(output_dir: Path, quick: bool = False) -> int:
    """Run the demo, writing figures and tables into ``output_dir``; returns 0."""
    import torch

    from . import ModalityAttribution, modality_reliance, top_tokens
    from .evaluation import write_csv, write_json
    from .evaluation.harness import run_benchmark
    from .generation import DecodingConfig, generate, prepare_inputs
    from .metrics import breakdown
    from .models import DEFAULT_CORRUPTION, load_builtin, pope_questions, task_prior
    from .visualize import image_overlay, text_html

    torch.manual_seed(0)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, processor = load_builtin("digits-llava")
    tok = processor.tokenizer
    print(f"model: builtin:digits-llava ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters)")

    # 1. explain one answer ------------------------------------------------------------------------------
    _rule("1. Explaining an answer")
    questions = pope_questions("digits-llava", "adversarial")
    q = questions[0]
    enc = prepare_inputs(model, processor, [q.prompt], images=[q.image])
    result = ModalityAttribution(model, processor).attribute(enc)
    answer = tok.convert_ids_to_tokens(int(result.target_ids.reshape(-1)[0]))
    print(f"question: {q.question}   (digits present: {' '.join(q.present)}; label: {q.label})")
    print(f"model's next token: {answer!r}")
    print(breakdown(result))
    print(top_tokens(result, k=8, tokenizer=tok))
    heat = out / "heatmap.png"
    image_overlay(result.heatmaps[0][0], path=heat, title=f"relevance for {answer!r}")
    text_html(result, tokenizer=tok, path=out / "tokens.html")
    print(f"wrote {heat} and {out / 'tokens.html'}")

    # 2. LIME vs greedy ----------------------------------------------------------------------------------
    _rule("2. LIME vs greedy decoding on adversarial questions")
    # where hallucination lives: degraded images (DEFAULT_CORRUPTION) and "no" questions that name the missing
    # co-occurrence partner of a present digit; reference mode (the published loop) optimises every token, so
    # the shares before / after are measured for each answer
    prior = task_prior("digits-llava")
    degraded = pope_questions("digits-llava", "adversarial", corruption="degraded")
    picked = [x for x in degraded if x.label == "no" and any(prior.partner_of(o) == x.object for o in x.present)]
    picked = picked[: (3 if quick else 6)]
    print(f"degraded images ({DEFAULT_CORRUPTION['digits-llava']}); each question names the missing partner of a "
          "digit that is present; LIME reference mode at the paper's settings")
    rows = []
    greedy_cfg = DecodingConfig("greedy", max_new_tokens=1)
    lime_cfg = DecodingConfig("lime", max_new_tokens=1, lime_mode="reference")
    print(f"{'question':34s} {'label':5s} {'greedy':7s} {'LIME':7s} {'share before':>12s} {'share after':>12s}")
    for x in picked:
        enc = prepare_inputs(model, processor, [x.prompt], images=[x.image])
        g = generate(model, processor, enc, greedy_cfg)
        lm = generate(model, processor, enc, lime_cfg)
        before = lm.details["share_before"][0][0]
        after = lm.details["share_after"][0][0]
        rows.append({"question": x.question, "object": x.object, "present": x.present, "label": x.label,
                     "greedy": g.texts[0],
                     "lime": lm.texts[0], "share_before": before, "share_after": after,
                     "seconds_greedy": g.seconds, "seconds_lime": lm.seconds})
        print(f"{x.question:34s} {x.label:5s} {g.texts[0]:7s} {lm.texts[0]:7s} {before:12.3f} {after:12.3f}")
    (out / "lime_vs_greedy.json").write_text(json.dumps(rows, indent=2, default=float))

    # 3. mini-POPE ---------------------------------------------------------------------------------------
    limit = 60 if quick else 200
    _rule(f"3. Mini-POPE (greedy), held-out scenes, first {limit} questions per split")
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
    print(f"wrote {out / 'mini_pope.json'}, {out / 'mini_pope.csv'}, {out / 'mini_pope.png'}")
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
