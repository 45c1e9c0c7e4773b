"""Scopes: apply a composite (and canonizer) to one model instance, and restore it exactly on exit.

Nothing global is touched: rules are attached as hooks to this model's module instances, op rules run
in a function mode pushed only around this model's own forward, attention goes through a per-instance
attention implementation set by the canonizer. On exit every hook is removed and every attribute a
canonizer changed is restored, so the model computes bit-identical outputs and gradients.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .composites import Composite, ZennitRule, _ZennitLookup, apply_zennit_canonizers, get_composite
from .errors import RuleSiteError, UncoveredModuleError, UnsupportedModelError
from .model_checks import check_model_state
from .ops import RuleMode
from .rules import Rule
from .rules import _tangent
from .rules._grad import EpsilonScale, epsilon_grad_hook, modified_grad, scale_grad
from .sites import Site, disable_inplace, discover_sites, inplace_input_error

__all__ = ["LRPScope", "lrp_scope", "current_scope"]

_local = threading.local()

_RULE_KINDS = ("layer", "affine", "activation", "softmax", "norm")


def current_scope() -> Optional["LRPScope"]:
    """The innermost scope whose model is currently running its forward (or None)."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def _product_weights(rule: Rule, k: int) -> list[float]:
    from .rules.builtin import CPAttention, Uniform

    if isinstance(rule, Uniform):
        return list(rule.weights) if rule.weights is not None else [1.0 / k] * k
    if isinstance(rule, CPAttention):
        return [0.0] + [1.0 / (k - 1)] * (k - 1)
    raise TypeError(f"rule {rule!r} cannot be applied at a gated-MLP product declared by a canonizer "
                    "(supported: 'uniform' and 'cp_attention')")


