"""The per-forward state of a scope: what rules, canonizers' attention bridge and the op mode read.

:class:`ScopeState` implements the :class:`~lime_attr.context.ForwardState` protocol for
:class:`~lime_attr.scope.LRPScope` (which adds resolve, install and restore): the attention rules and
transforms, the first-layer carriers, the module stack and coverage depths the op-coverage check reads,
and the dependence marks of that check.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

from .installer import Installer
from .ops import RuleMode
from .rules import Rule
from .sites import Site

__all__ = ["ScopeState", "TransformHandle"]


class ScopeState:
    """Per-forward state of one scope on one model (see the module docstring).

    Parameters
    ----------
    model : nn.Module
    composite : Composite
        Asked for the rules of op sites found while the model runs.
    """

    def __init__(self, model: nn.Module, composite: Any) -> None:
        self.model = model
        self.composite = composite
        self.ruled_ops: set[str] = set()
        #: depth of nested modules / kernels whose ops a rule covers (read by the op mode)
        self.covered_depth = 0
        #: depth of nested canonizer-declared gated products (read by the op mode)
        self.declared_product_depth = 0
        self._installer = Installer()
        self._module_stack: list[tuple[str, nn.Module]] = []
        self._carriers: list[tuple[Tensor, Tensor]] = []
        self._attention: dict[int, Rule] = {}
        self._transforms: dict[str, list[Callable]] = {"before_rule": [], "after_rule": []}
        #: the transforms added with ``also_without_grad=True`` (they also run in no-grad forwards)
        self._no_grad_transforms: dict[str, list[Callable]] = {"before_rule": [], "after_rule": []}
        self._op_rule_cache: dict[tuple, Optional[Rule]] = {}
        self._active = False
        self._mode: Optional[RuleMode] = None  # the op mode while it runs

    # ------------------------------------------------------------------ the ForwardState protocol
    @property
    def active(self) -> bool:
        """Whether the scope is installed on its model (between ``__enter__`` and ``__exit__``)."""
        return self._active

    @property
    def checking_ops(self) -> bool:
        """Whether the op mode (op rules and the op-coverage check) runs in the current forward."""
        return self._mode is not None

    @property
    def module_stack(self) -> tuple[tuple[str, nn.Module], ...]:
        """``(name, module)`` of the modules the current forward is inside (while the op mode runs)."""
        return tuple(self._module_stack)

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

    def add_attention_transform(self, transform: Callable, *, stage: str = "before_rule",
                                also_without_grad: bool = False) -> "TransformHandle":
        """Run ``transform(module, q, k, v, kwargs) -> (q, k, v)`` on every attention call of this scope.

        Parameters
        ----------
        transform : callable
            Gets the attention kernel's inputs ``[batch, heads, seq, head_dim]`` (after RoPE). It may return
            keys and values with one head per *query* head (the grouped-query repeat done, e.g. to add a
            perturbation per query head): the kernel is then called with no grouping.
        stage : {"before_rule", "after_rule"}
            ``"before_rule"`` (default): on the inputs of the attention rule, so that the rule's gradient
            scaling (AttnLRP: q, k by 1/4, v by 1/2) also acts on whatever the transform adds.
            ``"after_rule"``: between the rule and the kernel, so that what the transform adds receives the
            kernel's undivided gradient -- where the released LIME code adds its perturbations.
        also_without_grad : bool
            ``False`` (default): the transform runs only in forwards with gradients enabled (a no-grad forward
            inside the scope is the plain model). ``True``: it also runs when gradients are disabled
            (``torch.no_grad()``), where the attention rule is skipped (rules change gradients only) and the
            other transforms of the stage are not run -- e.g. to apply a fixed perturbation in a cheap
            no-grad forward.

        Returns
        -------
        TransformHandle
            ``remove()`` takes the transform out again (idempotent; also a context manager). Transforms of
            one stage run in the order they were added.
        """
        if not callable(transform):
            raise TypeError(f"an attention transform must be callable as transform(module, q, k, v, kwargs) -> "
                            f"(q, k, v), got {transform!r}")
        if stage not in self._transforms:
            raise ValueError(f"unknown attention-transform stage {stage!r}; use one of {sorted(self._transforms)}")
        if not isinstance(also_without_grad, bool):
            raise TypeError(f"also_without_grad must be a bool, got {also_without_grad!r}")
        lists = [self._transforms[stage]] + ([self._no_grad_transforms[stage]] if also_without_grad else [])
        for transforms in lists:
            transforms.append(transform)
        return TransformHandle(lists, transform)

    @property
    def has_no_grad_transforms(self) -> bool:
        """Whether an attention transform was added with ``also_without_grad=True`` (and not removed)."""
        return any(self._no_grad_transforms.values())

    def transform_attention(self, module: nn.Module, q: Tensor, k: Tensor, v: Tensor, kwargs: dict,
                            stage: str = "before_rule", grad: bool = True) -> tuple:
        """``(q, k, v)`` after every attention transform of this scope at ``stage`` (with ``grad=False``: only
        those added with ``also_without_grad=True``)."""
        for transform in (self._transforms if grad else self._no_grad_transforms)[stage]:
            q, k, v = transform(module, q, k, v, kwargs)
        return q, k, v

    def rule_for_op(self, kind: str, name: str) -> Optional[Rule]:
        """The composite's rule for an op site ``kind`` (torch function ``name``) in the current module."""
        mod_name = self.current_module_name()
        key = (kind, name, mod_name)
        if key not in self._op_rule_cache:
            module = self._module_stack[-1][1] if self._module_stack else self.model
            self._op_rule_cache[key] = self.composite.rule_for(Site(kind, mod_name, module, op=name))
        return self._op_rule_cache[key]

    def current_module_name(self) -> str:
        """Qualified name of the innermost module the forward is in ("" at the root)."""
        return self._module_stack[-1][0] if self._module_stack else ""

    def current_module_type(self) -> str:
        """Class name of the innermost module the forward is in."""
        return type(self._module_stack[-1][1]).__name__ if self._module_stack else type(self.model).__name__

    def in_normalizing_module(self) -> bool:
        """Whether the forward is inside a module a canonizer declared normalizing."""
        return self._installer.has_normalizing and any(self._installer.is_normalizing(m) for _, m in self._module_stack)

    def mark_dependent(self, out: Any, like: Optional[Tensor] = None) -> None:
        """Tell the op-coverage check that ``out`` depends on the explained input (when ``like`` does).

        For rules and adapters whose computation is hidden from the check (an ``autograd.Function``, a
        zennit hook): without this the ops after them would not be seen. No-op outside a checked forward.
        """
        mode = self._mode
        if mode is not None and (like is None or mode.depends(like)):
            mode.mark(out)

    def depends_on_input(self, *tensors: Any) -> bool:
        """Whether the op-coverage check sees any of ``tensors`` as depending on the explained input."""
        mode = self._mode
        return mode is not None and any(isinstance(t, Tensor) and mode.depends(t) for t in tensors)

    def enter_covered(self) -> None:
        """Ops from here on are covered by a rule (a module or kernel the scope rules)."""
        self.covered_depth += 1

    def exit_covered(self) -> None:
        """End of the span opened by :meth:`enter_covered`."""
        self.covered_depth = max(self.covered_depth - 1, 0)

    def _track(self, module: nn.Module, name: str, installer: Any) -> None:
        installer.add_hook(module.register_forward_pre_hook(lambda m, a: self._module_stack.append((name, m))))
        installer.add_hook(module.register_forward_hook(lambda m, a, o: self._pop_module()))

    def _pop_module(self) -> None:
        if self._module_stack:
            self._module_stack.pop()

    def _enter_product(self, step: int) -> None:
        self.declared_product_depth = max(self.declared_product_depth + step, 0)


class TransformHandle:
    """Removable handle of an attention transform (see :meth:`LRPScope.add_attention_transform`)."""

    def __init__(self, transforms: list, transform: Callable) -> None:
        self._lists, self._transform = transforms, transform

    def remove(self) -> None:
        """Take the transform out (no-op if it is already out)."""
        for transforms in self._lists:
            if self._transform in transforms:
                transforms.remove(self._transform)

    def __enter__(self) -> "TransformHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()
