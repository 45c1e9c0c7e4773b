"""zennit interop: zennit rules, composites and canonizers accepted wherever lime_attr's are.

* A zennit rule (a ``zennit.core.Hook``) in a :class:`~lime_attr.Composite` drives each module it matches
  with its own copy of the hook (:class:`ZennitRule`), exactly as inside zennit's own composites.
* A zennit composite (``EpsilonGammaBox()``, ...) passed as the composite assigns its rules through its
  ``module_map`` (:class:`ZennitCompositeRule`); transformer parts zennit has no rules for keep the
  base composite's rules.
* A zennit canonizer (``SequentialMergeBatchNorm()``) is accepted as ``canonizer=``, in a list of
  canonizers, or in ``Composite(canonizers=...)``; it is applied to a copy of itself and reverted exactly
  (:func:`apply_zennit_canonizers`).

zennit is optional: nothing here imports it unless a zennit object is given.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

from ..rules import Rule
from ..rules.primitives import grad_to_relevance, relevance_to_grad

__all__ = ["ZennitRule", "ZennitCompositeRule", "apply_zennit_canonizers", "is_zennit_hook",
           "is_zennit_canonizer", "is_zennit_composite"]


def _zennit_class(module: str, name: str) -> Optional[type]:
    try:
        mod = __import__(module, fromlist=[name])
    except Exception:  # noqa: BLE001 - zennit missing or broken: nothing is a zennit object
        return None
    return getattr(mod, name, None)


def is_zennit_hook(obj: Any) -> bool:
    """Whether ``obj`` is a zennit rule (a ``zennit.core.Hook``)."""
    cls = _zennit_class("zennit.core", "Hook") if type(obj).__module__.startswith("zennit") else None
    return cls is not None and isinstance(obj, cls)


def is_zennit_canonizer(obj: Any) -> bool:
    """Whether ``obj`` is a zennit canonizer (a ``zennit.canonizers.Canonizer``)."""
    cls = _zennit_class("zennit.canonizers", "Canonizer") if type(obj).__module__.startswith("zennit") else None
    return cls is not None and isinstance(obj, cls)


def is_zennit_composite(obj: Any) -> bool:
    """Whether ``obj`` is a zennit composite (a ``zennit.core.Composite``)."""
    cls = _zennit_class("zennit.core", "Composite") if type(obj).__module__.startswith("zennit") else None
    return cls is not None and isinstance(obj, cls)


class ZennitRule(Rule):
    """Adapter that lets a zennit rule (a ``zennit.core.Hook``) drive one Linear/Conv/activation module.

    zennit hooks pass *relevance* backwards where lime_attr passes gradients; the adapter converts at
    the module's boundaries, so the zennit rule computes exactly what it computes inside zennit:

    * every tensor output ``y`` (each element of a tuple output): ``R_out = y * g`` before the hook;
    * every tensor input ``x`` that requires grad -- each positional argument *and* each keyword argument
      -- after it: ``g_in = R_in / x`` (0 where ``x = 0``).

    Converting every input, not only the first, keeps the adapter exact for both hook protocols zennit
    has shipped: 0.5.x hooks see only the positional inputs and pass relevance to them alone (a keyword
    tensor then receives the plain gradient of the relevance, as it does inside zennit), 1.0 hooks
    receive ``(args, kwargs)`` and re-run the module with all of them. The zennit rule registers its own
    hooks with its own ``register`` method, so whichever protocol the installed zennit uses is used.
    """

    def __init__(self, hook: Any) -> None:
        self.hook = hook

    @classmethod
    def sites(cls) -> frozenset[str]:
        return frozenset({"layer", "affine", "activation"})

    def __repr__(self) -> str:
        return f"ZennitRule({type(self.hook).__name__})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ZennitRule) and other.hook is self.hook

    __hash__ = object.__hash__

    def install(self, site: Any, installer: Any, state: Any) -> bool:
        """Drive ``site.module`` with a copy of the zennit hook made for this module alone.

        zennit hooks keep per-module state (the stored input and output), so each matched module gets
        its own copy, as zennit's own composites do. The boundary conversions and zennit's hooks are
        autograd Functions, hidden from the op-coverage check: the input's dependence is carried over to
        the output, or ops after this module would go unruled.
        """
        module, hook = site.module, self.hook.copy()
        dependent: list[bool] = []

        def to_grad(mod: Any, args: tuple, kwargs: dict) -> Any:
            dependent.append(state.depends_on_input(*self.input_tensors(args, kwargs)))
            state.enter_covered()
            return self.inputs_to_grad(args, kwargs) if torch.is_grad_enabled() else None

        def to_relevance(mod: Any, args: tuple, out: Any) -> Any:
            state.exit_covered()
            new = self.outputs_to_relevance(out) if torch.is_grad_enabled() else None
            if dependent and dependent.pop():
                state.mark_dependent(out if new is None else new)
            return new

        installer.add_hook(module.register_forward_pre_hook(to_grad, with_kwargs=True))
        installer.add_hook(hook.register(module))
        installer.add_hook(module.register_forward_hook(to_relevance))
        return True

    @staticmethod
    def input_tensors(args: tuple, kwargs: dict) -> list[Tensor]:
        """The tensors among a module call's positional and keyword arguments."""
        return [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]

    @staticmethod
    def inputs_to_grad(args: tuple, kwargs: dict) -> Optional[tuple[tuple, dict]]:
        """``(args, kwargs)`` with relevance-to-gradient boundaries on every tensor that requires grad
        (a forward pre-hook result, ``with_kwargs=True``), or None when no input requires grad."""
        if not any(t.requires_grad for t in ZennitRule.input_tensors(args, kwargs)):
            return None

        def conv(a: Any) -> Any:
            return relevance_to_grad(a) if isinstance(a, Tensor) and a.requires_grad else a

        return tuple(conv(a) for a in args), {k: conv(v) for k, v in kwargs.items()}

    @staticmethod
    def outputs_to_relevance(out: Any) -> Any:
        """``out`` with gradient-to-relevance boundaries on every tensor output that has a ``grad_fn``
        (a tensor, or each tensor of a tuple/list), or None when nothing needs one (a forward-hook result)."""
        if isinstance(out, Tensor):
            return grad_to_relevance(out) if out.grad_fn is not None else None
        if isinstance(out, (tuple, list)) and any(isinstance(o, Tensor) and o.grad_fn is not None for o in out):
            new = [grad_to_relevance(o) if isinstance(o, Tensor) and o.grad_fn is not None else o for o in out]
            return type(out)(*new) if hasattr(out, "_fields") else type(out)(new)
        return None


