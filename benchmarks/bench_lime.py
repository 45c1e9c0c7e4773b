"""Cost of LIME against cached greedy decoding of the same model, in the same run.

Two parts; every decoder runs in a fresh subprocess (so that the resident-memory high-water mark is its
own), on one CPU thread, and every ratio is to greedy measured in the same run.

**Tiny random models** (``--models llama llava``; CPU, fp32, eager attention, an 80-token prompt with a
64-token perceptual span). Decoders:

* ``greedy``: ``model.generate(do_sample=False)`` (KV cache);
* ``vcd``: greedy with :class:`~lime_attr.mitigation.VCDLogitsProcessor` (LLaVA only);
* ``lime-reference``: the published loop (7 steps, full recompute, token from the last forward);
* ``lime-fast``: fast mode with its defaults (confidence gate 0.99, 2 updates carrying the reference's
  total step, emission after the last update);
* ``lime-fast-nogate``: ``lime-fast`` with ``confidence_gate=None`` (every token optimised);
* ``lime-fast-v1``: fast mode as it was before the compressed schedule (7 updates at ``lr``, fixed
  target, no gate);
* ``lime-fast-cached``: ``lime-fast-nogate`` with the incremental (approximate) emission;
* ``lime-fast-1``: ``lime-fast`` with one update (``fast_updates=1``) carrying the same total step;
* ``lime-reference-ckpt``, ``lime-fast-nogate-ckpt``: those decoders with LIME's activation checkpoint
  (``activation_checkpoint=True``; on CPU it releases freed heap pages before each layer's recomputation,
  ``release_heap=True``);
* ``lime-fast-nogate-ckpt-keepheap``: ``lime-fast-nogate-ckpt`` with ``release_heap=False``;
* ``lime-incremental``: ``mode="incremental"`` (issue 15's cheap variant: relevance along the KV-cache path,
  Delta on the current query's reads, every token optimised, one update carrying the total step);
* ``lime-incremental-2``: the same with two updates (``fast_updates=2``);
* ``lime-incremental-frozen``: ``lime-incremental`` with ``second_order="frozen"`` (its first-order variant);
* ``lime-incremental-fused``, ``lime-incremental-frozen-fused``: those two with ``prompt_pass="fused"`` (the
  whole prompt in the first inner forward instead of a separate no-grad forward of its prefix).

``--lr-factor K`` also runs the decoders named by ``--lr-decoders`` (default ``lime-reference`` and
``lime-fast``) at K times the preset learning rate.

It reports tokens/s, the peak resident memory above the memory after loading the model, and the ratios
to greedy. On CUDA the peak is ``torch.cuda.max_memory_allocated``.

**Trained demo models** (``--tasks``; ``digits-llava`` and ``tones-qwen2audio``, loaded with
``lime_attr.models.load_builtin``): held-out POPE adversarial questions (``pope_questions``) and
description requests (``description_items``, longer answers), clean and, when the installed
``lime_attr.models`` supports it, degraded (``corruption="degraded"``). Decoders ``greedy``,
``lime-reference``, ``lime-fast``, ``lime-fast-nogate`` and, with ``--lr-factor F``, the two LIME modes
with ``F`` times the preset learning rate (where LIME changes answers, so that "keeps the effect" is
tested on something). Besides tokens per CPU-second and memory it measures the effect on the same
questions: answers changed vs greedy, accuracy against the labels (descriptions: exact object set, and
CHAIR_i = hallucinated mentions / mentions), and the mean perceptual share of relevance before / after
over the optimised tokens. For ``lime-fast`` the share after is measured in a second, untimed pass with
``final_relevance=True`` (the relevance under the perturbation the token was emitted from).

Goals (reported, not tested): ``lime-fast`` at most 3x slower than cached greedy, at most +10% memory,
hallucination effect at least that of ``lime-reference``.

Run: ``python -m benchmarks.bench_lime [--tokens 16] [--models llama llava]`` and
``python -m benchmarks.bench_lime --models --tasks pope description --items 10 [--lr-factor 100]``.
``digits-llava`` as a ``--models`` entry is the old single-scene cost row (``LIME_BENCH_DIGITS_PATH``
names a ``save_pretrained`` folder). ``llava-1b`` is the GPU row the LIME issue asks for: a randomly
initialised LLaVA-1.5-shaped model of about 1.2B parameters (CLIP ViT-L/14-336 tower, 576 image tokens,
a 16-layer 2048-wide Llama), bf16 on CUDA:
``python -m benchmarks.bench_lime --models llava-1b --tokens 16 --device cuda``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import torch

from benchmarks._common import Stopwatch, machine_line, max_rss_mb, rss_mb, write_json

DECODERS = ("greedy", "vcd", "lime-reference", "lime-fast", "lime-fast-nogate", "lime-fast-v1", "lime-fast-cached",
            "lime-fast-1", "lime-reference-ckpt", "lime-fast-nogate-ckpt", "lime-fast-nogate-ckpt-keepheap", "lime-incremental",
            "lime-incremental-2", "lime-incremental-frozen", "lime-incremental-fused", "lime-incremental-frozen-fused")
TASK_DECODERS = ("greedy", "lime-reference", "lime-fast", "lime-fast-nogate")
TASK_MODELS = ("digits-llava", "tones-qwen2audio")


def lime_configs(model: Any = None, lr_factor: float = 1.0) -> dict:
    """The LIME decoders of the benchmark (presets of ``LimeConfig.for_model`` when the model has one)."""
    from lime_attr.mitigation import LimeConfig
    from lime_attr.mitigation.config import PRESETS

    mt = getattr(getattr(model, "config", None), "model_type", None)
    base = LimeConfig.for_model(mt) if mt in PRESETS else LimeConfig()
    cfgs = {
        "lime-reference": base.replace(mode="reference"),
        "lime-fast": base.replace(mode="fast"),
        "lime-fast-nogate": base.replace(mode="fast", confidence_gate=None),
        "lime-fast-v1": base.replace(mode="fast", confidence_gate=None, fast_updates=None, target="fixed"),
        "lime-fast-cached": base.replace(mode="fast", confidence_gate=None, emit="cached"),
        "lime-fast-1": base.replace(mode="fast", fast_updates=1),  # one update at (steps - 1) x lr
        "lime-reference-ckpt": base.replace(mode="reference", activation_checkpoint=True),
        "lime-fast-nogate-ckpt": base.replace(mode="fast", confidence_gate=None, activation_checkpoint=True),
        "lime-fast-nogate-ckpt-keepheap": base.replace(mode="fast", confidence_gate=None, activation_checkpoint=True,
                                                       release_heap=False),
        # the cheap variant (issue 15): one position over the KV cache, every token optimised (no gate)
        "lime-incremental": base.replace(mode="incremental"),  # 1 update at (steps - 1) x lr
        "lime-incremental-2": base.replace(mode="incremental", fast_updates=2),
        # its first-order variant: the rule gradient held constant, no double backward, no-grad emission
        "lime-incremental-frozen": base.replace(mode="incremental", second_order="frozen"),
        # both with the whole prompt in the first inner forward instead of a separate no-grad prefix forward
        "lime-incremental-fused": base.replace(mode="incremental", prompt_pass="fused"),
        "lime-incremental-frozen-fused": base.replace(mode="incremental", second_order="frozen", prompt_pass="fused"),
    }
    if lr_factor != 1.0:
        for k in ("lime-reference", "lime-fast", "lime-fast-1", "lime-incremental", "lime-incremental-2"):
            cfgs[f"{k}@x{lr_factor:g}"] = cfgs[k].replace(lr=base.lr * lr_factor)
    return cfgs


def build(name: str, device: str) -> tuple[Any, dict, Any]:
    """(model, inputs, modality_mask) for a model name."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=1024, hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=1024, bos_token_id=None, eos_token_id=None,
                pad_token_id=0)
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**text, attn_implementation="eager"))
        ids = torch.randint(1, 1024, (1, 80))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        span = (8, 8 + 64)  # a fake 64-token "image"
    elif name == "llava":
        vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=64)
        img = 1023
        cfg = LlavaConfig(vision_config=vc, text_config=LlamaConfig(**text), image_token_id=img, image_seq_length=64,
                          vision_feature_layer=-1, attn_implementation="eager")
        model = LlavaForConditionalGeneration(cfg)
        ids = torch.cat([torch.randint(1, 1000, (1, 8)), torch.full((1, 64), img), torch.randint(1, 1000, (1, 8))], 1)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
        span = None  # found from the image placeholder
    elif name == "llava-1b":
        # randomly initialised, LLaVA-1.5-shaped at about 1.2B parameters: a CLIP ViT-L/14 tower at 336 px
        # (576 image tokens) and a 1B Llama (hidden 2048, 16 layers, GQA 32/8 heads); bf16 on CUDA
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
        tc = LlamaConfig(vocab_size=32064, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                         bos_token_id=None, eos_token_id=None, pad_token_id=0)
        img = 32000
        cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=img, image_seq_length=576,
                          vision_feature_layer=-2, attn_implementation="sdpa")
        model = LlavaForConditionalGeneration(cfg)
        if device == "cuda":
            model = model.to(torch.bfloat16)
        g = torch.Generator().manual_seed(0)
        ids = torch.cat([torch.randint(1, 31999, (1, 16), generator=g), torch.full((1, 576), img),
                         torch.randint(1, 31999, (1, 24), generator=g)], 1)
        pixels = torch.randn(1, 3, 336, 336, generator=g).to(next(model.parameters()).dtype)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
        span = None
    elif name == "digits-llava":  # the embedded trained demo model, when its weights are installed
        import numpy as np

        from lime_attr.models import loading, processing, scenes

        path = os.environ.get("LIME_BENCH_DIGITS_PATH")  # a save_pretrained folder of the demo model
        model, proc = (loading.load_model(path, attn_implementation="eager") if path
                       else loading.load_builtin("digits-llava", attn_implementation="eager"))
        scene = scenes.make_scene(np.random.default_rng(0))
        text = processing.format_prompt(name, processing.description_question(name))
        inputs = dict(proc(images=[scene.image], text=[text], return_tensors="pt").items())
        span = None
    else:
        raise ValueError(f"unknown model {name!r}")
    model = model.to(device).eval()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return model, inputs, span


