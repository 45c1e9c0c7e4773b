"""Loading the builtin demo models, local checkpoints and hub checkpoints through ``from_pretrained``.

The builtin models are ordinary transformers checkpoints stored as package data
(``lime_attr/models/weights/<name>/``); they are loaded exactly like a hub checkpoint, with the model
class's ``from_pretrained`` and :class:`transformers.AutoProcessor`, so any code path that works for them
works for a real model of the same family.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2AudioForConditionalGeneration,
)

__all__ = ["BUILTIN_PREFIX", "available_builtins", "builtin_path", "load_builtin", "load_model"]

logger = logging.getLogger(__name__)

#: Prefix of builtin model specs in :func:`load_model`.
BUILTIN_PREFIX = "builtin:"
_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_BUILTINS: dict[str, type[PreTrainedModel]] = {
    "digits-llava": LlavaForConditionalGeneration,
    "tones-qwen2audio": Qwen2AudioForConditionalGeneration,
}

DType = torch.dtype | str | None
Device = torch.device | str | None


def available_builtins() -> list[str]:
    """Names of the builtin demo models whose weights are installed.

    Returns
    -------
    list of str
        Subset of ``["digits-llava", "tones-qwen2audio"]``.
    """
    return [name for name in _BUILTINS if (_WEIGHTS_DIR / name / "config.json").is_file()]


def builtin_path(name: str) -> Path:
    """Folder of a builtin model's ``save_pretrained`` checkpoint.

    Raises
    ------
    KeyError
        If ``name`` is not a builtin model.
    FileNotFoundError
        If its weights are not installed (retrain with ``python -m lime_attr.models.train``).
    """
    if name not in _BUILTINS:
        raise KeyError(f"unknown builtin model {name!r}; available: {sorted(_BUILTINS)}")
    path = _WEIGHTS_DIR / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"weights of builtin model {name!r} are missing from {path}; "
            f"recreate them with `python -m lime_attr.models.train --model {name}`"
        )
    return path


def _resolve_dtype(dtype: DType) -> torch.dtype | str | None:
    if isinstance(dtype, str) and dtype != "auto":
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return resolved
    return dtype


def _finish(model: PreTrainedModel, device: Device) -> PreTrainedModel:
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_builtin(
    name: str, dtype: DType = None, device: Device = None, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a builtin demo model and its processor via ``from_pretrained``.

    Parameters
    ----------
    name : {"digits-llava", "tones-qwen2audio"}
        Builtin model name (see :func:`available_builtins`).
    dtype : torch.dtype or str, optional
        Parameter dtype (``torch.float32`` when ``None``, as saved).
    device : torch.device or str, optional
        Where to move the model (stays on CPU when ``None``).
    attn_implementation : str
        ``"sdpa"`` (default) or ``"eager"`` (or any registered attention function).

    Returns
    -------
    model : transformers.PreTrainedModel
        ``LlavaForConditionalGeneration`` or ``Qwen2AudioForConditionalGeneration`` in eval mode.
    processor : transformers.ProcessorMixin
        ``LlavaProcessor`` or ``Qwen2AudioProcessor``.

    Examples
    --------
    >>> from lime_attr.models import load_builtin
    >>> model, processor = load_builtin("digits-llava")  # doctest: +SKIP
    """
    path = builtin_path(name)
    model = _BUILTINS[name].from_pretrained(
        path, dtype=_resolve_dtype(dtype), attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(path)
    return _finish(model, device), processor


def _model_class(config: Any) -> Any:
    """Auto class (or concrete class) that loads a multimodal checkpoint with this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    multimodal = getattr(transformers, "AutoModelForMultimodalLM", None)
    if multimodal is not None:
        from transformers.models.auto import modeling_auto

        names = getattr(modeling_auto, "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", {})
        if config.model_type in names:
            return multimodal
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    raise ValueError(
        f"do not know how to load a model of type {config.model_type!r}: it is neither an image-text-to-text "
        "nor an audio-text model known to transformers, and its config names no importable architecture"
    )


def load_model(
    spec: str | Path, dtype: DType = None, device: Device = None, attn_implementation: str = "sdpa", **kwargs: Any
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a model and its processor from a builtin name, a local folder or a hub id.

    Parameters
    ----------
    spec : str or pathlib.Path
        ``"builtin:digits-llava"``, ``"builtin:tones-qwen2audio"``, a local ``save_pretrained`` folder, or
        a Hugging Face hub id such as ``"llava-hf/llava-1.5-7b-hf"`` or ``"Qwen/Qwen2-Audio-7B-Instruct"``.
    dtype : torch.dtype or str, optional
        Parameter dtype (e.g. ``torch.bfloat16`` or ``"auto"``).
    device : torch.device or str, optional
        Where to move the model after loading.
    attn_implementation : str
        ``"sdpa"`` (default) or ``"eager"``.
    **kwargs
        Passed to the model's ``from_pretrained`` (e.g. ``revision``, ``device_map``).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode.
    processor : transformers.ProcessorMixin

    Raises
    ------
    OSError
        If the checkpoint cannot be found or downloaded (e.g. offline without a local cache); the message
        says how to proceed.
    """
    spec_str = str(spec)
    if spec_str.startswith(BUILTIN_PREFIX):
        name = spec_str[len(BUILTIN_PREFIX) :]
        return load_builtin(name, dtype=dtype, device=device, attn_implementation=attn_implementation)
    local = Path(spec_str).expanduser()
    source = str(local) if local.exists() else spec_str
    hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "token", "trust_remote_code", "cache_dir")}
    try:
        config = AutoConfig.from_pretrained(source, **hub_kwargs)
        model_cls = _model_class(config)
        model = model_cls.from_pretrained(
            source, dtype=_resolve_dtype(dtype), attn_implementation=attn_implementation, **kwargs
        )
        processor = AutoProcessor.from_pretrained(source, **hub_kwargs)
    except OSError as err:
        where = "local folder" if local.exists() else "hub id"
        raise OSError(
            f"could not load {spec_str!r} ({where}): {err}\n"
            "If this machine is offline, download the checkpoint elsewhere (e.g. `huggingface-cli download "
            f"{spec_str}`), copy the folder here and pass its path, or set HF_HUB_OFFLINE=1 to use a local "
            "cache. The builtin demo models need no download: use 'builtin:digits-llava' or "
            "'builtin:tones-qwen2audio'."
        ) from err
    if "device_map" in kwargs:
        return model.eval(), processor
    return _finish(model, device), processor
