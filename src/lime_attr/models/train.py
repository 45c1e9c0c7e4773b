"""Train the embedded demo models on CPU and save them as package data.

Usage::

    python -m lime_attr.models.train --model digits-llava|tones-qwen2audio|all [--out DIR] [--seed 0]

Each model is trained from scratch with a fixed seed on freshly generated training scenes / clips (the
digit-image pool and random streams of training never touch the held-out data), with teacher forcing and
a cross-entropy loss on the answer tokens only (``yes`` / ``no`` / the object list, plus ``</s>``).
Each batch mixes balanced yes/no existence questions (negatives: uniformly random absent objects) and
description requests. After training the script measures held-out accuracy
(:func:`lime_attr.models.accuracy.evaluate_heldout`), saves model and processor with
``save_pretrained`` (safetensors) into ``DIR/<name>/`` (default: the package's ``weights/`` folder) and
writes the model card ``README.md`` and ``eval_results.json`` next to them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from .accuracy import evaluate_heldout
from .architectures import build_model
from .heldout import object_names, task_prior
from .priors import HELDOUT_PARTNER_PROB, TRAIN_PARTNER_PROB
from .processing import (
    EOS,
    build_digits_processor,
    build_tones_processor,
    description_question,
    existence_question,
    format_prompt,
)
from .scenes import make_scene
from .sounds import make_clip

__all__ = ["TrainConfig", "DEFAULT_CONFIGS", "train_model", "save_builtin", "WEIGHTS_DIR", "MAX_TOTAL_BYTES", "main"]

logger = logging.getLogger(__name__)

#: Where the shipped weights live (package data).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Size budget of both shipped models together.
MAX_TOTAL_BYTES = 20 * 1024 * 1024
#: Names of the builtin models, in training order.
MODEL_NAMES: tuple[str, ...] = ("digits-llava", "tones-qwen2audio")


@dataclass
class TrainConfig:
    """Optimisation settings of one demo model.

    Attributes
    ----------
    steps : int
        Optimiser steps.
    batch_size : int
        Training examples (one question about one fresh scene / clip each) per step.
    lr : float
        Peak AdamW learning rate (linear warm-up, cosine decay to 10 %).
    warmup : int
        Warm-up steps.
    weight_decay : float
        AdamW weight decay.
    describe_fraction : float
        Share of description requests in a batch (the rest are yes/no questions, half "yes").
    partner_prob : float
        Co-occurrence strength of the training data.
    alignment_steps : int
        Length of the first stage (counted within ``steps``) in which every scene / clip holds a single
        object of uniformly random class (no prior): it aligns the perception tower with the word
        embeddings before the multi-object data with its co-occurrence prior is introduced (cf. the
        feature-alignment stage of LLaVA).
    """

    steps: int = 1500
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    describe_fraction: float = 0.3
    partner_prob: float = TRAIN_PARTNER_PROB
    alignment_steps: int = 0


DEFAULT_CONFIGS: dict[str, TrainConfig] = {
    "digits-llava": TrainConfig(steps=1500, lr=3e-3, alignment_steps=300),
    "tones-qwen2audio": TrainConfig(steps=1500, lr=3e-3),
}


def build_processor(name: str) -> ProcessorMixin:
    """Fresh processor of a demo model (see :mod:`lime_attr.models.processing`)."""
    if name == "digits-llava":
        return build_digits_processor()
    if name == "tones-qwen2audio":
        return build_tones_processor()
    raise ValueError(f"unknown demo model {name!r}; expected one of {MODEL_NAMES}")


def _training_batch(
    name: str, processor: ProcessorMixin, rng: np.random.Generator, config: TrainConfig, single: bool = False
) -> dict[str, torch.Tensor]:
    """One teacher-forcing batch: right-padded prompts + answers, labels only on answer tokens."""
    names = object_names(name)
    texts: list[str] = []
    answer_lengths: list[int] = []
    media: list[np.ndarray] = []
    for _ in range(config.batch_size):
        forced = [int(rng.integers(len(names)))] if single else None
        if name == "digits-llava":
            item = make_scene(rng, split="train", partner_prob=config.partner_prob, digits=forced)
            media.append(item.image)
        else:
            item = make_clip(rng, split="train", partner_prob=config.partner_prob, events=forced)
            media.append(item.audio)
        if rng.random() < config.describe_fraction:
            question, answer = description_question(name), item.description()
        else:
            present = list(item.objects)
            if rng.random() < 0.5:
                question, answer = existence_question(name, present[int(rng.integers(len(present)))]), "yes"
            else:
                absent = [o for o in names if o not in present]
                question, answer = existence_question(name, absent[int(rng.integers(len(absent)))]), "no"
        answer_text = f"{answer} {EOS}"
        texts.append(f"{format_prompt(name, question)} {answer_text}")
        answer_lengths.append(len(processor.tokenizer(answer_text, add_special_tokens=False)["input_ids"]))
    if name == "digits-llava":
        enc = processor(text=texts, images=media, return_tensors="pt", padding=True)
    else:
        enc = processor(text=texts, audio=media, sampling_rate=16000, return_tensors="pt", padding=True)
    labels = torch.full_like(enc["input_ids"], -100)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    for row, (length, n_answer) in enumerate(zip(lengths, answer_lengths)):
        labels[row, length - n_answer : length] = enc["input_ids"][row, length - n_answer : length]
    enc["labels"] = labels
    return dict(enc)


def _lr_lambda(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(config.steps - config.warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def train_model(
    name: str, seed: int = 0, config: TrainConfig | None = None, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, Any]]:
    """Train one demo model from scratch.

    Parameters
    ----------
    name : {"digits-llava", "tones-qwen2audio"}
        Which model.
    seed : int
        Seed of the weight initialisation and of the training data stream.
    config : TrainConfig, optional
        Optimisation settings (defaults: :data:`DEFAULT_CONFIGS`).
    attn_implementation : str
        Attention implementation used for training (and stored in the saved config).

    Returns
    -------
    model : transformers.PreTrainedModel
        The trained model (eval mode).
    processor : transformers.ProcessorMixin
        Its processor (tokenizer padding side ``"left"``, as shipped).
    info : dict
        ``cpu_seconds``, ``wall_seconds``, ``final_loss``, ``threads``, ``config``, ``seed``.
    """
    config = config or DEFAULT_CONFIGS[name]
    processor = build_processor(name)
    model = build_model(name, processor.tokenizer, attn_implementation=attn_implementation, seed=seed)
    model.train()
    # The training stream is seeded with a (seed, tag) tuple; held-out sets use plain integer seeds,
    # so the two random streams never coincide.
    rng = np.random.default_rng((seed, 0x7EA1))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))
    processor.tokenizer.padding_side = "right"
    cpu0, wall0 = time.process_time(), time.perf_counter()
    ema: float | None = None
    progress = tqdm(range(config.steps), desc=f"train {name}", mininterval=5.0)
    for step in progress:
        batch = _training_batch(name, processor, rng, config, single=step < config.alignment_steps)
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == config.steps - 1:
            progress.set_postfix(loss=f"{ema:.4f}")
            logger.info("%s step %d loss %.4f (ema %.4f)", name, step, loss.item(), ema)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    processor.tokenizer.padding_side = "left"
    model.eval()
    info = {
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "final_loss_ema": ema,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "seed": seed,
    }
    logger.info("%s trained: %.0f s CPU, %.0f s wall, loss %.4f", name, cpu, wall, ema)
    return model, processor, info


def save_builtin(
    name: str, model: PreTrainedModel, processor: ProcessorMixin, out_dir: Path, info: dict[str, Any], results: dict
) -> Path:
    """Save model + processor with ``save_pretrained`` and write the model card and metrics.

    Parameters
    ----------
    name : str
        Model name (the sub-folder of ``out_dir``).
    model, processor
        What to save.
    out_dir : pathlib.Path
        Parent folder.
    info : dict
        Training information from :func:`train_model`.
    results : dict
        Held-out metrics from :func:`~lime_attr.models.accuracy.evaluate_heldout`.

    Returns
    -------
    pathlib.Path
        The model folder.
    """
    target = Path(out_dir) / name
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.iterdir():
        if stale.is_file():
            stale.unlink()
    model.save_pretrained(target, safe_serialization=True)
    processor.save_pretrained(target)
    record = {"model": name, "training": info, "heldout": results, "environment": _environment()}
    (target / "eval_results.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    (target / "README.md").write_text(model_card(name, model, info, results))
    for path in target.iterdir():  # safetensors writes 0600; package data must be world-readable
        path.chmod(0o644)
    return target


def _environment() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.machine()} CPU with {os.cpu_count()} cores",
    }


def directory_bytes(path: Path) -> int:
    """Total size in bytes of the files below ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