def run_one(name: str, decoder: str, tokens: int, device: str, warmup: int = 2) -> dict:
    """Run one decoder on one model in this process; returns the measurements."""
    from transformers import LogitsProcessorList

    from lime_attr import LRP
    from lime_attr.mitigation import VCDLogitsProcessor, lime_generate

    torch.set_num_threads(1)
    model, inputs, span = build(name, device)
    lrp = LRP(model)
    prompt_len = inputs["input_ids"].shape[1]
    cfgs = lime_configs(model if name == "digits-llava" else None)

    def go(n: int) -> tuple[list, dict]:
        info: dict = {}
        with torch.no_grad():
            if decoder == "greedy":
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                return out[0, prompt_len:].tolist(), info
            if decoder == "vcd":
                if "pixel_values" not in inputs:
                    raise KeyError("vcd needs an image")
                vcd = VCDLogitsProcessor.from_inputs(model, inputs, generator=torch.Generator().manual_seed(0))
                out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     logits_processor=LogitsProcessorList([vcd]))
                return out[0, prompt_len:].tolist(), info
        res = lime_generate(model, None, inputs, cfgs[decoder], max_new_tokens=n, modality_mask=span, attribution=lrp)
        info["inner_steps"] = sum(r.steps for r in res.records)
        info["changed"] = int(res.changed.sum())
        sb, sa = res.share_before.nanmean().item(), res.share_after.nanmean().item()
        info["share_before"], info["share_after"] = sb, sa
        return res.tokens[0].tolist(), info

    if warmup > 0:
        go(warmup)  # warm-up (first scope entry runs the op-coverage check)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = rss_mb()
    with Stopwatch(sync=device == "cuda") as clock:
        toks, info = go(tokens)
    dt, cpu = clock.wall, clock.cpu
    peak_rss = max_rss_mb()
    out = dict(model=name, decoder=decoder, tokens=len(toks), seconds=dt, tokens_per_s=len(toks) / dt,
               cpu_seconds=cpu, tokens_per_cpu_s=len(toks) / cpu,
               base_mb=base_rss, peak_mb=peak_rss, extra_mb=max(peak_rss - base_rss, 0.0), ids=toks,
               weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, **info)
    if device == "cuda":
        out["base_mb"] = base
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["extra_mb"] = out["peak_mb"] - base
    return out


