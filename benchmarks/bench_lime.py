"""Cost of LIME against cached greedy decoding of the same model, in the same run.

For each model (tiny random models from configs, CPU, fp32, eager attention) and each decoder --

* ``greedy``: ``model.generate(do_sample=False)`` (KV cache);
* ``vcd``: greedy with :class:`~lime_attr.mitigation.VCDLogitsProcessor` (LLaVA only);
* ``lime-reference``: the published loop (7 steps, full recompute, token from the last forward);
* ``lime-fast``: no model copy, KV cache for the reference distribution, emission after the final update
  (one extra forward);
* ``lime-fast-cached``: as ``lime-fast`` but the emission is an incremental step over the KV cache
  (approximate, see docs/lime.rst);
* ``lime-fast-gated``: ``lime-fast-cached`` + early stopping (patience 2) + confidence gate 0.5

-- it reports tokens/s, the peak resident memory above the memory after loading the model (each decoder
runs in a fresh subprocess so that the high-water mark is its own), and the ratios to greedy. On CUDA
the peak is ``torch.cuda.max_memory_allocated``.

Goals (reported, not tested): ``lime-fast`` at most 3x slower than cached greedy, at most +10% memory.

Run: ``python -m benchmarks.bench_lime [--tokens 16] [--models llama llava digits-llava]``. ``digits-llava`` is
the embedded trained demo model (``lime_attr.models.load_builtin``), or the ``save_pretrained`` folder named
by the environment variable ``LIME_BENCH_DIGITS_PATH``; it is skipped when neither exists. The table also
gives the mean perceptual share of relevance before / after the inner loop (``share b->a``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import torch

DECODERS = ("greedy", "vcd", "lime-reference", "lime-fast", "lime-fast-cached", "lime-fast-gated")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


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


def run_one(name: str, decoder: str, tokens: int, device: str) -> dict:
    """Run one decoder on one model in this process; returns the measurements."""
    from transformers import LogitsProcessorList

    from lime_attr import LRP
    from lime_attr.mitigation import LimeConfig, VCDLogitsProcessor, lime_generate

    torch.set_num_threads(1)
    model, inputs, span = build(name, device)
    lrp = LRP(model)
    prompt_len = inputs["input_ids"].shape[1]
    cfgs = {
        "lime-reference": LimeConfig(mode="reference"),
        "lime-fast": LimeConfig(mode="fast"),
        "lime-fast-cached": LimeConfig(mode="fast", emit="cached"),
        "lime-fast-gated": LimeConfig(mode="fast", emit="cached", patience=2, tol=1e-3, confidence_gate=0.5),
    }

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

    go(2)  # warm-up (first scope entry runs the op-coverage check)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    toks, info = go(tokens)
    if device == "cuda":
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = dict(model=name, decoder=decoder, tokens=len(toks), seconds=dt, tokens_per_s=len(toks) / dt,
               cpu_seconds=cpu, tokens_per_cpu_s=len(toks) / cpu,
               base_mb=base_rss, peak_mb=peak_rss, extra_mb=max(peak_rss - base_rss, 0.0), ids=toks,
               weights_mb=sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, **info)
    if device == "cuda":
        out["base_mb"] = base
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["extra_mb"] = out["peak_mb"] - base
    return out


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} threads={torch.get_num_threads()}, "
            f"python {platform.python_version()}")


def main(argv: Any = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--models", nargs="+", default=["llama", "llava"])
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "DECODER"), help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.tokens, args.device)))
        return
    print(f"machine: {machine()} device={args.device}")
    rows = []
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
                   "--device", args.device]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(
                os.path.abspath(__file__))))
            if proc.returncode != 0:
                print(f"{name} {dec}: FAILED\n{proc.stderr[-2000:]}")
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
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
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
