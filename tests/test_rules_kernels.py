"""Layer rules as formulas (lime_attr.rules.kernels): fast kernels against the reference evaluation and
against the written-out formula, conservation, and the public switch ``use_fast_kernels``.

Relevance convention as in tests/test_rules.py: ``R_out = y * g`` at the layer output, ``R_in = x * g_in``
(plus ``carrier * d/d carrier`` for the first-layer rules). Everything runs in float64.
"""
from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lime_attr import Composite, LRP, get_rule
from lime_attr.rules import Rule
from lime_attr.rules.kernels import Branch, LayerFormula, fast_kernels_enabled, reference, use_fast_kernels
from lime_attr.scope import LRPScope

DT = torch.float64
RULES = {
    "gamma": dict(gamma=0.3, stabilizer=1e-6),
    "zplus": dict(stabilizer=1e-6),
    "alpha_beta": dict(alpha=2.0, beta=1.0, stabilizer=1e-6),
    "epsilon": dict(epsilon=1e-6),
    "flat": dict(stabilizer=1e-6),
    "wsquare": dict(stabilizer=1e-6),
    "zbox": dict(low=-4.0, high=4.0, stabilizer=1e-6),
}
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def layer_relevance(layer: nn.Module, rule: Rule, x: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """R_in of one layer under ``rule`` for the upstream gradient ``seed`` (carriers included)."""
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
    return r_in.detach()


def make_layer(kind: str, c_in: int, c_out: int, bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Linear(c_in, c_out, bias=bias).to(DT)
    if kind == "grouped":
        return nn.Conv2d(2 * c_in, 2 * c_out, 3, padding=1, groups=2, bias=bias).to(DT)
    return nn.Conv2d(c_in, c_out, 3, padding=1, stride=1 + seed % 2, bias=bias).to(DT)


def make_input(layer: nn.Module, kind: str, batch: int, seed: int, positive: bool) -> torch.Tensor:
    c_in = layer.in_features if kind == "linear" else layer.in_channels
    shape = (batch, c_in) if kind == "linear" else (batch, c_in, 5, 4)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=DT)
    return x.abs() if positive else x


# ---------------------------------------------------------------- the formula, written out as loops


def _stab(z: float, eps: float) -> float:
    return z + (eps if z >= 0 else -eps)


def written_out_branches(name: str, p: dict, x: list, w: list, b: list) -> list:
    """The rule's branches for one example of a Linear layer: ``(scale, support, z_ij, bias_j, eps)``.

    Written from the formulas in the rules' docstrings, independently of lime_attr.rules.kernels.
    """
    pos, neg = (lambda v: max(v, 0.0)), (lambda v: min(v, 0.0))
    if name == "gamma":
        g = p["gamma"]
        up = lambda j, i: w[j][i] + g * pos(w[j][i])  # noqa: E731  W + g W^+
        dn = lambda j, i: w[j][i] + g * neg(w[j][i])  # noqa: E731  W + g W^-
        return [(1.0, "pos", lambda i, j: pos(x[i]) * up(j, i) + neg(x[i]) * dn(j, i), lambda j: b[j] + g * pos(b[j]), p["stabilizer"]),
                (1.0, "neg", lambda i, j: pos(x[i]) * dn(j, i) + neg(x[i]) * up(j, i), lambda j: b[j] + g * neg(b[j]), p["stabilizer"])]
    if name == "zplus":
        return [(1.0, "all", lambda i, j: pos(x[i]) * pos(w[j][i]) + neg(x[i]) * neg(w[j][i]), lambda j: pos(b[j]), p["stabilizer"])]
    if name == "alpha_beta":
        return [(p["alpha"], "all", lambda i, j: pos(x[i]) * pos(w[j][i]) + neg(x[i]) * neg(w[j][i]), lambda j: pos(b[j]), p["stabilizer"]),
                (-p["beta"], "all", lambda i, j: pos(x[i]) * neg(w[j][i]) + neg(x[i]) * pos(w[j][i]), lambda j: neg(b[j]), p["stabilizer"])]
    if name == "epsilon":
        return [(1.0, "all", lambda i, j: x[i] * w[j][i], lambda j: b[j], p["epsilon"])]
    if name == "flat":
        return [(1.0, "all", lambda i, j: 1.0, lambda j: 0.0, p["stabilizer"])]
    if name == "wsquare":
        return [(1.0, "all", lambda i, j: w[j][i] ** 2, lambda j: b[j] ** 2, p["stabilizer"])]
    lo, hi = p["low"], p["high"]  # zbox
    return [(1.0, "all", lambda i, j: x[i] * w[j][i] - lo * pos(w[j][i]) - hi * neg(w[j][i]),
             lambda j: b[j] - pos(b[j]) - neg(b[j]), p["stabilizer"])]


def written_out_relevance(name: str, p: dict, layer: nn.Linear, x: torch.Tensor, r_out: torch.Tensor):
    """``R_i = sum_k s_k sum_{j in support k} z_ij / stab(sum_i' z_i'j + bias_j) R_j``, loop over i and j;
    also the smallest |denominator| per output (where relevance is absorbed by a zero denominator)."""
    w = layer.weight.detach().tolist()
    n_out, n_in = len(w), len(w[0])
    b = layer.bias.detach().tolist() if layer.bias is not None else [0.0] * n_out
    r, dens = torch.zeros_like(x), torch.full(r_out.shape, float("inf"), dtype=DT)
    for n in range(x.shape[0]):
        xs = x[n].tolist()
        y = [sum(xs[i] * w[j][i] for i in range(n_in)) + b[j] for j in range(n_out)]
        for scale, support, z, bias, eps in written_out_branches(name, p, xs, w, b):
            for j in range(n_out):
                if (support == "pos" and not y[j] > 0) or (support == "neg" and not y[j] < 0):
                    continue
                den = sum(z(i, j) for i in range(n_in)) + bias(j)
                dens[n, j] = min(dens[n, j].item(), abs(den))
                for i in range(n_in):
                    r[n, i] += scale * z(i, j) / _stab(den, eps) * r_out[n, j].item()
    return r, dens


# ------------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
@pytest.mark.parametrize("name", sorted(RULES))
@FEW
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 4), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_fast_kernels_equal_the_reference_evaluation(name, kind, positive, c_in, c_out, bias, seed):
    layer = make_layer(kind, c_in, c_out, bias, seed)
    x = make_input(layer, kind, 2, seed, positive)
    g = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(seed + 2), dtype=DT)
    rule = get_rule(name, **RULES[name])
    fast = layer_relevance(layer, rule, x, g)
    with use_fast_kernels(False):
        slow = layer_relevance(layer, rule, x, g)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fast", [True, False], ids=["fast kernels", "reference"])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