def apply_zennit_canonizers(model: nn.Module, canonizers: Sequence[Any]) -> Callable[[], None]:
    """Apply zennit canonizers (copies of them) to ``model``; return the function that reverts them exactly.

    zennit's protocol is ``canonizer.apply(root) -> [instance, ...]``, each reverted by
    ``instance.remove()``. How a canonizer changes a module differs between zennit versions: 0.5.x's
    ``MergeBatchNorm`` overwrites the parameters' ``.data``; 1.0's stores the merged tensors as plain
    instance attributes (``object.__setattr__``) that shadow ``_parameters``/``_buffers`` -- non-leaf
    tensors still attached to the original parameters -- and its ``remove`` leaves those shadows behind,
    while a 1.0 rule's ``ParamMod`` (``load_state_dict(..., assign=True)``) replaces the shadowed
    parameter objects (zennit issue #237). So, judged by what happened rather than by version:

    * after ``apply``: every parameter/buffer shadow is moved into ``_parameters``/``_buffers`` (as a
      detached leaf ``Parameter``), so inside the scope a canonized module looks the same under either
      version -- a leaf parameter holding the canonized value -- and no autograd graph into the original
      parameters is shared between forward passes;
    * on revert: after the canonizers' own ``remove``, every module's ``_parameters`` and ``_buffers``
      hold exactly the original objects again and no shadow that was not there before remains.
    """
    modules = list(model.modules())
    saved = [(m, dict(m._parameters), dict(m._buffers),
              {k: m.__dict__[k] for k in (*m._parameters, *m._buffers) if k in m.__dict__}) for m in modules]
    instances: list = []

    def revert() -> None:
        try:
            for instance in reversed(instances):
                instance.remove()
        finally:
            instances.clear()
            for m, params, buffers, shadows in saved:
                for k in [k for k in m.__dict__ if (k in m._parameters or k in m._buffers or k in params
                                                      or k in buffers) and k not in shadows]:
                    del m.__dict__[k]
                m.__dict__.update(shadows)
                m._parameters.clear()
                m._parameters.update(params)
                m._buffers.clear()
                m._buffers.update(buffers)

    try:
        for canonizer in canonizers:
            canonizer = canonizer.copy() if hasattr(canonizer, "copy") else canonizer
            instances.extend(canonizer.apply(model) or ())
        for m in model.modules():
            _unshadow(m)
    except BaseException:
        revert()
        raise
    return revert


def _unshadow(module: nn.Module) -> None:
    """Move instance attributes that shadow a registered parameter or buffer into its registry slot."""
    for key in [k for k in module.__dict__ if k in module._parameters or k in module._buffers]:
        value = module.__dict__.pop(key)
        if key in module._parameters:
            old = module._parameters[key]
            if isinstance(value, Tensor) and not isinstance(value, nn.Parameter):
                value = nn.Parameter(value.detach(), requires_grad=old.requires_grad if old is not None else False)
            module._parameters[key] = value
        else:
            module._buffers[key] = value.detach() if isinstance(value, Tensor) else value


class ZennitCompositeRule(Rule):
    """Resolves, per module, to the zennit rule a zennit composite's ``module_map`` assigns to it.

    Parameters
    ----------
    composite : zennit.core.Composite
    assigned : dict
        ``{id(module): zennit rule or None}``, filled by the matcher that decides which sites it takes.
    """

    def __init__(self, composite: Any, assigned: dict) -> None:
        self.composite = composite
        self.assigned = assigned

    @classmethod
    def sites(cls) -> frozenset[str]:
        return frozenset({"layer", "affine", "activation", "softmax", "norm", "passthrough", "unknown"})

    def __repr__(self) -> str:
        return f"zennit composite {type(self.composite).__name__}"

    def resolve(self, site: Any) -> Rule:
        return ZennitRule(self.assigned[id(site.module)])

    def matcher(self) -> Callable[[Any], bool]:
        """The composite-entry matcher: a module site that the zennit composite's ``module_map`` rules."""
        ctx: dict = {}

        def matches(site: Any) -> bool:
            if site.module is None or site.op:
                return False
            key = id(site.module)
            if key not in self.assigned:
                self.assigned[key] = self.composite.module_map(ctx, site.name, site.module)
            return self.assigned[key] is not None

        return matches
