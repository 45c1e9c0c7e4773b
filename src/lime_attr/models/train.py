"""Train the embedded demo models on CPU and save them as package data.

Usage::

    python -m lime_attr.models.train --model digits-llava|tones-qwen2audio|all [--out DIR] [--seed 0]

Each model is trained from scratch with a fixed seed by a two-stage LLaVA-style recipe
(:class:`TrainConfig`): stage 1 trains the language model alone on partial *textual* scene renderings
(:mod:`lime_attr.models.rendering`), so that it learns the co-occurrence prior from words; stage 2
aligns the perception tower and projector to the frozen language model on real media. Both stages use
teacher forcing with the loss on the answer tokens only (``yes`` / ``no`` / the object list, plus
``</s>``), over balanced yes/no existence questions (negatives uniformly random absent objects) and
description requests. Stage-2 checkpoints are scored on the validation split of the prior probes
(:mod:`lime_attr.models.probes`) and one is kept by the pre-registered rule of
:func:`select_checkpoint`. The script then measures the probe results on the test split
(:func:`lime_attr.models.accuracy.evaluate_probes`) and the held-out POPE / description accuracy
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

from .accuracy import evaluate_heldout, evaluate_probes, probe_accuracy
from .architectures import build_model
from .heldout import task_prior
from .priors import HELDOUT_PARTNER_PROB
from .probes import PROBE_CONDITIONS, prior_probe
from .rendering import shown_objects, slot_words, text_prompt
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

__all__ = [
    "TrainConfig",
    "DEFAULT_CONFIGS",
    "SELECTION_THRESHOLD",
    "train_model",
    "select_checkpoint",
    "partner_prob_for",
    "perception_parameters",
    "save_builtin",
    "WEIGHTS_DIR",
    "MAX_TOTAL_BYTES",
    "main",
]

logger = logging.getLogger(__name__)

#: Where the shipped weights live (package data).
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: Size budget of both shipped models together.
MAX_TOTAL_BYTES = 20 * 1024 * 1024
#: Names of the builtin models, in training order.
MODEL_NAMES: tuple[str, ...] = ("digits-llava", "tones-qwen2audio")
#: Minimum validation accuracy on the "model still sees" conditions in the checkpoint-selection rule.
SELECTION_THRESHOLD: float = 0.95


@dataclass
class TrainConfig:
    """Settings of the two-stage LLaVA-style recipe of one demo model.

    Stage 1 (``text_steps``) trains the language model alone on partial textual scene renderings
    (:mod:`lime_attr.models.rendering`): the media tokens are replaced by words, one member of a present
    pair is left out with probability ``drop_prob``, and pairs are complete in ``text_cooccurrence`` of
    the scenes, so the co-occurrence prior is learnt from words alone. Stage 2 (``steps``) aligns the
    perception tower and projector, trained from scratch, to the language model, which is frozen
    (``lm_lr_factor = 0``) or nearly so, on media whose pairs are complete in ``media_cooccurrence`` of
    the scenes. Every ``checkpoint_every`` stage-2 steps the tower and projector are evaluated on the
    validation split of the prior probes and kept; :func:`select_checkpoint` picks one.

    Attributes
    ----------
    text_steps : int
        Stage-1 optimiser steps (0 skips stage 1).
    text_lr : float
        Stage-1 peak learning rate.
    text_cooccurrence : float
        ``P(partner | object)`` of the stage-1 scenes.
    drop_prob : float
        Probability that a stage-1 rendering leaves one member of a present pair out.
    steps : int
        Stage-2 optimiser steps.
    lr : float
        Stage-2 peak learning rate of the tower and projector.
    lm_lr_factor : float
        Stage-2 learning rate of the language model as a fraction of ``lr`` (0: frozen).
    media_cooccurrence : float
        ``P(partner | object)`` of the stage-2 scenes / clips.
    batch_size : int
        Examples per step (one question about one fresh scene / clip each).
    warmup : int
        Warm-up steps of each stage (linear warm-up, cosine decay to 10 %).
    weight_decay : float
        AdamW weight decay.
    describe_fraction : float
        Share of description requests in a batch (the rest are yes/no questions, half "yes", negatives
        uniform among the absent objects).
    checkpoint_every : int
        Stage-2 checkpoint interval (the last step is always a checkpoint).
    validation_items : int
        Validation probe items per condition at each checkpoint.
    """

    text_steps: int = 1500
    text_lr: float = 3e-3
    text_cooccurrence: float = 0.97
    drop_prob: float = 0.5
    steps: int = 1500
    lr: float = 3e-3
    lm_lr_factor: float = 0.0
    media_cooccurrence: float = 0.90
    batch_size: int = 64
    warmup: int = 100
    weight_decay: float = 0.01
    describe_fraction: float = 0.3
    checkpoint_every: int = 250
    validation_items: int = 100


#: The recipe settings of each builtin (both use the :class:`TrainConfig` defaults).
DEFAULT_CONFIGS: dict[str, TrainConfig] = {
    "digits-llava": TrainConfig(),
    "tones-qwen2audio": TrainConfig(),
}


def partner_prob_for(cooccurrence: float) -> float:
    """The ``partner_prob`` that gives ``P(partner | object) = cooccurrence`` with ``whole_pairs=True``.

    With whole pairs, ``P(partner | object) = 2 p / (1 + p)`` (see
    :meth:`~lime_attr.models.priors.CooccurrencePrior.sample`), so ``p = c / (2 - c)``.
    """
    if not 0.0 < cooccurrence <= 1.0:
        raise ValueError(f"cooccurrence must be in (0, 1], got {cooccurrence}")
    return cooccurrence / (2.0 - cooccurrence)


def build_processor(name: str) -> ProcessorMixin:
    """Fresh processor of a demo model (see :mod:`lime_attr.models.processing`)."""
    if name == "digits-llava":
        return build_digits_processor()
    if name == "tones-qwen2audio":
        return build_tones_processor()
    raise ValueError(f"unknown demo model {name!r}; expected one of {MODEL_NAMES}")


def _example(name: str, rng: np.random.Generator, cooccurrence: float, config: TrainConfig) -> tuple[Any, str, str]:
    """One training scene / clip with a question and its answer."""
    prob = partner_prob_for(cooccurrence)
    prior = task_prior(name)
    classes = prior.sample(rng, prob, whole_pairs=True)
    if name == "digits-llava":
        item: Any = make_scene(rng, split="train", digits=classes)
    else:
        item = make_clip(rng, split="train", events=classes)
    if rng.random() < config.describe_fraction:
        return item, description_question(name), item.description()
    present = list(item.objects)
    if rng.random() < 0.5:
        return item, existence_question(name, present[int(rng.integers(len(present)))]), "yes"
    absent = [o for o in prior.names if o not in present]
    return item, existence_question(name, absent[int(rng.integers(len(absent)))]), "no"


def _answer_labels(enc: Any, answer_lengths: Sequence[int]) -> torch.Tensor:
    labels = torch.full_like(enc["input_ids"], -100)
    lengths = enc["attention_mask"].sum(dim=1).tolist()
    for row, (length, n_answer) in enumerate(zip(lengths, answer_lengths)):
        labels[row, length - n_answer : length] = enc["input_ids"][row, length - n_answer : length]
    return labels


def _training_batch(
    name: str, processor: ProcessorMixin, rng: np.random.Generator, config: TrainConfig, stage: int
) -> dict[str, torch.Tensor]:
    """One teacher-forcing batch (right-padded, labels on the answer and ``</s>`` only).

    Stage 1: textual renderings in place of the media (tokenizer only); stage 2: media via the processor.
    """
    cooccurrence = config.text_cooccurrence if stage == 1 else config.media_cooccurrence
    texts: list[str] = []
    answer_lengths: list[int] = []
    media: list[np.ndarray] = []
    prior = task_prior(name)
    for _ in range(config.batch_size):
        item, question, answer = _example(name, rng, cooccurrence, config)
        answer_text = f"{answer} {EOS}"
        if stage == 1:
            shown = shown_objects(item.objects, prior, rng, config.drop_prob)
            texts.append(f"{text_prompt(name, question, slot_words(item, shown))} {answer_text}")
        else:
            texts.append(f"{format_prompt(name, question)} {answer_text}")
            media.append(item.image if name == "digits-llava" else item.audio)
        answer_lengths.append(len(processor.tokenizer(answer_text, add_special_tokens=False)["input_ids"]))
    if stage == 1:
        enc = processor.tokenizer(texts, return_tensors="pt", padding=True)
    elif name == "digits-llava":
        enc = processor(text=texts, images=media, return_tensors="pt", padding=True)
    else:
        enc = processor(text=texts, audio=media, sampling_rate=16000, return_tensors="pt", padding=True)
    enc["labels"] = _answer_labels(enc, answer_lengths)
    return dict(enc)


def _lr_lambda(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


_PERCEPTION_PARTS = ("vision_tower", "audio_tower", "multi_modal_projector")


def perception_parameters(model: PreTrainedModel) -> dict[str, torch.nn.Parameter]:
    """The perception tower's and projector's parameters (everything else is the language model)."""
    return {n: p for n, p in model.named_parameters() if any(part in n.split(".") for part in _PERCEPTION_PARTS)}


def _run_stage(
    model: PreTrainedModel,
    name: str,
    processor: ProcessorMixin,
    rng: np.random.Generator,
    config: TrainConfig,
    stage: int,
    on_step: Any = None,
) -> float | None:
    """Run one stage's optimisation; ``on_step(step)`` is called after every step. Returns the loss EMA."""
    steps, lr = (config.text_steps, config.text_lr) if stage == 1 else (config.steps, config.lr)
    perception = perception_parameters(model)
    groups: list[dict[str, Any]] = []
    if stage == 1:
        groups.append({"params": [p for n, p in model.named_parameters() if n not in perception], "lr": lr})
    else:
        groups.append({"params": list(perception.values()), "lr": lr})
        if config.lm_lr_factor > 0:
            rest = [p for n, p in model.named_parameters() if n not in perception]
            groups.append({"params": rest, "lr": lr * config.lm_lr_factor})
    trained = [p for g in groups for p in g["params"]]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, config.warmup))
    ema: float | None = None
    for step in tqdm(range(steps), desc=f"train {name} stage {stage}", mininterval=5.0):
        loss = model(**_training_batch(name, processor, rng, config, stage)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            logger.info("%s stage %d step %d loss %.4f (ema %.4f)", name, stage, step, loss.item(), ema)
        if on_step is not None:
            on_step(step)
    for p in model.parameters():
        p.requires_grad_(True)
    return ema


def select_checkpoint(checkpoints: Sequence[dict[str, Any]], threshold: float = SELECTION_THRESHOLD) -> int:
    """Index of the checkpoint the pre-registered selection rule picks (greedy validation accuracy only).

    The rule (docs page *Demo models*): among the checkpoints whose validation accuracy is at least
    ``threshold`` on each of ``consistent_yes``, ``consistent_no`` and ``control``, pick the one with the
    lowest ``conflict`` accuracy (ties: the earliest). If none qualifies, pick the one with the highest
    minimum accuracy over those three conditions (ties: the latest).

    Parameters
    ----------
    checkpoints : sequence of dict
        Each with ``"validation"``: ``{condition: accuracy}``.
    threshold : float
        Minimum accuracy on the three conditions where the model must see.

    Returns
    -------
    int
    """
    if not checkpoints:
        raise ValueError("no checkpoints to select from")
    sees = ("consistent_yes", "consistent_no", "control")
    qualified = [i for i, c in enumerate(checkpoints) if all(c["validation"][k] >= threshold for k in sees)]
    if qualified:
        return min(qualified, key=lambda i: (checkpoints[i]["validation"]["conflict"], i))
    return max(range(len(checkpoints)), key=lambda i: (min(checkpoints[i]["validation"][k] for k in sees), i))


def train_model(
    name: str, seed: int = 0, config: TrainConfig | None = None, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, Any]]:
    """Train one demo model from scratch with the two-stage recipe (see :class:`TrainConfig`).

    Parameters
    ----------
    name : {"digits-llava", "tones-qwen2audio"}
        Which model.
    seed : int
        Seed of the weight initialisation and of the training data streams.
    config : TrainConfig, optional
        Settings (defaults: :data:`DEFAULT_CONFIGS`).
    attn_implementation : str
        Attention implementation used for training (and stored in the saved config).

    Returns
    -------
    model : transformers.PreTrainedModel
        The model with the selected stage-2 checkpoint (eval mode).
    processor : transformers.ProcessorMixin
        Its processor (tokenizer padding side ``"left"``, as shipped).
    info : dict
        ``cpu_seconds``, ``wall_seconds``, per-stage loss EMAs, ``checkpoints`` (step and validation
        accuracies), ``selected_step``, ``threads``, ``config``, ``seed``.
    """
    config = config or DEFAULT_CONFIGS[name]
    processor = build_processor(name)
    model = build_model(name, processor.tokenizer, attn_implementation=attn_implementation, seed=seed)
    # The training streams are seeded with (seed, tag) tuples; probes and held-out sets use other seeds.
    text_rng, media_rng = np.random.default_rng((seed, 0x7E47)), np.random.default_rng((seed, 0x7EA1))
    validation = {c: prior_probe(name, c, n=config.validation_items, split="validation") for c in PROBE_CONDITIONS}
    cpu0, wall0 = time.process_time(), time.perf_counter()
    checkpoints: list[dict[str, Any]] = []
    states: list[dict[str, torch.Tensor]] = []

    def checkpoint(step: int) -> None:
        if (step + 1) % config.checkpoint_every and step != config.steps - 1:
            return
        processor.tokenizer.padding_side = "left"
        model.eval()
        accuracy = {c: probe_accuracy(model, processor, items) for c, items in validation.items()}
        model.train()
        processor.tokenizer.padding_side = "right"
        checkpoints.append({"step": step + 1, "validation": accuracy})
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        logger.info("%s checkpoint at stage-2 step %d: validation %s", name, step + 1, accuracy)

    model.train()
    processor.tokenizer.padding_side = "right"
    text_ema = _run_stage(model, name, processor, text_rng, config, stage=1) if config.text_steps else None
    media_ema = _run_stage(model, name, processor, media_rng, config, stage=2, on_step=checkpoint)
    chosen = select_checkpoint(checkpoints)
    model.load_state_dict(states[chosen])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    processor.tokenizer.padding_side = "left"
    model.eval()
    info = {
        "cpu_seconds": cpu,
        "wall_seconds": wall,
        "final_loss_ema": media_ema,
        "text_loss_ema": text_ema,
        "checkpoints": checkpoints,
        "selected_step": checkpoints[chosen]["step"],
        "selection_threshold": SELECTION_THRESHOLD,
        "threads": torch.get_num_threads(),
        "config": asdict(config),
        "seed": seed,
    }
    logger.info("%s trained: %.0f s CPU, %.0f s wall; selected step %d", name, cpu, wall, info["selected_step"])
    return model, processor, info


