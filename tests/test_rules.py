"""Rules: per-layer conservation (property-based), agreement with written-out formulas, custom rules.

Relevance convention (gradient form): a backward pass seeded with ``g`` at a layer's output ``y`` carries
the relevance ``R_out = y * g``; the rule-modified gradient ``g_in`` at its input ``x`` gives
``R_in = x * g_in`` (plus ``carrier * d/d carrier`` for first-layer rules whose relevance does not carry
a factor ``x``). Everything here runs in float64.
"""
from __future__ import annotations

import dataclasses
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lime_attr import Composite, LRP, available_rules, get_rule, lrp_scope
from lime_attr.rules import Rule
from lime_attr.scope import LRPScope



@pytest.fixture(autouse=True, scope="module")
def _float64():
    """Everything in this module runs in float64; the global default is restored afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


TINY = 1e-30  # stabiliser small enough not to absorb relevance in float64
HSETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])

LAYER_RULES = {
    "epsilon": dict(epsilon=TINY),
    "gamma": dict(gamma=0.25, stabilizer=TINY),
    "zplus": dict(stabilizer=TINY),
    "alpha_beta": dict(alpha=2.0, beta=1.0, stabilizer=TINY),
    "flat": dict(stabilizer=TINY),
    "wsquare": dict(stabilizer=TINY),
    "zbox": dict(low=-4.0, high=4.0, stabilizer=TINY),
}


# ------------------------------------------------------------------------------------------- helpers


def layer_relevance(layer: nn.Module, rule: Rule, x: torch.Tensor, seed: torch.Tensor):
    """(R_in, R_out) of one layer under ``rule`` for the upstream gradient ``seed``."""
    model = nn.Sequential(layer)
    x = x.detach().clone().requires_grad_(True)
    scope = LRPScope(model, Composite([("site:layer", rule)]))
    with scope:
        y = model(x)
        carriers = scope.pop_carriers()
        grads = torch.autograd.grad(y, [x] + [c for _, c in carriers], seed, allow_unused=True)
    r_in = x * grads[0] if grads[0] is not None else torch.zeros_like(x)
    for (_, c), g in zip(carriers, grads[1:]):
        if g is not None:
            r_in = r_in + c * g
    return r_in.detach(), (y * seed).detach()


def make_layer(kind: str, c_in: int, c_out: int, bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(c_in, c_out, bias=bias)
    return nn.Conv2d(c_in, c_out, 3, padding=1, stride=1 + seed % 2, bias=bias)


def make_input(kind: str, batch: int, c_in: int, seed: int, positive: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed + 1)
    shape = (batch, c_in) if kind == "linear" else (batch, c_in, 5, 6)
    x = torch.randn(shape, generator=g)
    return x.abs() if positive else x


def signed_parts(layer: nn.Module, x: torch.Tensor):
    """(z+, z-): the sums of the positive and of the negative contributions x_i W_ji of a bias-free layer."""
    w = layer.weight.detach()

    def run(inp, weight):
        return torch.func.functional_call(layer, {"weight": weight}, (inp,)).detach()

    xp, xn = x.clamp(min=0), x.clamp(max=0)
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    return run(xp, wp) + run(xn, wn), run(xp, wn) + run(xn, wp)


layer_cases = st.tuples(st.sampled_from(["linear", "conv"]), st.integers(1, 3), st.integers(1, 6),
                        st.integers(1, 7), st.integers(0, 10_000))


# ------------------------------------------------------------------ 1. per-layer conservation (hypothesis)


@pytest.mark.parametrize("name", sorted(LAYER_RULES))
@HSETTINGS
@given(case=layer_cases)
def test_layer_rule_conserves(name, case):
    kind, batch, c_in, c_out, seed = case
    layer = make_layer(kind, c_in, c_out, bias=False, seed=seed)
    x = make_input(kind, batch, c_in, seed)
    g = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(seed + 2))
    r_in, r_out = layer_relevance(layer, get_rule(name, **LAYER_RULES[name]), x, g)
    expected = r_out.sum()
    if name in ("zplus", "alpha_beta"):
        # these rules split z into positive and negative contributions; an output whose positive (or
        # negative) part is exactly empty sends nothing through that part (as in zennit)
        z_pos, z_neg = signed_parts(layer, x)
        if name == "zplus":
            expected = (r_out * (z_pos != 0)).sum()
        else:
            expected = (2.0 * r_out * (z_pos != 0) - 1.0 * r_out * (z_neg != 0)).sum()
    torch.testing.assert_close(r_in.sum(), expected, rtol=0, atol=1e-10 * max(1.0, r_out.abs().sum().item()))


@pytest.mark.parametrize("fn", [torch.relu, F.silu, F.gelu, torch.tanh, torch.sigmoid, F.leaky_relu])
@HSETTINGS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 10_000))
def test_identity_rule_conserves_elementwise(fn, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).requires_grad_(True)
    g = torch.randn(shape, generator=gen)
    y = get_rule("identity").apply_activation(x, fn(x))
    (gx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(x * gx, fn(x).detach() * g, rtol=0, atol=1e-12)


@HSETTINGS
@given(k=st.integers(2, 4), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), seed=st.integers(0, 10_000))
def test_uniform_rule_conserves_and_splits_equally(k, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    factors = [torch.randn(shape, generator=gen).requires_grad_(True) for _ in range(k)]
    g = torch.randn(shape, generator=gen)
    ruled = get_rule("uniform").apply_product(factors)
    y = ruled[0]
    for f in ruled[1:]:
        y = y * f
    grads = torch.autograd.grad(y, factors, g)
    r_out = (y * g).detach()
    for f, gf in zip(factors, grads):  # each factor gets R_out / k (the other factors' gradients are linear)
        torch.testing.assert_close(f * gf, r_out / k, rtol=0, atol=1e-12)


def test_uniform_rule_constant_factor_gets_nothing():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, 4)  # constant
    a2, b2 = get_rule("uniform").apply_product([a, b])
    (ga,) = torch.autograd.grad(a2 * b2, a, torch.ones(3, 4))
    torch.testing.assert_close(a * ga, (a * b).detach())


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@HSETTINGS
@given(batch=st.integers(1, 4), d=st.integers(2, 9), seed=st.integers(0, 10_000))
def test_norm_rule_conserves(kind, batch, d, seed):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(d, bias=False) if kind == "layernorm" else nn.RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(batch, 3, d)
    g = torch.randn(batch, 3, d)
    model = nn.Sequential(norm)
    xr = x.clone().requires_grad_(True)
    with lrp_scope(model, Composite([("site:norm", "norm")])):
        y = model(xr)
        (gx,) = torch.autograd.grad(y, xr, g)
    torch.testing.assert_close((xr * gx).sum(), (y * g).sum(), rtol=0, atol=1e-10)
    torch.testing.assert_close(y, norm(x))  # forward value unchanged


@HSETTINGS
@given(n=st.integers(1, 5), m=st.integers(1, 5), p=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_bilinear_matmul_conserves_half_each(n, m, p, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(2, n, m, generator=gen).requires_grad_(True)
    b = torch.randn(2, m, p, generator=gen).requires_grad_(True)
    g = torch.randn(2, n, p, generator=gen)
    a2, b2 = get_rule("bilinear").apply_matmul(a, b)
    o = a2 @ b2
    ga, gb = torch.autograd.grad(o, (a, b), g)
    r_out = (o * g).sum()
    torch.testing.assert_close((a * ga).sum(), r_out / 2, rtol=0, atol=1e-10)
    torch.testing.assert_close((b * gb).sum(), r_out / 2, rtol=0, atol=1e-10)


@HSETTINGS
@given(t=st.integers(1, 6), d=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_cp_attention_conserves(t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 1, t, d, generator=gen).requires_grad_(True) for _ in range(3))
    g = torch.randn(2, 1, t, d, generator=gen)
    q2, k2, v2 = get_rule("cp_attention").apply_attention(q, k, v)
    o = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True)
    (gv,) = torch.autograd.grad(o, v, g)
    torch.testing.assert_close((v * gv).sum(), (o * g).sum(), rtol=0, atol=1e-10)


# ------------------------------------------------------------- 3. agreement with written-out formulas


def _stab(z: torch.Tensor, eps: float) -> torch.Tensor:
    return z + eps * torch.where(z >= 0, 1.0, -1.0)


def reference_dense(name: str, params: dict, x, w, b, r_out):
    """Written-out LRP for ``y = x W^T + b`` with the formulas of lrp-rules.md (x: [n, i], W: [j, i])."""
    b = torch.zeros(w.shape[0]) if b is None else b
    X = x[:, None, :]          # [n, 1, i]
    W = w[None]                # [1, j, i]
    xp, xn, wp, wn = X.clamp(min=0), X.clamp(max=0), W.clamp(min=0), W.clamp(max=0)
    bp, bn = b.clamp(min=0), b.clamp(max=0)
    s = params.get("stabilizer", 1e-6)

    def spread(contrib, bias, rel, eps):  # R_i = sum_j contrib_ji / (sum_i' contrib_ji' + b_j) R_j
        den = _stab(contrib.sum(-1) + bias, eps)
        return (contrib / den[..., None] * rel[..., None]).sum(1)

    if name == "epsilon":
        return spread(X * W, b, r_out, params.get("epsilon", 1e-6))
    if name == "zplus":
        return spread(xp * wp + xn * wn, bp, r_out, s)
    if name == "alpha_beta":
        a, be = params["alpha"], params["beta"]
        return a * spread(xp * wp + xn * wn, bp, r_out, s) - be * spread(xp * wn + xn * wp, bn, r_out, s)
    if name == "gamma":
        gm = params["gamma"]
        y = (x @ w.T + b)
        up, dn = W + gm * wp, W + gm * wn
        pos = spread(xp * up + xn * dn, b + gm * bp, r_out * (y > 0), s)
        neg = spread(xp * dn + xn * up, b + gm * bn, r_out * (y < 0), s)
        return pos + neg
    if name == "flat":
        return spread(torch.ones_like(X * W), torch.zeros_like(b), r_out, s)
    if name == "wsquare":
        return spread((W * W).expand(x.shape[0], -1, -1), b * b, r_out, s)
    if name == "zbox":
        lo, hi = params["low"], params["high"]
        return spread(X * W - lo * wp - hi * wn, b - bp - bn, r_out, s)
    raise AssertionError(name)


REF_PARAMS = {
    "epsilon": dict(epsilon=0.1),
    "gamma": dict(gamma=0.5, stabilizer=1e-6),
    "zplus": dict(stabilizer=1e-6),
    "alpha_beta": dict(alpha=2.0, beta=1.0, stabilizer=1e-6),
    "flat": dict(stabilizer=1e-6),
    "wsquare": dict(stabilizer=1e-6),
    "zbox": dict(low=-3.0, high=2.5, stabilizer=1e-6),
}


@pytest.mark.parametrize("name", sorted(REF_PARAMS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])  # x >= 0: rules' fast paths
@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 3), i=st.integers(1, 6), j=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_dense_rule_matches_written_out_formula(name, bias, positive, n, i, j, seed):
    layer = make_layer("linear", i, j, bias, seed)
    x = make_input("linear", n, i, seed, positive=positive)
    g = torch.randn(n, j, generator=torch.Generator().manual_seed(seed + 3))
    params = REF_PARAMS[name]
    r_in, r_out = layer_relevance(layer, get_rule(name, **params), x, g)
    expected = reference_dense(name, params, x, layer.weight.detach(), None if not bias else layer.bias.detach(),
                               r_out)
    torch.testing.assert_close(r_in, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(REF_PARAMS))
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
def test_conv_rule_matches_written_out_formula(name, positive):
    """Convolutions: unfold into patches, apply the dense formula per output position, fold back."""
    torch.manual_seed(7)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=True)
    x = torch.randn(2, 2, 6, 5)
    x = x.abs() if positive else x
    y = conv(x).detach()
    g = torch.randn(y.shape)
    params = REF_PARAMS[name]
    r_in, r_out = layer_relevance(conv, get_rule(name, **params), x, g)
    patches = F.unfold(x, 3, padding=1, stride=2)                   # [n, c*9, L]
    n, k, L = patches.shape
    w = conv.weight.detach().reshape(3, -1)
    rows = patches.transpose(1, 2).reshape(n * L, k)
    r_rows = r_out.reshape(n, 3, L).transpose(1, 2).reshape(n * L, 3)
    if name == "zbox":  # the box bounds live in input space; padding pixels are 0 in x and in the bounds
        ones = F.unfold(torch.ones_like(x), 3, padding=1, stride=2).transpose(1, 2).reshape(n * L, k)
        lo, hi = params["low"] * ones, params["high"] * ones
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        contrib = rows[:, None, :] * w[None] - lo[:, None, :] * wp[None] - hi[:, None, :] * wn[None]
        den = _stab(contrib.sum(-1), params["stabilizer"])
        rel_rows = (contrib / den[..., None] * r_rows[..., None]).sum(1)
    elif name == "flat":  # inputs set to 1 inside the image, padding stays 0 (as the layer sees it)
        ones = F.unfold(torch.ones_like(x), 3, padding=1, stride=2).transpose(1, 2).reshape(n * L, k)
        contrib = ones[:, None, :].expand(-1, 3, -1)
        den = _stab(contrib.sum(-1), params["stabilizer"])
        rel_rows = (contrib / den[..., None] * r_rows[..., None]).sum(1)
    elif name == "wsquare":
        ones = F.unfold(torch.ones_like(x), 3, padding=1, stride=2).transpose(1, 2).reshape(n * L, k)
        contrib = ones[:, None, :] * (w * w)[None]
        den = _stab(contrib.sum(-1) + conv.bias.detach() ** 2, params["stabilizer"])
        rel_rows = (contrib / den[..., None] * r_rows[..., None]).sum(1)
    else:
        rel_rows = reference_dense(name, params, rows, w, conv.bias.detach(), r_rows)
    rel = F.fold(rel_rows.reshape(n, L, k).transpose(1, 2), (6, 5), 3, padding=1, stride=2)
    torch.testing.assert_close(r_in, rel, rtol=1e-9, atol=1e-10)


# ------------------------------------------------ 3a. fast paths agree with the general autograd path
# The layer rules compute their modified backward as one transposed layer evaluation (rules._layer.layer_vjp)
# where the layer's transpose is known, and through autograd on re-evaluated layers otherwise; x >= 0 and
# mixed-sign inputs take different forms. All of them must give the same relevance and second derivatives.

FAST_RULES = {"gamma": dict(gamma=0.5), "zplus": {}, "alpha_beta": dict(alpha=2.0, beta=1.0)}


def _reference_kernels():
    """The layer rules' reference evaluation (autograd through the modified forward passes), no fast kernel."""
    from lime_attr.rules.kernels import use_fast_kernels

    return use_fast_kernels(False)


