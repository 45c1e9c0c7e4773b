"""LIME's objective registry (``LimeConfig(objective=...)``): the released objective unchanged, each variant
against its written-out formula, the decision's conservation, a user's objective through ``lime_generate``,
the per-tensor learning rates, exact second order against finite differences, and the errors."""
from __future__ import annotations

import json
import math
import pickle
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import LlamaConfig, LlamaForCausalLM

from lime_attr import LRP
from lime_attr.mitigation import (
    LimeConfig,
    LimeOptimizer,
    Objective,
    available_objectives,
    get_objective,
    lime_generate,
    register_objective,
    unregister_objective,
)
from lime_attr.mitigation.objectives import (
    DecisionObjective,
    EvidenceObjective,
    PaperObjective,
    ScaledObjective,
    UnknownObjectiveError,
    softmax_focus_loss,
    stable_logsumexp,
)

SPAN = (2, 8)  # fake "perceptual" positions of the text-only model
BUILTIN = ("paper", "decision", "logprob", "evidence", "scaled")

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def _llama64() -> LlamaForCausalLM:
    """float64 throughout: SDPA attention and torch's RMSNorm (transformers' eager attention and LlamaRMSNorm
    compute in float32 even in a float64 model, too coarse for finite differences and conservation)."""
    model = _llama().to(torch.float64)
    model.set_attn_implementation("sdpa")
    for parent in [model.model, *model.model.layers]:
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                norm = nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=torch.float64)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                setattr(parent, name, norm)
    return model


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    return torch.randint(1, 64, (1, 12))


def _run(model, prompt, cfg, n=1):
    recs = []
    out = lime_generate(model, None, {"input_ids": prompt}, cfg, max_new_tokens=n, modality_mask=SPAN,
                        callback=recs.append)
    return out, recs


def _masks(draw_valid, b, s, m):
    modality = torch.zeros(b, s, dtype=torch.bool)
    modality[:, s - m:] = True
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1:, :min(draw_valid, s - m)] = False  # left padding of the other rows (M stays valid)
    return modality, valid


# ------------------------------------------------------------------------------------------ registry and config


def test_builtin_objectives_are_registered_and_paper_is_the_default():
    assert available_objectives()[:5] == BUILTIN
    assert LimeConfig().objective == "paper"
    assert isinstance(LimeConfig().objective_impl, PaperObjective)
    for name in BUILTIN:
        obj = get_objective(name)
        assert isinstance(obj, Objective) and obj.name == name
        assert pickle.loads(pickle.dumps(obj)) == obj
    assert get_objective("scaled").scales_lr() and not get_objective("decision").scales_lr()


def test_config_accepts_an_instance_and_serialises_it_as_its_name():
    cfg = LimeConfig(objective=EvidenceObjective(eps=1e-3), layers=[0, 1])
    d = cfg.to_dict()
    assert d["objective"] == "evidence" and d["layers"] == [0, 1]
    json.dumps(d, allow_nan=False)
    assert LimeConfig(**{**d, "layers": tuple(d["layers"])}).objective == "evidence"
    assert LimeConfig(objective=Objective()).to_dict()["objective"] == "Objective"  # unregistered, no name
    assert cfg.replace(objective="decision").objective_impl is get_objective("decision")


def test_bad_objectives_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="available objectives: paper, decision, logprob, evidence, scaled"):
        LimeConfig(objective="papr")
    with pytest.raises(TypeError, match="registered name .* or an Objective instance"):
        LimeConfig(objective=3)
    with pytest.raises(UnknownObjectiveError, match="available objectives") as err:
        get_objective("nope")
    assert isinstance(err.value, ValueError) and isinstance(err.value, KeyError)
    with pytest.raises(TypeError, match="Objective instance"):
        get_objective(1.5)
    with pytest.raises(ValueError, match="already registered"):
        register_objective("decision", DecisionObjective())
    with pytest.raises(TypeError, match="expects an Objective"):
        register_objective("mine", lambda logits, target: logits[:, 0])
    with pytest.raises(ValueError, match="non-empty string"):
        register_objective("", Objective())
    with pytest.raises(ValueError, match="cannot be unregistered"):
        unregister_objective("paper")
    with pytest.raises(UnknownObjectiveError, match="unknown LIME objective 'nope'"):
        unregister_objective("nope")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        EvidenceObjective(eps=0.0)
    with pytest.raises(ValueError, match="floor must be a finite number > 0"):
        ScaledObjective(floor=-1.0)