class LRPScope:
    """Rules of ``composite`` applied to one model instance (a reusable context manager).

    Parameters
    ----------
    model : nn.Module
    composite : str or Composite
        Default ``"attnlrp"``.
    canonizer : "auto", None, str or Canonizer
        ``"auto"`` looks up ``model.config.model_type`` in the canonizer registry for Hugging Face models
        and uses the generic module discovery for plain torch models.
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

    def __init__(self, model: nn.Module, composite: Union[str, Composite] = "attnlrp", canonizer: Any = "auto",
                 check_ops: str = "first") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"lrp_scope needs a torch.nn.Module, got {type(model).__name__}")
        if check_ops not in ("first", "always", "never"):
            raise ValueError(f"check_ops must be 'first', 'always' or 'never', got {check_ops!r}")
        self.model = model
        self.composite = get_composite(composite)
        self.canonizer = _resolve_canonizer(model, canonizer)
        self.check_ops = check_ops
        self.covered_depth = 0
        self._module_stack: list[tuple[str, nn.Module]] = []
        self._handles: list[Any] = []
        self._reverts: list[Callable[[], None]] = []
        self._carriers: list[tuple[Tensor, Tensor]] = []
        self._attention: dict[int, Rule] = {}
        self.attention_transforms: list[Callable] = []  # (module, q, k, v, kwargs) -> (q, k, v)
        self._active = False
        self._checked = False
        self._needs_op_rules = False
        self._op_rule_cache: dict[tuple[str, str], Optional[Rule]] = {}
        self.sites: list[Site] = []
        self.enabled = True
        self._mode_running = False
        self._noop_modules: list[nn.Module] = []
        self._product_modules: list[nn.Module] = []
        self.declared_product_depth = 0
        self._mode: Any = None  # the RuleMode while it runs
        # id(relu) -> (output of the dense layer before it, epsilon): see _epsilon_relu_pairs
        self._pending_epsilon: dict[int, tuple[Tensor, float]] = {}

    # ------------------------------------------------------------------ public helpers
    @property
    def active(self) -> bool:
        """Whether the scope is installed on its model (between ``__enter__`` and ``__exit__``)."""
        return self._active

    def add_attention_transform(self, transform: Callable) -> "TransformHandle":
        """Run ``transform(module, q, k, v, kwargs) -> (q, k, v)`` on every attention call of this scope.

        Transforms run in the order they were added, on the kernel's inputs, before the attention rule
        (LIME adds its key/value perturbations here). Returns a handle whose ``remove()`` takes the
        transform out again (idempotent).
        """
        if not callable(transform):
            raise TypeError(f"an attention transform must be callable as transform(module, q, k, v, kwargs) -> "
                            f"(q, k, v), got {transform!r}")
        self.attention_transforms.append(transform)
        return TransformHandle(self.attention_transforms, transform)

    def add_carrier(self, x: Tensor, carrier: Tensor) -> None:
        """Register an auxiliary tensor whose relevance belongs to the module input ``x`` (first-layer rules)."""
        self._carriers.append((x, carrier))

    def pop_carriers(self) -> list[tuple[Tensor, Tensor]]:
        """Return and clear the carriers recorded by the last forward."""
        out, self._carriers = self._carriers, []
        return out

    def attention_rule(self, module: nn.Module) -> Optional[Rule]:
        """The attention rule for an attention module (used by canonizers' attention functions)."""
        return self._attention.get(id(module))

    def rule_for_op(self, kind: str, name: str) -> Optional[Rule]:
        mod_name = self.current_module_name()
        key = (kind, name, mod_name)
        if key not in self._op_rule_cache:
            module = self._module_stack[-1][1] if self._module_stack else self.model
            site = Site(kind, mod_name, module, op=name)
            self._op_rule_cache[key] = self.composite.rule_for(site)
        return self._op_rule_cache[key]

    def current_module_name(self) -> str:
        return self._module_stack[-1][0] if self._module_stack else ""

    def mark_dependent(self, out: Any, like: Optional[Tensor] = None) -> None:
        """Tell the op-coverage checker that ``out`` depends on the explained input (when ``like`` does).

        For rules and adapters whose computation is hidden from the checker (an ``autograd.Function``, a
        zennit hook): without this the ops after them would not be seen. ``like=None`` marks
        unconditionally. No-op outside the first (checked) forward.
        """
        mode = self._mode
        if mode is not None and (like is None or mode._dep(like)):
            mode._mark(out)

    def depends_on_input(self, *tensors: Any) -> bool:
        """Whether the op-coverage checker sees any of ``tensors`` as depending on the explained input."""
        mode = self._mode
        return mode is not None and any(isinstance(t, Tensor) and mode._dep(t) for t in tensors)

    def current_module_type(self) -> str:
        return type(self._module_stack[-1][1]).__name__ if self._module_stack else type(self.model).__name__

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
        for h in reversed(self._handles):
            h.remove()
        self._handles.clear()
        for revert in reversed(self._reverts):
            revert()
        self._reverts.clear()
        self._carriers.clear()
        self._attention.clear()
        self._noop_modules.clear()
        self._product_modules.clear()
        self.declared_product_depth = 0
        self._module_stack.clear()
        self.covered_depth = 0

    def _install(self) -> None:
        model = self.model
        # zennit canonizers (e.g. BatchNorm merging) first: they change the module structure's parameters
        # (applied and reverted exactly, under zennit 0.5 and 1.0 alike: see apply_zennit_canonizers)
        if self.composite.canonizers:
            self._reverts.append(apply_zennit_canonizers(model, self.composite.canonizers))
        overrides: dict = {}
        if self.canonizer is not None:
            overrides = self.canonizer.apply(model, self) or {}
        self.sites = discover_sites(model, overrides)
        self._check_first_layer()
        problems: list[str] = []
        products: list = []
        module_rules: list = []
        for site in self.sites:
            if site.kind in ("container", "passthrough"):
                continue
            if site.kind == "attention":
                rule = self.composite.rule_for(site)
                if rule is None:
                    problems.append(f"  {site.name or '<root>'} ({type(site.module).__name__}): attention, no rule")
                else:
                    self._attention[id(site.module)] = rule
                continue
            if site.kind == "product":
                rule = self.composite.rule_for(site)
                if rule is None:
                    problems.append(f"  {site.name} ({type(site.module).__name__}): gated product, no rule")
                else:
                    products.append((site, rule))
                continue
            rule = self.composite.rule_for(site)
            if isinstance(rule, _ZennitLookup):
                rule = rule.resolve(site)
            if rule is None:
                if site.kind == "unknown" and len(site.module._parameters) == 0:
                    # parameter-free module we do not know: its ops are checked by the op mode
                    self._track_module(site)
                    continue
                why = "no rule for this kind" if site.kind != "unknown" else "unknown module type"
                bad = self.composite.matched_unsupported(site)
                if bad:
                    why += f"; matched {bad[0]!r}, which does not apply to {site.kind!r}"
                problems.append(f"  {site.name or '<root>'} ({type(site.module).__name__}, {site.kind}): {why}")
                continue
            module_rules.append((site, rule))
        relu_after = _epsilon_relu_pairs(model, module_rules)
        for site, rule in module_rules:
            if id(site.module) in relu_after:
                rule = _DeferredEpsilon(rule.epsilon, self._pending_epsilon, id(relu_after[id(site.module)]))
            self._install_module_rule(site, rule)
        # after the activations' own rules, so that they act on the rule's output
        for relu in relu_after.values():
            self._handles.append(relu.register_forward_hook(self._claim_epsilon))
        # products last: their gate hooks must act on the activation rule's output
        for site, rule in products:
            self._install_product(site, rule)
            self._product_modules.append(site.module)
        if problems:
            raise UncoveredModuleError(
                f"composite {self.composite.name!r} does not cover these modules of {type(model).__name__}:\n"
                + "\n".join(problems)
                + "\nMap them in the composite (by type, name pattern or 'site:<kind>'), or add a canonizer "
                "that declares what they are (docs: writing_a_canonizer). lime_attr never falls back to a "
                "silent plain gradient."
            )
        self._wrap_root_forward()

    def _check_first_layer(self) -> None:
        """A ``"first_layer"`` entry on a model without a first layer would match nothing: refuse it."""
        if any(s.first_layer for s in self.sites):
            return
        entries = [r for m, r in self.composite.entries if isinstance(m, str) and m == "first_layer"]
        if entries:
            raise RuleSiteError(
                f"composite {self.composite.name!r} maps 'first_layer' to {entries[0]!r}, but "
                f"{type(self.model).__name__} has no first layer: a token model is explained at its input "
                "embeddings, which no weight-bearing layer consumes directly, so the rule would match nothing. "
                "Use a composite without a 'first_layer' entry (e.g. 'attnlrp' or 'epsilon-plus')")

    # ------------------------------------------------------------------ hooks
    def _claim_epsilon(self, relu: nn.Module, args: tuple, out: Any) -> Any:
        """Forward hook of a ReLU after an epsilon layer: take over the layer's epsilon factor.

        The ReLU is the layer output's only consumer (see :func:`_epsilon_relu_pairs`), so the gradient at
        the output ``y`` is zero wherever the ReLU's output ``r`` is, and elsewhere ``y = r``: scaling the
        gradient arriving at ``r`` by ``r / (r + eps)`` gives, after the ReLU's backward, exactly what
        scaling the gradient at ``y`` by ``|y| / (|y| + eps)`` gives -- but reads ``r``, which the ReLU
        keeps for its own backward anyway, so the factor costs no memory. Not claimed (another tensor
        reached the ReLU): the layer's output gets the ordinary epsilon hook.
        """
        pending = self._pending_epsilon.pop(id(relu), None)
        if pending is None:
            return None
        y, eps = pending
        if not (args and args[0] is y and isinstance(out, Tensor) and out.requires_grad and torch.is_grad_enabled()):
            epsilon_grad_hook(y, eps)
            return None
        return modified_grad(out, out, EpsilonScale(out, eps, nonnegative=True))

    def _flush_epsilon(self) -> None:
        """Give every unclaimed pending layer output its ordinary epsilon hook (before any backward)."""
        while self._pending_epsilon:
            y, eps = self._pending_epsilon.popitem()[1]
            epsilon_grad_hook(y, eps)

    def _track_module(self, site: Site) -> None:
        self._handles.append(site.module.register_forward_pre_hook(self._push_hook(site.name)))
        self._handles.append(site.module.register_forward_hook(self._pop_hook))

    def _install_module_rule(self, site: Site, rule: Rule) -> None:
        module = site.module
        if _is_noop(rule, site.kind):
            # the rule is the op's own Jacobian (e.g. epsilon with eps=0 on a linear layer): no hook at all,
            # only the coverage marker used by the op mode
            self._noop_modules.append(module)
            return
        if isinstance(rule, ZennitRule):
            self._install_zennit(module, rule)
            return
        # in-place modules (nn.ReLU(inplace=True)) overwrite the input the rule reads: out-of-place inside the
        # scope (this instance only, restored on exit); any other in-place write is caught by the version check
        restore_inplace = disable_inplace(module)
        if restore_inplace is not None:
            self._reverts.append(restore_inplace)
        versions: list[tuple[Any, int]] = []  # (input, its version counter) per call

        def pre(mod, args):
            self.covered_depth += 1
            x = args[0] if args else None
            versions.append((x, x._version) if isinstance(x, Tensor) and torch.is_grad_enabled()
                            and not x.is_inference() else (None, -1))

        kind, spec = site.kind, site.spec

        def post(mod, args, out):
            try:
                x_in, before = versions.pop() if versions else (None, -1)
                if not (self.enabled and torch.is_grad_enabled()) or not args or not isinstance(out, Tensor):
                    return None
                # the module wrote into its input (a later pre-hook that passed a new tensor is no such write)
                if x_in is not None and args[0] is x_in and x_in._version != before:
                    raise inplace_input_error(site, rule)
                return apply(mod, args[0], out)
            finally:
                self.covered_depth = max(self.covered_depth - 1, 0)

        def apply(mod, x, out):
            if kind == "layer":
                return rule.apply_layer(mod, x, out)
            if kind == "affine":
                return rule.apply_affine(mod, x, out)
            if kind == "activation":
                return rule.apply_activation_module(mod, x, out)
            if kind == "softmax":
                return rule.apply_softmax(x, out)
            if kind == "norm":
                return rule.apply_norm(spec, x, out)
            raise RuntimeError(f"rule {rule!r} mapped to {site.kind!r} site {site.name!r}: cannot be applied")

        self._handles.append(module.register_forward_pre_hook(pre))
        self._handles.append(module.register_forward_hook(post))

    def _install_product(self, site: Site, rule: Rule) -> None:
        """A canonizer-declared gated product ``act(gate) * up`` consumed by ``spec['consumer']``."""
        w_gate, w_up = _product_weights(rule, 2)
        consumer, act = site.spec["consumer"], site.spec.get("gate")
        scale_out = w_up if w_up != 0 else w_gate
        gate_extra = (w_gate / scale_out) if scale_out else 0.0

        def pre(mod, args):
            if not (self.enabled and torch.is_grad_enabled()) or not args:
                return None
            return (scale_grad(args[0], scale_out, copy=False), *args[1:])

        self._handles.append(consumer.register_forward_pre_hook(pre))
        if gate_extra != 1.0 and act is None:
            raise TypeError(f"product rule {rule!r} needs the gate module of {site.name}; the canonizer "
                            "declares none")
        if act is not None:

            def gate_post(mod, args, out):
                if not (self.enabled and torch.is_grad_enabled()) or (gate_extra == 1.0 and self._mode is None):
                    return None
                # the gate's output is hidden from the op mode (computed with torch functions disabled, so
                # not marked input-dependent): the declared product it feeds is ruled by these hooks, and the
                # op mode must not rule that product a second time
                with torch._C.DisableTorchFunction():
                    return scale_grad(out, gate_extra, copy=False) if gate_extra != 1.0 else out.view_as(out)

            self._handles.append(act.register_forward_hook(gate_post))
        if w_up == 0 and site.spec.get("up") is not None:
            self._handles.append(site.spec["up"].register_forward_hook(
                lambda mod, args, out: out.detach() if torch.is_grad_enabled() else None))

    def _install_zennit(self, module: nn.Module, rule: ZennitRule) -> None:
        # the boundary conversions and zennit's own hooks are autograd Functions, hidden from the op mode:
        # carry the input's dependence over to the output, or ops after this module would go unruled.
        # Every tensor input (positional and keyword) and every tensor output is converted (ZennitRule).
        dep_stack: list[bool] = []

        def to_grad(mod, args, kwargs):
            dep_stack.append(self.depends_on_input(*rule.input_tensors(args, kwargs)))
            if not (self.enabled and torch.is_grad_enabled()):
                return None
            return rule.inputs_to_grad(args, kwargs)

        def to_rel(mod, args, out):
            dep = dep_stack.pop() if dep_stack else False
            new = None
            if self.enabled and torch.is_grad_enabled():
                new = rule.outputs_to_relevance(out)
            if dep:
                self.mark_dependent(out if new is None else new)
            return new

        self._handles.append(module.register_forward_pre_hook(to_grad, with_kwargs=True))
        self._handles.append(rule.hook.register(module))
        self._handles.append(module.register_forward_hook(to_rel))
        self._handles.append(module.register_forward_pre_hook(lambda m, a: setattr(self, "covered_depth", self.covered_depth + 1)))
        self._handles.append(module.register_forward_hook(lambda m, a, o: setattr(self, "covered_depth", max(self.covered_depth - 1, 0))))

    def _wrap_root_forward(self) -> None:
        model = self.model
        had_instance_forward = "forward" in model.__dict__
        original = model.__dict__.get("forward", None)
        bound = model.forward
        scope = self

        def forward(*args: Any, **kwargs: Any) -> Any:
            stack = getattr(_local, "stack", None)
            if stack is None:
                stack = _local.stack = []
            stack.append(scope)
            scope._module_stack.clear()
            scope.covered_depth = 0
            try:
                check = scope.check_ops == "always" or (scope.check_ops == "first" and not scope._checked)
                if torch.is_grad_enabled() and (check or scope._needs_op_rules):
                    mode = RuleMode(scope)
                    mode.seed(_leaf_inputs(args, kwargs))
                    scope._mode_running, scope._mode = True, mode
                    try:
                        with scope._tracking_modules(), mode:
                            out = bound(*args, **kwargs)
                    finally:
                        scope._mode_running, scope._mode = False, None
                    scope._checked = True
                    scope._needs_op_rules = scope._needs_op_rules or bool(mode.ruled_ops)
                    scope.ruled_ops = mode.ruled_ops
                    return out
                return bound(*args, **kwargs)
            finally:
                stack.pop()
                scope._flush_epsilon()

        forward.__wrapped__ = bound  # type: ignore[attr-defined]
        model.forward = forward  # instance attribute: this model only

        def revert() -> None:
            if had_instance_forward:
                model.forward = original
            else:
                model.__dict__.pop("forward", None)

        self._reverts.append(revert)

    @contextlib.contextmanager
    def _tracking_modules(self) -> Iterator[None]:
        """Module-stack hooks on containers, only while the op mode runs (error messages, name matching)."""
        handles = []
        for name, module in self.model.named_modules():
            if name and len(module._modules) > 0:
                handles.append(module.register_forward_pre_hook(self._push_hook(name)))
                handles.append(module.register_forward_hook(self._pop_hook))
        for module in self._noop_modules:
            handles.append(module.register_forward_pre_hook(self._cover_hook))
            handles.append(module.register_forward_hook(self._uncover_hook))
        for module in self._product_modules:
            # the product inside a canonizer-declared gated MLP is ruled by the consumer/gate hooks
            handles.append(module.register_forward_pre_hook(self._enter_product))
            handles.append(module.register_forward_hook(self._exit_product))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _enter_product(self, module: nn.Module, args: Any) -> None:
        self.declared_product_depth += 1

    def _exit_product(self, module: nn.Module, args: Any, out: Any) -> None:
        self.declared_product_depth = max(self.declared_product_depth - 1, 0)

    def _cover_hook(self, module: nn.Module, args: Any) -> None:
        if self._mode_running:
            self.covered_depth += 1

    def _uncover_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._mode_running:
            self.covered_depth = max(self.covered_depth - 1, 0)

    def _push_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any) -> None:
            self._module_stack.append((name, module))
        return hook

    def _pop_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if self._module_stack:
            self._module_stack.pop()


