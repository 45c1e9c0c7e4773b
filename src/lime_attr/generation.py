"""One generation entry point for every registered decoding method.

:class:`DecodingConfig` is the flat configuration the CLI, the evaluation harness and the reports store;
:func:`generate` looks its ``method`` up in the decoding-method registry
(:func:`~lime_attr.mitigation.available_decoding_methods`: ``greedy`` and ``sample`` are transformers'
own ``generate()``, ``vcd`` adds the :class:`~lime_attr.mitigation.VCDLogitsProcessor`, ``lime`` runs
:func:`~lime_attr.mitigation.lime_generate`, and any method a user registers), builds the method's own
config from the flat fields and runs it. Evaluation and the CLI call :func:`generate` and never reach
into a method's internals.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from .mitigation.decoding import GenerationResult, config_to_dict, decode, decoding_session, get_decoding_method
from .mitigation.lime_method import LIME_MODES
from .mitigation.sampling import check_sampling

__all__ = ["METHODS", "DecodingConfig", "GenerationResult", "generate", "generation_session", "prepare_inputs"]

#: The built-in decoding methods; every registered one is in
#: :func:`~lime_attr.mitigation.available_decoding_methods`.
METHODS = ("greedy", "sample", "vcd", "lime")


@dataclass
class DecodingConfig:
    """How to decode; stored with every evaluation result.

    Parameters
    ----------
    method : str
        A registered decoding method (:func:`~lime_attr.mitigation.available_decoding_methods`; built in:
        ``"greedy"``, ``"sample"``, ``"vcd"``, ``"lime"``).
    max_new_tokens : int
    temperature, top_k, top_p : float, int or None, float or None
        Sampling parameters (``method="sample"``, or VCD / LIME with ``do_sample``); ``top_k >= 1`` and
        ``0 < top_p <= 1`` when given.
    do_sample : bool
        Sample instead of greedy for ``vcd`` and ``lime`` (``sample`` always samples).
    seed : int
        Seed of the sampling generator.
    vcd_alpha, vcd_beta, vcd_noise_step : float, float, int
        VCD parameters (defaults of Leng et al., 2024: 1, 0.1, 500).
    lime_mode : {"fast", "reference", "incremental"}
    lime_overrides : dict
        Further :class:`~lime_attr.mitigation.LimeConfig` fields.
    method_options : dict
        Fields of the method's own config (the ``config_type`` of its
        :class:`~lime_attr.mitigation.DecodingMethod`) that the flat fields above do not set, e.g. those of
        a method you registered; they win over the flat fields.

    Raises
    ------
    ValueError
        An unregistered method (:class:`~lime_attr.mitigation.UnknownDecodingMethodError`, listing the
        registered ones) or a field the method's own config refuses.
    """

    method: str = "greedy"
    max_new_tokens: int = 8
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    do_sample: bool = False
    seed: int = 0
    vcd_alpha: float = 1.0
    vcd_beta: float = 0.1
    vcd_noise_step: int = 500
    lime_mode: str = "fast"
    lime_overrides: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_decoding_method(self.method)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.lime_mode not in LIME_MODES:
            raise ValueError(f"lime_mode must be one of {', '.join(map(repr, LIME_MODES))}, got {self.lime_mode!r}")
        check_sampling(self.temperature, self.top_k, self.top_p)
        self.method_config()

    @property
    def sampling(self) -> bool:
        return self.method == "sample" or self.do_sample

    def options(self) -> dict:
        """The flat fields other than ``method``, with ``method_options`` merged in, from which a method
        builds its config."""
        d = asdict(self)
        d.pop("method")
        d.update(d.pop("method_options"))
        return d

    def method_config(self) -> Any:
        """The registered method's own config (:meth:`~lime_attr.mitigation.DecodingMethod.make_config`).

        Raises
        ------
        ValueError
            A ``method_options`` key that is not a field of the method's config, or a value it refuses.
        """
        spec = get_decoding_method(self.method)
        known = {f.name for f in fields(spec.config_type)}
        unknown = sorted(str(k) for k in self.method_options if k not in known)
        if unknown:
            raise ValueError(f"method_options {unknown} are not fields of {spec.config_type.__name__} (the "
                             f"{self.method!r} method's config); its fields: {', '.join(sorted(known))}")
        return spec.make_config(self.options())

    def to_dict(self) -> dict:
        """JSON-serialisable form (only the fields that matter for the method)."""
        d = asdict(self)
        if self.method != "vcd":
            for k in ("vcd_alpha", "vcd_beta", "vcd_noise_step"):
                d.pop(k)
        if self.method != "lime":
            d.pop("lime_mode")
            d.pop("lime_overrides")
        if not self.sampling:
            for k in ("temperature", "top_k", "top_p"):
                d.pop(k)
        if self.method_options:  # as the method's config holds them (strict JSON: NaN is None)
            own = config_to_dict(self.method_config())
            d["method_options"] = {k: own[k] for k in self.method_options}
        else:
            d.pop("method_options")
        return d


def generate(model: nn.Module, processor: Any, inputs: Mapping[str, Any], cfg: DecodingConfig) -> GenerationResult:
    """Generate answers for a (left-padded) batch of processor outputs with the configured method.

    Parameters
    ----------
    model, processor
        The model and its processor (or tokenizer).
    inputs : Mapping
        Processor outputs (:func:`prepare_inputs`).
    cfg : DecodingConfig
        The method (a registered name) and its settings.

    Returns
    -------
    GenerationResult
        The answers, their tokens, the wall-clock seconds and the method's details.
    """
    return decode(model, processor, inputs, cfg.method, cfg.method_config())


def generation_session(model: nn.Module, processor: Any, cfg: DecodingConfig) -> Any:
    """A context manager for many :func:`generate` calls with one config, the method's set-up done once
    (:func:`lime_attr.mitigation.decoding_session`; LIME installs its LRP scope once).

    Parameters
    ----------
    model, processor
        The model and its processor (or tokenizer).
    cfg : DecodingConfig
        The method (a registered name) and its settings.

    Returns
    -------
    object
        A context manager; entering it gives ``run(inputs) -> GenerationResult``, the answers
        :func:`generate` gives.
    """
    return decoding_session(model, processor, cfg.method, cfg.method_config())


def prepare_inputs(model: nn.Module, processor: Any, prompts: list, images: Optional[list] = None,
                   audios: Optional[list] = None, sampling_rate: Optional[int] = None) -> dict:
    """Processor outputs for prompts with their images / audio clips, left-padded, in the model's dtype."""
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        tok.padding_side = "left"
    kw: dict[str, Any] = {"text": prompts, "return_tensors": "pt", "padding": True}
    if images is not None:
        kw["images"] = images
    if audios is not None:
        kw["audio"] = audios
        if sampling_rate is not None:
            kw["sampling_rate"] = sampling_rate
    enc = processor(**kw)
    dtype = next(model.parameters()).dtype
    out = {}
    for k, v in enc.items():
        if isinstance(v, torch.Tensor):
            v = v.to(model.device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


def load_image(path: str) -> np.ndarray:
    """An RGB image file as an ``[H, W, 3]`` uint8 array."""
    from PIL import Image

    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def load_audio(path: str, sampling_rate: int) -> np.ndarray:
    """A PCM WAV file as float32 mono at ``sampling_rate`` (linear-interpolation resampling)."""
    import wave

    with wave.open(path, "rb") as w:
        rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
        raw = w.readframes(n)
    if width not in (1, 2, 4):
        raise ValueError(f"{path}: unsupported sample width {width} bytes (use 8/16/32-bit PCM WAV)")
    dtype = {1: np.uint8, 2: np.int16, 4: np.int32}[width]
    x = np.frombuffer(raw, dtype=dtype).astype(np.float32)
    if width == 1:
        x = x - 128.0
    x = x / float(2 ** (8 * width - 1))
    x = x.reshape(-1, channels).mean(1)
    if rate != sampling_rate:
        t_new = np.arange(int(round(len(x) * sampling_rate / rate))) / sampling_rate
        x = np.interp(t_new, np.arange(len(x)) / rate, x).astype(np.float32)
    return x
