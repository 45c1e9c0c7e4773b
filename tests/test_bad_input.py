"""Bad input fails loudly with a clear message; hand-written transformer code works through the op mode."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lime_attr import LRP, Composite, get_composite, get_rule, lrp_scope
from lime_attr.errors import (RuleParameterError, UncoveredModuleError, UncoveredOpError, UnknownNameError)

DT = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


# ------------------------------------------------------------------------------------------ inputs


@pytest.mark.parametrize("bad", [[[1.0, 2.0, 3.0, 4.0]], np.ones((1, 4), dtype=np.float32), 3.0, "x"],
                         ids=["list", "ndarray", "float", "str"])
def test_non_tensor_input(bad):
    with pytest.raises(TypeError, match="inputs must be a torch.Tensor or a tuple of tensors"):
        LRP(mlp()).attribute(bad, target=0)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_non_float_input(dtype):
    with pytest.raises(TypeError, match="LRP needs a floating-point tensor"):
        LRP(mlp()).attribute(torch.ones(2, 4, dtype=dtype), target=0)


def test_non_tensor_inside_tuple():
    with pytest.raises(TypeError, match="input 1 must be a torch.Tensor"):
        LRP(mlp()).attribute((torch.ones(1, 4), [1.0]), target=0)


def test_wrong_shape_for_the_model():
    with pytest.raises(RuntimeError, match=r"forward failed on input\(s\) of shape \(2, 5\).*mat1 and mat2"):
        LRP(mlp()).attribute(torch.ones(2, 5), target=0)


@pytest.mark.parametrize("shape,match", [((), "scalar; inputs need a batch dimension"), ((0, 4), "is empty")])
def test_scalar_and_empty_inputs(shape, match):
    with pytest.raises(ValueError, match=match):
        LRP(mlp()).attribute(torch.ones(shape), target=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(value):
    x = torch.ones(2, 4)
    x[1, 2] = value
    with pytest.raises(ValueError, match=r"contains 1 NaN/inf value\(s\)"):
        LRP(mlp()).attribute(x, target=0)


def test_non_finite_output():
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.fill_(1e38)
    with pytest.raises(FloatingPointError, match="explained output is NaN/inf"):
        LRP(model).attribute(torch.full((1, 4), 1e5), target=0)


def test_function_instead_of_module():
    with pytest.raises(TypeError, match="needs the model itself"):
        LRP(lambda x: x.sum(1))


def test_plain_model_rejects_model_kwargs():
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['mask'\\]"):
        LRP(mlp()).attribute(torch.ones(1, 4), target=0, mask=None)


# ----------------------------------------------------------------------------------------- targets


@pytest.mark.parametrize("target,exc,match", [
    (3, IndexError, "target 3 is out of range for an output dimension of size 3"),
    (-4, IndexError, "target -4 is out of range"),
    ((5,), IndexError, "target 5 is out of range"),
    ((1, 2), ValueError, "has 2 indices but the output has only 1 non-batch dimensions"),
    ([0, 7], IndexError, "target 7 is out of range"),
    ([0, 1, 2], ValueError, "one entry per example: 3 targets for 2 examples"),
    (torch.tensor([0, 9]), IndexError, "target 9 is out of range"),
    (torch.tensor([[0, 1]]), ValueError, "one index per example"),
    ("a", TypeError, "unsupported target 'a'"),
    (1.5, TypeError, "unsupported target 1.5"),
    (None, ValueError, "target=None needs a scalar output per example"),
], ids=["int", "negative int", "tuple", "tuple too long", "list", "list length", "tensor", "2-D tensor", "str",
        "float", "None"])
def test_bad_targets(target, exc, match):
    with pytest.raises(exc, match=match):
        LRP(mlp()).attribute(torch.ones(2, 4), target=target)


# -------------------------------------------------------------------------------- names and parameters


def test_unknown_rule_lists_available():
    with pytest.raises(UnknownNameError, match="unknown rule 'epsilonn'; available rules: .*epsilon.*zplus"):
        get_rule("epsilonn")
    with pytest.raises(UnknownNameError, match="unknown rule 'nope'; available rules: alpha_beta"):
        Composite([("site:layer", "nope")])


def test_unknown_composite_lists_available():
    with pytest.raises(UnknownNameError, match="unknown composite 'foo'; available composites: attnlrp, cp-lrp"):
        get_composite("foo")
    with pytest.raises(UnknownNameError, match="unknown composite 'foo'"):
        LRP(mlp(), "foo").attribute(torch.ones(1, 4), target=0)


@pytest.mark.parametrize("name,params,match", [
    ("epsilon", dict(epsilon=-1e-3), "epsilon must be a finite number >= 0"),
    ("epsilon", dict(epsilon=float("nan")), "epsilon must be a finite number >= 0"),
    ("gamma", dict(gamma=-0.25), "gamma must be a finite number >= 0"),
    ("gamma", dict(stabilizer=-1.0), "stabilizer must be a finite number >= 0"),
    ("alpha_beta", dict(alpha=2.0, beta=2.0), "alpha - beta must equal 1"),
    ("alpha_beta", dict(alpha=3.0, beta=1.0), "alpha - beta must equal 1"),
    ("alpha_beta", dict(alpha=-1.0, beta=-2.0), "alpha must be a finite number >= 0"),
    ("zbox", dict(low=1.0, high=0.0), "low must be <= high"),
    ("zbox", dict(low=torch.zeros(3), high=torch.tensor([1.0, -1.0, 1.0])), "low must be <= high"),
    ("uniform", dict(weights=(0.7, 0.7)), "weights must sum to 1"),
])
def test_rule_parameters_out_of_range(name, params, match):
    with pytest.raises(RuleParameterError, match=match):
        get_rule(name, **params)


def test_unknown_rule_parameter():
    with pytest.raises(TypeError, match=r"rule 'epsilon' takes parameters \['epsilon'\]"):
        get_rule("epsilon", eps=0.1)


def test_rule_errors_are_also_builtin_errors():
    with pytest.raises(ValueError):
        get_rule("gamma", gamma=-1)
    with pytest.raises(KeyError):
        get_rule("nope")


# ------------------------------------------------------------------------------------------ coverage


class Scale(nn.Module):
    """A custom module with its own parameter: no rule knows what it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * self.w


