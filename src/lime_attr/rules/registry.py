"""The rule registry: ``register_rule``, ``get_rule``, ``available_rules``.

A rule is a small, typed, picklable dataclass. Its docstring carries the formula and the source. A rule
declares the *sites* it can be applied to by overriding the matching ``apply_<site>`` method of
:class:`Rule`:

==============  ==============================================================  ================================
site            where                                                           method
==============  ==============================================================  ================================
``layer``       modules with a weight (Linear, Conv, HF Conv1D)                 ``apply_layer(module, x, y)``
``affine``      elementwise affine modules (BatchNorm in eval mode)             ``apply_affine(module, x, y)``
``activation``  elementwise nonlinearities (ReLU, SiLU, GELU, tanh, ...)        ``apply_activation(x, y)``
``product``     a k-way elementwise product of input-dependent factors          ``apply_product(factors)``
``matmul``      a product of two input-dependent matrices (q k^T, A V)          ``apply_matmul(a, b)``
``softmax``     a softmax over input-dependent logits                           ``apply_softmax(x, y)``
``attention``   a fused attention kernel (SDPA, flash, eager function)          ``apply_attention(q, k, v)``
``norm``        LayerNorm / RMSNorm / F.normalize                               ``apply_norm(spec, x, y)``
==============  ==============================================================  ================================

Each method returns tensors whose forward values are unchanged and whose gradients are the rule's
modified gradients (see :mod:`lime_attr.rules.primitives`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional, Sequence, TypeVar

from torch import Tensor

from ..errors import RuleSiteError, UnknownNameError

__all__ = ["Rule", "register_rule", "get_rule", "available_rules", "SITES"]

#: The site kinds a rule can declare support for (see :meth:`Rule.sites`).
SITES = ("layer", "affine", "activation", "product", "matmul", "softmax", "attention", "norm")

_RULES: dict[str, type["Rule"]] = {}

R = TypeVar("R", bound=type)


class Rule:
    """Base class of every rule. Subclasses are dataclasses and override ``apply_<site>`` methods."""

    #: registered name (set by :func:`register_rule`)
    name: ClassVar[str] = ""

    @classmethod
    def sites(cls) -> frozenset[str]:
        """The sites this rule can be applied to (those whose ``apply_<site>`` it overrides)."""
        return frozenset(s for s in SITES if getattr(cls, f"apply_{s}") is not getattr(Rule, f"apply_{s}"))

    def supports(self, site: str) -> bool:
        """Whether the rule can be applied to ``site``."""
        return site in self.sites()

    def _unsupported(self, site: str, where: str = "") -> RuleSiteError:
        return RuleSiteError(
            f"rule {self!r} cannot be applied to a {site!r} site{(' (' + where + ')') if where else ''}; "
            f"it applies to {sorted(self.sites())}. Map that place to a rule that supports {site!r} "
            f"(rules supporting it: {available_rules(site)})."
        )

    # The default implementations raise: a rule must not silently fall back to a plain gradient.
    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        """Modify the gradient of a weight-bearing layer ``y = module(x)``."""
        raise self._unsupported("layer", type(module).__name__)

    def apply_affine(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        """Modify the gradient of an elementwise affine module."""
        raise self._unsupported("affine", type(module).__name__)

    def apply_activation(self, x: Tensor, y: Tensor) -> Tensor:
        """Modify the gradient of an elementwise nonlinearity ``y = f(x)``."""
        raise self._unsupported("activation")

    def apply_activation_module(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        """An activation site whose module is known (``y = module(x)``, elementwise and stateless).

        Optional: the default is :meth:`apply_activation`. A rule may use the module to recompute ``f`` in
        the backward pass instead of keeping tensors from the forward pass (see ``Identity``).
        """
        return self.apply_activation(x, y)

    def apply_product(self, factors: Sequence[Tensor]) -> list[Tensor]:
        """Modify the gradients of the factors of an elementwise product (the caller multiplies)."""
        raise self._unsupported("product")

    def apply_matmul(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """Modify the gradients of the two factors of a matrix product (the caller multiplies)."""
        raise self._unsupported("matmul")

    def apply_softmax(self, x: Tensor, y: Tensor) -> Tensor:
        """Modify the gradient of ``y = softmax(x)``."""
        raise self._unsupported("softmax")

    def apply_attention(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Modify the gradients of the inputs of an attention kernel ``softmax(q k^T) v``."""
        raise self._unsupported("attention")

    def apply_norm(self, spec: Any, x: Tensor, y: Tensor) -> Tensor:
        """Modify the gradient of a normalisation ``y = norm(x)`` described by ``spec``."""
        raise self._unsupported("norm")

    # Optional behaviour a rule decides for itself (the scope never checks a rule's class).
    def resolve(self, site: Any) -> "Rule":
        """The rule that actually drives ``site`` (default: this rule; a lookup rule returns the one it finds)."""
        return self

    def is_plain_jacobian(self, kind: str) -> bool:
        """Whether, at a site of ``kind``, the rule is the op's own Jacobian (then no hook is installed)."""
        return False

    def product_weights(self, k: int) -> list[float]:
        """The shares of the ``k`` factors of a canonizer-declared gated product (gate first).

        Raises
        ------
        TypeError
            The default: the rule cannot rule a declared product.
        """
        raise TypeError(f"rule {self!r} cannot be applied at a gated-MLP product declared by a canonizer (it has no "
                        "product_weights; supported: 'uniform' and 'cp_attention')")

    def holds_normalizer_constant(self) -> bool:
        """Whether the rule, at a norm site, holds the normaliser constant (so it may rule a normalising division)."""
        return False

    def fusable_epsilon(self) -> Optional[float]:
        """The epsilon this layer rule lets a following ReLU apply for it (memory fusion), or None."""
        return None

    def is_relu_jacobian(self) -> bool:
        """Whether the rule, on a ReLU, is exactly the ReLU's Jacobian (so a layer's epsilon may fuse into it)."""
        return False

    def install(self, site: Any, installer: Any, state: Any) -> bool:
        """Install hooks of its own on ``site.module`` (through ``installer``); False: use the standard hooks.

        For adapters that drive a module with another library's hooks (zennit). ``state`` is the scope
        (the :class:`~lime_attr.context.ForwardState` protocol).
        """
        return False