_ARCH_TEXT = {
    "digits-llava": (
        "`transformers.LlavaForConditionalGeneration`: CLIP vision tower (`CLIPVisionConfig`: 32x32 RGB "
        "input, patch 8, hidden 64, 2 layers, 4 heads, MLP 128; the 16 patch features of the last layer, "
        "CLS dropped) -> 2-layer GELU projector -> Llama language model (`LlamaConfig`: hidden 96, "
        "2 layers, 4 query / 2 key-value heads, SwiGLU 256, RoPE, tied input / output embeddings). "
        "Processor: `LlavaProcessor` with `CLIPImageProcessor` (32x32, mean = std = 0.5); `<image>` "
        "expands to 16 tokens, one per 8x8 grid cell."
    ),
    "tones-qwen2audio": (
        "`transformers.Qwen2AudioForConditionalGeneration`: Whisper-style encoder "
        "(`Qwen2AudioEncoderConfig`: 32 mel bins, hidden 64, 2 layers, 4 heads, FFN 128, 50 positions "
        "with a fixed sinusoidal table, 2x average pool) -> linear projector -> Qwen2 language model "
        "(`Qwen2Config`: hidden 96, 2 layers, 4 query / 2 key-value heads, SwiGLU 256). Processor: "
        "`Qwen2AudioProcessor` with `WhisperFeatureExtractor` (16 kHz, 2 s chunks, hop 320, FFT 640, "
        "100 frames); `<|AUDIO|>` expands to 25 tokens of 80 ms."
    ),
}