class TransformHandle:
    """Removable handle of an attention transform (see :meth:`LRPScope.add_attention_transform`)."""

    def __init__(self, transforms: list, transform: Callable) -> None:
        self._transforms, self._transform = transforms, transform

    def remove(self) -> None:
        """Take the transform out (no-op if it is already out)."""
        if self._transform in self._transforms:
            self._transforms.remove(self._transform)

    def __enter__(self) -> "TransformHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _is_noop(rule: Rule, kind: str) -> bool:
    from .rules.builtin import Epsilon, Gradient, Softmax

    if isinstance(rule, Gradient):
        return True
    if isinstance(rule, Epsilon) and rule.epsilon == 0 and kind in ("layer", "affine"):
        return True
    return isinstance(rule, Softmax) and kind == "softmax"


def _leaf_inputs(args: Any, kwargs: Any) -> list:
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


def _resolve_canonizer(model: nn.Module, canonizer: Any) -> Any:
    if canonizer is None:
        return None
    if canonizer == "auto":
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type is None:
            return None
        from .canonizers import canonizer_for

        return canonizer_for(model)
    if isinstance(canonizer, str):
        from .canonizers import get_canonizer

        canonizer = get_canonizer(canonizer)
    if not callable(getattr(canonizer, "apply", None)):
        raise TypeError(f"canonizer must be 'auto', None, a registered model_type name or a canonizer object (with an "
                        f"apply(model, scope) method, e.g. a lime_attr.canonizers.HFCanonizer), got {canonizer!r}")
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