def save_builtin(
    name: str,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    out_dir: Path,
    info: dict[str, Any],
    results: dict | None,
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
    results : dict or None
        Held-out metrics from :func:`~lime_attr.models.accuracy.evaluate_heldout` with the probe results
        of :func:`~lime_attr.models.accuracy.evaluate_probes` under ``"probes"``; ``None`` (an unevaluated
        smoke run) writes no model card and no metrics.

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
    if results is not None:
        record = {"model": name, "training": info, "heldout": results, "environment": _environment()}
        text = json.dumps(record, indent=2, sort_keys=True, allow_nan=False)  # raises on NaN rather than write it
        (target / "eval_results.json").write_text(text + "\n")
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
        "training, 25 % for held-out scenes and probes.\n\n"
        "Priors: pairs **3 <-> 8** and **1 <-> 7** co-occur; digits **0, 2, 5** are drawn three times as often "
        "as the others (popular objects)."
    ),
    "tones-qwen2audio": (
        "2 s clips at 16 kHz with 1-4 non-overlapping events of distinct classes (tone, chirp, click, "
        "noise, hum, buzz), one per 0.5 s slot, over a faint noise floor "
        "(`lime_attr.models.sounds`). Training and held-out clips use disjoint random streams.\n\n"
        "Priors: pairs **chirp <-> click** and **hum <-> buzz** co-occur; **tone** and **noise** are drawn "
        "three times as often as the other classes (popular objects)."
    ),
}