class _CountTransposes(TorchDispatchMode):
    """Counts the layer evaluations (``mm``, ``bmm``, ``convolution``) run while it is active."""

    def __init__(self, calls: list) -> None:
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.bmm, torch.ops.aten.convolution):
            self.calls.append(1)
        return func(*args, **(kwargs or {}))


def _make(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(5, 4)
    if kind == "conv":
        return nn.Conv2d(3, 4, 3, padding=1, stride=2)
    if kind == "hf_conv1d":  # transformers' Conv1D (GPT-2): weight [in, out]; mixed-sign x falls back to autograd
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(4, 5)
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
        return layer
    return nn.Conv2d(4, 6, 3, padding=1, groups=2)  # grouped: mixed-sign x falls back to autograd


@pytest.mark.parametrize("name", sorted(FAST_RULES))
@pytest.mark.parametrize("kind", ["linear", "conv", "grouped", "hf_conv1d"])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
def test_fast_path_matches_autograd_path(name, kind, positive):
    layer = _make(kind, 3)
    shape = {"linear": (3, 5), "conv": (2, 3, 6, 5), "grouped": (2, 4, 5, 5), "hf_conv1d": (2, 3, 5)}[kind]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    x = x.abs() if positive else x
    g = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(5))
    rule = get_rule(name, **FAST_RULES[name])
    fast = layer_relevance(layer, rule, x, g)[0]
    with _reference_kernels():
        slow = layer_relevance(layer, rule, x, g)[0]
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gamma_skips_the_negative_branch_only_when_its_gradient_is_zero(kind, positive):
    """After a ReLU the gradient at outputs y < 0 is 0: gamma then needs one transposed layer, not two."""
    layer = _make(kind, 6)
    shape = (3, 5) if kind == "linear" else (2, 3, 6, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    x = x.abs() if positive else x
    y = layer(x).detach()
    params = dict(gamma=0.5, stabilizer=1e-6)
    calls = []
    for seed_mask, expected_calls in (((y > 0).to(y.dtype), 1), (torch.ones_like(y), 2)):
        calls.clear()
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)) * seed_mask
        model, xr = nn.Sequential(layer), x.clone().requires_grad_(True)
        with LRPScope(model, Composite([("site:layer", get_rule("gamma", **params))])):
            out = model(xr)
            with _CountTransposes(calls):  # the backward pass only: the transposed layers it evaluates
                (gx,) = torch.autograd.grad(out, xr, g)
        r_in, r_out = (xr * gx).detach(), (out * g).detach()
        assert len(calls) == (expected_calls if positive else 1)  # mixed x: one stacked call either way
        if kind == "linear":
            expected = reference_dense("gamma", params, x, layer.weight.detach(), layer.bias.detach(), r_out)
            torch.testing.assert_close(r_in, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(FAST_RULES))
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
def test_fast_path_second_order_matches_autograd_path(name, kind, positive):
    """create_graph=True: the modified backward is itself differentiable, with the autograd path's derivatives.

    The upstream gradient is scaled by a parameter ``p``; d(relevance)/dp differentiates through the rule's
    backward (the transposed layers), d(relevance)/dx through ``x * g``.
    """
    layer = _make(kind, 11)
    shape = (3, 5) if kind == "linear" else (2, 3, 6, 5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    x = x.abs() if positive else x
    g0 = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(13))
    v = torch.randn(shape, generator=torch.Generator().manual_seed(14))
    rule = get_rule(name, **FAST_RULES[name])

    def second_order():
        model = nn.Sequential(layer)
        xr = x.clone().requires_grad_(True)
        p = torch.tensor(1.3, requires_grad=True)
        with LRPScope(model, Composite([("site:layer", rule)])):
            y = model(xr)
            (gx,) = torch.autograd.grad(y, xr, g0 * p, create_graph=True)
        rel = xr * gx
        return (rel.detach(), *torch.autograd.grad((rel * v).sum(), [xr, p]))

    fast = second_order()
    with _reference_kernels():
        slow = second_order()
    assert fast[2].abs() > 0
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_fast_path_keeps_op_coverage_after_the_layer():
    """The fast path's autograd Function is invisible to the op mode; its output must stay input-dependent."""
    from lime_attr.errors import UncoveredOpError

    class Exp(nn.Module):
        def forward(self, x):
            return torch.exp(x)

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), Exp(), nn.Linear(4, 2))
    comp = Composite([("site:layer", "zplus"), ("site:activation", "identity")])
    with pytest.raises(UncoveredOpError, match="op 'exp'"):
        LRP(model, comp).attribute(torch.ones(1, 4), target=0)