def test_register_as_decorator_call_and_overwrite():
    try:
        @register_objective("t_margin")
        class Margin(Objective):
            def explained(self, logits, target):
                return logits.gather(1, target[:, None])[:, 0] - logits.mean(-1)

        assert isinstance(get_objective("t_margin"), Margin) and get_objective("t_margin").name == "t_margin"
        inst = register_objective("t_margin", Objective(), overwrite=True)
        assert get_objective("t_margin") is inst and inst.name == "t_margin"
        with pytest.raises(ValueError, match="already registered as 't_margin'"):
            register_objective("t_other", inst)
        assert LimeConfig(objective="t_margin").objective_impl is inst
    finally:
        unregister_objective("t_margin")
    assert "t_margin" not in available_objectives()


# ------------------------------------------------------------------------------------------ formulas


def _written_paper_loss(rel, mod_f, valid, counts, tau):
    """The optimiser's relevance loss as it was written before the registry (kept verbatim)."""
    r = rel / tau
    r = r.masked_fill(~valid, float("-inf"))
    logp = F.log_softmax(r, dim=-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    return -(logp * mod_f).sum(-1) / counts.to(logp.dtype)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(4, 9), m=st.integers(1, 3), pad=st.integers(0, 3),
       tau=st.floats(0.05, 3.0), seed=st.integers(0, 2 ** 16), double=st.booleans())
def test_paper_loss_is_the_released_formula_bit_for_bit(b, s, m, pad, tau, seed, double):
    torch.manual_seed(seed)
    rel = torch.randn(b, s, dtype=torch.float64 if double else torch.float32) * 3
    modality, valid = _masks(pad, b, s, m)
    old = _written_paper_loss(rel, modality.float(), valid, (modality & valid).sum(-1), tau)
    for obj in (get_objective("paper"), Objective()):
        assert torch.equal(obj.relevance_loss(rel, modality, valid, tau), old)
    logits, target = torch.randn(b, 11), torch.randint(0, 11, (b,))
    assert torch.equal(get_objective("paper").explained(logits, target), logits[torch.arange(b), target])


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), v=st.integers(2, 20), seed=st.integers(0, 2 ** 16))
def test_decision_and_logprob_explained_are_their_formulas(b, v, seed):
    torch.manual_seed(seed)
    logits = (torch.randn(b, v, dtype=torch.float64) * 4).requires_grad_(True)
    target = torch.randint(0, v, (b,))
    dec = get_objective("decision").explained(logits, target)
    for row in range(b):
        t = int(target[row])
        runner_up = max(float(logits[row, j].detach()) for j in range(v) if j != t)
        assert float(dec[row].detach()) == float(logits[row, t].detach()) - runner_up
    # the runner-up is an index: the gradient is e_t - e_r
    (g,) = torch.autograd.grad(dec.sum(), logits)
    assert torch.equal(g.sum(-1), torch.zeros(b, dtype=g.dtype)) and torch.equal(g[torch.arange(b), target],
                                                                                   torch.ones(b, dtype=g.dtype))
    lp = get_objective("logprob").explained(logits, target)
    torch.testing.assert_close(lp, torch.log_softmax(logits, -1)[torch.arange(b), target], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(stable_logsumexp(logits), torch.logsumexp(logits, -1), rtol=1e-14, atol=1e-13)
    (g,) = torch.autograd.grad(lp.sum(), logits)
    onehot = F.one_hot(target, v).to(g.dtype)
    torch.testing.assert_close(g, onehot - torch.softmax(logits.detach(), -1), rtol=1e-12, atol=1e-13)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(4, 9), m=st.integers(1, 3), pad=st.integers(0, 3),
       seed=st.integers(0, 2 ** 16), eps=st.sampled_from([1e-6, 1e-3, 0.5]))
def test_evidence_loss_is_the_positive_share_of_the_perceptual_tokens(b, s, m, pad, seed, eps):
    torch.manual_seed(seed)
    rel = torch.randn(b, s, dtype=torch.float64)
    modality, valid = _masks(pad, b, s, m)
    loss = EvidenceObjective(eps=eps).relevance_loss(rel, modality, valid, temperature=123.0)
    for row in range(b):
        on_m = sum(max(float(rel[row, i]), 0.0) for i in range(s) if modality[row, i] and valid[row, i])
        total = sum(max(float(rel[row, i]), 0.0) for i in range(s) if valid[row, i])
        assert float(loss[row]) == pytest.approx(-math.log((on_m + eps) / (total + eps)), rel=1e-12, abs=1e-12)
    assert bool((loss >= -1e-12).all())  # a share is at most 1


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(4, 9), m=st.integers(1, 3), pad=st.integers(0, 3),
       tau=st.floats(0.05, 3.0), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 16))
