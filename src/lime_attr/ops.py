"""Op-level coverage: the function mode that finds and rules the ops inside a model's forward.

While the model runs inside a scope, :class:`RuleMode` (a ``TorchFunctionMode`` pushed only around that
model's own forward) sees every torch function call. It tracks which tensors depend on the explained
input and classifies each call on an input-dependent path:

* linear or piecewise-linear ops (add, reshape, linear, conv, pooling, ...): nothing to do;
* ops with a rule site (``product`` -- elementwise product of two input-dependent tensors, ``matmul``,
  ``softmax``, ``attention`` -- a fused kernel, ``activation``, ``norm``): the composite's rule is
  applied to that call;
* anything else (``exp``, a division by an input-dependent tensor, ...): :class:`UncoveredOpError`.

Ops executed inside a module that a module rule already covers (a norm, an activation, a layer) or
inside a canonizer's attention function are not looked at.
"""
from __future__ import annotations

import operator
import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .errors import UncoveredOpError
from .rules.primitives import replace_grad
from .specs import NormSpec

__all__ = ["RuleMode", "op_name"]

T = torch.Tensor


def _names(*fns: Any) -> set:
    return {f for f in fns if f is not None}


def _getattr_all(owner: Any, names: str) -> list:
    return [getattr(owner, n, None) for n in names.split()]


_LINEAR_NAMES = (
    "add sub neg reshape view view_as permute transpose t contiguous flatten unflatten squeeze unsqueeze expand "
    "expand_as repeat repeat_interleave cat concat concatenate stack split chunk narrow select index_select "
    "gather take take_along_dim roll flip clone detach to type float double half bfloat16 cumsum sum mean "
    "movedim moveaxis swapaxes swapdims unbind tile masked_fill pad narrow_copy diagonal tril triu "
    "__getitem__ __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ __neg__ __pos__ squeeze_ unsqueeze_ "
    "zeros_like ones_like full_like empty_like new_zeros new_ones new_empty new_full size dim numel "
    "__len__ __setitem__ copy_ add_ sub_ mul_ contiguous split_with_sizes index_add index_add_ index_copy "
    "scatter scatter_add scatter_add_ where linear conv1d conv2d conv3d "
    "embedding dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout avg_pool1d "
    "avg_pool2d avg_pool3d adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d max_pool1d max_pool2d "
    "max_pool3d adaptive_max_pool1d adaptive_max_pool2d max_pool1d_with_indices max_pool2d_with_indices "
    "interpolate __format__ __repr__ item tolist numpy cpu cuda requires_grad_ is_floating_point "
    "data_ptr storage_offset stride is_contiguous __bool__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ "
    "eq ne lt le gt ge isnan isinf isfinite any all argmax argmin max_values sign "
    "broadcast_to as_strided unfold fold pixel_shuffle pixel_unshuffle channel_shuffle real imag "
    "__array__ dtype shape device grad_fn requires_grad is_leaf "
    "retain_grad register_hook __hash__ __contains__ __iter__ __reversed__ __index__ __int__ __float__ "
    "masked_select new_tensor flatten_ sort topk_indices nonzero argsort bincount unique __get__ __set__ "
    "element_size nbytes itemsize is_complex get_device dim_order fill_ zero_ normal_ uniform_ apply_ "
    "index_put index_put_ masked_fill_ expand_copy view_copy reshape_as new_empty_strided "
    "masked_scatter masked_scatter_"  # multimodal merges: features written into placeholder positions
)
_LINEAR = set(_LINEAR_NAMES.split())

_ACTIVATION = set(
    "relu relu_ silu silu_ gelu tanh tanh_ sigmoid sigmoid_ leaky_relu leaky_relu_ elu elu_ selu celu "
    "softplus mish hardtanh hardtanh_ relu6 hardswish hardsigmoid logsigmoid softsign tanhshrink "
    "gelu_ _gelu".split()
)
_PRODUCT = {"mul", "__mul__", "__rmul__", "multiply", "__imul__"}
_DIVIDE = {"div", "__truediv__", "divide", "true_divide", "__itruediv__", "div_"}
_MATMUL = {"matmul", "__matmul__", "__rmatmul__", "bmm", "mm", "einsum", "baddbmm_"}
_SOFTMAX = {"softmax", "_softmax"}
# fused kernels taking (query, key, value, ...) first; for torch.nn.MultiheadAttention the q/k/v are the inputs
# of its (linear) in-projection, so scaling their gradients is the same as scaling the projected ones
_ATTENTION = {"scaled_dot_product_attention", "multi_head_attention_forward"}
_NORM = {"layer_norm", "rms_norm", "normalize"}
_MAXLIKE = {"max", "min", "amax", "amin", "maximum", "minimum", "clamp", "clip", "clamp_min", "clamp_max",
            "topk", "sort"}  # piecewise-selection: gradient = selection