def test_fast_path_allows_inplace_ops_after_the_layer():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    ref = nn.Sequential(*[m if not isinstance(m, nn.ReLU) else nn.ReLU() for m in model])
    x = torch.randn(2, 3, 8, 8)
    for name in sorted(FAST_RULES):
        comp = Composite([(nn.Conv2d, get_rule(name, **FAST_RULES[name])), ("site:layer", "epsilon"),
                          ("site:activation", "identity")])
        torch.testing.assert_close(LRP(model, comp).attribute(x, target=1), LRP(ref, comp).attribute(x, target=1))


def test_stabilize_matches_the_sign_convention_bit_for_bit():
    from lime_attr.rules import stabilize

    z = torch.tensor([-0.0, 0.0, -1e-300, 1e-300, -2.5, 3.0, float("inf"), -float("inf")])
    expected = z + torch.where(z >= 0, torch.tensor(1e-6), torch.tensor(-1e-6))
    assert torch.equal(stabilize(z, 1e-6), expected)
    from lime_attr.rules._grad import stabilize_

    assert torch.equal(stabilize_(z.clone(), 1e-6), expected)
    assert torch.equal(stabilize(z.float(), 1e-3), z.float() + torch.where(z.float() >= 0, 1e-3, -1e-3).float())


# ------------------------------------------ 3b. softmax and bilinear rules on a causal attention head