@pytest.mark.parametrize("name", sorted(RULES))
@FEW
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 3), bias=st.booleans(), seed=st.integers(0, 10_000))
def test_linear_layer_rules_equal_the_written_out_formula(name, positive, fast, c_in, c_out, bias, seed):
    layer = make_layer("linear", c_in, c_out, bias, seed)
    x = make_input(layer, "linear", 2, seed, positive)
    g = torch.randn(2, c_out, generator=torch.Generator().manual_seed(seed + 2), dtype=DT)
    r_out = (layer(x) * g).detach()
    with use_fast_kernels(fast):
        got = layer_relevance(layer, get_rule(name, **RULES[name]), x, g)
    expected, _ = written_out_relevance(name, RULES[name], layer, x, r_out)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)


CONSERVING = ["gamma", "zplus", "alpha_beta", "epsilon", "flat", "wsquare", "zbox"]


@pytest.mark.parametrize("fast", [True, False], ids=["fast kernels", "reference"])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
@pytest.mark.parametrize("name", CONSERVING)
@FEW
@given(c_in=st.integers(1, 4), c_out=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_bias_free_layer_rules_conserve_relevance(name, positive, fast, c_in, c_out, seed):
    """Without a bias every rule passes on all relevance of the outputs whose denominators are nonzero
    (a zero denominator absorbs it: z+ where no input meets a positive weight, and the like)."""
    params = {**RULES[name], ("epsilon" if name == "epsilon" else "stabilizer"): 1e-30}
    layer = make_layer("linear", c_in, c_out, False, seed)
    x = make_input(layer, "linear", 2, seed, positive)
    g = torch.randn(2, c_out, generator=torch.Generator().manual_seed(seed + 2), dtype=DT)
    _, dens = written_out_relevance(name, params, layer, x, torch.zeros(2, c_out, dtype=DT))
    g = g * (dens > 1e-9)
    with use_fast_kernels(fast):
        r_in = layer_relevance(layer, get_rule(name, **params), x, g)
    r_out = (layer(x) * g).detach()
    torch.testing.assert_close(r_in.sum(-1), r_out.sum(-1), rtol=1e-9, atol=1e-9)


def test_epsilon_is_the_plain_formula():
    """LRP-epsilon (epsilon-plus's dense layers) is the one-branch formula ``z = x W + b`` (``Branch()``)."""
    layer = make_layer("conv", 3, 4, True, 5)
    x = make_input(layer, "conv", 2, 5, False)
    g = torch.randn(layer(x).shape, generator=torch.Generator().manual_seed(9), dtype=DT)

    class PlainFormula(Rule):
        def apply_layer(self, module, x, y):
            return reference(LayerFormula((Branch(),), 0.1), module, x, y)

    torch.testing.assert_close(layer_relevance(layer, PlainFormula(), x, g),
                               layer_relevance(layer, get_rule("epsilon", epsilon=0.1), x, g), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("composite", ["epsilon-plus", "epsilon-gamma", "alpha-beta"])
def test_composites_equal_their_reference_evaluation(composite):
    """A small CNN under the composites built on these rules: the same attribution either way."""
    if composite == "alpha-beta":
        composite = Composite([((nn.Conv2d,), get_rule("alpha_beta", alpha=2.0, beta=1.0)), ("site:layer", "epsilon"),
                               ("site:activation", "identity")])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).to(DT).eval()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    fast = LRP(model, composite).attribute(x, target=1)
    with use_fast_kernels(False):
        slow = LRP(model, composite).attribute(x, target=1)
    assert fast.abs().sum() > 0
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------- the switch


def test_use_fast_kernels_is_scoped_to_the_block_and_the_thread():
    assert fast_kernels_enabled()
    seen = []
    with use_fast_kernels(False):
        assert not fast_kernels_enabled()
        worker = threading.Thread(target=lambda: seen.append(fast_kernels_enabled()))
        worker.start()
        worker.join()
        with use_fast_kernels(True):
            assert fast_kernels_enabled()
        assert not fast_kernels_enabled()
    assert fast_kernels_enabled() and seen == [True]
    with pytest.raises(RuntimeError), use_fast_kernels(False):
        raise RuntimeError("restored on an exception too")
    assert fast_kernels_enabled()


def test_reference_evaluation_runs_no_transposed_layer():
    """Under ``use_fast_kernels(False)`` the backward is autograd through the modified forward passes."""
    layer = make_layer("conv", 3, 4, True, 2)
    x = make_input(layer, "conv", 1, 2, True)
    g = torch.ones(layer(x).shape, dtype=DT)
    for enabled, fused in ((True, True), (False, False)):
        model, xr = nn.Sequential(layer), x.clone().requires_grad_(True)
        with use_fast_kernels(enabled), LRPScope(model, Composite([("site:layer", get_rule("zplus"))])):
            out = model(xr)
        # the fast kernel's backward is one custom node holding the ratios; the reference keeps autograd's graph
        names = set()
        stack = [out.grad_fn]
        while stack:
            node = stack.pop()
            if node is not None:
                names.add(type(node).__name__)
                stack.extend(nxt for nxt, _ in node.next_functions)
        assert ("ConvolutionBackward0" not in names) == fused, names
        torch.autograd.grad(out, xr, g)


def test_branch_rejects_an_unknown_support():
    with pytest.raises(ValueError, match="where"):
        Branch(where="positive")


@pytest.mark.parametrize("name", ["gamma", "zplus", "alpha_beta"])
@pytest.mark.parametrize("positive", [False, True], ids=["mixed-sign x", "x >= 0"])
def test_grouped_convolution_equals_its_block_diagonal_dense_form(name, positive):
    """A grouped convolution is a dense one with a block-diagonal weight (zeros have no W^+ or W^- part), so
    every rule gives the same relevance on both (weight variants must not be stacked across groups)."""
    grouped = make_layer("grouped", 2, 3, True, 4)
    dense = nn.Conv2d(4, 6, 3, padding=1).to(DT)
    with torch.no_grad():
        dense.weight.zero_()
        dense.weight[:3, :2], dense.weight[3:, 2:] = grouped.weight[:3], grouped.weight[3:]
        dense.bias.copy_(grouped.bias)
    x = make_input(grouped, "conv", 2, 4, positive)
    g = torch.randn(grouped(x).shape, generator=torch.Generator().manual_seed(3), dtype=DT)
    rule = get_rule(name, **RULES[name])
    for fast in (True, False):
        with use_fast_kernels(fast):
            torch.testing.assert_close(layer_relevance(grouped, rule, x, g), layer_relevance(dense, rule, x, g),
                                       rtol=1e-9, atol=1e-12)
