"""Composites on whole networks (conservation) and scopes (exact restoration, isolation, reuse)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lime_attr import LRP, Composite, LRPScope, available_composites, get_composite, lrp_scope
from lime_attr.rules import AlphaBeta, Epsilon, Gamma, ZBox, ZPlus

TINY = 1e-30
NET_SETTINGS = settings(max_examples=5, deadline=None, derandomize=True,
                        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
DT = torch.float64


# ---------------------------------------------------------------------------------------- models


def random_mlp(depth: int, width: int, d_in: int, n_out: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=False), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, n_out, bias=False))
    return nn.Sequential(*layers).to(DT)


def random_cnn(depth: int, channels: int, pool: bool, seed: int, size: int = 8) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    c = 3
    for i in range(depth):
        layers += [nn.Conv2d(c, channels, 3, padding=1, bias=False), nn.ReLU()]
        c = channels
        if pool and i == 0:
            layers.append(nn.AvgPool2d(2))
            size //= 2
    layers += [nn.Flatten(), nn.Linear(c * size * size, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False)]
    return nn.Sequential(*layers).to(DT)


def conserving_composites(last: str) -> dict[str, Composite]:
    """Composites with stabilisers too small to absorb relevance in float64; the explained (last)
    layer gets epsilon as in zennit's composites."""
    act = ("site:activation", "identity")
    return {
        "epsilon": Composite([("site:layer", Epsilon(TINY)), act]),
        "zplus": Composite([(last, Epsilon(TINY)), ("site:layer", ZPlus(TINY)), act]),
        "gamma": Composite([(last, Epsilon(TINY)), ("site:layer", Gamma(0.25, TINY)), act]),
        "alpha_beta": Composite([(last, Epsilon(TINY)), ("site:layer", AlphaBeta(2.0, 1.0, TINY)), act]),
        "epsilon-gamma": Composite([("first_layer", ZBox(-4.0, 4.0, TINY)), (nn.Conv2d, Gamma(0.25, TINY)),
                                    ("site:layer", Epsilon(TINY)), act]),
    }