# ----------------------------------------------------------------------------------------- trained models


def task_items(name: str, kind: str, condition: str, n_items: int) -> list:
    """Held-out POPE adversarial questions or description items of a demo model (clean or degraded)."""
    from lime_attr.models import description_items, pope_questions

    kw: dict = {} if condition == "clean" else {"corruption": condition}
    if kind == "pope":
        return pope_questions(name, "adversarial", n_items=n_items, **kw)
    if kind == "description":
        return description_items(name, n_items=n_items, **kw)
    raise ValueError(f"unknown task set {kind!r} (pope, description)")


def degraded_supported() -> bool:
    """Whether the installed ``lime_attr.models`` takes ``corruption=`` (degraded inputs)."""
    import inspect

    from lime_attr.models import pope_questions

    return "corruption" in inspect.signature(pope_questions).parameters


def _mentions(text: str, names: tuple) -> list:
    import re

    low = {n.lower() for n in names}
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w in low]


def run_task(name: str, kind: str, condition: str, decoder: str, n_items: int, max_new: int,
             lr_factor: float = 1.0) -> dict:
    """One decoder over one held-out set of a trained demo model, in this process."""
    import math

    from lime_attr import LRP
    from lime_attr.generation import prepare_inputs
    from lime_attr.mitigation import lime_generate
    from lime_attr.models import load_builtin, object_names

    torch.set_num_threads(1)
    model, proc = load_builtin(name, attn_implementation="eager")
    model.eval()
    items = task_items(name, kind, condition, n_items)
    encs = []
    for it in items:
        if getattr(it, "image", None) is not None:
            encs.append(prepare_inputs(model, proc, [it.prompt], images=[it.image]))
        else:
            encs.append(prepare_inputs(model, proc, [it.prompt], audios=[it.audio], sampling_rate=it.sampling_rate))
    tok = proc.tokenizer
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    lrp = LRP(model)
    cfgs = lime_configs(model, lr_factor)

    def one(enc: dict, cfg: Any = None) -> tuple:
        if decoder == "greedy":
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False)
            ids = out[0, enc["input_ids"].shape[1]:].tolist()
            rec = None
        else:
            res = lime_generate(model, proc, enc, cfg or cfgs[decoder], max_new_tokens=max_new, attribution=lrp)
            ids, rec = res.tokens[0].tolist(), res
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), len(ids))
        return ids[:cut], rec

    one(encs[0])  # warm-up (first scope entry, op-coverage check, allocator)
    base_rss = rss_mb()
    with Stopwatch() as clock:
        runs = [one(e) for e in encs]
    dt, cpu = clock.wall, clock.cpu
    peak_rss = max_rss_mb()
    n_tok = sum(len(ids) for ids, _ in runs)
    names = object_names(name)
    answers = [tok.decode(ids, skip_special_tokens=True).strip() for ids, _ in runs]
    if kind == "pope":
        correct = [a.lower().split()[:1] == [it.label] for a, it in zip(answers, items)]
        chair = None
    else:
        correct, halluc, mentions = [], 0, 0
        for a, it in zip(answers, items):
            m = _mentions(a, names)
            truth = {o.lower() for o in it.objects}
            correct.append(set(m) == truth)
            halluc += sum(w not in truth for w in m)
            mentions += len(m)
        chair = halluc / max(mentions, 1)
    out = dict(model=name, set=kind, condition=condition, decoder=decoder, items=len(items), tokens=n_tok,
               seconds=dt, cpu_seconds=cpu, tokens_per_s=n_tok / dt, tokens_per_cpu_s=n_tok / cpu,
               base_mb=base_rss, peak_mb=peak_rss, extra_mb=max(peak_rss - base_rss, 0.0),
               answers=[ids for ids, _ in runs], accuracy=sum(correct) / len(correct), chair_i=chair)
    if decoder != "greedy":
        recs = [r for _, res in runs for r in res.records]
        out["optimised_tokens"] = sum(r.steps > 0 for r in recs)
        out["updates"] = sum(r.steps for r in recs)
        out["gated_tokens"] = sum(r.skipped == "confidence" for r in recs)
        out["lime_changed"] = sum(any(r.changed) for r in recs)
        cfg = cfgs[decoder]
        pairs = [(r.share_before[0], r.share_after[0]) for r in recs if r.steps > 0]
        if cfg.mode == "fast" and cfg.emit_from == "final" and pairs:
            # untimed second pass: the relevance under the perturbation each token was emitted from
            fin = cfg.replace(final_relevance=True)
            pairs = [(r.share_before[0], r.share_after[0]) for e in encs for r in one(e, fin)[1].records
                     if r.steps > 0]
        ok = [(b, a) for b, a in pairs if not (math.isnan(b) or math.isnan(a))]
        out["share_before"] = sum(b for b, _ in ok) / len(ok) if ok else float("nan")
        out["share_after"] = sum(a for _, a in ok) / len(ok) if ok else float("nan")
    return out