class Head(nn.Module):
    """A causal attention head written out: q, k, v linear, scaled q k^T, masked softmax, A V."""

    def __init__(self, d: int = 4, fused: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(d, d, bias=False) for _ in range(3))
        self.fused = fused
        self.saved: dict = {}

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t = x.shape[-2]
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        a = torch.softmax(s, dim=-1)
        o = a @ v
        for name, tensor in (("q", q), ("k", k), ("v", v), ("s", s), ("a", a)):
            tensor.retain_grad()
            self.saved[name] = tensor
        return o


def explicit_attnlrp(head: Head, x: torch.Tensor, r_o: torch.Tensor) -> dict:
    """AttnLRP's rules written out element by element (lrp-rules.md), for one sequence x: [T, d]."""
    wq, wk, wv = (m.weight.detach() for m in (head.q, head.k, head.v))
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    T, d = x.shape
    c = 1 / math.sqrt(d)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    s = (q @ k.T * c).masked_fill(mask, float("-inf"))
    a = torch.softmax(s, -1)
    o = a @ v
    r_a = torch.zeros(T, T)
    r_v = torch.zeros(T, d)
    for j in range(T):            # bilinear rule on O = A V
        for i in range(T):
            for p in range(d):
                share = a[j, i] * v[i, p] * r_o[j, p] / (2 * o[j, p])
                r_a[j, i] += share
                r_v[i, p] += share
    r_s = torch.zeros(T, T)
    for j in range(T):            # softmax rule, masked logits get nothing
        total = r_a[j].sum()
        for i in range(T):
            if not mask[j, i]:
                r_s[j, i] = s[j, i] * (r_a[j, i] - a[j, i] * total)
    r_q = torch.zeros(T, d)
    r_k = torch.zeros(T, d)
    for j in range(T):            # bilinear rule on S = c q k^T (the scale is linear: LRP-0)
        for i in range(j + 1):
            for e in range(d):
                share = c * q[j, e] * k[i, e] * r_s[j, i] / (2 * s[j, i])
                r_q[j, e] += share
                r_k[i, e] += share
    r_x = torch.zeros(T, d)
    for w, t, r in ((wq, q, r_q), (wk, k, r_k), (wv, v, r_v)):   # LRP-0 through the projections
        for tok in range(T):
            for a_ in range(d):
                for m in range(d):
                    r_x[tok, m] += x[tok, m] * w[a_, m] * r[tok, a_] / t[tok, a_]
    return dict(x=r_x, q=r_q, k=r_k, v=r_v, s=r_s, a=r_a)


