"""Agreement with zennit: rule by rule, whole models, and zennit rules/composites driving our scope.

zennit passes *relevance* through its backward pass and seeds it with a one-hot vector; lime_attr passes
a modified *gradient* seeded with 1, so relevance is ``x * g``. Seeding zennit's backward with the value
of the explained logit (instead of 1) makes the two directly comparable.
"""
from __future__ import annotations

import copy
import inspect
import os
from importlib import metadata
from pathlib import Path

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
from lime_attr.interop.zennit import ZennitRule  # noqa: E402
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
    assert isinstance(comp.rules[0][1], ZennitRule)
    assert "Epsilon" in repr(comp.rules[0][1])


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


# ------------------------------------------------------------------------- zennit versions (0.5, 1.0)


def imported_zennit_version() -> str:
    """Version of the zennit package actually imported (not of whichever zennit is installed first)."""
    root = Path(zennit.__file__).resolve().parent.parent
    for dist in metadata.distributions(path=[str(root)]):
        if (dist.metadata["Name"] or "").lower() == "zennit":
            return dist.version
    return getattr(zennit, "__version__", "unknown")


def test_expected_zennit_version():
    """CI runs this file under each supported zennit with LIME_ATTR_EXPECT_ZENNIT set (see .ci/run)."""
    expected = os.environ.get("LIME_ATTR_EXPECT_ZENNIT")
    if not expected:
        pytest.skip("set LIME_ATTR_EXPECT_ZENNIT=<version> to assert which zennit these tests run against")
    assert imported_zennit_version() == expected, f"zennit imported from {zennit.__file__}"


def hooks_see_all_inputs() -> bool:
    """zennit >= 1.0 hooks receive ``(args, kwargs)`` and re-run the module with all of them; 0.5 hooks
    see only the positional inputs and re-run the module with the first one (a capability, not a version)."""
    return "kwargs" in inspect.signature(zr.Epsilon().forward).parameters


class Shifted(nn.Module):
    """A dense layer with an additive shift from another branch: ``W x + b + shift``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=DT) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out, dtype=DT) * 0.1)

    def forward(self, x, shift=None):
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return y if shift is None else y + shift


class TwoBranch(nn.Module):
    """``head(relu(mix(relu(a(x)), b(x))))`` with the shift passed by keyword or positionally."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        torch.manual_seed(41)
        self.keyword = keyword
        self.a, self.b = nn.Linear(6, 5).to(DT), nn.Linear(6, 5).to(DT)
        self.mix = Shifted(5, 5)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(5, 3).to(DT)

    def forward(self, x):
        h, s = self.act1(self.a(x)), self.b(x)
        return self.head(self.act2(self.mix(h, shift=s) if self.keyword else self.mix(h, s)))


@pytest.mark.parametrize("keyword", [True, False], ids=["keyword-input", "positional-inputs"])
def test_zennit_rule_on_multi_input_module(keyword):
    """A zennit rule on a module with a second tensor input: every input is converted at the boundary,
    so the result is zennit's own attribution whichever hook protocol the installed zennit has."""
    if not keyword and not hooks_see_all_inputs():
        pytest.skip("this zennit's rules re-run a module with its first input only (zennit < 1.0)")
    model = TwoBranch(keyword)
    x = torch.randn(4, 6, dtype=DT)
    zc = LayerMapComposite([((nn.Linear, Shifted), zr.Epsilon(epsilon=0.05))])
    ref = zennit_attribution(model, zc, x, 1)
    got = LRP(model, Composite.from_zennit(zc)).attribute(x, target=1)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-11)
    assert float(ref.abs().sum()) > 0


class _Broken:
    def copy(self):
        return self

    def apply(self, root):
        raise RuntimeError("broken canonizer")


@pytest.mark.parametrize("which", ["zennit-composite", "lime-composite", "failing-canonizer"])
def test_zennit_canonizer_applied_and_restored_exactly(which):
    """BatchNorm merging: inside the scope the merged layer is a leaf parameter holding the merged value
    and repeated passes agree; on exit every parameter/buffer is the original object with the original
    value, no attribute shadows it, and no hook remains -- under zennit 0.5 and 1.0 alike (zennit 1.0's
    own context leaves merged values in ``_parameters``, zennit issue #237)."""
    model = bn_cnn()
    reference = copy.deepcopy(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    x = torch.rand(2, 3, 8, 8, dtype=DT) * (HIGH - LOW) + LOW
    merge = [SequentialMergeBatchNorm()]
    if which == "zennit-composite":
        comp = EpsilonGammaBox(low=LOW, high=HIGH, canonizers=merge)
    elif which == "lime-composite":
        comp = Composite(get_composite("epsilon-gamma", low=LOW, high=HIGH).entries, canonizers=merge)
    else:
        comp = Composite(get_composite("epsilon-plus").entries, canonizers=[*merge, _Broken()])
    if which == "failing-canonizer":
        with pytest.raises(RuntimeError, match="broken canonizer"):
            with lrp_scope(model, comp):
                pass  # pragma: no cover
    else:
        results = []
        with lrp_scope(model, comp):
            w = model[0].weight
            assert isinstance(w, nn.Parameter) and w.is_leaf
            assert not torch.equal(w, reference[0].weight)  # merged with the BatchNorm that follows
            probe = torch.randn(2, 6, 4, 4, dtype=DT)
            # the BatchNorm is now the identity (zennit 0.5 keeps its eps: x / sqrt(1 + eps))
            torch.testing.assert_close(model[1](probe), probe, rtol=2e-5, atol=2e-5)
            for _ in range(2):
                xi = x.clone().requires_grad_(True)
                model(xi)[:, 0].sum().backward()
                results.append(xi * xi.grad)
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    for n, p in model.named_parameters():
        assert p is params[n], n
    for n, b in model.named_buffers():
        assert b is buffers[n], n
    assert model.state_dict().keys() == reference.state_dict().keys()
    for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), n
    for m in model.modules():
        assert not [k for k in m.__dict__ if k in m._parameters or k in m._buffers], m
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert model[1].eps == reference[1].eps
    assert torch.equal(model(x), reference(x))