def register_rule(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering a rule under ``name``.

    Parameters
    ----------
    name : str
        The name used with :func:`get_rule` and in composites.
    overwrite : bool
        Replace an existing rule of that name (otherwise a second registration is an error).

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> from lime_attr.rules import Rule, register_rule, scale_grad
    >>> @register_rule("half_activation", overwrite=True)
    ... @dataclass(frozen=True)
    ... class HalfActivation(Rule):
    ...     '''R_in = R_out / 2 through an elementwise activation.'''
    ...     def apply_activation(self, x, y):
    ...         return scale_grad(y, 0.5)
    """

    def decorator(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Rule)):
            raise TypeError(f"@register_rule({name!r}) expects a subclass of lime_attr.rules.Rule, got {cls!r}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"rule {cls.__name__} must be a dataclass (rules are data: typed and picklable)")
        if name in _RULES and _RULES[name] is not cls and not overwrite:
            raise ValueError(f"a rule named {name!r} is already registered ({_RULES[name].__name__}); "
                             "pass overwrite=True to replace it")
        if not cls.__dict__.get("name"):
            cls.name = name
        _RULES[name] = cls
        return cls

    return decorator


def get_rule(name: str | Rule, **params: Any) -> Rule:
    """Instantiate the rule registered as ``name`` with ``params``.

    Parameters
    ----------
    name : str or Rule
        A registered name, or a rule object (returned unchanged; ``params`` must then be empty).
    **params
        The rule's parameters (see its docstring); validated by the rule.

    Raises
    ------
    UnknownNameError
        If no rule is registered under ``name``; the message lists the available rules.
    """
    if isinstance(name, Rule):
        if params:
            raise TypeError("get_rule(rule_object, **params): parameters only go with a rule name")
        return name
    try:
        cls = _RULES[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown rule {name!r}; available rules: {', '.join(available_rules())}. "
            "Register your own with @lime_attr.rules.register_rule(name)."
        ) from None
    try:
        return cls(**params)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(cls)]
        raise TypeError(f"rule {name!r} takes parameters {fields}: {exc}") from None


def available_rules(site: str | None = None) -> list[str]:
    """Sorted names of the registered rules, optionally only those that apply to ``site``."""
    if site is None:
        return sorted(_RULES)
    return sorted(n for n, c in _RULES.items() if site in c.sites())
