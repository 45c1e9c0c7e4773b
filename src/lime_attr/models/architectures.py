"""Configurations of the two demo models (real transformers classes, tiny sizes).

``digits-llava``
    :class:`transformers.LlavaForConditionalGeneration`: CLIP vision tower (32 x 32 input, patch 8,
    hidden 64, 2 layers, 4 heads, 16 patch tokens) -> 2-layer GELU projector -> Llama language model
    (hidden 96, 2 layers, 4 query / 2 key-value heads, SwiGLU 256, tied input / output embeddings).
``tones-qwen2audio``
    :class:`transformers.Qwen2AudioForConditionalGeneration`: Whisper-style encoder (32 mel bins,
    hidden 64, 2 layers, 4 heads, 50 positions after the stride-2 convolution, 2x average pool) ->
    linear projector -> Qwen2 language model (hidden 96, 2 layers, 4 query / 2 key-value heads,
    SwiGLU 256).

Both have about 0.3 M parameters; a forward and backward pass over a full prompt takes about 10 ms on one
CPU core (measured: 8 ms for a 29-token ``digits-llava`` prompt, 9 ms for a 40-token ``tones-qwen2audio``
prompt), which is what per-token attribution and the LIME inner loop need. Weights are initialised with
standard deviation 0.1 instead of the transformers default 0.02 (see ``_TEXT_SIZES``).
"""

from __future__ import annotations

import math

import torch
from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2AudioConfig,
    Qwen2AudioEncoderConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2Config,
)

from .processing import (
    AUDIO_TOKEN,
    IMAGE_TOKEN,
    NUM_AUDIO_FRAMES,
    NUM_AUDIO_TOKENS,
    NUM_IMAGE_TOKENS,
    NUM_MEL_BINS,
    PATCH_SIZE,
)
from .scenes import CANVAS_SIZE

__all__ = ["digits_llava_config", "tones_qwen2audio_config", "build_model", "generation_config"]

_TEXT_SIZES = dict(
    hidden_size=96,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # ~1/sqrt(hidden): with the transformers default of 0.02 the attention logits of such narrow models
    # start out ~100x too small and the question <-> media binding of the yes/no task stays stuck at
    # chance for thousands of steps; with 0.1 it is learnt within a few hundred.
    initializer_range=0.1,
)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def digits_llava_config(tokenizer: PreTrainedTokenizerBase) -> LlavaConfig:
    """Configuration of ``digits-llava`` for the given tokenizer.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The ``digits-llava`` tokenizer (provides vocabulary size and special-token ids).

    Returns
    -------
    transformers.LlavaConfig
    """
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_channels=3,
        image_size=CANVAS_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
    )
    text = LlamaConfig(**_TEXT_SIZES, **_special_ids(tokenizer), tie_word_embeddings=True)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )


def tones_qwen2audio_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2AudioConfig:
    """Configuration of ``tones-qwen2audio`` for the given tokenizer.

    Parameters
    ----------
    tokenizer : transformers.PreTrainedTokenizerBase
        The ``tones-qwen2audio`` tokenizer.

    Returns
    -------
    transformers.Qwen2AudioConfig
    """
    audio = Qwen2AudioEncoderConfig(
        num_mel_bins=NUM_MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=4,
        encoder_ffn_dim=128,
        d_model=64,
        max_source_positions=NUM_AUDIO_FRAMES // 2,
        initializer_range=0.1,
    )
    # Qwen2AudioForConditionalGeneration declares no tied weights: keep the LM head separate.
    text = Qwen2Config(**_TEXT_SIZES, **_special_ids(tokenizer), tie_word_embeddings=False)
    config = Qwen2AudioConfig(
        audio_config=audio, text_config=text, audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    )
    assert (audio.max_source_positions - 2) // 2 + 1 == NUM_AUDIO_TOKENS
    return config


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Greedy generation defaults shipped with both models (``max_new_tokens=8``)."""
    return GenerationConfig(
        do_sample=False,
        max_new_tokens=8,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    # Whisper-style fixed sinusoidal position table: [sin(t * w_i), cos(t * w_i)].
    log_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-log_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


def build_model(
    name: str, tokenizer: PreTrainedTokenizerBase, attn_implementation: str = "sdpa", seed: int = 0
) -> PreTrainedModel:
    """Freshly initialised (untrained) demo model.

    Parameters
    ----------
    name : {"digits-llava", "tones-qwen2audio"}
        Which demo model.
    tokenizer : transformers.PreTrainedTokenizerBase
        Its tokenizer.
    attn_implementation : str
        ``"sdpa"`` (default) or ``"eager"``.
    seed : int
        Seed of the weight initialisation.

    Returns
    -------
    transformers.PreTrainedModel
    """
    torch.manual_seed(seed)
    if name == "digits-llava":
        model: PreTrainedModel = LlavaForConditionalGeneration._from_config(
            digits_llava_config(tokenizer), attn_implementation=attn_implementation
        )
    elif name == "tones-qwen2audio":
        model = Qwen2AudioForConditionalGeneration._from_config(
            tones_qwen2audio_config(tokenizer), attn_implementation=attn_implementation
        )
        positions = model.model.audio_tower.embed_positions
        with torch.no_grad():
            positions.weight.copy_(_sinusoids(*positions.weight.shape))
    else:
        raise ValueError(f"unknown demo model {name!r}")
    model.generation_config = generation_config(tokenizer)
    return model