def test_scaled_loss_uses_a_relative_temperature_and_the_rms_lr(b, s, m, pad, tau, scale, seed):
    torch.manual_seed(seed)
    rel = torch.randn(b, s, dtype=torch.float64) * scale
    modality, valid = _masks(pad, b, s, m)
    obj = get_objective("scaled")
    loss = obj.relevance_loss(rel.requires_grad_(True), modality, valid, tau)
    for row in range(b):
        vals = [float(rel[row, i].detach()) for i in range(s) if valid[row, i]]
        tau_eff = tau * sum(abs(x) for x in vals) / len(vals)
        lse = math.log(sum(math.exp(x / tau_eff) for x in vals))
        on_m = [float(rel[row, i].detach()) for i in range(s) if modality[row, i] and valid[row, i]]
        expect = -sum(x / tau_eff - lse for x in on_m) / len(on_m)
        assert float(loss[row].detach()) == pytest.approx(expect, rel=1e-9, abs=1e-9)
    # scale-free: the same loss for relevance in other units
    torch.testing.assert_close(obj.relevance_loss(rel.detach() * 7.0, modality, valid, tau), loss.detach())
    k, v = torch.randn(2, 3, 5, 4) * scale, torch.randn(2, 3, 5, 4)
    sk, sv = obj.lr_scale(k, v)
    assert sk == pytest.approx(float(k.double().pow(2).mean().sqrt()), rel=1e-12)
    assert sv == pytest.approx(float(v.double().pow(2).mean().sqrt()), rel=1e-12)


# ------------------------------------------------------------------------------------------ in the optimiser


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_paper_objective_is_bit_exact_with_the_default(model, prompt, mode):
    base = dict(steps=3, lr=0.05, mode=mode, record="steps", confidence_gate=None, record_relevance=True)
    ref_out, ref = _run(model, prompt, LimeConfig(**base), n=2)
    for objective in ("paper", PaperObjective(), Objective()):
        out, recs = _run(model, prompt, LimeConfig(**base, objective=objective), n=2)
        assert torch.equal(out.tokens, ref_out.tokens)
        for a, b in zip(recs, ref):
            assert a.losses == b.losses and a.rel_losses == b.rel_losses and a.kl == b.kl
            assert torch.equal(a.relevance_after, b.relevance_after)
            assert [s.to_dict() for s in a.step_records] == [s.to_dict() for s in b.step_records]
    # the step record's explained value is the explained token's logit of that forward
    for s in ref[0].step_records:
        logit = dict(zip(s.top_tokens[0], s.top_logits[0]))[s.explained[0]]
        assert s.explained_value[0] == pytest.approx(logit, rel=1e-6)


def test_decision_relevance_conserves_to_the_margin():
    """Under CP-LRP (conservative; the Llama has no biases) the relevance of the decision objective sums to
    z_t - z_runner-up, and the step record's explained value is that margin of an ordinary forward."""
    model = _llama64()
    torch.manual_seed(2)
    ids = torch.randint(1, 64, (1, 10))
    cfg = LimeConfig(objective="decision", mode="reference", steps=1, lr=0.0, record="steps",
                     attn_implementation=None)
    recs = []
    with sdpa_kernel(SDPBackend.MATH):  # (the fused CPU kernel has no double backward)
        lime_generate(model, None, {"input_ids": ids}, cfg, max_new_tokens=1, modality_mask=SPAN,
                      callback=recs.append, attribution=LRP(model, composite="cp-lrp"))
        with torch.no_grad():
            logits = model(ids).logits[0, -1]
    step = recs[0].step_records[0]
    top2 = logits.topk(2).values
    assert step.explained[0] == int(logits.argmax())
    assert step.explained_value[0] == pytest.approx(float(top2[0] - top2[1]), rel=1e-10)
    # (up to the stabilisers' epsilon: relative to the logits' size, since the margin is their small difference)
    assert sum(step.relevance[0]) == pytest.approx(step.explained_value[0], abs=1e-8 * float(top2.abs().sum()))
    paper = get_objective("paper")  # whereas the paper's relevance sums to the logit itself
    assert abs(step.explained_value[0] - float(paper.explained(logits[None], logits.argmax()[None]))) > 1e-3