def op_name(func: Callable) -> str:
    """A stable name of a torch function / tensor method."""
    name = getattr(func, "__name__", None) or repr(func)
    return name


def tensors_in(obj: Any, out: Optional[list] = None) -> list:
    """Every tensor in ``obj`` (nested lists, tuples and dict values), appended to ``out``."""
    out = [] if out is None else out
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            tensors_in(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            tensors_in(o, out)
    return out



class _IdSet:
    """A set of tensors by identity (tensors compare elementwise, so WeakSet cannot hold them)."""

    def __init__(self) -> None:
        self._refs: dict[int, Any] = {}

    def add(self, t: Tensor) -> None:
        key = id(t)
        if key not in self._refs:
            self._refs[key] = weakref.ref(t, lambda _r, k=key: self._refs.pop(k, None))

    def __contains__(self, t: Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


class RuleMode(TorchFunctionMode):
    """Applies op rules and checks op coverage while one model's forward runs (see module docstring).

    Parameters
    ----------
    scope : lime_attr.scope.LRPScope
        The scope that owns this mode; it provides ``rule_for_op``, the tracked input tensors and the
        covered-module depth.
    apply_rules : bool
        Apply the composite's rules to op sites (``False`` only records and checks).
    """

    def __init__(self, scope: Any, apply_rules: bool = True) -> None:
        super().__init__()
        self.scope = scope
        self.apply_rules = apply_rules
        self.dependent = _IdSet()
        self.ruled_ops: set[str] = set()
        self.uncovered: list[str] = []

    # -- dependence tracking
    def seed(self, tensors: list) -> None:
        for t in tensors:
            if isinstance(t, Tensor):
                self.dependent.add(t)

    def depends(self, t: Any) -> bool:
        if not isinstance(t, Tensor):
            return False
        if t in self.dependent:
            # a tensor without gradient (detached by a rule, e.g. CP-LRP's constant attention weights or
            # gates) cannot carry relevance, so no op on it can hide a plain gradient
            return t.requires_grad
        # leaves that require grad but are not parameters (e.g. inputs, perturbations) count as inputs
        return t.requires_grad and t.grad_fn is None and not isinstance(t, torch.nn.Parameter)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: C901
        kwargs = kwargs or {}
        scope = self.scope
        if not torch.is_grad_enabled():
            return func(*args, **kwargs)
        if scope.covered_depth > 0:
            # inside a module (or attention kernel) a rule covers: not checked, but what it computes from
            # the input stays input-dependent, so the ops after it are still seen
            out = func(*args, **kwargs)
            if any(self.depends(t) for t in tensors_in(args) + tensors_in(kwargs)):
                self.mark(out)
            return out
        name = op_name(func)
        ins = tensors_in(args) + tensors_in(kwargs)
        deps = [t for t in ins if self.depends(t)]
        if not deps or name in _LINEAR:
            out = func(*args, **kwargs)
            if deps:
                self.mark(out)
            return out
        kind = self._classify(name, func, args, kwargs, deps)
        if kind == "linear":
            out = func(*args, **kwargs)
            self.mark(out)
            return out
        if kind is None:
            self.uncovered.append(name)
            raise UncoveredOpError(
                f"op {name!r} on an input-dependent path inside module {scope.current_module_name()!r} "
                f"({scope.current_module_type()}) is not covered by any LRP rule, so its relevance would be "
                "a silent plain gradient. Cover it: write a canonizer that handles this module "
                "(docs: writing_a_canonizer), or map the site with a rule in the composite "
                f"(e.g. ('op:{name}', rule) or the module's name)."
            )
        rule = scope.rule_for_op(kind, name)
        if rule is None:
            raise UncoveredOpError(
                f"{kind} op {name!r} inside module {scope.current_module_name()!r} has no rule in composite "
                f"{scope.composite.name!r}; add ('site:{kind}', rule) to the composite."
            )
        self.ruled_ops.add(f"{kind}:{name}")
        out = self._apply(kind, rule, func, args, kwargs) if self.apply_rules else func(*args, **kwargs)
        self.mark(out)
        return out

    def mark(self, out: Any) -> None:
        for t in tensors_in(out):
            if t.is_floating_point() or t.is_complex():
                self.dependent.add(t)

    def _classify(self, name: str, func, args, kwargs, deps) -> Optional[str]:
        if name in _ACTIVATION:
            return "activation"
        if name in _SOFTMAX:
            return "softmax"
        if name in _ATTENTION:
            return "attention"
        if name in _NORM:
            return "norm"
        if name in _MAXLIKE or name.startswith("_"):
            return "linear" if name in _MAXLIKE else None
        tens = [a for a in args[:2] if isinstance(a, Tensor)]
        if name in _PRODUCT:
            live = [a for a in args[:2] if self.depends(a)]
            if len(live) >= 2 and self.scope.declared_product_depth > 0:
                return "linear"  # the canonizer-declared gated product: ruled by the scope's hooks
            return "product" if len(live) >= 2 else "linear"
        if name in _MATMUL:
            if name == "einsum":
                live = [a for a in tensors_in(args[1:]) if self.depends(a)]
            else:
                live = [a for a in args[:2] if self.depends(a)]
            return "matmul" if len(live) >= 2 else "linear"
        if name in _DIVIDE:
            den = args[1] if len(args) > 1 else kwargs.get("other")
            if not self.depends(den):
                return "linear"
            # inside a module a canonizer declares normalising (e.g. MoE top-k weights / their sum):
            # a normalisation, ruled like a norm (the normaliser held constant)
            if self.scope.in_normalizing_module():
                return "norm"
            return None
        return None

    def _apply(self, kind: str, rule, func, args, kwargs):
        if kind == "activation":
            x = args[0]
            name = op_name(func)
            if name.endswith("_") or kwargs.get("inplace") or (len(args) > 1 and args[-1] is True):
                raise UncoveredOpError(
                    f"in-place activation {name!r} inside module {self.scope.current_module_name()!r} overwrites "
                    "its input, so the activation rule would see the output instead of the input and give a "
                    f"silently wrong relevance. Use the out-of-place op ({name.rstrip('_')}(x), "
                    "inplace=False) in the model's forward."
                )
            return rule.apply_activation(x, func(*args, **kwargs))
        if kind == "softmax":
            x = args[0]
            return rule.apply_softmax(x, func(*args, **kwargs))
        if kind == "product":
            a, b = rule.apply_product([args[0], args[1]])
            return func(a, b, *args[2:], **kwargs)
        if kind == "matmul":
            if op_name(func) == "einsum":
                ops = list(args[1:]) if not (len(args) == 2 and isinstance(args[1], (list, tuple))) else list(args[1])
                live = [i for i, t in enumerate(ops) if self.depends(t)]
                a, b = rule.apply_matmul(ops[live[0]], ops[live[1]])
                ops[live[0]], ops[live[1]] = a, b
                return func(args[0], *ops, **kwargs)
            a, b = rule.apply_matmul(args[0], args[1])
            return func(a, b, *args[2:], **kwargs)
        if kind == "attention":
            q = args[0] if len(args) > 0 else kwargs.pop("query")
            k = args[1] if len(args) > 1 else kwargs.pop("key")
            v = args[2] if len(args) > 2 else kwargs.pop("value")
            q, k, v = rule.apply_attention(q, k, v)
            return func(q, k, v, *args[3:], **kwargs)
        if kind == "norm" and op_name(func) in _DIVIDE:
            if not rule.holds_normalizer_constant():
                raise TypeError(f"a normalising division needs the 'norm' rule at 'site:norm', got {rule!r}")
            den = args[1] if len(args) > 1 else kwargs.pop("other")
            # the same (possibly in-place) op with the normaliser constant
            return func(args[0], den.detach(), *args[2:], **kwargs)
        if kind == "norm":
            y = func(*args, **kwargs)
            name = op_name(func)
            x = args[0]
            if name == "layer_norm":
                shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                w = args[2] if len(args) > 2 else kwargs.get("weight")
                b = args[3] if len(args) > 3 else kwargs.get("bias")
                eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
                spec = NormSpec("layernorm", None if w is None else w.detach(), None, eps, dims=len(shape), upcast=False)
                out = rule.apply_norm(spec, x, y if b is None else y - b.detach())
                return out if b is None else out + b
            if name == "rms_norm":
                shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
                w = args[2] if len(args) > 2 else kwargs.get("weight")
                eps = args[3] if len(args) > 3 else kwargs.get("eps")
                spec = NormSpec("rmsnorm", None if w is None else w.detach(), None,
                                torch.finfo(x.dtype).eps if eps is None else eps, dims=len(shape), upcast=False)
                return rule.apply_norm(spec, x, y)
            # F.normalize(x, p=2, dim=-1): x / ||x|| with the norm constant
            p = args[1] if len(args) > 1 else kwargs.get("p", 2.0)
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 1)
            denom = x.detach().norm(p=p, dim=dim, keepdim=True).clamp_min(kwargs.get("eps", 1e-12))
            return replace_grad(y, x / denom)
        raise AssertionError(kind)
