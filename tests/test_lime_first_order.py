"""LIME ``mode="incremental", second_order="frozen"``: the first-order update (issue 15, part 4).

* a written-out computation (float64 LLaVA-shaped model, multi-head and grouped-query; plain autograd, the
  per-query-head keys / values as leaves at the rule's input, no lime_attr scope): the emitted logits are
  those of Delta = one optimiser step on dL/dR_j * g_j;
* the relation to ``second_order="autograd"``: at Delta = 0 the two gradients add up to the full derivative
  of the perturbed entries' relevance (K + Delta) . g(Delta) (double backward, written out), and the library's
  autograd mode (Delta before the rule) emits from the step on the autograd term alone;
* Adam's first step from zero moments, the no-grad attention transforms of the scope, lr = 0 = greedy, errors.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import _lime_reference as ref
from lime_attr import LRP
from lime_attr.mitigation import LimeConfig, lime_generate
from lime_attr.mitigation.cache import output_cache
from lime_attr.mitigation.first_order import first_step
from lime_attr.mitigation.incremental import IncrementalOptimizer, KVCacheState
from test_lime_incremental import _gen, _greedy, _llama, _llava, _prompt, _rel_err

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ written out


def _attention(W, p, a, K_c, V_c, cos, sin, probe, delta):
    """The current query over cached K_c, V_c ``[1, KV, t, D]`` and its own k, v: per query head, then the
    probe and Delta added (the rule's input), then AttnLRP's scaling (q, k / 4, v / 2)."""
    cfg = W.cfg
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    q = ref._rotate(F.linear(a, *p["q"]).view(1, 1, H, D).transpose(1, 2), cos, sin)
    k = ref._rotate(F.linear(a, *p["k"]).view(1, 1, KV, D).transpose(1, 2), cos, sin)
    v = F.linear(a, *p["v"]).view(1, 1, KV, D).transpose(1, 2)
    g = H // KV
    kr = torch.cat([K_c, k], 2).repeat_interleave(g, dim=1)
    vr = torch.cat([V_c, v], 2).repeat_interleave(g, dim=1)
    read = (kr.detach(), vr.detach())
    kr, vr = kr + probe[0] + delta[0], vr + probe[1] + delta[1]
    q, kr, vr = ref.scale_grad(q, 0.25), ref.scale_grad(kr, 0.25), ref.scale_grad(vr, 0.5)
    attn = F.softmax(torch.matmul(q, kr.transpose(2, 3)) * D ** -0.5, dim=-1, dtype=torch.float32).to(q.dtype)
    return F.linear(torch.matmul(attn, vr).transpose(1, 2).reshape(1, 1, H * D), *p["o"]), read


def _forward(model, x_t, cache, t, probes, deltas):
    """Logits of position ``t`` over ``cache`` with the probes and Delta per layer; the keys / values read."""
    W = ref._weights(model)
    eps = W.cfg.rms_norm_eps
    cos, sin = ref._rope(W.cfg, torch.tensor([[t]]), x_t.dtype)
    cos, sin = cos[:, None], sin[:, None]
    h, reads = x_t, []
    for i, p in enumerate(W.layers):
        o, read = _attention(W, p, ref._rms_norm(h, p["ln1"], eps), *cache[i], cos, sin, probes[i], deltas[i])
        reads.append(read)
        h = h + o
        a = ref._rms_norm(h, p["ln2"], eps)
        prod = ref.scale_grad(ref._silu_identity(F.linear(a, *p["gate"])) * F.linear(a, *p["up"]), 0.5)
        h = h + F.linear(prod, *p["down"])
    return F.linear(ref._rms_norm(h, W.norm, eps), W.lm_head)[0, -1], reads


def _setup(kv_heads):
    model, inputs, embeds, modality = _llava(kv_heads)
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=embeds[:, :-1], use_cache=True)
    cache = [(k, v) for k, v, *_ in output_cache(out)]
    return model, embeds, modality, cache, KVCacheState.from_cache(output_cache(out))


def _zeros(model, t):
    cfg = model.config.text_config
    H = cfg.num_attention_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    return [tuple(torch.zeros(1, H, t + 1, D, dtype=torch.float64, requires_grad=True) for _ in range(2))
            for _ in range(cfg.num_hidden_layers)]


def _gradients(model, embeds, modality, cache, tau, kl_weight):
    """At Delta = 0: dL/dDelta of the frozen first-order update, of the autograd term (K . dg/dDelta) and of
    the full derivative of (K + Delta) . g(Delta), per layer and k / v."""
    t = embeds.shape[1] - 1
    probes, deltas = _zeros(model, t), _zeros(model, t)
    x = embeds[:, -1:].clone().requires_grad_(True)
    logits, reads = _forward(model, x, cache, t, probes, deltas)
    p_ref = F.softmax(logits.detach(), -1)
    z = int(logits.detach().argmax())
    flat = [pr for pair in probes for pr in pair]
    g_x, *g = torch.autograd.grad(logits[z], [x] + flat, create_graph=True)
    kv = [r for pair in reads for r in pair]
    dl = [d for pair in deltas for d in pair]
    r_x = (x * g_x).sum(-1)[0]

    def loss_of(r_cache):
        phi = torch.cat([r_cache[:-1], r_x])
        kl = (p_ref * (torch.log(p_ref) - F.log_softmax(logits, -1))).sum()
        return -F.log_softmax(phi / tau, -1)[modality].mean() + kl_weight * kl, phi

    full_loss, phi = loss_of(sum(((a + d) * b).sum((0, 1, 3)) for a, d, b in zip(kv, dl, g)))
    full = torch.autograd.grad(full_loss, dl, retain_graph=True)
    auto_loss, _ = loss_of(sum((a * b).sum((0, 1, 3)) for a, b in zip(kv, g)))
    auto = torch.autograd.grad(auto_loss, dl, retain_graph=True, allow_unused=True)
    phi_leaf = phi.detach().requires_grad_(True)
    (dl_dphi,) = torch.autograd.grad(-F.log_softmax(phi_leaf / tau, -1)[modality].mean(), phi_leaf)
    w = dl_dphi.clone()
    w[-1] = 0  # position t: relevance through x_t, not its own keys / values
    frozen = [w[None, None, :, None] * b.detach() for b in g]
    return frozen, [torch.zeros_like(d) if a is None else a for a, d in zip(auto, dl)], full, logits.detach()


def _emit(model, embeds, cache, grads, lr):
    t = embeds.shape[1] - 1
    steps = [first_step(gr, lr, "adam") for gr in grads]
    deltas = [(steps[2 * i], steps[2 * i + 1]) for i in range(len(steps) // 2)]
    zero = [(torch.zeros_like(a), torch.zeros_like(b)) for a, b in deltas]
    with torch.no_grad():
        return _forward(model, embeds[:, -1:], cache, t, zero, deltas)[0]


def _library_step(model, embeds, modality, state, cfg):
    lime = IncrementalOptimizer(LRP(model), cfg)
    S = embeds.shape[1]
    kw = {"attention_mask": torch.ones(1, S, dtype=torch.long), "position_ids": torch.tensor([[S - 1]]),
          "use_cache": True}
    with torch.enable_grad():
        emit, ref_logits, _, rec = lime.step(state, embeds[:, -1:], kw, modality[None], torch.ones_like(modality[None]))
    return emit[0], ref_logits[0], rec


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_frozen_update_agrees_with_written_out(kv_heads):
    """The emitted logits are those of Delta = Adam's first step on (dL/dR_j) g_j, at lr (steps - 1)."""
    model, embeds, modality, cache, state = _setup(kv_heads)
    tau, kl_weight, lr = 0.1, 0.1, 0.05
    frozen, _, _, logits0 = _gradients(model, embeds, modality, cache, tau, kl_weight)
    want = _emit(model, embeds, cache, frozen, lr * 6)
    cfg = LimeConfig(mode="incremental", second_order="frozen", lr=lr, kl_weight=kl_weight, temperature=tau,
                     record="steps")
    emit, ref_logits, rec = _library_step(model, embeds, modality, state, cfg)
    assert rec.steps == 1 and rec.step_records[0].kl[0] == 0.0
    # (the engine's working dtype is float32: 1e-6 on the logits, 1e-4 on their change)
    assert _rel_err(ref_logits, logits0) < 1e-6 and _rel_err(emit, want) < 1e-6
    assert _rel_err(emit - ref_logits, want - logits0) < 1e-4  # the change the update makes
    assert float((emit - ref_logits).abs().max()) > 1e-3 * float(logits0.abs().max())  # and it is not nothing


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_frozen_plus_autograd_is_the_full_derivative(kv_heads):
    """At Delta = 0: frozen + autograd term == d/dDelta of L((K + Delta) . g(Delta)); the dropped term is not 0;
    and the library's autograd mode (Delta before the rule) steps on the autograd term alone."""
    model, embeds, modality, cache, state = _setup(kv_heads)
    tau, kl_weight, lr = 0.1, 0.1, 0.05
    frozen, auto, full, logits0 = _gradients(model, embeds, modality, cache, tau, kl_weight)
    for f, a, u in zip(frozen, auto, full):
        torch.testing.assert_close(f + a, u, rtol=1e-8, atol=1e-12)
    assert max(float(a.abs().max()) for a in auto) > 1e-3 * max(float(f.abs().max()) for f in frozen)
    want = _emit(model, embeds, cache, auto, lr * 6)
    cfg = LimeConfig(mode="incremental", second_order="autograd", delta_placement="before_rule", fast_updates=1,
                     lr=lr, kl_weight=kl_weight, temperature=tau)
    emit, ref_logits, _ = _library_step(model, embeds, modality, state, cfg)
    assert _rel_err(emit, want) < 1e-6 and _rel_err(emit - ref_logits, want - logits0) < 1e-4


# ------------------------------------------------------------------------------------------ pieces


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_first_step_is_the_optimisers(optimizer):
    g = torch.tensor([[0.3, -2.0, 0.0, 1e-9]], dtype=torch.float64)
    p = torch.zeros_like(g, requires_grad=True)
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([p], lr=0.7)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(first_step(g, 0.7, optimizer), p.detach(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        first_step(g, 0.7, "lbfgs")


def test_no_grad_attention_transform():
    """A transform added with also_without_grad=True runs in no-grad forwards too; the default one does not;
    remove() takes it out of both."""
    model = _llama(torch.float32)
    ids = _prompt()
    lrp, calls = LRP(model), []

    def zero_values(module, q, k, v, kwargs):
        calls.append(torch.is_grad_enabled())
        return q, k, v * 0

    with torch.no_grad():
        plain = model(ids).logits
    with lrp.scope():
        with lrp.scope().add_attention_transform(zero_values):
            with torch.no_grad():
                same = model(ids).logits
        assert calls == [] and torch.equal(same, plain)
        handle = lrp.scope().add_attention_transform(zero_values, also_without_grad=True)
        with torch.no_grad():
            changed = model(ids).logits
        assert calls == [False, False] and not torch.allclose(changed, plain)
        handle.remove()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, plain)
        assert not lrp.scope().has_no_grad_transforms
    with pytest.raises(TypeError, match="also_without_grad must be a bool"):
        lrp.scope().add_attention_transform(zero_values, also_without_grad="yes")


@pytest.mark.parametrize("objective", ["paper", "decision", "logprob", "evidence", "scaled"])
def test_every_objective_runs_frozen(objective):
    """Every objective drives the frozen update (one update, finite losses, tokens changed at a large lr); lr = 0
    emits model.generate's tokens."""
    model = _llama(torch.float32)
    ids = _prompt()
    out = _gen(model, ids, LimeConfig(mode="incremental", second_order="frozen", lr=0.5, objective=objective), n=4)
    assert all(r.steps == 1 and all(torch.isfinite(torch.tensor(r.losses)).flatten()) for r in out.records)
    zero = _gen(model, ids, LimeConfig(mode="incremental", second_order="frozen", lr=0.0, objective=objective), n=4)
    assert zero.tokens.tolist() == _greedy(model, {"input_ids": ids}, 4).tolist()


def test_frozen_batch_rows_are_independent():
    model = _llama(torch.float32)
    a, b = _prompt(seed=1), _prompt(seed=2)
    cfg = LimeConfig(mode="incremental", second_order="frozen", lr=0.5)
    both = _gen(model, torch.cat([a, b]), cfg, n=3, extra={"attention_mask": torch.ones(2, 12, dtype=torch.long)})
    one = [_gen(model, x, cfg, n=3).tokens[0].tolist() for x in (a, b)]
    assert both.tokens.tolist() == one


@pytest.mark.parametrize("change, match", [
    (dict(mode="fast"), "second_order='frozen' needs mode='incremental'"),
    (dict(mode="reference"), "second_order='frozen' needs mode='incremental'"),
    (dict(fast_updates=2), "takes one update per token"),
    (dict(fast_updates=None), "takes one update per token"),
    (dict(delta_placement="after_rule"), "adds Delta where its relevance probe is"),
])
def test_frozen_errors(change, match):
    with pytest.raises(ValueError, match=match):
        LimeConfig(**{"mode": "incremental", "second_order": "frozen", **change})


def test_frozen_placement_and_schedule():
    cfg = LimeConfig(mode="incremental", second_order="frozen")
    assert cfg.placement == "before_rule" and cfg.schedule == (1, 6 * cfg.lr)
    assert LimeConfig(mode="incremental").placement == "after_rule"  # autograd's default unchanged