def _recipe_text(info: dict[str, Any]) -> str:
    cfg = info["config"]
    lm = "frozen" if not cfg["lm_lr_factor"] else f"trained at {cfg['lm_lr_factor']} x the tower's lr"
    return (
        f"**Stage 1, the language model alone learns from text** ({cfg['text_steps']} AdamW steps of "
        f"{cfg['batch_size']} texts, lr {cfg['text_lr']}): the media placeholder is replaced by words in the "
        "perception-token layout (`lime_attr.models.rendering`), pairs are complete in "
        f"{cfg['text_cooccurrence']:.0%} of the scenes and one member of each complete pair is left out of "
        f"the rendering with probability {cfg['drop_prob']}; answers come from the whole scene.\n\n"
        f"**Stage 2, alignment** ({cfg['steps']} steps of {cfg['batch_size']} examples, lr {cfg['lr']}): the "
        f"perception tower and projector (from scratch) are trained on real media with pairs complete in "
        f"{cfg['media_cooccurrence']:.0%} of them; the language model is {lm}.\n\n"
        f"Both stages: {cfg['describe_fraction']:.0%} description requests, the rest balanced yes/no questions "
        f"(negatives uniform among absent objects); warm-up {cfg['warmup']}, cosine to 10 %, weight decay "
        f"{cfg['weight_decay']}, gradient clip 1.0; loss on the answer tokens and `</s>` only. Weights "
        "initialised with std 0.1 (the transformers default 0.02 leaves such narrow models at chance for "
        "thousands of steps)."
    )


