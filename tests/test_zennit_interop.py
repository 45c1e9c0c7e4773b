"""Agreement with zennit: rule by rule, whole models, and zennit rules/composites driving our scope.

zennit passes *relevance* through its backward pass and seeds it with a one-hot vector; lime_attr passes
a modified *gradient* seeded with 1, so relevance is ``x * g``. Seeding zennit's backward with the value
of the explained logit (instead of 1) makes the two directly comparable.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

zennit = pytest.importorskip("zennit")
from zennit import rules as zr  # noqa: E402
from zennit.attribution import Gradient as ZGradient  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.composites import (EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlus,  # noqa: E402
                               LayerMapComposite)

from lime_attr import LRP, Composite, get_composite, get_rule, lrp_scope  # noqa: E402
from lime_attr.composites import ZennitRule  # noqa: E402
from lime_attr.scope import LRPScope  # noqa: E402

DT = torch.float64
LOW, HIGH = -3.0, 3.0

PAIRS = {  # (zennit rule factory, our rule name, our parameters)
    "Epsilon": (lambda: zr.Epsilon(epsilon=0.05), "epsilon", dict(epsilon=0.05)),
    "Gamma": (lambda: zr.Gamma(gamma=0.3), "gamma", dict(gamma=0.3)),
    "ZPlus": (lambda: zr.ZPlus(), "zplus", {}),
    "AlphaBeta": (lambda: zr.AlphaBeta(alpha=2.0, beta=1.0), "alpha_beta", dict(alpha=2.0, beta=1.0)),
    "Flat": (lambda: zr.Flat(), "flat", {}),
    "WSquare": (lambda: zr.WSquare(), "wsquare", {}),
    "ZBox": (lambda: zr.ZBox(low=LOW, high=HIGH), "zbox", dict(low=LOW, high=HIGH)),
}


def zennit_relevance(model: nn.Module, composite, x: torch.Tensor, r_out_fn) -> torch.Tensor:
    """Relevance zennit assigns to ``x`` for the output relevance ``r_out_fn(output)``."""
    x = x.clone().requires_grad_(True)
    with composite.context(model) as m:
        out = m(x)
        (rel,) = torch.autograd.grad(out, x, r_out_fn(out.detach()))
    return rel.detach()


def our_relevance(model: nn.Module, composite, x: torch.Tensor, seed_fn) -> torch.Tensor:
    """Relevance of ``x`` (incl. first-layer carriers) for the upstream gradient ``seed_fn(output)``."""
    x = x.clone().requires_grad_(True)
    scope = LRPScope(model, composite)
    with scope:
        out = model(x)
        carriers = scope.pop_carriers()
        grads = torch.autograd.grad(out, [x] + [c for _, c in carriers], seed_fn(out.detach()), allow_unused=True)
    rel = x * grads[0] if grads[0] is not None else torch.zeros_like(x)
    for (_, c), g in zip(carriers, grads[1:]):
        if g is not None:
            rel = rel + c * g
    return rel.detach()


def layer(kind: str) -> nn.Module:
    torch.manual_seed(11)
    mod = nn.Linear(6, 5) if kind == "linear" else nn.Conv2d(3, 4, 3, padding=1)
    return mod.to(DT)


def inputs(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12)
    shape = (3, 6) if kind == "linear" else (2, 3, 5, 5)
    return torch.randn(shape, dtype=DT, generator=gen)


# --------------------------------------------------------------------------------- rule by rule


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("zname", sorted(PAIRS))
def test_module_rule_matches_zennit(zname, kind):
    zfactory, ours, params = PAIRS[zname]
    mod = layer(kind)
    x = inputs(kind)
    g = torch.randn(mod(x).shape, dtype=DT, generator=torch.Generator().manual_seed(13))
    typ = type(mod)
    ref = zennit_relevance(nn.Sequential(mod), LayerMapComposite([(typ, zfactory())]), x, lambda y: y * g)
    got = our_relevance(nn.Sequential(mod), Composite([("site:layer", get_rule(ours, **params))]), x, lambda y: g)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    # and the zennit rule itself driving our scope through the adapter
    via = our_relevance(nn.Sequential(mod), Composite([("site:layer", zfactory())]), x, lambda y: g)
    torch.testing.assert_close(via, ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.SiLU])
def test_pass_matches_zennit_pass(act):
    model = nn.Sequential(act())
    x = inputs("linear")
    g = torch.randn(3, 6, dtype=DT)
    ref = zennit_relevance(model, LayerMapComposite([(act, zr.Pass())]), x, lambda y: y * g)
    got = our_relevance(model, Composite([("site:activation", "pass")]), x, lambda y: g)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ref, (model(x) * g).detach())  # R_in = R_out elementwise


def test_zennit_rule_object_becomes_adapter():
    comp = Composite([(nn.Linear, zr.Epsilon()), ("site:activation", "identity")])
    assert isinstance(comp._rules[0][1], ZennitRule)
    assert "Epsilon" in repr(comp._rules[0][1])


# ------------------------------------------------------------------------------------ whole models


def bn_cnn(pool: type = nn.MaxPool2d) -> nn.Sequential:
    torch.manual_seed(21)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), pool(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), pool(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 16), nn.ReLU(), nn.Linear(16, 5),
    ).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.2)
    return model.eval()


def mlp() -> nn.Sequential:
    torch.manual_seed(22)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(DT)


def zennit_attribution(model, composite, x, target):
    """zennit's own attribution, seeded with the logit value at ``target``."""
    def seed(out):
        s = torch.zeros_like(out)
        s[:, target] = out[:, target]
        return s

    return zennit_relevance(copy.deepcopy(model), composite, x, seed)


