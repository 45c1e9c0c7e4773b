"""Resolution, the first of a scope's three steps: which canonizers apply, and which rule drives each site.

Nothing here changes the model. :func:`resolve_canonizers` turns the ``canonizer=`` argument (``"auto"``,
None, a registered ``model_type``, a canonizer object, a zennit canonizer, or a list of these) into the
canonizers to apply; :func:`plan_rules` asks the composite for each site's rule and collects every
uncovered site, so that one error lists them all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn

from .canonizers import canonizer_for, get_canonizer
from .composites import Composite
from .errors import RuleSiteError, UncoveredModuleError, UnsupportedModelError
from .interop.zennit import is_zennit_canonizer
from .sites import Site

__all__ = ["ResolvedCanonizers", "resolve_canonizers", "RulePlan", "plan_rules", "uncovered_error",
           "check_first_layer"]


@dataclass
class ResolvedCanonizers:
    """The canonizers of one scope: lime_attr's (applied in order) and zennit's (applied first)."""

    own: list = field(default_factory=list)
    zennit: list = field(default_factory=list)


def resolve_canonizers(model: nn.Module, canonizer: Any) -> ResolvedCanonizers:
    """Resolve ``canonizer`` (see :class:`~lime_attr.scope.LRPScope`) for ``model``."""
    out = ResolvedCanonizers()
    items = list(canonizer) if isinstance(canonizer, (list, tuple)) else [canonizer]
    for item in items:
        if is_zennit_canonizer(item):
            out.zennit.append(item)
            continue
        own = _resolve_own(model, item)
        if own is not None:
            out.own.append(own)
    return out


def _resolve_own(model: nn.Module, canonizer: Any) -> Any:
    if canonizer is None:
        return None
    if isinstance(canonizer, str) and canonizer == "auto":
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return None if model_type is None else canonizer_for(model)
    if isinstance(canonizer, str):
        canonizer = get_canonizer(canonizer)
    if isinstance(canonizer, type):
        raise TypeError(f"canonizer={canonizer.__name__} is a class; pass an instance: canonizer={canonizer.__name__}()")
    if not callable(getattr(canonizer, "apply", None)):
        raise TypeError("canonizer must be 'auto', None, a registered model_type name or a canonizer object (a lime_attr "
                        "canonizer with an apply(model, installer) method, e.g. a lime_attr.canonizers.HFCanonizer, or "
                        "a zennit canonizer, e.g. zennit.torchvision.SequentialMergeBatchNorm()), or a list of these; "
                        f"got {canonizer!r}")
    _check_canonizer_fits(model, canonizer)
    return canonizer


def _check_canonizer_fits(model: nn.Module, canonizer: Any) -> None:
    """A canonizer registered for other ``model_type`` values would adapt the wrong modules: refuse it."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    declared = tuple(getattr(canonizer, "model_types", ()) or ())
    if model_type is None or not declared or model_type in declared:
        return
    raise UnsupportedModelError(
        f"canonizer {type(canonizer).__name__} is written for model_type {', '.join(map(repr, declared))}, but the "
        f"model is {model_type!r} ({type(model).__name__}): its rules would be placed on the wrong modules. Use "
        "canonizer='auto' (the registered one), canonizer=None (no canonizer: see UnsupportedModelError's "
        "docs for when that is valid), or, if that canonizer really fits this architecture, register a subclass "
        f"for it: @register_canonizer({model_type!r}) class Mine({type(canonizer).__name__}): ...")


@dataclass
class RulePlan:
    """Which rule drives each site of a model (the result of :func:`plan_rules`)."""

    attention: dict = field(default_factory=dict)  # id(attention module) -> rule
    products: list = field(default_factory=list)  # (site, rule) of canonizer-declared gated products
    modules: list = field(default_factory=list)  # (site, rule) of module sites
    tracked: list = field(default_factory=list)  # parameter-free modules of unknown kind (their ops are checked)
    problems: list = field(default_factory=list)  # one line per uncovered site


def plan_rules(composite: Composite, sites: Sequence[Site]) -> RulePlan:
    """Each site's rule from ``composite`` (first match that supports the site's kind)."""
    plan = RulePlan()
    for site in sites:
        if site.kind in ("container", "passthrough"):
            continue
        rule = composite.rule_for(site)
        rule = rule.resolve(site) if rule is not None else None
        if site.kind in ("attention", "product"):
            if rule is None:
                what = "attention" if site.kind == "attention" else "gated product"
                plan.problems.append(f"  {site.name or '<root>'} ({type(site.module).__name__}): {what}, no rule")
            elif site.kind == "attention":
                plan.attention[id(site.module)] = rule
            else:
                plan.products.append((site, rule))
            continue
        if rule is not None:
            plan.modules.append((site, rule))
        elif site.kind == "unknown" and len(site.module._parameters) == 0:
            plan.tracked.append(site)
        else:
            plan.problems.append(_uncovered_line(composite, site))
    return plan


def _uncovered_line(composite: Composite, site: Site) -> str:
    why = "no rule for this kind" if site.kind != "unknown" else "unknown module type"
    bad = composite.matched_unsupported(site)
    if bad:
        why += f"; matched {bad[0]!r}, which does not apply to {site.kind!r}"
    return f"  {site.name or '<root>'} ({type(site.module).__name__}, {site.kind}): {why}"


def uncovered_error(composite: Composite, model: nn.Module, problems: list[str]) -> UncoveredModuleError:
    """The error listing every site ``composite`` leaves uncovered, and how to cover them."""
    return UncoveredModuleError(
        f"composite {composite.name!r} does not cover these modules of {type(model).__name__}:\n"
        + "\n".join(problems)
        + "\nMap them in the composite (by type, name pattern or 'site:<kind>'), or add a canonizer "
        "that declares what they are (docs: writing_a_canonizer). lime_attr never falls back to a "
        "silent plain gradient.")


def check_first_layer(composite: Composite, model: nn.Module, sites: Sequence[Site]) -> None:
    """A ``"first_layer"`` entry on a model without a first layer would match nothing: refuse it."""
    if any(s.first_layer for s in sites):
        return
    entries = [r for m, r in composite.entries if isinstance(m, str) and m == "first_layer"]
    if entries:
        raise RuleSiteError(
            f"composite {composite.name!r} maps 'first_layer' to {entries[0]!r}, but "
            f"{type(model).__name__} has no first layer: a token model is explained at its input "
            "embeddings, which no weight-bearing layer consumes directly, so the rule would match nothing. "
            "Use a composite without a 'first_layer' entry (e.g. 'attnlrp' or 'epsilon-plus')")