def test_custom_module_with_parameter_is_uncovered():
    model = nn.Sequential(Scale(), nn.Linear(4, 2))
    with pytest.raises(UncoveredModuleError,
                       match=r"(?s)does not cover these modules.*0 \(Scale, unknown\): unknown module type"):
        LRP(model, "epsilon-plus").attribute(torch.ones(1, 4), target=0)
    # a rule mapped to it by name must support its kind: "gradient" does not apply to an unknown module
    comp = get_composite("epsilon-plus").prepend(("0", "gradient"))
    with pytest.raises(UncoveredModuleError, match="matched .*which does not apply to .unknown."):
        LRP(model, comp).attribute(torch.ones(1, 4), target=0)


def test_layernorm_without_norm_rule_is_uncovered():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    comp = Composite([("site:layer", "epsilon"), ("site:activation", "identity")])
    with pytest.raises(UncoveredModuleError, match=r"1 \(LayerNorm, norm\): no rule for this kind"):
        LRP(model, comp).attribute(torch.ones(1, 4), target=0)


def test_rule_mapped_to_wrong_kind_is_named():
    comp = Composite([("site:layer", "identity"), ("site:activation", "identity")])
    with pytest.raises(UncoveredModuleError, match="matched Identity\\(\\), which does not apply to 'layer'"):
        LRP(mlp(), comp).attribute(torch.ones(1, 4), target=0)


class Exp(nn.Module):
    def forward(self, x):
        return torch.exp(x)


class DivideBySum(nn.Module):
    def forward(self, x):
        return x / x.sum(-1, keepdim=True)


class Square(nn.Module):
    def forward(self, x):
        return x ** 2


@pytest.mark.parametrize("module,op", [(Exp, "exp"), (DivideBySum, "div"), (Square, "pow")])
def test_uncovered_functional_op(module, op):
    model = nn.Sequential(nn.Linear(4, 4), module(), nn.Linear(4, 2))
    with pytest.raises(UncoveredOpError, match=f"op '{op}' on an input-dependent path inside module '1'"):
        LRP(model, "attnlrp").attribute(torch.ones(1, 4), target=0)


def test_uncovered_op_is_not_masked_by_operator_protocol():
    """torch turns a TypeError inside ``a / b`` into NotImplemented; the error must survive as ours."""
    assert not issubclass(UncoveredOpError, TypeError)


def test_op_on_constant_path_is_fine():
    class ConstExp(nn.Module):
        def forward(self, x):
            return x * torch.exp(torch.ones(4))  # exp of a constant: not on the input path

    model = nn.Sequential(nn.Linear(4, 4), ConstExp(), nn.Linear(4, 2))
    LRP(model, "attnlrp").attribute(torch.ones(1, 4), target=0)