def check_conserves(model: nn.Sequential, x: torch.Tensor, composite: Composite, target: int = 1) -> None:
    attr, delta = LRP(model, composite).attribute(x, target=target, return_convergence_delta=True)
    logit = model(x)[:, target].detach()
    total = attr.flatten(1).sum(1)
    scale = max(1.0, float(logit.abs().max()))
    torch.testing.assert_close(total, logit, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(delta, logit - total, rtol=0, atol=1e-12 * scale)


def both_signs_everywhere(model: nn.Sequential, x: torch.Tensor) -> bool:
    """Whether every unit of every layer but the last receives both positive and negative contributions.

    alpha-beta is conservative only then: a unit whose negative part is exactly empty passes ``alpha * R``
    (as in zennit), by the rule's definition.
    """
    ok = True
    layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d))][:-1]

    def hook(mod, args, out):
        nonlocal ok
        xin = args[0].detach()
        w = mod.weight.detach()
        if isinstance(mod, nn.Linear):
            fwd = F.linear
        else:
            def fwd(a, b):
                return mod._conv_forward(a, b, None)
        xp, xn, wp, wn = xin.clamp(min=0), xin.clamp(max=0), w.clamp(min=0), w.clamp(max=0)
        pos, neg = fwd(xp, wp) + fwd(xn, wn), fwd(xp, wn) + fwd(xn, wp)
        ok = ok and bool((pos != 0).all() and (neg != 0).all())

    handles = [m.register_forward_hook(hook) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return ok


# ------------------------------------------------------------------ 2. conservation on whole networks


@pytest.mark.parametrize("name", ["epsilon", "zplus", "gamma", "alpha_beta", "epsilon-gamma"])
@NET_SETTINGS
@given(depth=st.integers(1, 3), width=st.integers(4, 12), batch=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_mlp_relevance_sums_to_logit(name, depth, width, batch, seed):
    model = random_mlp(depth, width, 5, 4, seed)
    x = torch.randn(batch, 5, dtype=DT, generator=torch.Generator().manual_seed(seed))
    if name == "alpha_beta":
        assume(both_signs_everywhere(model, x))
    check_conserves(model, x, conserving_composites(str(len(model) - 1))[name])


@pytest.mark.parametrize("name", ["epsilon", "zplus", "gamma", "alpha_beta", "epsilon-gamma"])
@NET_SETTINGS
@given(depth=st.integers(1, 3), channels=st.integers(2, 5), pool=st.booleans(), seed=st.integers(0, 10_000))
def test_cnn_relevance_sums_to_logit(name, depth, channels, pool, seed):
    model = random_cnn(depth, channels, pool, seed)
    x = torch.randn(2, 3, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(seed))
    if name == "alpha_beta":
        assume(both_signs_everywhere(model, x))
    check_conserves(model, x, conserving_composites(str(len(model) - 1))[name], target=2)


@pytest.mark.parametrize("name", ["epsilon-gamma", "epsilon-plus", "attnlrp", "cp-lrp"])
def test_named_composites_nearly_conserve(name):
    """The named composites keep their default stabilisers (1e-6): conservation up to what they absorb."""
    model = random_cnn(2, 4, True, seed=3)
    x = torch.randn(3, 3, 8, 8, dtype=DT)
    attr, delta = LRP(model, name).attribute(x, target=0, return_convergence_delta=True)
    logit = model(x)[:, 0].detach()
    assert float((delta / logit).abs().max()) < 1e-3


def test_lrp0_on_relu_cnn_conserves_exactly():
    model = random_cnn(2, 4, True, seed=5)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    check_conserves(model, x, Composite([("site:layer", Epsilon(0.0)), ("site:activation", "identity")]))


# -------------------------------------------------------------------------------- composite matching


def test_first_match_wins_and_matchers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    comp = Composite([("first_layer", "zbox"), ("3", "epsilon"), (nn.Conv2d, "gamma"), ("site:layer", "zplus"),
                      ("site:activation", "identity")])
    with LRPScope(model, comp) as m:
        pass
    scope = LRPScope(model, comp)
    with scope:
        rules = {s.name: comp.rule_for(s) for s in scope.sites if s.kind in ("layer", "activation")}
    assert type(rules["0"]).__name__ == "ZBox"       # first_layer beats the Conv2d entry
    assert type(rules["3"]).__name__ == "Epsilon"    # name pattern beats site:layer
    assert type(rules["1"]).__name__ == "Identity"
    assert m is model


def test_prepend_and_registry():
    comp = get_composite("epsilon-plus")
    comp2 = comp.prepend(("site:layer", "epsilon"))
    assert comp2.entries[0] == ("site:layer", "epsilon")
    assert len(comp2.entries) == len(comp.entries) + 1
    assert {"attnlrp", "cp-lrp", "epsilon-gamma", "epsilon-plus"} <= set(available_composites())
    assert get_composite(comp) is comp


# ---------------------------------------------------------------------------------------- 8. scopes


def _plain(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    seed = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = torch.autograd.grad(out, [x, *model.parameters()], seed)
    return out.detach(), [g.detach() for g in grads]


def _assert_bit_identical(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> None:
    out, grads = _plain(model, x)
    ref_out, ref_grads = _plain(reference, x)
    assert torch.equal(out, ref_out)
    assert len(grads) == len(ref_grads)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)
    for (n, p), (n2, p2) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert n == n2 and torch.equal(p, p2), n
    assert len(model._forward_hooks) == len(reference._forward_hooks)
    for m, r in zip(model.modules(), reference.modules()):
        assert len(m._forward_hooks) == len(r._forward_hooks) == 0
        assert len(m._forward_pre_hooks) == len(r._forward_pre_hooks) == 0
        assert "forward" not in m.__dict__


def bn_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)).to(DT)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    return model.eval()


def _globals_snapshot() -> dict:
    import transformers.modeling_utils as mu

    snap = {f"{cls.__name__}.forward": cls.forward for cls in
            (nn.Module, nn.Linear, nn.Conv2d, nn.ReLU, nn.GELU, nn.LayerNorm, nn.BatchNorm2d, nn.Dropout,
             nn.Softmax, nn.MaxPool2d, nn.Flatten)}
    snap.update({f"F.{n}": getattr(F, n) for n in ("linear", "conv2d", "softmax", "scaled_dot_product_attention",
                                                   "layer_norm", "gelu", "relu", "dropout")})
    snap.update({f"torch.{n}": getattr(torch, n) for n in ("matmul", "softmax", "exp", "mul")})
    snap["Tensor.__mul__"] = torch.Tensor.__mul__
    snap["Tensor.__matmul__"] = torch.Tensor.__matmul__
    snap.update({f"attn:{k}": v for k, v in mu.ALL_ATTENTION_FUNCTIONS._global_mapping.items()})
    snap["mode_stack"] = torch._C._len_torch_function_stack()
    return snap


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(DT).eval()


@pytest.mark.parametrize("composite", ["epsilon-gamma", "epsilon-plus", "attnlrp", "zennit-bn"])
def test_scope_restores_cnn_exactly(composite):
    model = bn_cnn()
    reference = copy.deepcopy(model)
    before = _globals_snapshot()
    x = torch.randn(2, 3, 10, 10, dtype=DT)
    if composite == "zennit-bn":
        from zennit.canonizers import SequentialMergeBatchNorm

        composite = Composite(get_composite("epsilon-gamma").entries, canonizers=[SequentialMergeBatchNorm()])
    lrp = LRP(model, composite)
    lrp.attribute(x, target=1)
    _assert_bit_identical(model, reference, x)
    assert _globals_snapshot() == before


def test_scope_restores_hf_llama_exactly():
    model = tiny_llama()
    reference = copy.deepcopy(model)
    before = _globals_snapshot()
    emb = model.get_input_embeddings()(torch.tensor([[1, 5, 7, 2, 9]])).detach()
    impl = model.config._attn_implementation
    attr = LRP(model, "attnlrp").attribute(emb, target=3)
    assert attr.shape == emb.shape and torch.isfinite(attr).all()
    assert model.config._attn_implementation == impl
    after = _globals_snapshot()
    # pre-existing attention-registry entries are untouched (lime_attr only adds its own names)
    def own(snapshot):  # lime_attr's own, idempotent registrations may already exist from earlier tests
        return {k: v for k, v in snapshot.items() if not k.startswith("attn:lime_attr")}

    assert own(after) == own(before)

    def run(m):
        e = emb.clone().requires_grad_(True)
        logits = m(inputs_embeds=e).logits
        grads = torch.autograd.grad(logits[0, -1].sum(), [e, *m.parameters()], allow_unused=True)
        return logits.detach(), grads

    (lo, g), (lr, gr) = run(model), run(reference)
    assert torch.equal(lo, lr)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g, gr))