_DATA_TEXT = {
    "digits-llava": (
        "32x32 scenes on a fixed 4x4 grid of 8x8 cells holding 1-4 distinct digits from scikit-learn's "
        "bundled `load_digits` images (8x8, one per cell, cell = bounding box), white on a faint noise "
        "background (`lime_attr.models.scenes`). Digit images come from disjoint pools: 75 % of each class for "
        "training, 25 % for held-out scenes.\n\n"
        "Priors: pairs **3 <-> 8** and **1 <-> 7** co-occur (partner added with probability "
        "{train_p} in training, P(8 | 3) = {p_pair:.2f}; {held_p} in held-out scenes); digits **0, 2, 5** "
        "are drawn three times as often as the others (popular objects)."
    ),
    "tones-qwen2audio": (
        "2 s clips at 16 kHz with 1-4 non-overlapping events of distinct classes (tone, chirp, click, "
        "noise, hum, buzz), one per 0.5 s slot, over a faint noise floor "
        "(`lime_attr.models.sounds`). Training and held-out clips use disjoint random streams.\n\n"
        "Priors: pairs **chirp <-> click** and **hum <-> buzz** co-occur (partner added with probability "
        "{train_p} in training, P(click | chirp) = {p_pair:.2f}; {held_p} in held-out clips); **tone** and "
        "**noise** are drawn three times as often as the other classes (popular objects)."
    ),
}


def _alignment_text(cfg: dict[str, Any]) -> str:
    if not cfg.get("alignment_steps"):
        return ""
    return (
        f"The first {cfg['alignment_steps']} steps are an alignment stage on single-object items of uniformly "
        "random class (no prior). "
    )