def test_attnlrp_softmax_and_bilinear_match_explicit_rules_on_causal_head():
    torch.manual_seed(0)
    T, d = 5, 4
    head = Head(d)
    x = torch.randn(1, T, d, requires_grad=True)
    g = torch.randn(1, T, d)
    model = nn.Sequential(head)
    with lrp_scope(model, "attnlrp"):
        o = model(x)
        (gx,) = torch.autograd.grad(o, x, g)
    r_o = (o * g).detach()[0]
    ref = explicit_attnlrp(head, x.detach()[0], r_o)
    torch.testing.assert_close((x * gx).detach()[0], ref["x"], rtol=1e-9, atol=1e-10)
    # intermediate relevances, element by element
    sv = head.saved
    for name in ("q", "k", "v", "a"):
        torch.testing.assert_close((sv[name] * sv[name].grad).detach()[0], ref[name], rtol=1e-9, atol=1e-10)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    r_s = torch.where(mask, 0.0, sv["s"].detach() * sv["s"].grad)[0]
    torch.testing.assert_close(r_s, ref["s"], rtol=1e-9, atol=1e-10)


def test_attnlrp_fused_sdpa_matches_explicit_head():
    torch.manual_seed(1)
    explicit, fused = Head(4), Head(4, fused=True)
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 6, 4)
    g = torch.randn(2, 6, 4)
    rel = []
    for head in (explicit, fused):
        model = nn.Sequential(head)
        xr = x.clone().requires_grad_(True)
        with lrp_scope(model, "attnlrp"):
            (gx,) = torch.autograd.grad(model(xr), xr, g)
        rel.append(xr.detach() * gx)
    torch.testing.assert_close(rel[0], rel[1], rtol=1e-9, atol=1e-10)


