"""Adapters that turn a model into Captum's ``forward_func(*inputs, *additional_args) -> Tensor``."""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import Tensor, nn


def is_hf_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` (duck-typed on ``config.model_type``)."""
    return isinstance(model, nn.Module) and getattr(getattr(model, "config", None), "model_type", None) is not None


def hf_input_name(model: nn.Module) -> str:
    """The tensor an HF model is explained with respect to: ``inputs_embeds`` for token models, else
    its ``main_input_name`` (``pixel_values``, ``input_features``)."""
    main = getattr(model, "main_input_name", "input_ids")
    if main == "input_ids":
        return "inputs_embeds"
    return main


def model_output_tensor(output: Any) -> Tensor:
    """The tensor to explain from a model output: ``logits`` if present, else the first tensor."""
    if isinstance(output, Tensor):
        return output
    for key in ("logits", "image_embeds", "text_embeds", "audio_embeds", "last_hidden_state", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, Tensor):
            return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find an output tensor to explain in {type(output).__name__}; "
                    "wrap the model in a function that returns the tensor to explain")


class HFForward:
    """``forward(x, *extra) -> output`` for a Hugging Face model explained w.r.t. ``input_name``.

    Token-level outputs ``[batch, seq, vocab]`` are reduced to the last position when the target is
    an int (or one int per example); a tuple target ``(position, token)`` keeps the full output.
    """

    def __init__(self, model: nn.Module, input_name: str, kwargs: dict, keep_positions: bool) -> None:
        self.model = model
        self.input_name = input_name
        self.kwargs = kwargs
        self.keep_positions = keep_positions
        self.__signature__ = inspect.Signature(
            [inspect.Parameter("x", inspect.Parameter.POSITIONAL_OR_KEYWORD),
             inspect.Parameter("extra", inspect.Parameter.VAR_POSITIONAL)])

    def __call__(self, x: Tensor, *extra: Any) -> Tensor:
        kwargs = dict(self.kwargs)
        for e in extra:
            if isinstance(e, dict):
                kwargs.update(e)
            else:
                raise TypeError("for Hugging Face models, additional_forward_args must be a dict of model "
                                "keyword arguments (e.g. {'attention_mask': mask}); got "
                                f"{type(e).__name__}")
        kwargs.setdefault("use_cache", False) if "use_cache" in _params(self.model) else None
        out = model_output_tensor(self.model(**{self.input_name: x}, **kwargs))
        if out.dim() == 3 and not self.keep_positions:
            _check_last_position_real(kwargs.get("attention_mask"))
            out = out[:, -1, :]
        return out


def _check_last_position_real(mask: Any) -> None:
    """An int target is explained at the last position: refuse rows whose last position is padding."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return
    rows = (mask[:, -1] == 0).nonzero().flatten().tolist()
    if rows:
        raise ValueError(f"the attention_mask is right-padded (the last position of row(s) {rows} is padding), but "
                         "an int target is explained at the last position, so the pad token would be explained. "
                         "Left-pad the batch (tokenizer.padding_side = 'left'), or explain each row's last real "
                         "position with target=[(position, token_id), ...]")


def _params(model: nn.Module) -> set:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()