def test_epsilon_gamma_box_cnn_with_batchnorm():
    model = bn_cnn()
    x = torch.rand(3, 3, 8, 8, dtype=DT) * (HIGH - LOW) + LOW
    target = 2
    ref = zennit_attribution(model, EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()]),
                             x, target)
    ours = Composite(get_composite("epsilon-gamma", low=LOW, high=HIGH).entries,
                     canonizers=[SequentialMergeBatchNorm()])
    got = LRP(model, ours).attribute(x, target=target)
    torch.testing.assert_close(got, ref, rtol=1e-8, atol=1e-10)
    # zennit's composite driving our scope: through get_composite and through Composite.from_zennit
    zc = EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()])
    for comp in (get_composite(zc), Composite.from_zennit(zc)):
        torch.testing.assert_close(LRP(model, comp).attribute(x, target=target), ref, rtol=1e-8, atol=1e-10)


def test_epsilon_plus_cnn_with_batchnorm_and_avgpool():
    """zennit maps AvgPool to its Norm rule (a 1e-6 stabiliser); lime_attr keeps average pooling linear."""
    model = bn_cnn(nn.AvgPool2d)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    ref = zennit_attribution(model, EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]), x, 1)
    ours = Composite(get_composite("epsilon-plus").entries, canonizers=[SequentialMergeBatchNorm()])
    got = LRP(model, ours).attribute(x, target=1)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    via = LRP(model, EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])).attribute(x, target=1)
    torch.testing.assert_close(via, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("zcomp", ["EpsilonPlus", "EpsilonGammaBox"])
def test_mlp_matches_zennit(zcomp):
    model = mlp()
    x = torch.randn(4, 10, dtype=DT)
    if zcomp == "EpsilonPlus":
        zc, ours = EpsilonPlus(), get_composite("epsilon-plus")
    else:  # zennit's first-layer map is for convolutions only: on an MLP every Linear gets epsilon
        zc, ours = EpsilonGammaBox(low=LOW, high=HIGH), get_composite("epsilon-plus")
    ref = zennit_attribution(model, zc, x, 3)
    torch.testing.assert_close(LRP(model, ours).attribute(x, target=3), ref, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(LRP(model, zc).attribute(x, target=3), ref, rtol=1e-9, atol=1e-11)


def test_alpha2beta1_cnn():
    model = bn_cnn()
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    zc = EpsilonAlpha2Beta1(canonizers=[SequentialMergeBatchNorm()])
    ref = zennit_attribution(model, zc, x, 0)
    ours = Composite([(nn.Conv2d, "alpha_beta"), ("site:layer", "epsilon"), ("site:affine", "gradient"),
                      ("site:activation", "identity")], canonizers=[SequentialMergeBatchNorm()])
    torch.testing.assert_close(LRP(model, ours).attribute(x, target=0), ref, rtol=1e-8, atol=1e-10)


def test_zennit_gradient_attributor_agrees():
    """zennit's ``Gradient`` attributor (one-hot seed) times the logit equals our relevance."""
    model = mlp()
    x = torch.randn(3, 10, dtype=DT)
    zc = EpsilonPlus()
    with ZGradient(model=copy.deepcopy(model), composite=zc) as attributor:
        out, rel = attributor(x, torch.eye(4, dtype=DT)[[1, 1, 1]])
    logit = model(x)[:, 1].detach()
    ref = rel * logit[:, None]
    torch.testing.assert_close(LRP(model, "epsilon-plus").attribute(x, target=1), ref, rtol=1e-9, atol=1e-11)


def test_zennit_rule_as_composite_entry_with_our_rules():
    """A zennit rule for one module type, lime_attr's rules for everything else."""
    model = mlp()
    x = torch.randn(2, 10, dtype=DT)
    mixed = Composite([("0", zr.ZPlus()), ("site:layer", "epsilon"), ("site:activation", "identity")])
    pure = Composite([("0", "zplus"), ("site:layer", "epsilon"), ("site:activation", "identity")])
    torch.testing.assert_close(LRP(model, mixed).attribute(x, target=0), LRP(model, pure).attribute(x, target=0),
                               rtol=1e-10, atol=1e-12)


def test_zennit_scope_restores_model():
    model = bn_cnn()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    LRP(model, EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()])).attribute(x, target=0)
    for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), n
    assert torch.equal(model(x), reference(x))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_zennit_composite_in_lrp_scope_directly():
    model = mlp()
    x = torch.randn(2, 10, dtype=DT, requires_grad=True)
    with lrp_scope(model, EpsilonPlus()):
        out = model(x)[:, 2]
        (g,) = torch.autograd.grad(out.sum(), x)
    ref = zennit_attribution(model, EpsilonPlus(), x.detach(), 2)
    torch.testing.assert_close((x * g).detach(), ref, rtol=1e-9, atol=1e-11)


class _Attention(nn.Module):
    """Hand-written attention (functional ops go through the op mode) after Linear layers zennit drives."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8).to(DT) for _ in range(4))
        self.head = nn.Linear(8, 3).to(DT)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        a = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
        h = torch.nn.functional.gelu(self.o(a @ v))
        return self.head(h[:, -1])


def test_zennit_driven_layers_keep_op_rules_downstream():
    """Ops after a zennit-driven module are still seen (and ruled) by the op-coverage mode."""
    model = _Attention()
    x = torch.randn(2, 5, 8, dtype=DT)
    ours = LRP(model, get_composite("attnlrp", epsilon=1e-6)).attribute(x, target=1)
    zc = LayerMapComposite([(nn.Linear, zr.Epsilon(epsilon=1e-6))])
    scope = LRPScope(model, Composite.from_zennit(zc))
    with scope:
        model(x.clone().requires_grad_(True))
    assert {"matmul:matmul", "softmax:softmax", "activation:gelu"} <= scope.ruled_ops
    torch.testing.assert_close(LRP(model, Composite.from_zennit(zc)).attribute(x, target=1), ours,
                               rtol=1e-9, atol=1e-12)