@contextlib.contextmanager
def lrp_scope(model: nn.Module, composite: Union[str, Composite] = "attnlrp", canonizer: Any = "auto",
              check_ops: str = "first") -> Iterator[nn.Module]:
    """Context manager: ``composite``'s rules applied to ``model`` (see :class:`LRPScope`)."""
    scope = LRPScope(model, composite, canonizer, check_ops)
    with scope as m:
        yield m


# ----------------------------------------------------------------- epsilon read from the ReLU after the layer


def _epsilon_relu_pairs(model: nn.Module, module_rules: list) -> dict[int, nn.Module]:
    """Dense layers with LRP-epsilon (> 0) whose output only an ``nn.ReLU`` consumes: ``id(layer) -> relu``.

    Found structurally: consecutive children of an ``nn.Sequential`` whose forward is the stock one (each
    child's output is the next child's only input), each module used once in the model, the ReLU ruled
    as the plain ReLU Jacobian (identity / pass / gradient). At run time the ReLU must also receive the
    very tensor the layer returned (:meth:`LRPScope._claim_epsilon`); otherwise the ordinary hook is used.
    """
    from .rules.builtin import Epsilon, Gradient, Identity, Pass

    plain_relu = (Identity, Pass, Gradient)  # each is the ReLU's own Jacobian on a ReLU
    ruled = {id(site.module): (site, rule) for site, rule in module_rules}
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs: dict[int, nn.Module] = {}
    for seq in model.modules():
        if type(seq).forward is not nn.Sequential.forward or not isinstance(seq, nn.Sequential):
            continue
        kids = list(seq)
        for a, b in zip(kids, kids[1:]):
            if type(b) is not nn.ReLU or counts.get(id(a)) != 1 or counts.get(id(b)) != 1:
                continue
            la, lb = ruled.get(id(a)), ruled.get(id(b))
            if la is None or lb is None or la[0].kind != "layer" or lb[0].kind != "activation":
                continue
            if type(la[1]) is not Epsilon or la[1].epsilon == 0 or type(lb[1]) not in plain_relu:
                continue
            pairs[id(a)] = b
    return pairs


class _DeferredEpsilon(Rule):
    """LRP-epsilon on a layer whose ReLU takes the factor over (internal; see ``LRPScope._claim_epsilon``)."""

    def __init__(self, epsilon: float, pending: dict, relu_id: int) -> None:
        self.epsilon, self._pending, self._relu = epsilon, pending, relu_id

    def apply_layer(self, module: Any, x: Tensor, y: Tensor) -> Tensor:
        if _tangent.active() or not (y.requires_grad and torch.is_grad_enabled()) or _observed(module):
            return epsilon_grad_hook(y, self.epsilon)
        old = self._pending.pop(self._relu, None)
        if old is not None:  # the previous output never reached the ReLU
            epsilon_grad_hook(*old)
        self._pending[self._relu] = (y, self.epsilon)
        return y

    def __repr__(self) -> str:
        return f"Epsilon(epsilon={self.epsilon})"


def _observed(module: nn.Module) -> bool:
    """Whether a forward hook besides the scope's own sees ``module``'s output (latent relevance, Captum's
    layer methods, a user's capture): then the gradient *at* the output must stay the one before the
    layer's epsilon factor, so the factor is not moved up to the ReLU."""
    return len(module._forward_hooks) > 1 or bool(nn.modules.module._global_forward_hooks)
