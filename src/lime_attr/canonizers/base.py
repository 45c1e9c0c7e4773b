"""Canonizer base, the Hugging Face attention bridge, and the canonizer registry.

A canonizer is a small declarative adapter for one model family (one file per family). It names the
family's attention modules, norms, gated MLPs, activations and passthrough modules; the shared base
below turns those names into *sites* for the scope, and routes attention through transformers'
``AttentionInterface``: one named function per original implementation (``lime_attr:sdpa``,
``lime_attr:eager``...) is registered -- existing entries are never replaced -- and selected for this
model instance only by setting its configs' attention implementation, which the scope restores exactly
on exit. The registered function wraps the implementation the model had, so fused kernels keep
working: AttnLRP acts on the kernel's inputs (q, k, v), not inside it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..context import current_scope
from ..errors import UnknownNameError, UnsupportedModelError
from ..installer import Installer
from ..sites import norm_spec_for
from ..specs import NormSpec, ProductSpec

__all__ = ["Canonizer", "HFCanonizer", "GatedMLP", "register_canonizer", "unregister_canonizer", "canonizer_for",
           "get_canonizer",
           "available_canonizers", "attention_function_name", "route_inputs_embeds"]

_CANONIZERS: dict[str, type] = {}
_PREFIX = "lime_attr:"


class Canonizer:
    """Base of all canonizers: prepare one model instance inside a scope, reversibly.

    Subclasses implement :meth:`apply`, which registers everything it changes with the ``installer``
    (:meth:`~lime_attr.installer.Installer.on_exit`, :meth:`~lime_attr.installer.Installer.add_hook`,
    :meth:`~lime_attr.installer.Installer.declare_normalizing`), so the scope undoes it on exit, and
    returns site overrides ``{qualified_module_name: (kind, spec)}``.
    """

    model_types: tuple[str, ...] = ()

    def apply(self, model: nn.Module, installer: Installer) -> dict:
        """Prepare ``model`` and return site overrides (default: none)."""
        return {}


# ------------------------------------------------------------------------------- attention bridge


def attention_function_name(original: str) -> str:
    """The registered name of the wrapper around the attention implementation ``original``."""
    return _PREFIX + original


def _original_function(original: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if original == "eager":
        mod = sys.modules.get(type(module).__module__)
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            raise UnsupportedModelError(
                f"{type(module).__name__} runs 'eager' attention but its modeling file has no "
                "eager_attention_forward; use attn_implementation='sdpa' or give its canonizer an `eager` function")
        return fn
    return ALL_ATTENTION_FUNCTIONS[original]


def _make_bridge(original: str) -> Callable:
    def lime_attr_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], **kwargs: Any):
        fn = _original_function(original, module)
        state = current_scope()
        if state is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        if not torch.is_grad_enabled():  # no rule; only the transforms added with also_without_grad=True
            if not getattr(state, "has_no_grad_transforms", False):
                return fn(module, query, key, value, attention_mask, **kwargs)
            kv_heads = key.shape[1]
            for stage in ("before_rule", "after_rule"):
                query, key, value = state.transform_attention(module, query, key, value, kwargs, stage=stage,
                                                              grad=False)
            kernel_module = module if key.shape[1] == kv_heads else _per_query_head(module, query, key)
            return fn(kernel_module, query, key, value, attention_mask, **kwargs)
        kv_heads = key.shape[1]
        query, key, value = state.transform_attention(module, query, key, value, kwargs)
        rule = state.attention_rule(module)
        if rule is not None:
            query, key, value = rule.apply_attention(query, key, value)
        query, key, value = state.transform_attention(module, query, key, value, kwargs, stage="after_rule")
        kernel_module = module if key.shape[1] == kv_heads else _per_query_head(module, query, key)
        state.enter_covered()
        try:
            return fn(kernel_module, query, key, value, attention_mask, **kwargs)
        finally:
            state.exit_covered()

    lime_attr_attention.__name__ = f"lime_attr_attention_{original}"
    return lime_attr_attention


class _UngroupedView:
    """An attention module as its kernel sees it once keys and values have one head per query head."""

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _per_query_head(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> Any:
    """The module the kernel gets when a transform returned keys/values per query head (no grouping left)."""
    if key.shape[1] != query.shape[1]:
        raise ValueError(f"an attention transform on {type(module).__name__} returned keys with {key.shape[1]} heads for "
                         f"{query.shape[1]} query heads; return one per key-value head (unchanged) or one per query "
                         "head (the grouped-query repeat done)")
    return _UngroupedView(module)


def _ensure_registered(original: str) -> str:
    from transformers import AttentionInterface

    from transformers.masking_utils import AttentionMaskInterface

    name = attention_function_name(original)
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_bridge(original))
    # the mask built for the wrapper must be the one the original implementation gets
    mask_fn = AttentionMaskInterface._global_mapping.get(original)
    if mask_fn is not None and name not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(name, mask_fn)
    return name


def _configs_of(model: nn.Module, attr: str = "_attn_implementation_internal") -> list:
    seen: dict[int, Any] = {}
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, attr) and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    # sub-configs reachable from the configs (vision_config, text_config, audio_config, ...)
    stack = list(seen.values())
    while stack:
        cfg = stack.pop()
        for key in getattr(cfg, "sub_configs", {}) or {}:
            sub = getattr(cfg, key, None)
            if sub is not None and hasattr(sub, attr) and id(sub) not in seen:
                seen[id(sub)] = sub
                stack.append(sub)
    return list(seen.values())


def install_attention_bridge(model: nn.Module, installer: Installer) -> None:
    """Select the lime_attr attention wrapper for every config of ``model``; restored on scope exit."""
    for cfg in _configs_of(model):
        current = cfg._attn_implementation_internal
        if current is None or isinstance(current, dict):
            continue
        if current.startswith(_PREFIX):
            raise RuntimeError("this model is already inside a lime_attr scope; exit it before entering another")
        if current.startswith("paged|") or current.startswith("flex"):
            raise UnsupportedModelError(f"attention implementation {current!r} is not supported inside an LRP scope; "
                                        "load the model with attn_implementation='sdpa' or 'eager'")
        cfg._attn_implementation_internal = _ensure_registered(current)

        def revert(cfg=cfg, value=current) -> None:
            cfg._attn_implementation_internal = value

        installer.on_exit(revert)


def suspend_gradient_checkpointing(model: nn.Module, installer: Installer) -> None:
    """Run checkpointed layers normally inside the scope (restored on exit).

    A checkpointed layer recomputes its forward during the backward pass, after the scope's forward has
    returned: the recomputation would not see the attention rule (the scope is only current during the
    forward) and would silently give plain gradients. The forward values are identical either way.
    """
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.gradient_checkpointing = False
            installer.on_exit(lambda m=m: setattr(m, "gradient_checkpointing", True))


def _set_config_attr(model: nn.Module, installer: Installer, attr: str, value: Any) -> None:
    for cfg in _configs_of(model, attr):
        old = getattr(cfg, attr)
        if old == value or isinstance(old, dict):
            continue
        setattr(cfg, attr, value)
        installer.on_exit(lambda cfg=cfg, old=old: setattr(cfg, attr, old))


def route_inputs_embeds(module: nn.Module, installer: Installer, when: tuple[str, ...] = ()) -> None:
    """Let ``module`` (a model whose forward builds its embeddings from ``input_ids``) take ``inputs_embeds``.

    For models that ignore or refuse ``inputs_embeds`` on the path that matters (Qwen2-Audio runs its audio
    tower only when it embeds ``input_ids`` itself; CLIP's text tower accepts only ``input_ids``): a call
    with ``inputs_embeds`` *and* ``input_ids`` (and every keyword in ``when``) runs as a call with
    ``input_ids`` only, whose input-embedding lookup returns the given ``inputs_embeds`` (a one-shot hook).
    ``input_ids`` then only locate special tokens. Installed for the scope only (removed on exit).
    """

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        emb, ids = kwargs.get("inputs_embeds"), kwargs.get("input_ids")
        if emb is None or ids is None or any(kwargs.get(k) is None for k in when):
            return None
        if tuple(emb.shape[:-1]) != tuple(ids.shape):
            raise ValueError(f"inputs_embeds {tuple(emb.shape)} and input_ids {tuple(ids.shape)} must cover the same "
                             "positions (inputs_embeds = model.get_input_embeddings()(input_ids))")
        kwargs = dict(kwargs)
        kwargs.pop("inputs_embeds")
        handle: Any = None

        def answer(m: nn.Module, a: tuple, out: Any) -> Any:
            handle.remove()
            return emb

        handle = mod.get_input_embeddings().register_forward_hook(answer)
        installer.add_hook(handle)  # in case the forward fails before the lookup
        return args, kwargs

    installer.add_hook(module.register_forward_pre_hook(pre, with_kwargs=True))


# ------------------------------------------------------------------------------- declarative base


@dataclass(frozen=True)
class GatedMLP:
    """Attribute names inside a gated MLP ``consumer(act(gate(x)) * up(x))``."""

    act: str = "act_fn"
    consumer: str = "down_proj"
    up: Optional[str] = "up_proj"


class HFCanonizer(Canonizer):
    """Declarative canonizer for Hugging Face families.

    The class attributes name module *classes* (matched exactly); subclass in one small file per family.

    Attributes
    ----------
    attention
        Modules that call transformers' attention interface (their kernel gets the attention rule).
    norms
        ``{class_name: dict(kind=..., weight_offset=...)}`` overrides; other ``*RMSNorm`` /
        ``*LayerNorm`` classes are recognised automatically.
    gated_mlps
        ``{class_name: GatedMLP(...)}``: the product ``act(gate) * up`` gets the product rule.
    activations
        Extra elementwise activation classes.
    passthrough
        Modules covered as they are (rotary embeddings, patch/position embedding holders whose ops are
        linear in the input); their ops are still checked by the op-coverage mode.
    op_modules
        Modules whose products / matmuls go through the op mode (e.g. MoE expert blocks).
    normalizing_modules
        Modules inside which a division by an input-dependent tensor is a normalisation (MoE routers
        renormalising their top-k weights by their sum): it gets the norm rule (the normaliser constant).
    eager_experts
        Run fused MoE expert modules with transformers' ``eager`` experts implementation inside the scope
        (so their products go through the op mode); the configs' setting is restored on exit.
    route_embeds
        ``{class_name: when}``: modules whose forward ignores given ``inputs_embeds`` (or drops a modality
        when given them) get :func:`route_inputs_embeds` inside the scope; ``when`` names the inputs that
        must be present for the routing to apply (empty: always).
    components
        Config attributes (``vision_config``, ``text_config``, ``audio_config``) naming nested towers: the
        declarations of the canonizer registered for each one's ``model_type`` are merged into this one's
        (multimodal families: vision tower + language model + the family's own projector/merger).
    """

    attention: tuple[str, ...] = ()
    norms: dict[str, dict] = {}
    gated_mlps: dict[str, GatedMLP] = {}
    activations: tuple[str, ...] = ()
    passthrough: tuple[str, ...] = ()
    op_modules: tuple[str, ...] = ()
    components: tuple[str, ...] = ()
    eager_experts: bool = False
    normalizing_modules: tuple[str, ...] = ()
    route_embeds: dict[str, tuple[str, ...]] = {}

    def apply(self, model: nn.Module, installer: Installer) -> dict:
        overrides: dict[str, tuple[str, Any]] = {}
        for sub in self.component_canonizers(_root_config(model, self.model_types)):
            overrides.update(sub.site_overrides(model))
        overrides.update(self.site_overrides(model))
        self.check_declared(model, overrides)
        install_attention_bridge(model, installer)
        suspend_gradient_checkpointing(model, installer)
        if self.eager_experts:
            _set_config_attr(model, installer, "_experts_implementation_internal", "eager")
        if self.normalizing_modules:  # read by the op mode
            installer.declare_normalizing(m for m in model.modules() if type(m).__name__ in self.normalizing_modules)
        for module in model.modules():
            when = self.route_embeds.get(type(module).__name__)
            if when is not None:
                route_inputs_embeds(module, installer, when=when)
        return overrides

    def component_canonizers(self, config: Any) -> list["HFCanonizer"]:
        """The canonizers of the towers named by :attr:`components` (recursively), from ``config``."""
        out: list[HFCanonizer] = []
        for key in self.components:
            sub = getattr(config, key, None) if config is not None else None
            if sub is None:
                continue
            mt = getattr(sub, "model_type", None)
            if mt not in _CANONIZERS:
                raise UnsupportedModelError(
                    f"the {key} of this {getattr(config, 'model_type', '?')!r} model has model_type {mt!r}, for "
                    f"which no canonizer is registered (supported: {', '.join(available_canonizers())}); add one "
                    "with @lime_attr.canonizers.register_canonizer (docs: writing_a_canonizer)")
            canon = _CANONIZERS[mt]()
            if not isinstance(canon, HFCanonizer):
                raise TypeError(f"the canonizer for {key} ({mt!r}) is not declarative (HFCanonizer); it cannot be "
                                "composed into a multimodal canonizer")
            out.extend([canon, *canon.component_canonizers(sub)])
        return out

    def site_overrides(self, model: nn.Module) -> dict:
        """``{qualified_name: (kind, spec)}`` for the modules this declaration names (no side effects)."""
        overrides: dict[str, tuple[str, Any]] = {}
        for name, module in model.named_modules():
            cls = type(module).__name__
            if cls in self.attention:
                overrides[name] = ("attention", None)
            elif cls in self.norms:
                spec = norm_spec_for(module)
                base = dict(kind=spec.kind if spec else "rmsnorm", weight=spec.weight if spec else None,
                            bias=spec.bias if spec else None, eps=spec.eps if spec else 1e-6,
                            upcast=spec.upcast if spec else True)
                base.update(self.norms[cls])
                if base.get("weight") is None and getattr(module, "weight", None) is not None:
                    base["weight"] = module.weight.detach()
                overrides[name] = ("norm", NormSpec(**base))
            elif cls in self.gated_mlps:
                g = self.gated_mlps[cls]
                overrides[name] = ("product", ProductSpec(consumer=getattr(module, g.consumer),
                                                          gate=getattr(module, g.act),
                                                          up=getattr(module, g.up) if g.up else None))
            elif cls in self.activations:
                overrides[name] = ("activation", None)
            elif cls in self.passthrough:
                overrides[name] = ("passthrough", None)
            elif cls in self.op_modules:
                overrides[name] = ("container", None)
        return overrides

    def check_declared(self, model: nn.Module, overrides: dict) -> None:
        """Hook for families to validate the model against their declaration (default: nothing)."""


def _root_config(model: nn.Module, model_types: tuple) -> Any:
    """The config of ``model`` (or of its first submodule whose ``model_type`` is one of ``model_types``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "model_type", None) in model_types:
        return cfg
    for m in model.modules():
        sub = getattr(m, "config", None)
        if sub is not None and getattr(sub, "model_type", None) in model_types:
            return sub
    return cfg


def register_canonizer(*model_types: str) -> Callable[[type], type]:
    """Class decorator registering a canonizer for one or more ``config.model_type`` values.

    Examples
    --------
    >>> from lime_attr.canonizers import HFCanonizer, register_canonizer
    >>> @register_canonizer("my_llama_variant")
    ... class MyCanonizer(HFCanonizer):
    ...     attention = ("MyAttention",)
    """

    def decorator(cls: type) -> type:
        cls.model_types = tuple(model_types)
        for mt in model_types:
            _CANONIZERS[mt] = cls
        return cls

    return decorator


def unregister_canonizer(model_type: str) -> None:
    """Remove the canonizer registered for ``model_type`` (e.g. one a test or a notebook registered).

    Raises
    ------
    UnknownNameError
        If none is registered for it.
    """
    if model_type not in _CANONIZERS:
        raise UnknownNameError(f"no canonizer is registered for model_type {model_type!r}; registered: "
                               f"{', '.join(available_canonizers())}")
    del _CANONIZERS[model_type]


def available_canonizers() -> list[str]:
    """Sorted ``model_type`` values that have a canonizer."""
    return sorted(_CANONIZERS)


def get_canonizer(model_type: str) -> Canonizer:
    """An instance of the canonizer registered for ``model_type``."""
    try:
        return _CANONIZERS[model_type]()
    except KeyError:
        raise UnknownNameError(f"no canonizer for model_type {model_type!r}; available: "
                               f"{', '.join(available_canonizers())}") from None


def canonizer_for(model: nn.Module) -> Canonizer:
    """The canonizer for ``model.config.model_type``; a clear error if the type is unsupported."""
    mt = model.config.model_type
    if mt not in _CANONIZERS:
        raise UnsupportedModelError(
            f"no canonizer is registered for model_type {mt!r} ({type(model).__name__}). Supported model types: "
            f"{', '.join(available_canonizers())}. To add one (usually under 60 lines), see the docs page "
            "'Writing a canonizer' (docs/writing_a_canonizer.rst) and use @lime_attr.canonizers.register_canonizer. "
            "Escape hatch: canonizer=None runs without a canonizer (generic module discovery; attention, softmax and "
            "products are ruled as ops while the model runs, and an op no rule covers is an error). It is valid "
            "when the model's attention is computed with torch ops (eager or sdpa) and its norms and gated MLPs are "
            "standard modules; with composite='cp-lrp' it conserves relevance (docs: architectures, 'Unsupported "
            "architectures')."
        )
    return _CANONIZERS[mt]()
