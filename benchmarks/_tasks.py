"""What is explained on each benchmark model: inputs, targets, features, removal baseline, evidence."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ._rollout import attention_rollout
from .bench_models import SEED, DigitsSplit, RetrievalTask, load_digits_split

N_BACKGROUND = 16
"""Background (baseline) samples for GradientShap: training inputs drawn with a fixed seed."""


@dataclass
class BenchInstance:
    """One model with the held-out examples it is explained on.

    Attributes
    ----------
    name : str
        ``cnn``, ``vit`` or ``llama``.
    model : torch.nn.Module
        The model, in eval mode.
    forward : callable
        ``inputs -> logits [N, C]`` (for the LM: next-token logits at the last position).
    inputs : torch.Tensor
        The explained inputs: pixels ``[N, 1, 8, 8]`` or input embeddings ``[N, S, D]``.
    targets : torch.Tensor
        ``[N]``: the model's own prediction on the clean input (the explained logit).
    labels : torch.Tensor
        ``[N]``: the correct answer.
    groups : torch.Tensor
        ``inputs.shape[1:]``: feature index of every input element.
    n_features : int
        Number of features F.
    baseline : torch.Tensor
        Removal value, broadcastable to ``inputs.shape[1:]``.
    background : torch.Tensor
        GradientShap baseline distribution (training inputs).
    feature_unit : str
        What a feature is, for the docs.
    baseline_note : str
        What removal means, for the docs.
    box : tuple of float, optional
        ``(low, high)`` range of valid input values (pixel models), for the z-box first-layer rule.
    evidence : torch.Tensor, optional
        ``[N, F]`` bool ground-truth evidence features (the retrieval task).
    rollout : callable, optional
        ``inputs -> [N, F]`` attention-rollout scores (transformers only).
    info : dict
        Model metadata (accuracy, size, training) for the report.
    """

    name: str
    model: nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]
    inputs: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor
    n_features: int
    baseline: torch.Tensor
    background: torch.Tensor
    feature_unit: str
    baseline_note: str
    box: Optional[tuple[float, float]] = None
    evidence: Optional[torch.Tensor] = None
    rollout: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """``torch`` for plain torch models, ``hf`` for Hugging Face models."""
        return "hf" if getattr(getattr(self.model, "config", None), "model_type", None) else "torch"


def _predict(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return forward(x).argmax(dim=-1)


def _background(x_train: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 3)
    return x_train[torch.randperm(len(x_train), generator=gen)[:N_BACKGROUND]].clone()


def cnn_instance(model: nn.Module, n_examples: int, data: DigitsSplit | None = None) -> BenchInstance:
    """The digits CNN explained on the first ``n_examples`` held-out digits; features are pixels."""
    data = data or load_digits_split()
    x = data.x_test[:n_examples].clone()
    forward = model
    return BenchInstance(
        name="cnn",
        model=model,
        forward=forward,
        inputs=x,
        targets=_predict(forward, x),
        labels=data.y_test[:n_examples].clone(),
        groups=torch.arange(64).reshape(1, 8, 8),
        n_features=64,
        baseline=torch.zeros(1, 8, 8),
        background=_background(data.x_train),
        feature_unit="pixel (64 per image)",
        baseline_note="pixel set to 0 (the digits' background, no ink)",
        box=(0.0, 1.0),
    )


def vit_instance(model: nn.Module, n_examples: int, data: DigitsSplit | None = None) -> BenchInstance:
    """The digits ViT explained on held-out digits; features are its 16 2x2 patches (= tokens)."""
    data = data or load_digits_split()
    x = data.x_test[:n_examples].clone()
    patch = model.config.patch_size
    side = model.config.image_size // patch
    rows = torch.arange(model.config.image_size) // patch
    groups = (rows[:, None] * side + rows[None, :]).unsqueeze(0).expand(model.config.num_channels, -1, -1)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixel_values=pixels).logits

    def rollout(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            attentions = model(pixel_values=pixels, output_attentions=True).attentions
        return attention_rollout(attentions)[:, 0, 1:]  # CLS row, patch tokens

    return BenchInstance(
        name="vit",
        model=model,
        forward=forward,
        inputs=x,
        targets=_predict(forward, x),
        labels=data.y_test[:n_examples].clone(),
        groups=groups.contiguous(),
        n_features=side * side,
        baseline=torch.zeros(1, 8, 8),
        background=_background(data.x_train),
        feature_unit=f"{patch}x{patch} patch = one ViT token ({side * side} per image)",
        baseline_note="all pixels of the patch set to 0 (background, no ink)",
        box=(0.0, 1.0),
        rollout=rollout,
    )


def llama_instance(model: nn.Module, n_examples: int, task: RetrievalTask | None = None) -> BenchInstance:
    """The retrieval Llama explained on held-out prompts; features are token positions.

    The explained input is ``inputs_embeds``; a position is removed by replacing its embedding with
    the embedding of ``<mask>`` (a token the model saw in training in place of distractors).
    """
    task = task or RetrievalTask()
    test = task.sample(max(n_examples, 1), torch.Generator().manual_seed(SEED + 2))
    train = task.sample(N_BACKGROUND, torch.Generator().manual_seed(SEED + 3))
    embed = model.get_input_embeddings()
    with torch.no_grad():
        x = embed(test.input_ids[:n_examples]).clone()
        background = embed(train.input_ids).clone()
        mask_embedding = embed.weight[task.token_id("<mask>")].clone()
    seq, dim = x.shape[1], x.shape[2]

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=embeds).logits[:, -1, :]

    def rollout(embeds: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            attentions = model(inputs_embeds=embeds, output_attentions=True).attentions
        return attention_rollout(attentions)[:, -1, :]  # last position's row

    return BenchInstance(
        name="llama",
        model=model,
        forward=forward,
        inputs=x,
        targets=_predict(forward, x),
        labels=test.targets[:n_examples].clone(),
        groups=torch.arange(seq)[:, None].expand(seq, dim).contiguous(),
        n_features=seq,
        baseline=mask_embedding.expand(seq, dim),
        background=background,
        feature_unit=f"token position ({seq} per prompt; relevance summed over the embedding dim)",
        baseline_note="input embedding replaced by the <mask> token's embedding",
        evidence=test.evidence[:n_examples].clone(),
        rollout=rollout,
    )


INSTANCE_BUILDERS: dict[str, Callable[..., BenchInstance]] = {
    "cnn": cnn_instance,
    "vit": vit_instance,
    "llama": llama_instance,
}
