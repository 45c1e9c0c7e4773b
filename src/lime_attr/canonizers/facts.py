"""Family facts: what lime_attr needs to know about a multimodal family besides its modules.

Each family's canonizer file declares them (``facts = FamilyFacts(...)`` on its canonizer class), so that
everything known about one family lives in one file: which config fields and tokens mark its image /
audio tokens (the modality spec), how its pixels are laid out, where its language model and decoder
are, and which rotary positions it uses. :func:`facts_for` reads them through the canonizer registry;
a model without a registered family (or a family that declares nothing) gets :data:`DEFAULT_FACTS`,
the generic discovery (the usual config field names, the usual module paths).

Examples
--------
>>> from lime_attr.canonizers.facts import facts_for
>>> facts_for("qwen2_vl").pixel_layout, facts_for("qwen2_vl").rope
('flattened_patches', 'mrope')
>>> facts_for("llama").rope is None
True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from .base import available_canonizers, get_canonizer

__all__ = ["FamilyFacts", "DEFAULT_FACTS", "facts_for", "find_language_model", "find_decoder", "uses_mrope",
           "PIXEL_LAYOUTS"]

#: the pixel layouts :func:`lime_attr.modality.split_pixel_relevance` reads
PIXEL_LAYOUTS = ("images", "tiles", "flattened_patches")

_PLACEHOLDER_FIELDS = {"image": ("image_token_id", "image_token_index"),
                       "video": ("video_token_id", "video_token_index"),
                       "audio": ("audio_token_id", "audio_token_index")}
_LANGUAGE_MODEL_PATHS = ("model.language_model", "language_model", "model.text_model")
_DECODER_PATHS = ("model.language_model", "language_model", "model", "transformer")


@dataclass(frozen=True)
class FamilyFacts:
    """What one model family is, beyond its modules.

    Attributes
    ----------
    placeholder_fields : dict
        ``{kind: config field names}``: the config fields holding the placeholder token id that each
        image / video / audio feature replaces (the first field present is used).
    vision_marker_fields : tuple of str or None
        ``(start, end)`` config fields of the tokens that delimit an image / video span, inclusive
        (Qwen2-VL's ``vision_start_token_id`` / ``vision_end_token_id``); None: no vision markers.
    audio_marker_tokens : tuple of str or None
        ``(start, end)`` tokens delimiting an audio span that the config does not store (looked up in the
        processor's tokenizer); None: no audio markers.
    audio_markers_required : bool
        Whether an audio span cannot be found without those markers (Qwen2-Audio): a missing processor or
        tokenizer token is then an error.
    audio_feature_mask : bool
        Whether audio features must come with their ``feature_attention_mask``.
    pixel_layout : str or None
        ``"images"`` (``[images, C, H, W]``, LLaVA), ``"tiles"`` (``[batch, tiles, C, H, W]``,
        LLaVA-NeXT) or ``"flattened_patches"`` (``[patches, C*T*P*P]`` with a ``*_grid_thw``, Qwen2-VL);
        None: inferred from the tensor.
    language_model : tuple of str
        Qualified names of the module that receives the merged ``inputs_embeds``, tried in order (then
        the generic paths).
    decoder : tuple of str
        Qualified names of the decoder holding the ``layers`` ModuleList, tried in order (then the generic
        paths and ``get_decoder()``).
    rope : str or None
        ``"1d"`` (positions from the attention mask) or ``"mrope"`` (multimodal rotary positions computed by
        the model itself, Qwen2-VL); None: detected (a model with ``get_rope_index`` uses M-RoPE).
    """

    placeholder_fields: dict = field(default_factory=lambda: dict(_PLACEHOLDER_FIELDS))
    vision_marker_fields: Optional[tuple[str, str]] = ("vision_start_token_id", "vision_end_token_id")
    audio_marker_tokens: Optional[tuple[str, str]] = ("<|audio_bos|>", "<|audio_eos|>")
    audio_markers_required: bool = False
    audio_feature_mask: bool = False
    pixel_layout: Optional[str] = None
    language_model: tuple[str, ...] = ()
    decoder: tuple[str, ...] = ()
    rope: Optional[str] = None

    def __post_init__(self) -> None:
        if self.pixel_layout is not None and self.pixel_layout not in PIXEL_LAYOUTS:
            raise ValueError(f"pixel_layout must be one of {PIXEL_LAYOUTS} or None, got {self.pixel_layout!r}")
        if self.rope not in (None, "1d", "mrope"):
            raise ValueError(f"rope must be '1d', 'mrope' or None, got {self.rope!r}")


#: the facts of a model without a registered family (the generic discovery)
DEFAULT_FACTS = FamilyFacts()


def facts_for(model_or_type: Any) -> FamilyFacts:
    """The :class:`FamilyFacts` of a model, a config or a ``model_type`` string.

    Read from the ``facts`` attribute of the canonizer registered for ``config.model_type``;
    :data:`DEFAULT_FACTS` for a plain torch model, an unregistered type, or a family without facts.
    """
    if isinstance(model_or_type, str):
        model_type: Optional[str] = model_or_type
    else:
        config = getattr(model_or_type, "config", model_or_type)
        model_type = getattr(config, "model_type", None)
    if not isinstance(model_type, str) or model_type not in available_canonizers():
        return DEFAULT_FACTS
    facts = getattr(get_canonizer(model_type), "facts", None)
    return facts if isinstance(facts, FamilyFacts) else DEFAULT_FACTS


def _lookup(model: nn.Module, name: str) -> Optional[nn.Module]:
    mod: Any = model
    for part in name.split("."):
        mod = mod._modules.get(part) if isinstance(mod, nn.Module) else None  # plain lookup: properties may alias
    return mod if isinstance(mod, nn.Module) else None


def _paths(declared: tuple[str, ...], generic: tuple[str, ...]) -> list[str]:
    return list(dict.fromkeys(declared + generic))


def find_language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """The inner language model of a multimodal model (the module receiving ``inputs_embeds``) and its name.

    Raises
    ------
    TypeError
        If none of the family's paths (nor the generic ones) names a submodule.
    """
    for name in _paths(facts_for(model).language_model, _LANGUAGE_MODEL_PATHS):
        mod = _lookup(model, name)
        if mod is not None:
            return name, mod
    raise TypeError(f"cannot find the language model inside {type(model).__name__}: ModalityAttribution expects "
                    "an image/audio-text model with a `model.language_model` (or `language_model`) submodule "
                    "that receives inputs_embeds (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio, ...)")


def find_decoder(model: nn.Module) -> nn.Module:
    """The language model's decoder (the module holding the ``layers`` ModuleList) of a Hugging Face model.

    Raises
    ------
    TypeError
        If no candidate holds decoder layers with ``self_attn``.
    """
    candidates = [m for m in (_lookup(model, n) for n in _paths(facts_for(model).decoder, _DECODER_PATHS))
                  if m is not None]
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            candidates.append(getter())
        except Exception:  # pragma: no cover - exotic wrappers
            pass
    candidates.append(model)
    for dec in candidates:
        layers = getattr(dec, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(l, "self_attn") for l in layers):
            return dec
    raise TypeError(f"LIME cannot find the decoder layers of {type(model).__name__}: it expects a language model "
                    "with a `layers` ModuleList whose layers have `self_attn` (Llama, Qwen2, LLaVA, Qwen2-VL, "
                    "Qwen2-Audio, ...)")


def uses_mrope(model: nn.Module) -> bool:
    """Whether the model computes its own multimodal rotary positions (M-RoPE, the Qwen2-VL families)."""
    rope = facts_for(model).rope
    if rope is not None:
        return rope == "mrope"
    for m in (model, getattr(model, "model", None)):
        if m is not None and callable(getattr(m, "get_rope_index", None)):
            return True
    return False