def model_card(name: str, model: PreTrainedModel, info: dict[str, Any], results: dict[str, dict[str, float]]) -> str:
    """Markdown model card with architecture, data, priors, training cost and held-out metrics."""
    prior = task_prior(name)
    _, cooc = prior.statistics()
    a, b = prior.pairs[0]
    p_pair = float(cooc[prior.names.index(a), prior.names.index(b)])
    n_params = sum(p.numel() for p in model.parameters())
    cfg = info["config"]
    env = _environment()
    rows = []
    for split in ("random", "popular", "adversarial"):
        r = results[f"pope_{split}"]
        rows.append(
            f"| {split} | {int(r['n'])} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['f1']:.3f} | {r['yes_ratio']:.3f} |"
        )
    d = results["description"]
    pb = results["prior_breaking_negatives"]
    modality = "image" if name == "digits-llava" else "audio"
    ask = existence_question(name, prior.names[3])
    describe = description_question(name)
    vocab_size = model.config.text_config.vocab_size
    cpu, wall = info["cpu_seconds"], info["wall_seconds"]
    return f"""# {name}

A tiny demo multimodal model trained by `lime_attr` itself (`python -m lime_attr.models.train --model {name}`)
so that attribution and LIME examples, tests and mini benchmarks run offline on a CPU. It is **not** a
general-purpose model: it only understands the synthetic {modality} data described below.

## Architecture

{_ARCH_TEXT[name]}

Parameters: **{n_params:,}** ({n_params * 4 / 1e6:.2f} MB in float32). Word-level tokenizer
(`tokenizers` WordLevel wrapped in `PreTrainedTokenizerFast`), vocabulary of {vocab_size} tokens.
Default attention implementation `sdpa`; `eager` gives the same outputs.

Prompt format (the chat template renders the same tokens):

```
<s> {format_prompt(name, ask)} yes </s>
<s> {format_prompt(name, describe)} {' '.join(prior.names[:2])} </s>
```

## Training data and priors

{_DATA_TEXT[name].format(train_p=TRAIN_PARTNER_PROB, held_p=HELDOUT_PARTNER_PROB, p_pair=p_pair)}

Tasks: yes/no existence questions ("{ask}", balanced, negatives uniform among absent objects) and
descriptions ("{describe}" -> present objects in canonical order, space separated). Loss: cross-entropy
on the answer tokens and `</s>` only (teacher forcing).

## Training

Seed {info['seed']}; {cfg['steps']} AdamW steps of {cfg['batch_size']} fresh examples (lr {cfg['lr']}, warm-up
{cfg['warmup']}, cosine to 10 %, weight decay {cfg['weight_decay']}, gradient clip 1.0), {cfg['describe_fraction']:.0%}
description requests. {_alignment_text(cfg)}Weights initialised from a normal distribution with
std 0.1 (about 1/sqrt(hidden); the transformers default 0.02 leaves the yes/no task at chance for
thousands of steps). Final training loss (EMA) {info['final_loss_ema']:.4f}.

Cost: **{cpu:.0f} CPU-seconds** ({cpu / 60:.1f} CPU-minutes; {wall / 60:.1f} min wall on a shared
machine) with {info['threads']} torch thread(s) on an {env['machine']} (torch {env['torch']},
transformers {env['transformers']}).

## Held-out accuracy

Greedy decoding on the default held-out sets of `lime_attr.models.heldout` (digit images / random streams
never seen in training; co-occurrence prior weakened to {HELDOUT_PARTNER_PROB}). Yes/no parse: "yes" iff the
first generated word is `yes`.

POPE-style questions (positive class "yes", exactly 50 % yes):

| split | N | accuracy | precision | recall | F1 | yes-ratio |
|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Prior-breaking negatives (adversarial questions about the absent co-occurrence partner of a present
object, where the prior says "yes"): {int(pb['n'])} questions, accuracy {pb['accuracy']:.3f}.

Descriptions ({int(d['n'])} items): exact set match {d['exact_match']:.3f}; per-object precision {d['precision']:.3f},
recall {d['recall']:.3f}, F1 {d['f1']:.3f}; CHAIR_I {d['chair_i']:.3f}, CHAIR_S {d['chair_s']:.3f}.

The same numbers are in `eval_results.json`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lime_attr.models.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODEL_NAMES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="parent folder (default: package weights/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="override the number of optimiser steps")
    parser.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    parser.add_argument("--alignment-steps", type=int, default=None, help="override the single-object stage length")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny matrix products gain little from more, and on a "
        "shared 2-core machine extra threads mostly spin)",
    )
    parser.add_argument("--skip-eval", action="store_true", help="do not measure held-out accuracy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    names = MODEL_NAMES if args.model == "all" else (args.model,)
    for name in names:
        config = DEFAULT_CONFIGS[name]
        requested = {"steps": args.steps, "lr": args.lr, "alignment_steps": args.alignment_steps}
        overrides = {k: v for k, v in requested.items() if v is not None}
        config = TrainConfig(**{**asdict(config), **overrides})
        model, processor, info = train_model(name, seed=args.seed, config=config)
        results: dict[str, dict[str, float]] = {}
        if not args.skip_eval:
            eval0 = time.perf_counter()
            results = evaluate_heldout(model, processor, name)
            logger.info("%s held-out evaluation (%.0f s): %s", name, time.perf_counter() - eval0, json.dumps(results))
            target = save_builtin(name, model, processor, args.out, info, results)
        else:
            target = args.out / name
            target.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(target)
            processor.save_pretrained(target)
            for path in target.iterdir():
                path.chmod(0o644)
        logger.info("saved %s (%.2f MB)", target, directory_bytes(target) / 1e6)
    total = sum(directory_bytes(args.out / n) for n in MODEL_NAMES if (args.out / n).exists())
    logger.info("all builtin weights under %s: %.2f MB (budget %.0f MB)", args.out, total / 1e6, MAX_TOTAL_BYTES / 1e6)
    if total > MAX_TOTAL_BYTES:
        logger.error("weights exceed the %d-byte budget", MAX_TOTAL_BYTES)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
