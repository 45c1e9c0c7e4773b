"""The three small models the faithfulness benchmark explains, and how they are trained.

* ``cnn``: a plain-torch CNN with BatchNorm (Conv2d / BatchNorm2d / ReLU / MaxPool2d / AvgPool2d /
  Linear) on scikit-learn's bundled 8x8 digits;
* ``vit``: a Hugging Face :class:`~transformers.ViTForImageClassification` with a tiny
  :class:`~transformers.ViTConfig` (2x2 patches, so 16 patch tokens + CLS) on the same digits;
* ``llama``: a tiny :class:`~transformers.LlamaForCausalLM` trained on a synthetic key-value
  retrieval task (:class:`RetrievalTask`) whose evidence tokens are known for every example.

Every model is trained on CPU in well under a minute from the fixed seed :data:`SEED` and cached in
``benchmarks/checkpoints/<name>.safetensors`` (weights plus a JSON metadata header with the recipe
version, the configuration and the held-out accuracy). :func:`get_model` loads the cache, and trains
and writes it when it is missing or its recipe version is stale. Nothing is downloaded.

Run ``python -m benchmarks.bench_models [--retrain]`` to (re)build all checkpoints.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SEED = 0
"""Seed of every split, initialisation and training run."""

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
"""Where the trained checkpoints are cached."""

RECIPE_VERSION = "2"
"""Bump when a model definition or training recipe changes: stale caches are then retrained."""

MODEL_NAMES = ("cnn", "vit", "llama")


# --------------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DigitsSplit:
    """scikit-learn's 8x8 digits, scaled to [0, 1], split into train and held-out test.

    Attributes
    ----------
    x_train, x_test : torch.Tensor
        Images of shape ``[N, 1, 8, 8]`` (float32, ink intensity / 16, so 0 is background).
    y_train, y_test : torch.Tensor
        Class labels of shape ``[N]`` (int64).
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_fraction: float = 0.25, seed: int = SEED) -> DigitsSplit:
    """Load the bundled digits and split them, stratified by class, with a fixed seed.

    Parameters
    ----------
    test_fraction : float
        Share of the 1797 images held out (450 at the default).
    seed : int
        Seed of the split.

    Returns
    -------
    DigitsSplit
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 16.0)[:, None]
    labels = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=test_fraction, random_state=seed, stratify=labels
    )
    return DigitsSplit(
        torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)
    )


@dataclass(frozen=True)
class RetrievalBatch:
    """A batch of key-value retrieval prompts.

    Attributes
    ----------
    input_ids : torch.Tensor
        ``[N, S]`` token ids.
    targets : torch.Tensor
        ``[N]`` id of the correct answer (the queried key's value).
    evidence : torch.Tensor
        ``[N, S]`` bool: the queried key's occurrence in the context, its value, and the query key.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    evidence: torch.Tensor


@dataclass(frozen=True)
class RetrievalTask:
    """Synthetic key-value retrieval with a word-level vocabulary.

    A prompt lists ``n_pairs`` distinct keys with random values and then asks for one of them; the
    answer is the next token after the query key::

        <bos> k3 = 7 k1 = 2 k8 = 5 k0 = 7 k5 = 1 k9 = 4 ? k1      answer: 2

    The answer depends only on three *evidence* tokens: the queried key where it occurs in the
    context (``k1`` at position 4), its value (``2``) and the query key after ``?`` (the last
    token). There is deliberately no answer cue such as ``->`` after the query key: with one, the
    query key is no longer at the predicting position, the lookup needs one more composition of
    attention layers, and tiny models (2-3 layers, also a plain attention-only transformer) stayed
    on a ~30% plateau for thousands of steps instead of training in minutes.

    Parameters
    ----------
    n_keys : int
        Size of the key alphabet (``k0`` ... ``k{n_keys-1}``).
    n_values : int
        Size of the value alphabet (``0`` ... ``{n_values-1}``).
    n_pairs : int
        Key-value pairs per prompt; the sequence length is ``3 + 3 * n_pairs``.
    """

    n_keys: int = 16
    n_values: int = 10
    n_pairs: int = 6

    SPECIALS = ("<pad>", "<bos>", "<mask>", "=", "?")

    @property
    def vocab(self) -> list[str]:
        """Token strings, indexed by id."""
        return (
            list(self.SPECIALS)
            + [f"k{i}" for i in range(self.n_keys)]
            + [str(v) for v in range(self.n_values)]
        )

    def token_id(self, token: str) -> int:
        """Id of a token string."""
        return self.vocab.index(token)

    @property
    def seq_len(self) -> int:
        """Length of every prompt."""
        return 3 + 3 * self.n_pairs

    @property
    def key_offset(self) -> int:
        """Id of ``k0``."""
        return len(self.SPECIALS)

    @property
    def value_offset(self) -> int:
        """Id of ``0``."""
        return len(self.SPECIALS) + self.n_keys

    def sample(self, n: int, generator: torch.Generator) -> RetrievalBatch:
        """Draw ``n`` prompts.

        Parameters
        ----------
        n : int
            Number of prompts.
        generator : torch.Generator
            Source of randomness (keys, values, queried pair).

        Returns
        -------
        RetrievalBatch
        """
        p = self.n_pairs
        keys = torch.rand(n, self.n_keys, generator=generator).argsort(dim=1)[:, :p] + self.key_offset
        values = torch.randint(self.n_values, (n, p), generator=generator) + self.value_offset
        query = torch.randint(p, (n,), generator=generator)
        rows = torch.arange(n)

        ids = torch.empty(n, self.seq_len, dtype=torch.long)
        ids[:, 0] = self.token_id("<bos>")
        pair_pos = 1 + 3 * torch.arange(p)
        ids[:, pair_pos] = keys
        ids[:, pair_pos + 1] = self.token_id("=")
        ids[:, pair_pos + 2] = values
        ids[:, 1 + 3 * p] = self.token_id("?")
        ids[:, 2 + 3 * p] = keys[rows, query]

        evidence = torch.zeros(n, self.seq_len, dtype=torch.bool)
        evidence[rows, pair_pos[query]] = True
        evidence[rows, pair_pos[query] + 2] = True
        evidence[:, 2 + 3 * p] = True
        return RetrievalBatch(ids, values[rows, query], evidence)

    def decode(self, ids: torch.Tensor) -> str:
        """Render one prompt as text."""
        vocab = self.vocab
        return " ".join(vocab[int(i)] for i in ids)


# --------------------------------------------------------------------------------------------------
# model definitions
# --------------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """Conv-BN-ReLU CNN for 8x8 digits.

    ``features`` is a single :class:`torch.nn.Sequential` (so zennit's ``SequentialMergeBatchNorm``
    finds every Conv2d/BatchNorm2d pair) built only from layer types Captum's ``LRP`` supports; the
    flatten is a functional call, not a module.

    Parameters
    ----------
    width : int
        Channels of the first convolution (later ones use twice as many).
    n_classes : int
        Number of output logits.
    """

    def __init__(self, width: int = 16, n_classes: int = 10) -> None:
        super().__init__()
        w2 = 2 * width
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, w2, 3, padding=1),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(w2, w2, 3, padding=1),
            nn.BatchNorm2d(w2),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Linear(w2 * 2 * 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, n_classes]`` for images ``[N, 1, 8, 8]``."""
        return self.classifier(torch.flatten(self.features(x), 1))


def vit_config(**overrides: Any):
    """The tiny ViT configuration: 8x8 single-channel input, 2x2 patches, eager attention.

    Parameters
    ----------
    **overrides
        Fields to change (the smoke test shrinks the model).

    Returns
    -------
    transformers.ViTConfig
    """
    from transformers import ViTConfig

    kwargs: dict[str, Any] = dict(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=10,
    )
    kwargs.update(overrides)
    return ViTConfig(**kwargs)


def llama_config(task: RetrievalTask | None = None, **overrides: Any):
    """The tiny Llama configuration for the retrieval task: 2 layers, 4 heads (2 KV heads), d=64.

    Weights are initialised with std 0.1 rather than Llama's 0.02 (see :func:`train_llama`).

    Parameters
    ----------
    task : RetrievalTask, optional
        Sets the vocabulary size and special token ids.
    **overrides
        Fields to change.

    Returns
    -------
    transformers.LlamaConfig
    """
    from transformers import LlamaConfig

    task = task or RetrievalTask()
    kwargs: dict[str, Any] = dict(
        vocab_size=len(task.vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=task.token_id("<pad>"),
        bos_token_id=task.token_id("<bos>"),
        eos_token_id=None,
        attention_dropout=0.0,
        initializer_range=0.1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _eager(model: nn.Module) -> nn.Module:
    """Select the eager attention implementation (attention rollout needs the weights)."""
    model.set_attn_implementation("eager")
    return model


def build_model(name: str, **config_overrides: Any) -> nn.Module:
    """Build an *untrained* benchmark model (seeded with :data:`SEED`), in eval mode.

    Parameters
    ----------
    name : {"cnn", "vit", "llama"}
        Which model.
    **config_overrides
        For ``vit`` / ``llama``: configuration fields to change; for ``cnn``: ``width``.

    Returns
    -------
    torch.nn.Module
    """
    torch.manual_seed(SEED)
    if name == "cnn":
        model: nn.Module = DigitsCNN(**config_overrides)
    elif name == "vit":
        from transformers import ViTForImageClassification

        model = _eager(ViTForImageClassification(vit_config(**config_overrides)))
    elif name == "llama":
        from transformers import LlamaForCausalLM

        model = _eager(LlamaForCausalLM(llama_config(**config_overrides)))
    else:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {MODEL_NAMES}")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------
def _random_shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by -1, 0 or +1 pixel in each direction (zero fill)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    dy = torch.randint(3, (n,), generator=generator)
    dx = torch.randint(3, (n,), generator=generator)
    out = torch.empty_like(x)
    for oy in range(3):
        for ox in range(3):
            sel = (dy == oy) & (dx == ox)
            out[sel] = padded[sel, :, oy : oy + h, ox : ox + w]
    return out


def _accuracy(logits_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits_fn(x).argmax(-1) == y).float().mean())


def _train_digits_classifier(
    model: nn.Module,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    data: DigitsSplit,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int = 64,
    augment: bool = False,
) -> dict[str, float]:
    """Minibatch AdamW with a cosine schedule; returns train/test accuracy."""
    generator = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = len(data.x_train)
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            xb = data.x_train[idx]
            if augment:
                xb = _random_shift(xb, generator)
            loss = F.cross_entropy(logits_fn(xb), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return {
        "train_accuracy": _accuracy(logits_fn, data.x_train, data.y_train),
        "test_accuracy": _accuracy(logits_fn, data.x_test, data.y_test),
    }


def train_cnn(data: DigitsSplit | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train :class:`DigitsCNN` on the digits (30 epochs of batch 64, AdamW, one-cycle lr 1e-2).

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    metadata : dict
        Accuracies and the recipe.
    """
    data = data or load_digits_split()
    model = build_model("cnn")
    recipe = dict(epochs=30, lr=1e-2, weight_decay=1e-4, augment=False)
    metrics = _train_digits_classifier(model, model, data, **recipe)
    return model, {"recipe": recipe, **metrics}


def train_vit(data: DigitsSplit | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny ViT on the digits (150 epochs of batch 64, AdamW, one-cycle lr 2e-3, +-1 pixel shifts).

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    metadata : dict
        Accuracies and the recipe.
    """
    data = data or load_digits_split()
    model = build_model("vit")
    recipe = dict(epochs=150, lr=2e-3, weight_decay=0.05, augment=True)
    metrics = _train_digits_classifier(
        model, lambda x: model(pixel_values=x).logits, data, **recipe
    )
    return model, {"recipe": recipe, **metrics}


def _mask_distractors(
    batch: RetrievalBatch, task: RetrievalTask, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Replace a random ``rate`` share of the non-evidence tokens by ``<mask>``.

    Training with this makes ``<mask>`` an in-distribution "token removed" symbol, which the
    perturbation curves use as the removal baseline; evidence tokens are never masked in training.
    """
    hit = (torch.rand(batch.input_ids.shape, generator=generator) < rate) & ~batch.evidence
    return batch.input_ids.masked_fill(hit, task.token_id("<mask>"))


def llama_answer_logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits at the last position, ``[N, vocab]``."""
    return model(input_ids=input_ids).logits[:, -1, :]


def train_llama(task: RetrievalTask | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train the tiny Llama on :class:`RetrievalTask` until validation accuracy >= 99%.

    Fresh prompts every step (batch 128, AdamW lr 3e-3, gradient clipping at 1, 10% of the
    distractor tokens masked); the loss is the cross-entropy of the answer at the last position.
    Validation (for stopping, every 100 steps) and test prompts come from separate seeds.

    Initialisation matters here: with Llama's defaults (all weights, embeddings included, with
    std 0.02) the model sits for thousands of steps on a "most frequent value in the context"
    plateau (~30% accuracy). Linear weights with std 0.1 (``initializer_range``) and token
    embeddings with std 1 let it learn the two-step lookup (a previous-token head, then
    content matching) within about a thousand steps.

    Returns
    -------
    model : torch.nn.Module
        In eval mode.
    metadata : dict
        Accuracies, steps and the recipe.
    """
    task = task or RetrievalTask()
    model = build_model("llama")
    recipe = dict(batch_size=128, lr=3e-3, weight_decay=0.01, max_steps=5000, mask_rate=0.1,
                  eval_every=100, stop_at=0.99, initializer_range=model.config.initializer_range,
                  embedding_init_std=1.0)
    torch.manual_seed(SEED)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=recipe["embedding_init_std"])
    train_gen = torch.Generator().manual_seed(SEED)
    val = task.sample(1000, torch.Generator().manual_seed(SEED + 1))
    test = task.sample(2000, torch.Generator().manual_seed(SEED + 2))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    logits_fn = lambda ids: llama_answer_logits(model, ids)  # noqa: E731
    step, val_acc = 0, 0.0
    model.train()
    for step in range(1, recipe["max_steps"] + 1):
        batch = task.sample(recipe["batch_size"], train_gen)
        ids = _mask_distractors(batch, task, recipe["mask_rate"], train_gen)
        loss = F.cross_entropy(logits_fn(ids), batch.targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % recipe["eval_every"] == 0:
            model.eval()
            val_acc = _accuracy(logits_fn, val.input_ids, val.targets)
            logger.info("llama step %d: loss %.4f, validation accuracy %.3f", step, loss.item(), val_acc)
            model.train()
            if val_acc >= recipe["stop_at"]:
                break
    model.eval()
    test_acc = _accuracy(logits_fn, test.input_ids, test.targets)
    return model, {"recipe": recipe, "steps": step, "validation_accuracy": val_acc, "test_accuracy": test_acc}


_TRAINERS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "cnn": train_cnn,
    "vit": train_vit,
    "llama": train_llama,
}


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainedModel:
    """A benchmark model and what is known about how it was made.

    Attributes
    ----------
    name : str
        ``cnn``, ``vit`` or ``llama``.
    model : torch.nn.Module
        In eval mode.
    metadata : dict
        Recipe version, seed, accuracies, training time, parameter count, whether it was loaded.
    """

    name: str
    model: nn.Module
    metadata: dict[str, Any] = field(default_factory=dict)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def get_model(
    name: str, *, checkpoint_dir: Path | str | None = None, retrain: bool = False
) -> TrainedModel:
    """Load a trained benchmark model from the cache, training (and caching) it if needed.

    Parameters
    ----------
    name : {"cnn", "vit", "llama"}
        Which model.
    checkpoint_dir : path, optional
        Cache folder; default :data:`CHECKPOINT_DIR`.
    retrain : bool
        Train even when a valid cache exists.

    Returns
    -------
    TrainedModel
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    if name not in _TRAINERS:
        raise ValueError(f"unknown benchmark model {name!r}; choose from {MODEL_NAMES}")
    path = Path(checkpoint_dir or CHECKPOINT_DIR) / f"{name}.safetensors"
    if path.exists() and not retrain:
        with safe_open(str(path), framework="pt") as fh:
            metadata = json.loads((fh.metadata() or {}).get("lime_attr_bench", "{}"))
        if metadata.get("recipe_version") == RECIPE_VERSION:
            model = build_model(name)
            model.load_state_dict(load_file(str(path)))
            model.eval()
            logger.info("loaded %s from %s (test accuracy %.3f)", name, path, metadata["test_accuracy"])
            return TrainedModel(name, model, {**metadata, "loaded_from_cache": True})
        logger.info("cached %s has recipe %s, want %s: retraining", name,
                    metadata.get("recipe_version"), RECIPE_VERSION)

    logger.info("training %s (seed %d) ...", name, SEED)
    start = time.perf_counter()
    model, info = _TRAINERS[name]()
    metadata = {
        "recipe_version": RECIPE_VERSION,
        "seed": SEED,
        "n_params": _n_params(model),
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_threads": torch.get_num_threads(),
        **{k: round(v, 4) if isinstance(v, float) else v for k, v in info.items()},
    }
    logger.info("trained %s in %.1f s: %s", name, metadata["train_seconds"],
                {k: v for k, v in metadata.items() if "accuracy" in k})
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"lime_attr_bench": json.dumps(metadata, sort_keys=True)})
    return TrainedModel(name, model, {**metadata, "loaded_from_cache": False})


def main(argv: list[str] | None = None) -> None:
    """Command line: (re)build the cached checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--retrain", action="store_true", help="train even if a valid cache exists")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    for name in args.models:
        trained = get_model(name, retrain=args.retrain)
        logger.info("%s: %s", name, json.dumps(trained.metadata, sort_keys=True))


if __name__ == "__main__":
    main()