def test_softmax_rule_formula_elementwise():
    torch.manual_seed(2)
    x = torch.randn(3, 7, requires_grad=True)
    g = torch.randn(3, 7)
    y = get_rule("softmax").apply_softmax(x, torch.softmax(x, -1))
    (gx,) = torch.autograd.grad(y, x, g)
    s = torch.softmax(x, -1).detach()
    r_out = s * g
    expected = x.detach() * (r_out - s * r_out.sum(-1, keepdim=True))
    torch.testing.assert_close(x * gx, expected, rtol=1e-12, atol=1e-12)


def test_norm_rule_matches_written_out_linear_map():
    torch.manual_seed(3)
    ln = nn.LayerNorm(5)
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
    x = torch.randn(2, 5)
    g = torch.randn(2, 5)
    xr = x.clone().requires_grad_(True)
    model = nn.Sequential(ln)
    with lrp_scope(model, Composite([("site:norm", "norm")])):
        (gx,) = torch.autograd.grad(model(xr), xr, g)
    sigma = torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    # y = (x - mean) * w / sigma + b with sigma constant: J_ij = w_j / sigma (delta_ij - 1/n)
    n = x.shape[-1]
    J = (torch.eye(n) - 1.0 / n)[None] * (ln.weight.detach() / sigma)[:, None, :]   # [b, i, j]
    expected = x * torch.einsum("bij,bj->bi", J, g)
    torch.testing.assert_close(xr.detach() * gx, expected, rtol=1e-10, atol=1e-12)


def test_epsilon_zero_is_plain_gradient_and_adds_nothing():
    layer = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    y = layer(x)
    assert get_rule("epsilon", epsilon=0.0).apply_layer(layer, x, y) is y


# ------------------------------------------------------------------------------- registry and data


def test_rules_are_picklable_frozen_dataclasses():
    for name in available_rules():
        rule = get_rule(name)
        assert dataclasses.is_dataclass(rule)
        assert pickle.loads(pickle.dumps(rule)) == rule
        assert rule.__doc__ and rule.__doc__.strip()


def test_rule_sites_are_declared():
    assert get_rule("epsilon").supports("layer")
    assert get_rule("identity").supports("activation")
    assert not get_rule("identity").supports("layer")
    assert "bilinear" in available_rules("matmul")
    assert "softmax" in available_rules("softmax")


def test_rule_on_wrong_site_raises():
    from lime_attr.errors import RuleSiteError

    with pytest.raises(RuleSiteError, match="cannot be applied to a 'layer' site"):
        get_rule("identity").apply_layer(nn.Linear(2, 2), torch.randn(1, 2), torch.randn(1, 2))


# ------------------------------------------------------------- 10. a custom rule in under 20 lines
# This block is reproduced verbatim in docs/custom_rule.rst (test_custom_rule_doc_is_identical checks it).

# --- custom rule start
from dataclasses import dataclass

from lime_attr import LRP, Composite, register_rule
from lime_attr.rules import Rule, replace_grad


@register_rule("epsilon_abs", overwrite=True)
@dataclass(frozen=True)
class EpsilonAbs(Rule):
    """LRP-epsilon with a stabiliser proportional to |z|: R_i = sum_j x_i W_ji / (z_j (1 + eps)) R_j."""

    epsilon: float = 0.1

    def apply_layer(self, module, x, y):
        # gradient form: scale the gradient arriving at y by z / (z (1 + eps)) = 1 / (1 + eps)
        return replace_grad(y, y / (1 + self.epsilon))