# ------------------------------------------------------------------ one zennit rule shared by many modules


def two_conv_cnn() -> nn.Sequential:
    """Two differently shaped convolutions (and a dense head)."""
    torch.manual_seed(41)
    return nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 5, padding=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).to(DT)


def same_linear_mlp() -> nn.Sequential:
    """Identically shaped Linear layers (a shared hook's stored state would silently mix them)."""
    torch.manual_seed(42)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 3)).to(DT)


@pytest.mark.parametrize("zname", ["Epsilon", "Gamma", "ZPlus", "AlphaBeta"])
@pytest.mark.parametrize("shapes", ["different-convs", "same-linears"])
def test_shared_zennit_rule_instance_equals_zennit_composite(zname, shapes):
    """ONE zennit rule instance as a composite entry that matches several modules: each module gets its own
    copy of the hook, and the relevance equals zennit's own layer-map composite to 1e-6 (float64)."""
    make = PAIRS[zname][0]
    if shapes == "different-convs":
        model, x, kind = two_conv_cnn(), torch.randn(2, 3, 6, 6, dtype=DT), nn.Conv2d
    else:
        model, x, kind = same_linear_mlp(), torch.randn(3, 8, dtype=DT), nn.Linear
    shared, head = make(), zr.Epsilon(epsilon=1e-6)
    ours = Composite([(kind, shared), (nn.Linear, head), ("site:activation", "pass")])
    reference = LayerMapComposite([(kind, make()), (nn.Linear, zr.Epsilon(epsilon=1e-6))])
    ref = zennit_attribution(model, reference, x, 1)
    got = LRP(model, ours).attribute(x, target=1)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------ zennit canonizers wherever a canonizer goes


def test_canonizer_argument_takes_zennit_canonizers():
    """``canonizer=`` with a zennit canonizer, and with a list, equals the Composite(canonizers=...) route."""
    model = bn_cnn()
    reference = copy.deepcopy(model)
    x = torch.rand(2, 3, 8, 8, dtype=DT) * (HIGH - LOW) + LOW
    base = get_composite("epsilon-gamma", low=LOW, high=HIGH)
    via_composite = LRP(model, Composite(base.entries, canonizers=[SequentialMergeBatchNorm()])).attribute(x, target=1)
    ref = zennit_attribution(model, EpsilonGammaBox(low=LOW, high=HIGH, canonizers=[SequentialMergeBatchNorm()]),
                             x, 1)
    torch.testing.assert_close(via_composite, ref, rtol=1e-8, atol=1e-10)
    for canonizer in (SequentialMergeBatchNorm(), [SequentialMergeBatchNorm()], ["auto", SequentialMergeBatchNorm()]):
        got = LRP(model, base, canonizer=canonizer).attribute(x, target=1)
        torch.testing.assert_close(got, via_composite, rtol=0, atol=0)
        for (n, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items()):
            assert torch.equal(p, q), n
    with lrp_scope(model, base, canonizer=SequentialMergeBatchNorm()):
        assert not torch.equal(model[0].weight, reference[0].weight)  # merged inside the scope
    assert torch.equal(model[0].weight, reference[0].weight)


def test_zennit_canonizer_in_the_composite_slot_is_a_clear_error():
    model = bn_cnn()
    with pytest.raises(TypeError, match=r"canonizer=SequentialMergeBatchNorm\(\)"):
        LRP(model, SequentialMergeBatchNorm()).attribute(torch.randn(1, 3, 8, 8, dtype=DT), target=0)
    with pytest.raises(TypeError, match="zennit canonizer, not a rule"):
        Composite([(nn.Conv2d, SequentialMergeBatchNorm())])
    with pytest.raises(TypeError, match="a zennit canonizer"):
        LRPScope(model, "epsilon-plus", canonizer=[object()])