def print_tasks(rows: list) -> None:
    print(f"\n{'model':16} {'set':11} {'cond':8} {'decoder':22} {'tok/cpu-s':>9} {'x slower':>8} {'tok/s':>7} "
          f"{'x slower':>8} {'mem ratio':>9} {'opt/tok':>8} {'upd':>5} {'changed':>7} {'acc':>6} {'CHAIR_i':>7} "
          f"{'=ref':>6} {'share b->a':>12}")
    keys = []
    for r in rows:
        k = (r["model"], r["set"], r["condition"])
        if k not in keys:
            keys.append(k)
    for k in keys:
        grp = [r for r in rows if (r["model"], r["set"], r["condition"]) == k]
        g = next((r for r in grp if r["decoder"] == "greedy"), None)
        for r in grp:
            ref_name = "lime-reference" + (r["decoder"].split("@", 1)[1:] and "@" + r["decoder"].split("@", 1)[1] or "")
            ref = next((x for x in grp if x["decoder"] == ref_name), None)
            same = (f"{sum(a == b for a, b in zip(r['answers'], ref['answers']))}/{len(ref['answers'])}"
                    if ref is not None and r["decoder"].startswith("lime") else "")
            slow_cpu = g["tokens_per_cpu_s"] / r["tokens_per_cpu_s"] if g else float("nan")
            slow = g["tokens_per_s"] / r["tokens_per_s"] if g else float("nan")
            mem = (r["base_mb"] + r["extra_mb"]) / (g["base_mb"] + g["extra_mb"]) if g else float("nan")
            changed = sum(a != b for a, b in zip(r["answers"], g["answers"])) if g else ""
            opt = f"{r['optimised_tokens']}/{r['tokens']}" if "optimised_tokens" in r else ""
            share = (f"{r['share_before']:.3f}->{r['share_after']:.3f}" if r.get("share_before") is not None
                     and r["share_before"] == r["share_before"] else "")
            chair = f"{r['chair_i']:.3f}" if r.get("chair_i") is not None else ""
            print(f"{r['model']:16} {r['set']:11} {r['condition']:8} {r['decoder']:22} {r['tokens_per_cpu_s']:9.2f} "
                  f"{slow_cpu:8.2f} {r['tokens_per_s']:7.2f} {slow:8.2f} {mem:9.3f} {opt:>8} {r.get('updates', ''):>5} "
                  f"{changed:>7} {r['accuracy']:6.3f} {chair:>7} {same:>6} {share:>12}")
    print("\nx slower: greedy's tokens per CPU-second (then per wall-second) over the decoder's, same set, same run. "
          "mem ratio: peak resident memory over greedy's. opt/tok: tokens that ran the inner loop / generated tokens. "
          "upd: optimiser updates. changed: answers (token sequences) that differ from greedy's. acc: POPE: answer == "
          "label; description: exact object set. =ref: answers equal to lime-reference's (same lr). share b->a: mean perceptual share of |relevance| before / after "
          "the inner loop over the optimised tokens (after = under the perturbation the token was emitted from).")


