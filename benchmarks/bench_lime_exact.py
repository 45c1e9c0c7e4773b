"""LIME with the exact second-order gradient (``second_order="exact"``) against the reference code's
double backward (``second_order="autograd"``), in the same run.

On the trained demo model ``digits-llava`` (``lime_attr.models.load_builtin``), eager attention, one CPU
thread, reference mode (the published loop: 7 steps, full recompute, token from the last forward), on the
degraded adversarial POPE questions (``pope_questions(..., "adversarial",
corruption=DEFAULT_CORRUPTION[...])``), the first ``--items`` of them. Decoders: cached greedy, and LIME
with the preset learning rate and ``--lr-factors`` times it, each with both second-order settings. The
decoders are interleaved per question (question 1 with every decoder, then question 2, ...), so that the
load of a shared machine affects them alike.

Reported per decoder: CPU seconds per optimised token (and the ratio exact / autograd at the same lr),
accuracy, answers changed vs greedy, and over the optimised tokens the mean of: the perceptual share of
relevance ``sum_M |R| / sum |R|`` before / after (after = under the last perturbation whose relevance was
computed, the 7th forward), the objective's quantity ``softmax(R / tau)`` mass on M before / after, and the
relevance loss at the first / last step (mean, the fraction of tokens where it went down, the median
change). Before that, ``--gradient-check N`` compares the two gradients themselves on the first ``N``
questions (:func:`gradient_agreement`).

Run: ``python -m benchmarks.bench_lime_exact [--items 80] [--lr-factors 10 100] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from benchmarks._common import cpu_model, write_json


def _mean(xs: list) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: list) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[len(xs) // 2] if xs else float("nan")


def gradient_agreement(model: Any, proc: Any, lrp: Any, encs: list) -> dict:
    """At the first inner step of each question's first token (Delta = 0, relevance loss only): the cosine
    between the autograd and exact gradients of the relevance loss w.r.t. Delta, and the first-order
    decrease a first Adam update (``-lr sign(g)``) along the autograd gradient achieves relative to one
    along the exact gradient: ``<g_exact, sign(g_autograd)> / ||g_exact||_1`` (1: as good, 0: no decrease
    to first order, < 0: the loss goes up)."""
    import lime_attr.mitigation.generate as gen
    from lime_attr.mitigation import LimeConfig, LimeOptimizer, lime_generate

    seen: dict = {}

    class Recording(LimeOptimizer):  # the perturbations it creates; after one SGD step at lr 1: -gradient
        def _transform(self, *args: Any):
            out = super()._transform(*args)
            seen.update(self._deltas)
            return out

    cos, eff = [], []
    saved = gen.LimeOptimizer
    gen.LimeOptimizer = Recording
    try:
        for enc in encs:
            g = {}
            for so in ("autograd", "exact"):
                seen.clear()
                cfg = LimeConfig.for_model(model, mode="reference", steps=1, lr=1.0, optimizer="sgd", kl_weight=0.0,
                                           second_order=so)
                lime_generate(model, proc, enc, cfg, max_new_tokens=1, attribution=lrp)
                g[so] = torch.cat([-d.detach().flatten() for pair in seen.values() for d in pair if d is not None])
            a, e = g["autograd"].double(), g["exact"].double()
            cos.append(float(a @ e / (a.norm() * e.norm())))
            eff.append(float((e * a.sign()).sum() / e.abs().sum()))
    finally:
        gen.LimeOptimizer = saved
    return dict(questions=len(encs), cosine_mean=_mean(cos), cosine_min=min(cos), cosine_max=max(cos),
                adam_step_efficiency_mean=_mean(eff), adam_step_efficiency_min=min(eff),
                adam_step_efficiency_max=max(eff))


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="digits-llava")
    ap.add_argument("--items", type=int, default=80)
    ap.add_argument("--lr-factors", type=float, nargs="+", default=[100.0],
                    help="multiples of the preset lr run besides the preset itself")
    ap.add_argument("--max-new", type=int, default=3)
    ap.add_argument("--gradient-check", type=int, default=20, metavar="N",
                    help="compare the two gradients on the first N questions (0: skip)")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)

    from lime_attr import LRP
    from lime_attr.generation import prepare_inputs
    from lime_attr.mitigation import LimeConfig, lime_generate
    from lime_attr.models import DEFAULT_CORRUPTION, load_builtin, pope_questions

    torch.set_num_threads(1)
    model, proc = load_builtin(args.model, attn_implementation="eager")
    model.eval()
    items = pope_questions(args.model, "adversarial", corruption=DEFAULT_CORRUPTION[args.model])[: args.items]
    encs = [prepare_inputs(model, proc, [it.prompt], images=[it.image]) for it in items]
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    lrp = LRP(model)
    base = LimeConfig.for_model(model, mode="reference")
    cfgs = {}
    for factor in dict.fromkeys([1.0, *args.lr_factors]):
        for so in ("autograd", "exact"):
            cfgs[f"lr x{factor:g} {so}"] = base.replace(lr=base.lr * factor, second_order=so)

    def cut(ids: list) -> list:
        return ids[: next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))]

    def greedy(enc: dict) -> list:
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new, do_sample=False)
        return cut(out[0, enc["input_ids"].shape[1]:].tolist())

    lime_generate(model, proc, encs[0], cfgs[next(iter(cfgs))].replace(steps=1), max_new_tokens=1, attribution=lrp)
    lime_generate(model, proc, encs[0], base.replace(steps=2, second_order="exact"), max_new_tokens=1,
                  attribution=lrp)  # warm-up of both paths
    agreement = gradient_agreement(model, proc, lrp, encs[: args.gradient_check]) if args.gradient_check else None
    greedy_ids = [greedy(e) for e in encs]
    runs: dict = {k: dict(cpu=0.0, answers=[], recs=[]) for k in cfgs}
    for i, enc in enumerate(encs):
        for name, cfg in cfgs.items():
            c0 = time.process_time()
            res = lime_generate(model, proc, enc, cfg, max_new_tokens=args.max_new, attribution=lrp)
            runs[name]["cpu"] += time.process_time() - c0
            runs[name]["answers"].append(cut(res.tokens[0].tolist()))
            runs[name]["recs"].extend(res.records)
        print(f"question {i + 1}/{len(encs)} done", flush=True)

    def acc(answers: list) -> float:
        words = [tok.decode(a, skip_special_tokens=True).strip().lower().split()[:1] for a in answers]
        return sum(w == [it.label] for w, it in zip(words, items)) / len(items)

    rows = [dict(decoder="greedy", accuracy=acc(greedy_ids))]
    for name, r in runs.items():
        recs = [x for x in r["recs"] if x.steps > 0]
        n_opt = len(recs)
        rows.append(dict(
            decoder=name, optimised_tokens=n_opt, cpu_s_per_token=r["cpu"] / max(n_opt, 1),
            accuracy=acc(r["answers"]), changed=sum(a != g for a, g in zip(r["answers"], greedy_ids)),
            share_before=_mean([x.share_before[0] for x in recs]), share_after=_mean([x.share_after[0] for x in recs]),
            focus_before=_mean([x.focus_before[0] for x in recs]), focus_after=_mean([x.focus_after[0] for x in recs]),
            rel_loss_first=_mean([x.rel_losses[0][0] for x in recs]),
            rel_loss_last=_mean([x.rel_losses[-1][0] for x in recs]),
            # per optimised token: did the relevance loss of the last forward go below that of the first?
            rel_loss_decreased=_mean([float(x.rel_losses[-1][0] < x.rel_losses[0][0]) for x in recs]),
            rel_loss_change_median=_median([x.rel_losses[-1][0] - x.rel_losses[0][0] for x in recs])))
    by = {r["decoder"]: r for r in rows}
    for r in rows:
        if r["decoder"].endswith(" exact"):
            other = by[r["decoder"].replace(" exact", " autograd")]
            r["cost_ratio"] = r["cpu_s_per_token"] / other["cpu_s_per_token"]
    print(f"\n{args.model}, POPE adversarial degraded, {len(items)} questions, reference mode, "
          f"{cpu_model()}, torch {torch.__version__}, 1 thread")
    print(f"{'decoder':22} {'cpu-s/tok':>9} {'ratio':>6} {'acc':>6} {'changed':>7} {'share b->a':>15} "
          f"{'focus b->a':>15} {'L_rel first->last':>18} {'L_rel down':>10} {'median dL_rel':>13}")
    for r in rows:
        if r["decoder"] == "greedy":
            print(f"{'greedy':22} {'':>9} {'':>6} {r['accuracy']:6.3f}")
            continue
        ratio = f"{r['cost_ratio']:6.2f}" if "cost_ratio" in r else f"{'':>6}"
        print(f"{r['decoder']:22} {r['cpu_s_per_token']:9.3f} {ratio} {r['accuracy']:6.3f} {r['changed']:7d} "
              f"{r['share_before']:7.4f}->{r['share_after']:.4f} {r['focus_before']:7.4f}->{r['focus_after']:.4f} "
              f"{r['rel_loss_first']:8.4f}->{r['rel_loss_last']:.4f} {r['rel_loss_decreased']:10.3f} "
              f"{r['rel_loss_change_median']:13.4g}")
    if agreement:
        print(f"\ngradient of the relevance loss at Delta = 0, first token, {agreement['questions']} questions: "
              f"cosine(autograd, exact) mean {agreement['cosine_mean']:.3f} (min {agreement['cosine_min']:.3f}, max "
              f"{agreement['cosine_max']:.3f}); first Adam step along autograd achieves "
              f"{agreement['adam_step_efficiency_mean']:.3f} of the first-order decrease along exact (min "
              f"{agreement['adam_step_efficiency_min']:.3f}, max {agreement['adam_step_efficiency_max']:.3f})")
    if args.json:
        write_json(args.json, dict(rows=rows, gradient_agreement=agreement), indent=1)


if __name__ == "__main__":
    main()