composite = Composite([("site:layer", "epsilon_abs"), ("site:activation", "identity")])
# --- custom rule end


def test_custom_rule_used_by_name():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.ReLU(), nn.Linear(6, 3, bias=False))
    x = torch.randn(2, 4)
    attr, delta = LRP(model, composite).attribute(x, target=2, return_convergence_delta=True)
    logit = model(x)[:, 2].detach()
    # two layers, each keeps a fraction eps / (1 + eps) of the relevance
    torch.testing.assert_close(attr.sum(1), logit / 1.1 ** 2)
    assert "epsilon_abs" in available_rules("layer")
    assert pickle.loads(pickle.dumps(EpsilonAbs(0.2))) == EpsilonAbs(0.2)


def test_custom_rule_doc_is_identical():
    import pathlib
    import textwrap

    src = pathlib.Path(__file__).read_text()
    block = src.split("# --- custom rule start\n")[1].split("# --- custom rule end")[0]
    doc = pathlib.Path(__file__).parents[1] / "docs" / "custom_rule.rst"
    if not doc.exists():
        pytest.skip("docs/custom_rule.rst not present")
    text = doc.read_text()
    assert textwrap.indent(block.strip("\n"), "   ") in text
    assert len(block.strip("\n").splitlines()) < 20


class _AddOne(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x):
        if self.inplace:
            x += 1.0
            return x
        return x + 1.0


@pytest.mark.parametrize("composite", ["attnlrp", "epsilon-plus", "cp-lrp"])
def test_in_place_op_after_a_rule_site_is_allowed_and_exact(composite):
    """A rule's output (a replaced gradient) may be modified in place by the model's next op: same relevance
    as the out-of-place model, and the primitives' outputs do not alias tensors other consumers read."""
    torch.manual_seed(61)
    inplace = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), _AddOne(True), nn.Linear(5, 2)).double()
    plain = nn.Sequential(nn.Linear(4, 5), nn.SiLU(), _AddOne(False), nn.Linear(5, 2)).double()
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(3, 4, dtype=torch.double)
    assert torch.equal(LRP(inplace, composite).attribute(x, target=0), LRP(plain, composite).attribute(x, target=0))


def test_scale_grad_output_does_not_alias_its_input():
    from lime_attr.rules._grad import scale_grad

    x = torch.randn(5, requires_grad=True)
    y = x * 1.0
    out = scale_grad(y, 0.5)
    out.add_(1.0)  # must not reach y, which other consumers read
    assert torch.equal(y, x * 1.0)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, torch.full_like(x, 0.5))