def test_a_registered_objective_is_used_by_lime_generate(model, prompt):
    """Both hooks of a user's objective are what the inner loop computes (explained value, loss)."""

    @dataclass(frozen=True)
    class TwiceLogitMass(Objective):
        """Explain 2 z_t; loss: minus the total relevance on M."""

        def explained(self, logits, target):
            return 2 * logits.gather(1, target[:, None])[:, 0]

        def relevance_loss(self, relevance, modality, valid, temperature):
            return -(relevance * modality).sum(-1)

    register_objective("t_twice", TwiceLogitMass())
    try:
        base = dict(steps=3, lr=0.05, mode="reference", record="steps", kl_weight=0.0)
        _, mine = _run(model, prompt, LimeConfig(**base, objective="t_twice"))
        _, paper = _run(model, prompt, LimeConfig(**base))
    finally:
        unregister_objective("t_twice")
    s0, p0 = mine[0].step_records[0], paper[0].step_records[0]
    assert s0.explained_value[0] == pytest.approx(2 * p0.explained_value[0], rel=1e-6)
    torch.testing.assert_close(torch.tensor(s0.relevance), 2 * torch.tensor(p0.relevance), rtol=1e-5, atol=1e-6)
    for step, loss in zip(mine[0].step_records, mine[0].rel_losses):
        assert loss[0] == pytest.approx(-sum(step.relevance[0][SPAN[0]:SPAN[1]]), rel=1e-5)
    assert mine[0].rel_losses[-1][0] < mine[0].rel_losses[0][0]  # the loop minimises the user's loss


class _FixedScale(Objective):
    """The paper objective with the lr of Delta_K doubled and that of Delta_V tripled."""

    def lr_scale(self, keys, values):
        assert keys.dim() == 4 and keys.shape == values.shape and not keys.requires_grad
        return 2.0, 3.0


@pytest.mark.parametrize("mode,optimizer", [("reference", "adam"), ("reference", "sgd"), ("fast", "adam"),
                                            ("fast", "sgd")])
def test_lr_scale_multiplies_each_delta_tensors_step(model, prompt, mode, optimizer):
    """After the first update, Delta_K (Delta_V) is lr_scale times the paper's in every layer: the first
    step of Adam and of SGD is linear in the lr."""
    lr = 0.05 if optimizer == "adam" else 5.0
    base = dict(steps=2, lr=lr, mode=mode, optimizer=optimizer, record="steps", confidence_gate=None,
                fast_updates=None, target="fixed")
    _, paper = _run(model, prompt, LimeConfig(**base))
    _, scaled = _run(model, prompt, LimeConfig(**base, objective=_FixedScale()))
    p1, s1 = paper[0].step_records[1], scaled[0].step_records[1]
    for layer in range(2):
        assert s1.delta_k_norm[0][layer] == pytest.approx(2 * p1.delta_k_norm[0][layer], rel=1e-5)
        assert s1.delta_v_norm[0][layer] == pytest.approx(3 * p1.delta_v_norm[0][layer], rel=1e-5)
        assert p1.delta_k_norm[0][layer] > 0


def test_scaled_objective_steps_relative_to_the_keys_and_values(model, prompt):
    """With SGD, ``scaled`` moves each layer's Delta by lr * RMS of its keys / values times the paper gradient
    of the scaled loss: Delta_K / Delta_V after one step differ from a unit-scale run by exactly those RMS."""
    rms = {}

    class Probe(ScaledObjective):
        def lr_scale(self, keys, values):
            out = super().lr_scale(keys, values)
            rms.setdefault(len(rms), out)
            return 1.0, 1.0

    base = dict(steps=2, lr=5.0, mode="reference", optimizer="sgd", record="steps", target="fixed")
    _, unit = _run(model, prompt, LimeConfig(**base, objective=Probe()))
    _, scaled = _run(model, prompt, LimeConfig(**base, objective="scaled"))
    assert len(rms) == 2 and all(k > 0 and v > 0 for k, v in rms.values())
    u1, s1 = unit[0].step_records[1], scaled[0].step_records[1]
    assert unit[0].rel_losses[0] == scaled[0].rel_losses[0]
    for layer in range(2):
        assert s1.delta_k_norm[0][layer] == pytest.approx(rms[layer][0] * u1.delta_k_norm[0][layer], rel=1e-5)
        assert s1.delta_v_norm[0][layer] == pytest.approx(rms[layer][1] * u1.delta_v_norm[0][layer], rel=1e-5)


