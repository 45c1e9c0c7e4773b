"""Composites: which rule applies where, first match wins; the named-composite registry; zennit interop.

A :class:`Composite` is an ordered list of ``(matcher, rule)`` pairs. A matcher is

* a module type or a tuple of types (subclass-aware ``isinstance``),
* ``"site:<kind>"`` -- any site of that kind (``site:layer``, ``site:attention``, ``site:product``, ...),
* ``"first_layer"`` -- the first weight-bearing layer of the model,
* ``"op:<name>"`` -- an op site whose torch function is called ``name`` (``op:mul``, ``op:matmul``),
* any other string -- an fnmatch pattern on the qualified module name (``"encoder.layer.*.output.dense"``),
* or a callable ``(site) -> bool``.

For each site the first entry whose matcher matches *and* whose rule supports the site's kind wins.
A rule may also be a zennit rule (``zennit.core.Hook``): it then drives that Linear/Conv module.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from torch import Tensor, nn

from .errors import UnknownNameError
from .interop.zennit import (ZennitCompositeRule, ZennitRule, apply_zennit_canonizers, is_zennit_canonizer,
                             is_zennit_composite, is_zennit_hook)
from .rules import SITES, Rule, get_rule
from .sites import Site

__all__ = ["Composite", "register_composite", "get_composite", "available_composites", "ZennitRule",
           "apply_zennit_canonizers", "check_matcher", "matcher_matches", "SITE_KINDS"]

Matcher = Union[type, tuple, str, Callable[[Site], bool]]


def _as_rule(rule: Any) -> Rule:
    if isinstance(rule, Rule):
        return rule
    if isinstance(rule, str):
        return get_rule(rule)
    if is_zennit_hook(rule):
        return ZennitRule(rule)
    if is_zennit_canonizer(rule):
        raise TypeError(f"{type(rule).__name__} is a zennit canonizer, not a rule: pass it as "
                        f"canonizer={type(rule).__name__}() or Composite(entries, canonizers=[...])")
    raise TypeError(f"a composite maps places to rules: expected a Rule, a rule name or a zennit rule, got {rule!r}")


#: the site kinds a ``"site:<kind>"`` matcher may name
SITE_KINDS = (*SITES, "passthrough", "unknown")


def check_matcher(matcher: Any) -> None:
    """Refuse a matcher that can never match: an unknown ``site:`` kind, an empty string, or a non-matcher.

    Raises
    ------
    TypeError, ValueError
        Naming the matcher and the valid forms.
    """
    if isinstance(matcher, str):
        if matcher.startswith("site:") and matcher[5:] not in SITE_KINDS:
            raise ValueError(f"unknown site kind in matcher {matcher!r}; valid: "
                             f"{', '.join('site:' + k for k in SITE_KINDS)}")
        if matcher in ("", "op:"):
            raise ValueError(f"empty matcher {matcher!r}: give a module name pattern, 'site:<kind>', 'op:<name>' "
                             "or 'first_layer'")
        return
    if isinstance(matcher, type) or (isinstance(matcher, tuple) and matcher
                                     and all(isinstance(t, type) for t in matcher)):
        return
    if not callable(matcher):
        raise TypeError(f"unknown matcher {matcher!r}: use a module type (or tuple of types), 'site:<kind>', "
                        "'first_layer', 'op:<name>', a module name pattern, or a callable (site) -> bool")


def matcher_matches(matcher: Matcher, site: Site) -> bool:
    """Whether a composite matcher (see the module docstring) matches ``site``."""
    if isinstance(matcher, type) or (isinstance(matcher, tuple) and all(isinstance(t, type) for t in matcher)):
        return site.module is not None and isinstance(site.module, matcher) and not site.op
    if isinstance(matcher, str):
        if matcher.startswith("site:"):
            return site.kind == matcher[5:]
        if matcher == "first_layer":
            return site.first_layer
        if matcher.startswith("op:"):
            return site.op == matcher[3:]
        return site.matches_name(matcher)
    if callable(matcher):
        return bool(matcher(site))
    raise TypeError(f"unknown matcher {matcher!r}")


@dataclass
class Composite:
    """An ordered mapping from places in a model to rules; the first match wins.

    Parameters
    ----------
    entries : sequence of tuple
        ``(matcher, rule)`` pairs. See the module docstring for matchers. Rules may be names, rule objects or zennit rules.
    canonizers : sequence, optional
        zennit canonizers (e.g. ``SequentialMergeBatchNorm()``) applied inside the scope and reverted.
    name : str
        Display name.

    Examples
    --------
    >>> import torch
    >>> from lime_attr import Composite
    >>> comp = Composite([(torch.nn.Conv2d, "gamma"), ("site:layer", "epsilon"), ("site:activation", "identity")])
    """

    entries: Sequence[tuple[Matcher, Any]]
    canonizers: Sequence[Any] = ()
    name: str = "custom"
    _rules: list = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.entries, (str, bytes)) or not isinstance(self.entries, Iterable):
            raise TypeError(f"Composite takes a list of (matcher, rule) pairs, got {self.entries!r}; e.g. "
                            "Composite([('site:layer', 'epsilon'), ('site:activation', 'identity')])")
        self.entries = list(self.entries)
        for i, entry in enumerate(self.entries):
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise TypeError(f"composite entry {i} is {entry!r}, not a (matcher, rule) pair; write e.g. "
                                f"('site:layer', {entry!r}) to apply a rule to every site of a kind")
            check_matcher(entry[0])
        self._rules = [(m, _as_rule(r)) for m, r in self.entries]

    @property
    def rules(self) -> list[tuple[Matcher, Rule]]:
        """The entries with every rule resolved to a :class:`~lime_attr.rules.Rule` (names looked up,
        zennit rules wrapped in :class:`~lime_attr.interop.zennit.ZennitRule`)."""
        return list(self._rules)

    def rule_for(self, site: Site) -> Optional[Rule]:
        """The rule for ``site`` (first entry that matches and supports the site's kind), or None."""
        for matcher, rule in self._rules:
            if matcher_matches(matcher, site) and rule.supports(site.kind):
                return rule
        return None

    def matched_unsupported(self, site: Site) -> list[Rule]:
        """Rules whose matcher matched ``site`` but which cannot apply to its kind (for error messages)."""
        return [r for m, r in self._rules if matcher_matches(m, site) and not r.supports(site.kind)]

    def prepend(self, *entries: tuple[Matcher, Any]) -> "Composite":
        """A new composite with ``entries`` taking precedence over this one's."""
        return Composite([*entries, *self.entries], self.canonizers, self.name)

    @classmethod
    def from_zennit(cls, composite: Any, base: Union[str, "Composite"] = "attnlrp") -> "Composite":
        """Let a zennit composite drive the modules it maps; everything else comes from ``base``.

        Each module zennit's ``module_map`` assigns a rule gets its own copy of that zennit rule;
        transformer parts zennit has no rules for (attention, norms, products) keep ``base``'s rules.
        The zennit composite's canonizers are applied inside the scope and reverted.
        """
        base_c = get_composite(base) if isinstance(base, str) else base
        lookup = ZennitCompositeRule(composite, {})
        return Composite([(lookup.matcher(), lookup), *base_c.entries],
                         (*tuple(getattr(composite, "canonizers", ()) or ()), *base_c.canonizers),
                         name=f"zennit:{type(composite).__name__}")


_COMPOSITES: dict[str, Callable[..., Composite]] = {}


def register_composite(name: str, *, overwrite: bool = False) -> Callable:
    """Decorator registering a composite factory ``(**params) -> Composite`` under ``name``."""

    if not isinstance(name, str) or not name:
        raise TypeError(f"register_composite takes the composite's name (a non-empty str), got {name!r}; use it as "
                        "@register_composite('my-composite') above a function returning a Composite")

    def decorator(factory: Callable[..., Composite]) -> Callable[..., Composite]:
        if not callable(factory) or isinstance(factory, Composite):
            raise TypeError(f"register_composite({name!r}) decorates a factory function (**params) -> Composite, "
                            f"got {factory!r}; write `@register_composite({name!r})` above `def f(): return "
                            "Composite([...])`")
        if name in _COMPOSITES and not overwrite:
            raise ValueError(f"a composite named {name!r} is already registered; pass overwrite=True")
        _COMPOSITES[name] = factory
        return factory

    return decorator


def get_composite(name: Union[str, Composite], **params: Any) -> Composite:
    """The composite registered as ``name`` (built with ``params``), or ``name`` itself if a Composite.

    Raises
    ------
    UnknownNameError
        With the list of registered composites.
    """
    if params and not isinstance(name, str):
        raise TypeError(f"get_composite: parameters {sorted(params)} apply to a registered composite name (the factory "
                        f"builds it with them), not to an already built {type(name).__name__}; e.g. "
                        "get_composite('attnlrp', epsilon=1e-6)")
    if isinstance(name, Composite):
        return name
    if is_zennit_composite(name):
        return Composite.from_zennit(name)
    if is_zennit_canonizer(name):
        raise TypeError(f"{type(name).__name__}() is a zennit canonizer, not a composite: pass it as "
                        f"canonizer={type(name).__name__}() (a list of canonizers works too), and the composite "
                        "(a name such as 'epsilon-plus', a lime_attr.Composite or a zennit composite) separately")
    try:
        factory = _COMPOSITES[name]
    except (KeyError, TypeError):
        raise UnknownNameError(
            f"unknown composite {name!r}; available composites: {', '.join(available_composites())}. "
            "Build one with lime_attr.Composite([...]) or register it with @register_composite(name)."
        ) from None
    _check_params(name, factory, params)
    comp = factory(**params)
    if not isinstance(comp, Composite):
        raise TypeError(f"the factory registered as composite {name!r} returned {type(comp).__name__}, not a "
                        "Composite")
    comp.name = name
    return comp


def _check_params(name: str, factory: Callable, params: dict) -> None:
    """Unknown keyword parameters of a composite factory: a clear TypeError listing the accepted ones."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return
    kinds = {p.kind for p in sig.parameters.values()}
    if inspect.Parameter.VAR_KEYWORD in kinds:
        return
    accepted = [p.name for p in sig.parameters.values()
                if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"composite {name!r} takes parameters {accepted}, got unknown {unknown}; e.g. "
                        f"get_composite({name!r}" + (f", {accepted[0]}=...)" if accepted else ")"))


def available_composites() -> list[str]:
    """Sorted names of the registered composites."""
    return sorted(_COMPOSITES)


# --------------------------------------------------------------------------------- built-in composites

_TRANSFORMER = [
    ("site:attention", "bilinear"),
    ("site:matmul", "bilinear"),
    ("site:softmax", "softmax"),
    ("site:product", "uniform"),
    ("site:norm", "norm"),
    ("site:activation", "identity"),
]


@register_composite("attnlrp")
def _attnlrp(epsilon: float = 0.0) -> Composite:
    """AttnLRP (Achtibat et al., 2024): bilinear + softmax rules in attention, uniform on products, identity
    on activations, norm rule, epsilon (default eps -> 0, i.e. the plain gradient) on linear layers."""
    return Composite([*_TRANSFORMER, ("site:layer", get_rule("epsilon", epsilon=epsilon)),
                      ("site:affine", get_rule("epsilon", epsilon=epsilon))])


@register_composite("cp-lrp")
def _cplrp(epsilon: float = 0.0) -> Composite:
    """CP-LRP (Ali et al., 2022): attention weights and MLP gates constant; otherwise as ``attnlrp``."""
    return Composite([
        ("site:attention", "cp_attention"), ("site:softmax", "cp_attention"), ("site:matmul", "cp_attention"),
        ("site:product", "cp_attention"), ("site:norm", "norm"), ("site:activation", "identity"),
        ("site:layer", get_rule("epsilon", epsilon=epsilon)), ("site:affine", get_rule("epsilon", epsilon=epsilon)),
    ])


@register_composite("epsilon-gamma")
def _epsilon_gamma(epsilon: float = 1e-6, gamma: float = 0.25, low: Any = -3.0, high: Any = 3.0) -> Composite:
    """zbox on the first layer, gamma on convolutions, epsilon on dense layers (zennit's EpsilonGammaBox),
    AttnLRP rules on transformer parts. ``low``/``high`` bound the input (defaults suit standardised data)."""
    return Composite([
        ("first_layer", get_rule("zbox", low=low, high=high)),
        ((nn.Conv1d, nn.Conv2d, nn.Conv3d), get_rule("gamma", gamma=gamma)),
        ("site:layer", get_rule("epsilon", epsilon=epsilon)),
        ("site:affine", get_rule("epsilon", epsilon=0.0)),
        *_TRANSFORMER,
    ])


@register_composite("epsilon-plus")
def _epsilon_plus(epsilon: float = 1e-6) -> Composite:
    """z+ on convolutions, epsilon on dense layers (zennit's EpsilonPlus), AttnLRP rules on transformer parts."""
    return Composite([
        ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "zplus"),
        ("site:layer", get_rule("epsilon", epsilon=epsilon)),
        ("site:affine", get_rule("epsilon", epsilon=0.0)),
        *_TRANSFORMER,
    ])

