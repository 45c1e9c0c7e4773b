"""Speed fusions: the same rules, evaluated with less memory. Switchable off per scope.

**Epsilon into the following ReLU.** A dense layer with LRP-epsilon whose output only an ``nn.ReLU``
consumes hands its epsilon factor to that ReLU: the gradient at the layer output ``y`` is zero wherever
the ReLU output ``r`` is, and elsewhere ``y = r``, so scaling the gradient arriving at ``r`` by
``r / (r + eps)`` gives, after the ReLU's backward, exactly what scaling the gradient at ``y`` by
``|y| / (|y| + eps)`` gives -- but it reads ``r``, which the ReLU keeps for its own backward anyway, so
the factor costs no memory.

The pairs are found structurally (:func:`epsilon_relu_pairs`); whether a rule takes part is the rule's
own decision (:meth:`~lime_attr.rules.Rule.fusable_epsilon`, :meth:`~lime_attr.rules.Rule.is_relu_jacobian`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import _tangent
from ._grad import EpsilonScale, epsilon_grad_hook, modified_grad
from .registry import Rule

__all__ = ["epsilon_relu_pairs", "EpsilonReluFusion"]


def epsilon_relu_pairs(model: nn.Module, module_rules: list) -> dict[int, nn.Module]:
    """Dense layers whose epsilon a following ``nn.ReLU`` can apply: ``{id(layer): relu}``.

    Consecutive children of an ``nn.Sequential`` with the stock forward (each child's output is the next
    child's only input), each module used once in the model, the layer ruled with a fusable epsilon and
    the ReLU ruled as its own Jacobian. ``module_rules`` is a list of ``(site, rule)``.
    """
    ruled = {id(site.module): (site, rule) for site, rule in module_rules}
    counts: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    pairs: dict[int, nn.Module] = {}
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        kids = list(seq)
        for a, b in zip(kids, kids[1:]):
            if type(b) is not nn.ReLU or counts.get(id(a)) != 1 or counts.get(id(b)) != 1:
                continue
            la, lb = ruled.get(id(a)), ruled.get(id(b))
            if la is None or lb is None or la[0].kind != "layer" or lb[0].kind != "activation":
                continue
            if la[1].fusable_epsilon() is None or not lb[1].is_relu_jacobian():
                continue
            pairs[id(a)] = b
    return pairs


class EpsilonReluFusion:
    """The run-time half of the fusion for one scope: layer outputs waiting for their ReLU."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[Tensor, float]] = {}  # id(relu) -> (layer output, epsilon)

    def layer_rule(self, epsilon: float, relu: nn.Module) -> Rule:
        """The rule the layer gets instead of its epsilon rule."""
        return _DeferredEpsilon(epsilon, self.pending, id(relu))

    def claim(self, relu: nn.Module, args: tuple, out: Any) -> Any:
        """Forward hook of the ReLU: take over the layer's epsilon factor (or give the layer its own hook)."""
        pending = self.pending.pop(id(relu), None)
        if pending is None:
            return None
        y, eps = pending
        if not (args and args[0] is y and isinstance(out, Tensor) and out.requires_grad and torch.is_grad_enabled()):
            epsilon_grad_hook(y, eps)
            return None
        return modified_grad(out, out, EpsilonScale(out, eps, nonnegative=True))

    def flush(self) -> None:
        """Give every unclaimed layer output its ordinary epsilon hook (before any backward)."""
        while self.pending:
            y, eps = self.pending.popitem()[1]
            epsilon_grad_hook(y, eps)


class _DeferredEpsilon(Rule):
    """LRP-epsilon on a layer whose ReLU takes the factor over (see :class:`EpsilonReluFusion`)."""

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

    def fusable_epsilon(self) -> Optional[float]:
        return None

    def __repr__(self) -> str:
        return f"Epsilon(epsilon={self.epsilon})"


def _observed(module: nn.Module) -> bool:
    """Whether a forward hook besides the scope's own sees ``module``'s output (latent relevance, Captum's
    layer methods, a user's capture): then the gradient *at* the output must stay the one before the
    layer's epsilon factor, so the factor is not moved up to the ReLU."""
    return len(module._forward_hooks) > 1 or bool(nn.modules.module._global_forward_hooks)