def test_objective_hook_errors_name_the_objective(model, prompt):
    class WrongShape(Objective):
        def explained(self, logits, target):
            return logits[:, :2]

    class WrongLoss(Objective):
        def relevance_loss(self, relevance, modality, valid, temperature):
            return relevance.sum()

    class NanScale(Objective):
        def lr_scale(self, keys, values):
            return float("nan"), 1.0

    for obj, match in ((WrongShape(), r"explained\(logits, target\) must return .* shape \(1,\)"),
                       (WrongLoss(), r"relevance_loss must return a tensor of shape \(1,\)"),
                       (NanScale(), "lr_scale returned .* finite and >= 0")):
        with pytest.raises(ValueError, match=match):
            _run(model, prompt, LimeConfig(steps=2, lr=0.05, mode="reference", objective=obj))


# ------------------------------------------------------------------------------------------ exact second order


def _relevance_loss(lime, emb, mod, deltas, target, create_graph, fd_loss=None):
    """The objective's relevance loss (sum over rows) at the perturbation ``deltas``, target held fixed.

    ``deltas`` stay installed: the exact relevance runs its tangent pass when it is differentiated."""
    valid = torch.ones_like(mod)
    lime._deltas.clear()
    lime._deltas.update(deltas)
    out = lime._forward(emb, {"use_cache": False}, lambda _l: target, True, create_graph)
    if fd_loss is not None:
        return fd_loss(out.relevance).sum()
    rel, _ = lime._losses(out, torch.log_softmax(out.logits.detach(), -1), mod.double(), valid)
    return rel.sum()


@pytest.mark.parametrize("name", BUILTIN)
def test_exact_second_order_is_the_derivative_of_every_objective(prompt, name):
    """At a nonzero perturbation, the gradient of each objective's relevance loss on the exact path equals
    central finite differences of that loss (float64, random directions). ``scaled`` holds its tau_eff
    (a detached function of the relevance) constant: the finite differences do too."""
    model = _llama64()
    emb = model.get_input_embeddings()(prompt).detach()
    mod = torch.zeros_like(prompt, dtype=torch.bool)
    mod[:, SPAN[0]:SPAN[1]] = True
    valid = torch.ones_like(mod)
    lime = LimeOptimizer(LRP(model), LimeConfig(mode="reference", attn_implementation=None, second_order="exact",
                                                objective=name))
    torch.manual_seed(5)
    shape = (1, 4, prompt.shape[1], 8)  # [batch, query heads, seq, head_dim]
    point = {i: (0.3 * torch.randn(shape, dtype=torch.float64), 0.3 * torch.randn(shape, dtype=torch.float64))
             for i in range(2)}
    with lime.session(), sdpa_kernel(SDPBackend.MATH):
        target = lime._forward(emb, {"use_cache": False}, lambda l: l.argmax(-1), False, False).target
        fd_loss = None
        if name == "scaled":
            lime._deltas.update(point)  # tau_eff at the point
            r0 = lime._forward(emb, {"use_cache": False}, lambda _l: target, True, False).relevance
            tau0 = lime.config.temperature * r0.abs().mean(-1, keepdim=True)
            fd_loss = lambda r: softmax_focus_loss(r, mod, valid, tau0)  # noqa: E731
        leaves = {i: tuple(d.clone().requires_grad_(True) for d in pair) for i, pair in point.items()}
        loss = _relevance_loss(lime, emb, mod, leaves, target, True)
        grads = torch.autograd.grad(loss, [d for pair in leaves.values() for d in pair])
        dirs = [[torch.randn(shape, dtype=torch.float64) for _ in grads] for _ in range(3)]
        h, fd, dots = 1e-5, [], []
        for u in dirs:
            shifted = [{i: tuple(point[i][j] + sign * h * u[2 * i + j] for j in range(2)) for i in point}
                       for sign in (1, -1)]
            plus, minus = (float(_relevance_loss(lime, emb, mod, d, target, False, fd_loss)) for d in shifted)
            fd.append((plus - minus) / (2 * h))
            dots.append(sum(float((g * d).sum()) for g, d in zip(grads, u)))
    fd_t, dots_t = torch.tensor(fd), torch.tensor(dots)
    assert float(fd_t.norm()) > 1e-6  # the loss does depend on Delta
    assert float((dots_t - fd_t).norm() / fd_t.norm()) < 1e-6, (dots, fd)


@pytest.mark.parametrize("name", BUILTIN)
def test_every_objective_runs_with_both_second_orders(model, prompt, name):
    for so in ("autograd", "exact"):
        out, recs = _run(model, prompt, LimeConfig(objective=name, steps=3, lr=0.05, mode="reference",
                                                   second_order=so, kl_weight=0.0, target="fixed", record="steps"))
        losses = [r[0] for r in recs[0].rel_losses]
        assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
        assert losses[1] != losses[0]  # the perturbation moved the objective
        json.dumps(recs[0].to_dict(), allow_nan=False)