def test_product_without_rule_is_uncovered():
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * self.b(x)

    model = nn.Sequential(Gate(), nn.Linear(4, 2))
    comp = Composite([("site:layer", "epsilon")])
    with pytest.raises(UncoveredOpError, match="product op 'mul' .* has no rule in composite"):
        LRP(model, comp).attribute(torch.ones(1, 4), target=0)
    LRP(model, "attnlrp").attribute(torch.ones(1, 4), target=0)  # uniform rule covers it


def test_first_layer_rule_on_inner_layer():
    comp = Composite([("site:layer", "flat"), ("site:activation", "identity")])
    with pytest.raises(ValueError, match="first-layer rule .* whose input is not a model input"):
        LRP(mlp(), comp).attribute(torch.ones(1, 4), target=0)


def test_bad_scope_arguments():
    with pytest.raises(ValueError, match="check_ops must be"):
        with lrp_scope(mlp(), check_ops="sometimes"):
            pass
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        with lrp_scope(lambda x: x):
            pass
    with pytest.raises(TypeError, match="unknown matcher 3"):
        LRP(mlp(), Composite([(3, "epsilon")])).attribute(torch.ones(1, 4), target=0)


# ------------------------------------------------------ hand-written transformer block through the op mode


class Block(nn.Module):
    """A pre-norm transformer block written by hand: parameters only in Linear / LayerNorm children."""

    def __init__(self, d: int = 8, heads: int = 2, fused: bool = True) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.head = nn.Linear(d, 3)
        self.heads, self.fused = heads, fused

    def split(self, t):
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        b, n, d = x.shape
        h = self.ln1(x)
        q, k, v = self.split(self.q(h)), self.split(self.k(h)), self.split(self.v(h))
        if self.fused:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            a = torch.softmax(s, dim=-1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, n, d))
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x[:, -1])


def reference_attnlrp_explicit(block: Block, x: torch.Tensor, target: int) -> torch.Tensor:
    """AttnLRP for ``Block`` written out in gradient form with explicit stop-gradients (no lime_attr):
    bilinear rule = each factor of q k^T and of A V gets half the gradient, softmax = its plain gradient,
    norm rule = sigma constant, identity rule on GELU = gelu(z) / z constant."""

    def half(t):
        return t * 0.5 + (t * 0.5).detach()

    def norm(ln, t):
        c = t - t.mean(-1, keepdim=True)
        sigma = torch.sqrt(c.detach().pow(2).mean(-1, keepdim=True) + ln.eps)
        return c / sigma * ln.weight + ln.bias

    x = x.clone().requires_grad_(True)
    b, n, d = x.shape
    h = norm(block.ln1, x)
    q, k, v = block.split(block.q(h)), block.split(block.k(h)), block.split(block.v(h))
    s = half(q) @ half(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    a = half(torch.softmax(s, -1)) @ half(v)
    out = x + block.o(a.transpose(1, 2).reshape(b, n, d))
    z = block.fc1(norm(block.ln2, out))
    out = out + block.fc2(z * (F.gelu(z) / z).detach())
    logit = block.head(out[:, -1])[:, target]
    (g,) = torch.autograd.grad(logit.sum(), x)
    return (x * g).detach()


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "matmul+softmax"])
def test_hand_written_transformer_block_attnlrp_agrees_with_explicit_rules(fused):
    torch.manual_seed(3)
    block = Block(fused=fused).to(DT)
    x = torch.randn(2, 5, 8, dtype=DT)
    ours = LRP(block, "attnlrp").attribute(x, target=1)
    ref = reference_attnlrp_explicit(block, x, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-11)


def test_hand_written_block_sdpa_equals_explicit_attention():
    torch.manual_seed(4)
    fused, explicit = Block(fused=True).to(DT), Block(fused=False).to(DT)
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(1, 6, 8, dtype=DT)
    for comp in ("attnlrp", "cp-lrp"):
        torch.testing.assert_close(LRP(fused, comp).attribute(x, target=0), LRP(explicit, comp).attribute(x, target=0),
                                   rtol=1e-9, atol=1e-11)


def test_hand_written_block_records_ruled_ops():
    from lime_attr.scope import LRPScope

    block = Block(fused=False).to(DT)
    scope = LRPScope(block, "attnlrp")
    x = torch.randn(1, 4, 8, dtype=DT, requires_grad=True)
    with scope:
        block(x)
    kinds = {r.split(":")[0] for r in scope.ruled_ops}
    assert {"matmul", "softmax", "activation"} <= kinds