def test_scope_restores_on_exception():
    model = bn_cnn()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 3, 10, 10, dtype=DT)
    with pytest.raises(RuntimeError, match="boom"):
        with lrp_scope(model, "epsilon-plus"):
            model(x)
            raise RuntimeError("boom")
    _assert_bit_identical(model, reference, x)


def _attr_in_scope(model, x, composite, target=1):
    xr = x.clone().requires_grad_(True)
    out = model(xr)[:, target].sum()
    (g,) = torch.autograd.grad(out, xr)
    return (xr * g).detach()


def test_two_models_nested_and_sequential_scopes_do_not_interfere():
    m1, m2 = random_cnn(2, 4, True, seed=1), random_cnn(2, 4, True, seed=2)
    x = torch.randn(2, 3, 8, 8, dtype=DT)
    alone1 = LRP(m1, "epsilon-plus").attribute(x, target=1)
    gamma = Composite([("site:layer", Gamma(0.5)), ("site:activation", "identity")])  # no first-layer carriers
    alone2 = LRP(m2, gamma).attribute(x, target=1)
    plain2 = LRP(m2, Composite([("site:layer", "gradient"), ("site:activation", "gradient")])).attribute(x, target=1)
    # nested: each model keeps its own rules
    with lrp_scope(m1, "epsilon-plus"):
        with lrp_scope(m2, gamma):
            r2 = _attr_in_scope(m2, x, None)
            r1 = _attr_in_scope(m1, x, None)
        r1b = _attr_in_scope(m1, x, None)
        r2_plain = _attr_in_scope(m2, x, None)   # m2 outside its scope: plain input x gradient
    torch.testing.assert_close(r1, alone1, rtol=0, atol=0)
    torch.testing.assert_close(r1b, alone1, rtol=0, atol=0)
    torch.testing.assert_close(r2, alone2, rtol=0, atol=0)
    torch.testing.assert_close(r2_plain, plain2, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(alone1, LRP(m1, "epsilon-gamma").attribute(x, target=1))
    # sequential scopes, alternating composites on the same model
    for _ in range(2):
        torch.testing.assert_close(LRP(m1, "epsilon-plus").attribute(x, target=1), alone1, rtol=0, atol=0)
        torch.testing.assert_close(LRP(m1, "epsilon-gamma").attribute(x, target=1),
                                   LRP(copy.deepcopy(m1), "epsilon-gamma").attribute(x, target=1), rtol=0, atol=0)


def test_scope_is_reusable_and_not_reentrant():
    model = random_mlp(2, 6, 5, 3, seed=4)
    x = torch.randn(2, 5, dtype=DT)
    scope = LRPScope(model, "epsilon-plus")
    results = []
    for _ in range(3):
        with scope:
            results.append(_attr_in_scope(model, x, None))
    assert all(torch.equal(results[0], r) for r in results[1:])
    lrp = LRP(model, "epsilon-plus")
    assert torch.equal(lrp.attribute(x, target=1), lrp.attribute(x, target=1))
    with scope:
        with pytest.raises(RuntimeError, match="already active"):
            scope.__enter__()


def test_two_hf_models_in_one_process():
    a, b = tiny_llama(0), tiny_llama(1)
    emb = a.get_input_embeddings()(torch.tensor([[3, 4, 5]])).detach()
    ra = LRP(a, "attnlrp").attribute(emb, target=2)
    rb = LRP(b, "cp-lrp").attribute(emb, target=2)
    with lrp_scope(a, "attnlrp"):
        with lrp_scope(b, "cp-lrp"):
            for m, ref in ((a, ra), (b, rb)):
                e = emb.clone().requires_grad_(True)
                out = m(inputs_embeds=e).logits[:, -1, 2].sum()
                (g,) = torch.autograd.grad(out, e)
                torch.testing.assert_close(e.detach() * g, ref, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------- in-place activations


def _inplace_net(act: type, inplace: bool) -> nn.Sequential:
    torch.manual_seed(51)
    return nn.Sequential(nn.Linear(5, 7), act(inplace=inplace), nn.Linear(7, 7), act(inplace=inplace),
                         nn.Linear(7, 3)).to(DT)


def _relevance(model: nn.Module, composite: str, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    with lrp_scope(model, composite):
        (g,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    return (x * g).detach()


@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.ELU, nn.Hardswish])
@pytest.mark.parametrize("composite", ["attnlrp", "epsilon-plus"])
def test_inplace_activation_equals_out_of_place(act, composite):
    """An activation built with inplace=True gets the same relevance as the same model built with
    inplace=False: inside the scope the instance is out-of-place, and on exit its flag is restored."""
    model, plain = _inplace_net(act, True), _inplace_net(act, False)
    x = torch.randn(4, 5, dtype=DT)
    with LRPScope(model, composite):
        inside = [m.inplace for m in model.modules() if isinstance(m, act)]
    assert inside == [False, False]
    got, ref = _relevance(model, composite, x), _relevance(plain, composite, x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert [m.inplace for m in model.modules() if isinstance(m, act)] == [True, True]
    assert all("inplace" in m.__dict__ for m in model.modules() if isinstance(m, act))
    assert torch.equal(model(x), plain(x))


class _ForcedInplaceSiLU(nn.SiLU):
    """Writes into its input whatever its ``inplace`` flag says (lime_attr cannot switch it off)."""

    def forward(self, x):
        return F.silu(x, inplace=True)


def test_input_overwritten_in_place_is_a_clear_error():
    torch.manual_seed(52)
    model = nn.Sequential(nn.Linear(5, 7), _ForcedInplaceSiLU(), nn.Linear(7, 3)).to(DT)
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    from lime_attr.errors import RuleSiteError

    with pytest.raises(RuleSiteError, match=r"module '1' \(_ForcedInplaceSiLU, activation\) modified its input in "
                                            r"place.*out-of-place"):
        with lrp_scope(model, "attnlrp"):
            model(x)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad(), lrp_scope(model, "attnlrp"):
        model(x)  # without gradients no rule runs, so nothing to check


class _InplaceOpBlock(nn.Module):
    """An unknown module whose forward calls an in-place functional activation (ruled by the op mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x):
        return F.silu(self.lin(x), inplace=True)


def test_inplace_functional_activation_is_a_clear_error():
    torch.manual_seed(53)
    model = nn.Sequential(nn.Linear(5, 5), _InplaceOpBlock(), nn.Linear(5, 3)).to(DT)
    x = torch.randn(2, 5, dtype=DT, requires_grad=True)
    from lime_attr.errors import UncoveredOpError

    with pytest.raises(UncoveredOpError, match=r"in-place activation 'silu'.*inplace=False"):
        LRP(model, "attnlrp").attribute(x, target=0)


# ------------------------------------------------------------- epsilon factor read from the ReLU after a layer


class _SameMLPUnrolled(nn.Module):
    """The layers of a Sequential MLP called from a custom forward: no structural pairing possible."""

    def __init__(self, seq: nn.Sequential) -> None:
        super().__init__()
        self.layers = nn.ModuleList(list(seq))

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).double()


def test_epsilon_before_a_relu_is_read_from_the_relu_output_bit_for_bit():
    """In a stock nn.Sequential the ReLU after an epsilon layer takes its factor over (no tensor of its own):
    the relevance is bit-identical to the unpaired computation, and no hook is left on the layer outputs."""
    seq = _mlp()
    x = torch.randn(5, 6, dtype=torch.double)
    comp = Composite([("site:layer", Epsilon(0.3)), ("site:activation", "identity")])
    outs: list = []
    # (a forward hook on the ReLUs sees their inputs, the layers' outputs, without observing the layers)
    handles = [seq[i].register_forward_hook(lambda m, a, o: outs.append(a[0])) for i in (1, 3)]
    paired = LRP(seq, comp).attribute(x, target=1)
    for h in handles:
        h.remove()
    assert len(outs) == 2 and all(not o._backward_hooks for o in outs)  # claimed by the ReLUs
    unrolled = LRP(_SameMLPUnrolled(seq), comp).attribute(x, target=1)
    assert torch.equal(paired, unrolled)
    # and both equal the written-out epsilon rule, layer by layer
    acts, a = [x], x
    for m in seq:
        a = torch.relu(a) if isinstance(m, nn.ReLU) else m(a)  # (not the in-place ReLU: keep every tensor)
        acts.append(a)
    r = torch.zeros_like(acts[-1])
    r[:, 1] = acts[-1][:, 1]
    for i in (4, 2, 0):
        z = acts[i + 1]
        # (the ReLU before layer i passes relevance unchanged: identity rule)
        r = acts[i] * ((r / (z + 0.3 * ((z >= 0).to(z) * 2 - 1))) @ seq[i].weight)
    torch.testing.assert_close(paired, r.detach(), rtol=1e-10, atol=1e-12)


def test_epsilon_pairing_falls_back_when_the_relu_gets_another_tensor():
    """A pre-hook that replaces the ReLU's input breaks the 'only consumer' premise: the layer's output then
    gets the ordinary epsilon hook, and the result equals the unpaired model with the same hook."""
    seq = _mlp(1)
    x = torch.randn(4, 6, dtype=torch.double)
    comp = Composite([("site:layer", Epsilon(0.3)), ("site:activation", "identity")])
    seq[1].register_forward_pre_hook(lambda m, a: (a[0] * 1.0,))
    unrolled = _SameMLPUnrolled(seq)
    assert torch.equal(LRP(seq, comp).attribute(x, target=0), LRP(unrolled, comp).attribute(x, target=0))


def test_epsilon_pairing_keeps_latent_relevance_at_the_layer_and_relu_outputs():
    """Latent relevance at a layer's output is z * g *before* the layer's epsilon factor: a recorded layer
    keeps its own hook (its output is observed), the ReLU's output relevance is unchanged either way."""
    seq = _mlp(2)
    x = torch.randn(3, 6, dtype=torch.double)
    comp = Composite([("site:layer", Epsilon(0.3)), ("site:activation", "identity")])
    _, lat_seq = LRP(seq, comp).attribute(x, target=2, latent=["1", "2"])
    _, lat_unr = LRP(_SameMLPUnrolled(seq), comp).attribute(x, target=2, latent=["layers.1", "layers.2"])
    assert torch.equal(lat_seq["1"], lat_unr["layers.1"]) and torch.equal(lat_seq["2"], lat_unr["layers.2"])
