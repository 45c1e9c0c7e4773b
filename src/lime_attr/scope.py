"""Scopes: resolve, install, restore -- a composite's rules on one model instance, undone exactly on exit.

Nothing global is touched: rules are attached as hooks to this model's module instances, op rules run
in a function mode pushed only around this model's own forward, attention goes through a per-instance
attention implementation selected by the canonizer. Everything installed is registered with one
:class:`~lime_attr.installer.Installer`, so on exit the model computes bit-identical outputs and
gradients again. Resolution lives in :mod:`lime_attr.resolution`, the per-module hooks in
:mod:`lime_attr.module_hooks`, the speed fusions in :mod:`lime_attr.rules.fusions`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .composites import Composite, get_composite
from .context import current_scope, running
from .forward_state import ScopeState, TransformHandle
from .installer import Installer
from .interop.zennit import apply_zennit_canonizers
from .model_checks import check_model_state
from .module_hooks import install_module_rule, install_product
from .ops import RuleMode
from .resolution import check_first_layer, plan_rules, resolve_canonizers, uncovered_error
from .rules import Rule
from .rules.fusions import EpsilonReluFusion, epsilon_relu_pairs
from .sites import Site, discover_sites

__all__ = ["LRPScope", "lrp_scope", "current_scope", "TransformHandle"]


class LRPScope(ScopeState):
    """Rules of ``composite`` applied to one model instance (a reusable context manager).

    Parameters
    ----------
    model : nn.Module
    composite : str or Composite
        Default ``"attnlrp"``; a zennit composite is accepted too.
    canonizer : "auto", None, str, Canonizer or list
        A canonizer object may be lime_attr's or zennit's; a list may mix them. ``"auto"`` looks up ``model.config.model_type`` in the canonizer registry for Hugging Face models
        and uses the generic module discovery for plain torch models. zennit canonizers (e.g.
        ``SequentialMergeBatchNorm()``) are applied first and reverted exactly.
    check_ops : {"first", "always", "never"}
        Run the op-coverage check on the first forward in the scope (default), on every forward, or never.

    Examples
    --------
    >>> import torch
    >>> from lime_attr import lrp_scope
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(1, 4, requires_grad=True)
    >>> with lrp_scope(model, "epsilon-plus"):
    ...     out = model(x)[0, 1]
    ...     (g,) = torch.autograd.grad(out, x)
    >>> relevance = x * g
    """

    def __init__(self, model: nn.Module, composite: Union[str, Composite, Any] = "attnlrp", canonizer: Any = "auto",
                 check_ops: str = "first") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"lrp_scope needs a torch.nn.Module, got {type(model).__name__}")
        if check_ops not in ("first", "always", "never"):
            raise ValueError(f"check_ops must be 'first', 'always' or 'never', got {check_ops!r}")
        super().__init__(model, get_composite(composite))
        self.canonizers = resolve_canonizers(model, canonizer)
        self.canonizer = self.canonizers.own[0] if len(self.canonizers.own) == 1 else None
        self.check_ops = check_ops
        self.sites: list[Site] = []
        self._fusion = EpsilonReluFusion()
        self._noop_modules: list[nn.Module] = []
        self._product_modules: list[nn.Module] = []
        self._checked = self._needs_op_rules = False

    @property
    def op_check_pending(self) -> bool:
        """Whether the next forward with gradients runs the op-coverage check (``check_ops``)."""
        return self.check_ops == "always" or (self.check_ops == "first" and not self._checked)

    @property
    def applies_op_rules(self) -> bool:
        """Whether a checked forward found op sites the composite rules (every forward then runs the op mode)."""
        return self._needs_op_rules

    # ------------------------------------------------------------------ enter / exit
    def __enter__(self) -> nn.Module:
        if self._active:
            raise RuntimeError("this scope is already active; create a new LRPScope to nest")
        check_model_state(self.model)
        try:
            self._install()
        except BaseException:
            self._uninstall()
            raise
        self._active = True
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self._uninstall()
        self._active = False

    def _uninstall(self) -> None:
        try:
            self._installer.restore()
        finally:
            for state in (self._carriers, self._attention, self._noop_modules, self._product_modules,
                          self._module_stack, self._fusion.pending):
                state.clear()
            self.declared_product_depth = self.covered_depth = 0

    def _install(self) -> None:
        model, installer = self.model, self._installer
        zennit = [*self.composite.canonizers, *self.canonizers.zennit]
        if zennit:  # first: they change module parameters (applied to copies, reverted exactly)
            installer.on_exit(apply_zennit_canonizers(model, zennit))
        overrides: dict = {}
        for canonizer in self.canonizers.own:
            overrides.update(canonizer.apply(model, installer) or {})
        self.sites = discover_sites(model, overrides)
        check_first_layer(self.composite, model, self.sites)
        plan = plan_rules(self.composite, self.sites)
        self._attention.update(plan.attention)
        for site in plan.tracked:
            self._track(site.module, site.name, installer)
        relu_after = epsilon_relu_pairs(model, plan.modules)
        for site, rule in plan.modules:
            if id(site.module) in relu_after:
                rule = self._fusion.layer_rule(rule.fusable_epsilon(), relu_after[id(site.module)])
            self._install_module_rule(site, rule)
        for relu in relu_after.values():  # after the activations' own rules: they act on the rule's output
            installer.add_hook(relu.register_forward_hook(self._fusion.claim))
        for site, rule in plan.products:  # last: the gate hooks act on the activation rule's output
            install_product(site, rule, installer, self)
            self._product_modules.append(site.module)
        if plan.problems:
            raise uncovered_error(self.composite, model, plan.problems)
        self._wrap_root_forward()

    def _install_module_rule(self, site: Site, rule: Rule) -> None:
        if rule.install(site, self._installer, self):
            return
        if rule.is_plain_jacobian(site.kind):
            # the op's own Jacobian (e.g. epsilon with eps=0 on a linear layer): no hook at all, only the
            # coverage marker used by the op mode
            self._noop_modules.append(site.module)
            return
        install_module_rule(site, rule, self._installer, self)

    # ------------------------------------------------------------------ the model's forward, wrapped
    def _wrap_root_forward(self) -> None:
        model = self.model
        had_instance_forward = "forward" in model.__dict__
        original = model.__dict__.get("forward", None)
        bound = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self._module_stack.clear()
            self.covered_depth = 0
            try:
                with running(self):
                    check = self.check_ops == "always" or (self.check_ops == "first" and not self._checked)
                    if torch.is_grad_enabled() and (check or self._needs_op_rules):
                        return self._checked_forward(bound, args, kwargs)
                    return bound(*args, **kwargs)
            finally:
                self._fusion.flush()

        forward.__wrapped__ = bound  # type: ignore[attr-defined]
        model.forward = forward  # instance attribute: this model only

        def revert() -> None:
            if had_instance_forward:
                model.forward = original
            else:
                model.__dict__.pop("forward", None)

        self._installer.on_exit(revert)

    def _checked_forward(self, bound: Callable, args: tuple, kwargs: dict) -> Any:
        """One forward under the op mode: op rules applied, op coverage checked."""
        mode = RuleMode(self)
        mode.seed(_leaf_inputs(args, kwargs))
        self._mode = mode
        try:
            with self._tracking_modules(), mode:
                out = bound(*args, **kwargs)
        finally:
            self._mode = None
        self._checked = True
        self._needs_op_rules = self._needs_op_rules or bool(mode.ruled_ops)
        self.ruled_ops = mode.ruled_ops
        return out

    @contextlib.contextmanager
    def _tracking_modules(self) -> Iterator[None]:
        """Module-stack and coverage hooks, only while the op mode runs (error messages, name matching)."""
        tracking = Installer()
        for name, module in self.model.named_modules():
            if name and len(module._modules) > 0:
                self._track(module, name, tracking)
        for module in self._noop_modules:
            tracking.add_hook(module.register_forward_pre_hook(lambda m, a: self.enter_covered()))
            tracking.add_hook(module.register_forward_hook(lambda m, a, o: self.exit_covered()))
        for module in self._product_modules:  # the product inside a declared gated MLP is ruled by its hooks
            tracking.add_hook(module.register_forward_pre_hook(lambda m, a: self._enter_product(1)))
            tracking.add_hook(module.register_forward_hook(lambda m, a, o: self._enter_product(-1)))
        try:
            yield
        finally:
            tracking.restore()

def _leaf_inputs(args: Any, kwargs: Any) -> list:
    """The tensors that require grad among a call's (nested) arguments: the op mode's seeds."""
    out: list = []

    def walk(o: Any) -> None:
        if isinstance(o, Tensor):
            if o.requires_grad:
                out.append(o)
        elif isinstance(o, (list, tuple)):
            for i in o:
                walk(i)
        elif isinstance(o, dict):
            for i in o.values():
                walk(i)

    walk(args)
    walk(kwargs)
    return out


@contextlib.contextmanager
def lrp_scope(model: nn.Module, composite: Union[str, Composite, Any] = "attnlrp", canonizer: Any = "auto",
              check_ops: str = "first") -> Iterator[nn.Module]:
    """Context manager: ``composite``'s rules applied to ``model`` (see :class:`LRPScope`)."""
    scope = LRPScope(model, composite, canonizer, check_ops)
    with scope as m:
        yield m
