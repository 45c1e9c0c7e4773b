"""The hooks that apply a rule to one module instance, and a declared gated product's hooks.

Everything is registered through the scope's :class:`~lime_attr.installer.Installer`, so it is removed
on exit; ``state`` is the scope (the :class:`~lime_attr.context.ForwardState` protocol).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from .installer import Installer
from .rules import Rule
from .rules.primitives import scale_grad
from .sites import Site, disable_inplace, inplace_input_error

__all__ = ["install_module_rule", "install_product"]


def _site_applier(site: Site, rule: Rule) -> Callable[[Any, Tensor, Tensor], Tensor]:
    """``(module, x, y) -> y'``: the rule's method for the site's kind."""
    kind, spec = site.kind, site.spec
    if kind == "layer":
        return rule.apply_layer
    if kind == "affine":
        return rule.apply_affine
    if kind == "activation":
        return rule.apply_activation_module
    if kind == "softmax":
        return lambda mod, x, y: rule.apply_softmax(x, y)
    if kind == "norm":
        return lambda mod, x, y: rule.apply_norm(spec, x, y)

    def cannot(mod: Any, x: Tensor, y: Tensor) -> Tensor:
        raise RuntimeError(f"rule {rule!r} mapped to {kind!r} site {site.name!r}: cannot be applied")

    return cannot


def install_module_rule(site: Site, rule: Rule, installer: Installer, state: Any) -> None:
    """Apply ``rule`` to ``site.module``: a forward hook replaces the output by the rule's version.

    In-place modules (``nn.ReLU(inplace=True)``) overwrite the input the rule reads: they run out of
    place inside the scope (this instance only, restored on exit); any other in-place write into the
    input is caught by its version counter and reported.
    """
    module = site.module
    restore_inplace = disable_inplace(module)
    if restore_inplace is not None:
        installer.on_exit(restore_inplace)
    versions: list[tuple[Any, int]] = []  # (input, its version counter) per call
    apply = _site_applier(site, rule)

    def pre(mod: Any, args: tuple) -> None:
        state.enter_covered()
        x = args[0] if args else None
        versions.append((x, x._version) if isinstance(x, Tensor) and torch.is_grad_enabled()
                        and not x.is_inference() else (None, -1))

    def post(mod: Any, args: tuple, out: Any) -> Any:
        try:
            x_in, before = versions.pop() if versions else (None, -1)
            if not torch.is_grad_enabled() or not args or not isinstance(out, Tensor):
                return None
            # the module wrote into its input (a later pre-hook that passed a new tensor is no such write)
            if x_in is not None and args[0] is x_in and x_in._version != before:
                raise inplace_input_error(site, rule)
            return apply(mod, args[0], out)
        finally:
            state.exit_covered()

    installer.add_hook(module.register_forward_pre_hook(pre))
    installer.add_hook(module.register_forward_hook(post))


def install_product(site: Site, rule: Rule, installer: Installer, state: Any) -> None:
    """A canonizer-declared gated product ``consumer(act(gate) * up)`` (``site.spec``: a ProductSpec).

    The product's shares come from the rule (:meth:`~lime_attr.rules.Rule.product_weights`): the
    consumer's input gradient is scaled by the up share, the gate activation's output additionally by
    gate / up share, and an up factor with share 0 is detached.
    """
    w_gate, w_up = rule.product_weights(2)
    spec = site.spec
    scale_out = w_up if w_up != 0 else w_gate
    gate_extra = (w_gate / scale_out) if scale_out else 0.0
    if gate_extra != 1.0 and spec.gate is None:
        raise TypeError(f"product rule {rule!r} needs the gate module of {site.name}; the canonizer declares none")

    def pre(mod: Any, args: tuple) -> Any:
        if not torch.is_grad_enabled() or not args:
            return None
        return (scale_grad(args[0], scale_out, copy=False), *args[1:])

    installer.add_hook(spec.consumer.register_forward_pre_hook(pre))
    if spec.gate is not None:

        def gate_post(mod: Any, args: tuple, out: Any) -> Any:
            if not torch.is_grad_enabled() or (gate_extra == 1.0 and not state.checking_ops):
                return None
            # the gate's output is hidden from the op mode (computed with torch functions disabled, so not
            # marked input-dependent): the declared product it feeds is ruled by these hooks, and the op
            # mode must not rule that product a second time
            with torch._C.DisableTorchFunction():
                return scale_grad(out, gate_extra, copy=False) if gate_extra != 1.0 else out.view_as(out)

        installer.add_hook(spec.gate.register_forward_hook(gate_post))
    if w_up == 0 and spec.up is not None:
        installer.add_hook(spec.up.register_forward_hook(
            lambda mod, args, out: out.detach() if torch.is_grad_enabled() else None))
