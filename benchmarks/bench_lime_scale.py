"""Where the incremental LIME variants cross 3x greedy's CPU time per one-token answer as the language model
grows (design: ``docs/lime_evaluation.rst``, "How large a model must be for the cheap variants to be
within 3x").

Randomly initialised LLaVA-shaped models: a fixed 2-layer CLIP tower of width 64 (64 image tokens) and an
8-layer Llama of width ``h`` (MLP ``2.75 h``, ``h / 32`` heads, at least 2; vocabulary 1024), fp32, eager
attention, one CPU thread; a 96-token prompt (16 text, 64 image, 16 text tokens); ``--prompts`` prompts,
``--rounds`` interleaved rounds after a warm-up (:func:`benchmarks.bench_lime_session.time_rounds`):
``greedy`` (one no-grad forward, the argmax), ``lime-incremental`` (autograd) and ``lime-incremental-frozen``
(first order), each answering every prompt inside one ``LimeSession``, at the LLaVA preset.

Run: ``python -m benchmarks.bench_lime_scale [--widths 64 128 256 512 1024] [--json out.json]``.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from benchmarks.bench_lime_session import run_and_report, time_rounds

IMAGE_TOKEN = 1023
VARIANTS = {"lime-incremental": {}, "lime-incremental-frozen": {"second_order": "frozen"}}


def build(width: int, prompts: int) -> tuple[Any, list[dict]]:
    """A random LLaVA-shaped model with an 8-layer Llama of ``width``, and ``prompts`` processor-like inputs."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    heads = max(width // 32, 2)
    text = LlamaConfig(vocab_size=1024, hidden_size=width, intermediate_size=int(2.75 * width), num_hidden_layers=8,
                       num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
                       bos_token_id=None, eos_token_id=None, pad_token_id=0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=8, projection_dim=64)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=64,
                      vision_feature_layer=-1, attn_implementation="eager")
    model = LlavaForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(1)
    inputs = []
    for _ in range(prompts):
        ids = torch.cat([torch.randint(1, 1000, (1, 16), generator=g), torch.full((1, 64), IMAGE_TOKEN),
                         torch.randint(1, 1000, (1, 16), generator=g)], 1)
        inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                       "pixel_values": torch.randn(1, 3, 64, 64, generator=g)})
    return model, inputs


def decoders(model: Any, inputs: list[dict]) -> dict[str, Callable[[], None]]:
    """``{name: one round}``: greedy and each variant inside one session."""
    from lime_attr.mitigation import LimeConfig, LimeSession

    def greedy() -> None:
        with torch.no_grad():
            for enc in inputs:
                model(**enc).logits[:, -1].argmax(-1)

    def variant(extra: dict) -> Callable[[], None]:
        cfg = LimeConfig.for_model("llava", mode="incremental", **extra)

        def one_round() -> None:
            with LimeSession(model, None, cfg) as session:
                for enc in inputs:
                    session.generate(enc, max_new_tokens=1)

        return one_round

    return {"greedy": greedy, **{name: variant(extra) for name, extra in VARIANTS.items()}}


def run_width(width: int, prompts: int, rounds: int) -> dict[str, Any]:
    model, inputs = build(width, prompts)
    n_params = sum(p.numel() for p in model.model.language_model.parameters())
    return {"model": f"llava-w{width} ({n_params / 1e6:.1f}M LM)", "width": width, "lm_parameters": n_params,
            **time_rounds(decoders(model, inputs), len(inputs), rounds)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    run_and_report(args, lambda w: run_width(w, args.prompts, args.rounds), cases=args.widths)

if __name__ == "__main__":
    main()