def _checkpoint_rows(info: dict[str, Any]) -> str:
    rows = []
    for c in info["checkpoints"]:
        v = c["validation"]
        mark = " (selected)" if c["step"] == info["selected_step"] else ""
        rows.append(
            f"| {c['step']}{mark} | {v['conflict']:.2f} | {v['consistent_yes']:.2f} | {v['consistent_no']:.2f} "
            f"| {v['control']:.2f} |"
        )
    return "\n".join(rows)


def _probe_rows(probes: dict[str, dict[str, float]]) -> str:
    return "\n".join(
        f"| {c} | {int(probes[c]['n'])} | {probes[c]['accuracy']:.3f} | {probes[c]['yes_ratio']:.3f} |"
        for c in PROBE_CONDITIONS
    )


def _pope_rows(results: dict[str, dict[str, Any]]) -> str:
    """The model card's held-out POPE table rows, one per split."""
    rows = []
    for split in ("random", "popular", "adversarial"):
        r = results[f"pope_{split}"]
        rows.append(f"| {split} | {int(r['n'])} | {r['accuracy']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} "
                    f"| {r['f1']:.3f} | {r['yes_ratio']:.3f} |")
    return "\n".join(rows)


def model_card(name: str, model: PreTrainedModel, info: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """Markdown model card: architecture, data, recipe, checkpoints, probe and held-out results."""
    prior = task_prior(name)
    n_params = sum(p.numel() for p in model.parameters())
    env = _environment()
    probes, d = results["probes"], results["probes"]["description"]
    modality = "image" if name == "digits-llava" else "audio"
    ask = existence_question(name, prior.names[3])
    describe = description_question(name)
    cpu, wall = info["cpu_seconds"], info["wall_seconds"]
    return f"""# {name}

A tiny demo multimodal model trained by `lime_attr` itself (`python -m lime_attr.models.train --model {name}`)
so that attribution and LIME examples, tests and benchmarks run offline on a CPU. It is **not** a
general-purpose model: it only understands the synthetic {modality} data described below. It is made the
way LLaVA-style models are made (a text-pretrained language model, then a brief alignment of the
perception tower with the language model frozen), so that it **hallucinates from its language prior on
clean inputs** while still seeing: the testbed of the docs page *Demo models*.

## Architecture

{_ARCH_TEXT[name]}

Parameters: **{n_params:,}** ({n_params * 4 / 1e6:.2f} MB in float32). Word-level tokenizer
(`tokenizers` WordLevel wrapped in `PreTrainedTokenizerFast`), vocabulary of {model.config.text_config.vocab_size} tokens.
Default attention implementation `sdpa`; `eager` gives the same outputs.

Prompt format (the chat template renders the same tokens):

```
<s> {format_prompt(name, ask)} yes </s>
<s> {format_prompt(name, describe)} {' '.join(prior.names[:2])} </s>
```

## Data and priors

{_DATA_TEXT[name]}

## Training recipe

Seed {info['seed']}. {_recipe_text(info)}

Cost: **{cpu:.0f} CPU-seconds** ({cpu / 60:.1f} CPU-minutes; {wall / 60:.1f} min wall) with {info['threads']}
torch thread(s) on an {env['machine']} (torch {env['torch']}, transformers {env['transformers']}); final
loss EMA stage 1 {info['text_loss_ema']:.4f}, stage 2 {info['final_loss_ema']:.4f}.

## Checkpoint selection (validation split, greedy)

Rule: among the stage-2 checkpoints with validation accuracy >= {info['selection_threshold']} on
`consistent_yes`, `consistent_no` and `control`, the lowest `conflict` accuracy (ties: earliest).

| stage-2 step | conflict | consistent_yes | consistent_no | control |
|---|---|---|---|---|
{_checkpoint_rows(info)}

## Prior probes (test split, clean inputs, greedy)

`lime_attr.models.prior_probe(...)`; yes/no parse: "yes" iff the first generated word is `yes`.

| condition | N | accuracy | yes-ratio |
|---|---|---|---|
{_probe_rows(probes)}

Broken-pair descriptions ({int(d['n'])} conflict scenes, "{describe}"): the absent partner is named in
**{d['partner_hallucination']:.3f}** of them; CHAIR_I {d['chair_i']:.3f}, CHAIR_S {d['chair_s']:.3f},
exact match {d['exact_match']:.3f}.

## Held-out POPE (clean)

Default held-out sets of `lime_attr.models.heldout` (co-occurrence prior weakened to {HELDOUT_PARTNER_PROB}),
balanced yes/no:

| split | N | accuracy | precision | recall | F1 | yes-ratio |
|---|---|---|---|---|---|---|
{_pope_rows(results)}

The same numbers are in `eval_results.json`.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m lime_attr.models.train", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=[*MODEL_NAMES, "all"], default="all")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="parent folder (default: package weights/)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-steps", type=int, default=None, help="override the stage-1 (text) steps")
    parser.add_argument("--steps", type=int, default=None, help="override the stage-2 (alignment) steps")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="override the checkpoint interval")
    parser.add_argument("--validation-items", type=int, default=None, help="override the validation items")
    parser.add_argument("--eval-items", type=int, default=200, help="test probe items per condition")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: the tiny matrix products gain little from more)",
    )
    parser.add_argument("--skip-eval", action="store_true", help="do not measure probe / held-out accuracy")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    names = MODEL_NAMES if args.model == "all" else (args.model,)
    requested = {
        "text_steps": args.text_steps,
        "steps": args.steps,
        "checkpoint_every": args.checkpoint_every,
        "validation_items": args.validation_items,
    }
    overrides = {k: v for k, v in requested.items() if v is not None}
    for name in names:
        config = TrainConfig(**{**asdict(DEFAULT_CONFIGS[name]), **overrides})
        model, processor, info = train_model(name, seed=args.seed, config=config)
        if args.skip_eval:
            target = save_builtin(name, model, processor, args.out, info, None)
        else:
            eval0 = time.perf_counter()
            results: dict[str, Any] = evaluate_heldout(model, processor, name)
            results["probes"] = evaluate_probes(model, processor, name, n=args.eval_items)
            logger.info("%s evaluation (%.0f s): %s", name, time.perf_counter() - eval0, json.dumps(results))
            target = save_builtin(name, model, processor, args.out, info, results)
        logger.info("saved %s (%.2f MB)", target, directory_bytes(target) / 1e6)
    total = sum(directory_bytes(args.out / n) for n in MODEL_NAMES if (args.out / n).exists())
    logger.info("all builtin weights under %s: %.2f MB (budget %.0f MB)", args.out, total / 1e6, MAX_TOTAL_BYTES / 1e6)
    if total > MAX_TOTAL_BYTES:
        logger.error("weights exceed the %d-byte budget", MAX_TOTAL_BYTES)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