class _LinearThenInPlace(nn.Module):
    """A dense layer whose output the model then writes into in place (legal for autograd: nothing saved it)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc, self.head, self.inplace = nn.Linear(4, 5), nn.Linear(5, 2), inplace

    def forward(self, x):
        y = self.fc(x)
        if self.inplace:
            y.mul_(2.0)
        else:
            y = y * 2.0
        return self.head(y)


def test_epsilon_factor_is_read_in_the_backward_and_an_in_place_write_is_a_clear_error():
    """LRP-epsilon computes |z| / (|z| + eps) from the layer's output in the backward pass (no tensor of its
    own); a write into that output after the rule would change the factor, so it is refused, not used."""
    torch.manual_seed(3)
    plain = _LinearThenInPlace(False).double()
    x = torch.randn(3, 4, dtype=torch.double)
    comp = Composite([("site:layer", get_rule("epsilon", epsilon=0.5))])
    # the written-out rule on the out-of-place model: the result of the lazily computed factor is exact
    r = LRP(plain, comp).attribute(x, target=0)
    z1 = plain.fc(x)
    a1 = z1 * 2.0
    z2 = plain.head(a1)
    r2 = torch.zeros_like(z2)
    r2[:, 0] = z2[:, 0]
    s2 = r2 / (z2 + 0.5 * torch.where(z2 >= 0, 1.0, -1.0))
    r_fc_out = a1 * (s2 @ plain.head.weight)  # y = 2 z is linear: its relevance passes unchanged
    expected = x * ((r_fc_out / (z1 + 0.5 * torch.where(z1 >= 0, 1.0, -1.0))) @ plain.fc.weight)
    torch.testing.assert_close(r, expected.detach(), rtol=1e-10, atol=1e-12)
    inplace = _LinearThenInPlace(True).double()
    inplace.load_state_dict(plain.state_dict())
    with pytest.raises(RuntimeError, match="modified in place.*out-of-place form"):
        LRP(inplace, comp).attribute(x, target=0)
    # with epsilon = 0 there is no factor and the in-place model is fine
    comp0 = Composite([("site:layer", get_rule("epsilon", epsilon=0.0))])
    torch.testing.assert_close(LRP(inplace, comp0).attribute(x, target=0), LRP(plain, comp0).attribute(x, target=0))


def test_epsilon_on_batchnorm_allows_an_in_place_residual_add():
    """BatchNorm (an affine site) keeps a factor computed in the forward pass: ResNets write ``out += identity``
    into its output."""
    torch.manual_seed(4)

    class Block(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.conv, self.bn, self.head, self.inplace = nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Linear(32, 2), inplace

        def forward(self, x):
            out = self.bn(self.conv(x))
            if self.inplace:
                out += x
            else:
                out = out + x
            return self.head(torch.relu(out).flatten(1))

    a, b = Block(True).double().eval(), Block(False).double().eval()
    a.bn.running_mean.uniform_(-1, 1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 2, 4, 4, dtype=torch.double)
    comp = Composite([(nn.BatchNorm2d, get_rule("epsilon", epsilon=0.1)), ("site:layer", get_rule("epsilon", epsilon=0.1)),
                      ("site:activation", "identity")])
    torch.testing.assert_close(LRP(a, comp).attribute(x, target=1), LRP(b, comp).attribute(x, target=1))


def test_scale_grad_without_copy_shares_storage_and_scales_only_its_own_use():
    from lime_attr.rules._grad import scale_grad

    x = torch.randn(5, requires_grad=True)
    y = x * 1.0
    out = scale_grad(y, 0.25, copy=False)
    assert out.data_ptr() == y.data_ptr()
    (g,) = torch.autograd.grad((out * 2.0).sum() + y.sum(), x)  # this use scaled, the other one not
    assert torch.equal(g, torch.full_like(x, 0.25 * 2.0 + 1.0))
    second = []
    for copy in (False, True):  # differentiable, and the same second derivative as the copying form
        out = scale_grad(x * 1.0, 0.25, copy=copy)
        (g1,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
        second.append(torch.autograd.grad(g1.sum(), x)[0])
    assert torch.equal(second[0], second[1]) and torch.equal(second[0], torch.full_like(x, 0.125))


class _FunctionalSiLU(nn.Module):
    """Linear -> F.silu -> Linear: the activation is an op (ratio computed in the forward pass)."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.a, self.b = seq[0], seq[2]

    def forward(self, x):
        return self.b(torch.nn.functional.silu(self.a(x)))


@pytest.mark.parametrize("inplace_after", [False, True])
def test_identity_ratio_recomputed_in_the_backward_after_an_epsilon_layer(monkeypatch, inplace_after):
    """After an epsilon layer (which keeps its output for the backward pass) the identity rule recomputes
    f(x) / x there instead of keeping a ratio: bit for bit the forward-pass ratio, and an in-place write into
    the activation's output after it is still fine."""
    from lime_attr.rules import builtin

    calls = []
    original = builtin._RecomputedRatio.__call__
    monkeypatch.setattr(builtin._RecomputedRatio, "__call__", lambda self, g: calls.append(1) or original(self, g))
    torch.manual_seed(7)
    seq = nn.Sequential(nn.Linear(5, 6), nn.SiLU(), nn.Linear(6, 2)).double()
    model = nn.Sequential(seq[0], seq[1], _AddOne(True), seq[2]) if inplace_after else seq
    x = torch.randn(4, 5, dtype=torch.double)
    comp = Composite([("site:layer", get_rule("epsilon", epsilon=0.1)), ("site:activation", "identity")])
    got = LRP(model, comp).attribute(x, target=1)
    assert calls, "the recomputing path was not taken"
    if inplace_after:
        ref_model = nn.Sequential(seq[0], seq[1], _AddOne(False), seq[2])
        calls.clear()
        assert torch.equal(got, LRP(ref_model, comp).attribute(x, target=1))
    else:
        assert torch.equal(got, LRP(_FunctionalSiLU(seq), comp).attribute(x, target=1))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_transpose_vjp_equals_the_convolution_input_gradient(dims):
    """The layer rules' transposed convolution (conv_transpose with the output padding that restores the
    input size) is the convolution's input gradient, for strides, dilations, paddings, groups and sizes
    that do not divide evenly."""
    import itertools

    from lime_attr.rules._layer import layer_vjp

    torch.manual_seed(dims)
    conv_t = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    for stride, pad, dil, groups, size in itertools.product([1, 2, 3], [0, 1], [1, 2], [1, 2], [7, 8]):
        conv = conv_t(4, 6, 3, stride=stride, padding=pad, dilation=dil, groups=groups).double()
        x = torch.randn(2, 4, *([size] * dims), dtype=torch.double, requires_grad=True)
        y = conv(x)
        g = torch.randn_like(y)
        (ref,) = torch.autograd.grad(y, x, g)
        got = layer_vjp(conv, x)(g, conv.weight.detach())
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
