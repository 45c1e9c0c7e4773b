"""Sites: the places in a model where a rule applies.

A *site* is a module (a layer, an activation, a norm, a softmax) or an op inside a module (a product of
two input-dependent factors, a matrix product, an attention kernel). Canonizers and the default
discovery below turn a model into a list of module sites; op sites are found while the model runs.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import nn

from .errors import RuleSiteError
from .specs import NormSpec

__all__ = ["Site", "discover_sites", "ACTIVATION_TYPES", "PASSTHROUGH_TYPES", "norm_spec_for", "disable_inplace",
           "inplace_input_error"]

ACTIVATION_TYPES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SELU, nn.CELU, nn.Softplus,
    nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
)

PASSTHROUGH_TYPES: tuple[type, ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
    nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Embedding, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.Upsample,
)

LAYER_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
AFFINE_TYPES: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Site:
    """One place in a model where a rule applies.

    Attributes
    ----------
    kind : str
        One of :data:`lime_attr.rules.SITES` (``layer``, ``affine``, ``activation``, ``norm``, ...), or
        ``passthrough`` (covered by construction, e.g. dropout, pooling) or ``unknown``.
    name : str
        Qualified module name (``""`` for the root); for op sites the innermost module's name.
    module : nn.Module or None
        The module (None for op sites outside any module).
    spec : Any
        Extra data: a :class:`~lime_attr.specs.NormSpec` for norms, the consumer module for products.
    first_layer : bool
        The first weight-bearing layer in module order (for first-layer rules).
    op : str
        For op sites, the torch function's name.
    """

    kind: str
    name: str
    module: Optional[nn.Module] = None
    spec: Any = None
    first_layer: bool = False
    op: str = ""
    extra: dict = field(default_factory=dict)

    def matches_name(self, pattern: str) -> bool:
        """fnmatch-style match of the qualified name."""
        return fnmatch.fnmatchcase(self.name, pattern)


def _is_hf_activation(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.activations")


def norm_spec_for(module: nn.Module) -> Optional[NormSpec]:
    """A :class:`~lime_attr.specs.NormSpec` for torch's LayerNorm / RMSNorm and RMSNorm-like modules, else None."""
    w = getattr(module, "weight", None)
    w = w.detach() if w is not None else None
    if isinstance(module, nn.LayerNorm):
        b = module.bias.detach() if module.bias is not None else None
        return NormSpec("layernorm", w, b, module.eps, dims=len(module.normalized_shape), upcast=False)
    if hasattr(nn, "RMSNorm") and isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else 1e-6
        return NormSpec("rmsnorm", w, None, eps, dims=len(module.normalized_shape), upcast=False)
    cls = type(module).__name__
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if cls.endswith("RMSNorm") and eps is not None:
        return NormSpec("rmsnorm", w, None, float(eps), upcast=True)
    if cls.endswith("LayerNorm") and eps is not None:
        b = getattr(module, "bias", None)
        return NormSpec("layernorm", w, b.detach() if b is not None else None, float(eps), upcast=False)
    return None


def classify_module(module: nn.Module) -> tuple[str, Any]:
    """Default site kind of a module: (kind, spec)."""
    if isinstance(module, LAYER_TYPES) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf")):
        return "layer", None
    if isinstance(module, AFFINE_TYPES):
        return "affine", None
    if isinstance(module, ACTIVATION_TYPES) or _is_hf_activation(module):
        return "activation", None
    if isinstance(module, nn.Softmax):
        return "softmax", None
    spec = norm_spec_for(module)
    if spec is not None:
        return "norm", spec
    if isinstance(module, PASSTHROUGH_TYPES):
        return "passthrough", None
    if isinstance(module, nn.modules.conv._ConvNd) or isinstance(module, nn.modules.batchnorm._NormBase):
        return "unknown", None
    if len(module._parameters) == 0 and len(module._modules) > 0:
        return "container", None
    if len(module._modules) == 0 or len(module._parameters) > 0:
        return "unknown", None
    return "container", None


def discover_sites(model: nn.Module, overrides: Optional[dict[str, tuple[str, Any]]] = None) -> list[Site]:
    """Module sites of ``model`` in ``named_modules`` order.

    Parameters
    ----------
    model : nn.Module
    overrides : dict, optional
        ``{qualified_name: (kind, spec)}`` set by a canonizer; ``kind="container"`` marks a module whose
        own ops are handled elsewhere (e.g. an attention module whose kernel goes through the
        attention interface).
    """
    overrides = overrides or {}
    sites: list[Site] = []
    # token models are explained at their input embeddings, which no weight-bearing layer consumes directly
    # (they enter a norm and the residual stream): they have no "first layer" for first-layer rules
    token_model = getattr(model, "main_input_name", None) == "input_ids"
    first_seen = token_model
    for name, module in model.named_modules():
        kind, spec = overrides.get(name) or classify_module(module)
        site = Site(kind, name, module, spec)
        if kind == "layer" and not first_seen:
            site.first_layer = True
            first_seen = True
        sites.append(site)
    return sites


def disable_inplace(module: nn.Module) -> Optional[Callable[[], None]]:
    """Switch an in-place module (``nn.ReLU(inplace=True)``, ``nn.SiLU(inplace=True)``...) to out-of-place.

    A module rule reads the module's *input* after its forward (an activation rule uses ``y / x``); an
    in-place module has overwritten that input with its output by then, so the rule would silently
    compute something else. ``inplace=False`` gives the same values (only a copy more), so the scope sets
    it on this one instance -- nothing global -- and calls the returned function on exit, which restores
    the attribute exactly. Returns None when the module is not in-place.
    """
    if getattr(module, "inplace", False) is not True:
        return None
    missing = object()
    own = module.__dict__.get("inplace", missing)
    module.inplace = False

    def restore() -> None:
        if own is missing:
            module.__dict__.pop("inplace", None)
        else:
            module.inplace = own

    return restore


def inplace_input_error(site: Site, rule: Any) -> RuleSiteError:
    """The error for a module that modified its input in place although its ``inplace`` flag is off."""
    return RuleSiteError(
        f"module {site.name or '<root>'!r} ({type(site.module).__name__}, {site.kind}) modified its input in "
        f"place, so rule {rule!r} would see the overwritten input instead of the one it attributes to. "
        "lime_attr switches a module's own `inplace` flag off inside the scope, so this module overwrites "
        "its input some other way (e.g. `x.relu_()` or `F.silu(x, inplace=True)` in its forward). Fix: make "
        "its forward out-of-place (`torch.relu(x)`, `F.silu(x)`), or write a canonizer that replaces the "
        "module inside the scope (docs: writing_a_canonizer)."
    )