def machine() -> str:
    """The machine in one line (:func:`benchmarks._common.machine_line`)."""
    return machine_line()


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=2,
                    help="tokens of the untimed warm-up generation before the measured one (0: none)")
    ap.add_argument("--models", nargs="*", default=["llama", "llava"])
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "DECODER"), help=argparse.SUPPRESS)
    ap.add_argument("--one-task", nargs=4, metavar=("MODEL", "SET", "CONDITION", "DECODER"), help=argparse.SUPPRESS)
    ap.add_argument("--tasks", nargs="*", default=[], choices=["pope", "description"],
                    help="held-out sets of the trained demo models to measure (speed and effect)")
    ap.add_argument("--task-models", nargs="+", default=list(TASK_MODELS))
    ap.add_argument("--conditions", nargs="+", default=["clean", "degraded"])
    ap.add_argument("--task-decoders", nargs="+", default=list(TASK_DECODERS))
    ap.add_argument("--items", type=int, default=10, help="held-out scenes / clips per set")
    ap.add_argument("--lr-factor", type=float, default=1.0,
                    help="also run lime-reference / lime-fast with this multiple of the preset lr")
    ap.add_argument("--lr-decoders", nargs="*", default=["lime-reference", "lime-fast"],
                    help="the task decoders that also run at --lr-factor")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.tokens, args.device, args.warmup)))
        return
    if args.one_task:
        m, kind, cond, dec = args.one_task
        max_new = 3 if kind == "pope" else 10
        print(json.dumps(run_task(m, kind, cond, dec, args.items, max_new, args.lr_factor)))
        return
    print(f"machine: {machine()} device={args.device}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows = []
    task_rows = []
    if args.tasks:
        conds = list(args.conditions)
        if "degraded" in conds and not degraded_supported():
            print("degraded inputs: lime_attr.models.pope_questions has no corruption= yet, skipped")
            conds.remove("degraded")
        decs = list(args.task_decoders)
        if args.lr_factor != 1.0:
            decs += [f"{d}@x{args.lr_factor:g}" for d in args.lr_decoders]
        for m in args.task_models:
            for kind in args.tasks:
                for cond in conds:
                    for dec in decs:
                        cmd = [sys.executable, "-m", "benchmarks.bench_lime", "--one-task", m, kind, cond, dec,
                               "--items", str(args.items), "--lr-factor", str(args.lr_factor)]
                        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
                        if proc.returncode != 0:
                            print(f"{m} {kind} {cond} {dec}: FAILED\n{proc.stderr[-2000:]}")
                            continue
                        task_rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                        print(f"  done {m} {kind} {cond} {dec}", file=sys.stderr, flush=True)
        print_tasks(task_rows)
    if "digits-llava" in args.models:
        from lime_attr.models.loading import available_builtins

        if "digits-llava" not in available_builtins() and not os.environ.get("LIME_BENCH_DIGITS_PATH"):
            print("digits-llava: weights not installed, skipped")
            args.models = [m for m in args.models if m != "digits-llava"]
    for name in args.models:
        for dec in args.decoders:
            if dec == "vcd" and "llava" not in name:
                continue
            cmd = [sys.executable, "-m", "benchmarks.bench_lime", "--one", name, dec, "--tokens", str(args.tokens),
                   "--device", args.device, "--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            if proc.returncode != 0:
                print(f"{name} {dec}: FAILED\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    if not rows:
        if args.json:
            write_json(args.json, {"machine": machine(), "rows": rows, "task_rows": task_rows}, indent=1)
        return
    print(f"\n{'model':6} {'decoder':17} {'tok/s':>8} {'x slower':>9} {'tok/cpu-s':>9} {'x slower':>9} {'extra MB':>9} "
          f"{'mem ratio':>9} {'extra/weights':>13} {'steps':>6} {'changed':>7} {'same as fast':>12} {'share b->a':>12}")
    for name in args.models:
        base = next((r for r in rows if r["model"] == name and r["decoder"] == "greedy"), None)
        ref = next((r for r in rows if r["model"] == name and r["decoder"] == "lime-reference"), None)
        fast = next((r for r in rows if r["model"] == name and r["decoder"] == "lime-fast"), None)
        for r in rows:
            if r["model"] != name:
                continue
            slow = base["tokens_per_s"] / r["tokens_per_s"] if base else float("nan")
            slow_cpu = base["tokens_per_cpu_s"] / r["tokens_per_cpu_s"] if base else float("nan")
            mem = (r["base_mb"] + r["extra_mb"]) / (base["base_mb"] + base["extra_mb"]) if base else float("nan")
            same = ""
            if fast is not None and r["decoder"].startswith("lime") and r is not ref:
                agree = sum(a == b for a, b in zip(r["ids"], fast["ids"]))
                same = f"{agree}/{len(fast['ids'])}"
            print(f"{name:6} {r['decoder']:17} {r['tokens_per_s']:8.2f} {slow:9.2f} {r['tokens_per_cpu_s']:9.2f} "
                  f"{slow_cpu:9.2f} {r['extra_mb']:9.1f} {mem:9.3f} {r['extra_mb'] / r['weights_mb']:13.2f} "
                  f"{r.get('inner_steps', ''):>6} "
                  f"{r.get('changed', ''):>7} {same:>12} "
                  + (f"{r['share_before']:.3f}->{r['share_after']:.3f}" if "share_before" in r else ""))
    print("\nx slower: greedy tokens/s / decoder tokens/s (wall clock, then process CPU time, which is robust to "
          "other load on the machine). mem ratio: (base + extra) / greedy's (base + extra), "
          "base = resident memory after loading the model (mostly the Python / torch runtime for these tiny models), "
          "so extra/weights (peak memory above base over the model's weight bytes) is the figure that scales. same as fast: emitted tokens equal to lime-fast's.")
    if args.json:
        write_json(args.json, {"machine": machine(), "rows": rows, "task_rows": task_rows}, indent=1)


if __name__ == "__main__":
    main()
