"""LIME ``mode="incremental"`` (issue 15, part 4): relevance along the KV-cache path, Delta on the current
query's reads.

* conservation: under CP-LRP on a bias-free float64 Llama the relevance of the cache entries plus the
  current embedding's sums to the explained logit, at every generated position;
* agreement with a written-out loop (plain autograd, cached keys / values as leaves, Delta placed by hand
  after AttnLRP's scaling, no lime_attr scope) on tiny float64 LLaVA-shaped models, multi-head and
  grouped-query: same tokens, relevance, losses and KL to 1e-6;
* the cache after a LIME step holds the unperturbed keys and values, and the step never writes to the
  state it reads;
* Delta = 0 (steps = 0 or lr = 0) emits cached greedy's tokens exactly;
* rows of a (left-padded) batch are independent;
* per-step records, no deprecated transformers argument, and errors for what the mode does not support.
"""
from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from transformers import (CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration,
                          MistralConfig, MistralForCausalLM)

import _lime_reference as ref
from lime_attr import LRP
from lime_attr.mitigation import LimeConfig, lime_generate
from lime_attr.mitigation.cache import output_cache
from lime_attr.mitigation.incremental import IncrementalOptimizer, KVCacheState

pytestmark = pytest.mark.usefixtures("one_thread")

SPAN = (2, 8)  # fake perceptual positions of the text-only Llama
IMG = 63


def _llama(dtype=torch.float64, seed: int = 0, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, max_position_embeddings=128, attn_implementation="eager",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval().to(dtype)
    with torch.no_grad():  # norm weights away from 1 (the init's), so that the norm rule matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@functools.lru_cache(maxsize=None)
def _model() -> LlamaForCausalLM:
    return _llama()


def _prompt(n: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 64, (1, n), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, cfg, n=5, **kw):
    return lime_generate(model, None, {"input_ids": ids, **kw.pop("extra", {})}, cfg, max_new_tokens=n,
                         modality_mask=kw.pop("modality_mask", SPAN), **kw)


def _greedy(model, inputs, n):
    return model.generate(**inputs, max_new_tokens=n, do_sample=False)[:, inputs["input_ids"].shape[1]:]


# ------------------------------------------------------------------------------------------ conservation


def test_cache_path_relevance_conserves_under_cp_lrp():
    """Sum over positions of R (cache entries of every layer + the current embedding) == the explained logit,
    for every generated token (float64 Llama, no biases; its RMSNorm casts to float32: 1e-6)."""
    model = _model()
    cfg = LimeConfig(mode="incremental", lr=0.0, steps=2, record_relevance=True, record="steps")
    out = _gen(model, _prompt(), cfg, n=4, attribution=LRP(model, composite="cp-lrp"))
    ids = torch.cat([_prompt(), out.tokens], 1)
    for t, rec in enumerate(out.records):
        rel = rec.relevance_before[0]
        with torch.no_grad():
            z = model(ids[:, :12 + t]).logits[0, -1, rec.step_records[0].explained[0]]
        assert rel.shape == (12 + t,)
        torch.testing.assert_close(rel.sum(), z, rtol=1e-6, atol=1e-9)
        assert float(rel[:-1].abs().sum()) > 0.02 * float(rel.abs().sum())  # the cache path carries relevance
        assert float(rel[-1].abs()) > 0


@pytest.mark.parametrize("objective", ["paper", "decision"])
def test_conservation_of_the_objectives_explained_value(objective):
    """Objectives linear in the logits (the raw logit, the margin over the runner-up) conserve too: the
    relevance sums to the step record's explained value."""
    model = _model()
    cfg = LimeConfig(mode="incremental", lr=0.0, steps=2, record="steps", objective=objective)
    out = _gen(model, _prompt(), cfg, n=3, attribution=LRP(model, composite="cp-lrp"))
    for rec in out.records:
        step = rec.step_records[0]
        # (float32 RMSNorm inside the float64 model: ~1e-7 of the logits' scale, absolute)
        torch.testing.assert_close(torch.tensor(step.relevance[0]).sum(), torch.tensor(step.explained_value[0]),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("objective", ["paper", "decision", "logprob", "evidence", "scaled"])
def test_every_objective_runs(objective):
    """Every registered objective drives incremental mode (finite losses, a real update); lr = 0 stays greedy."""
    model = _llama(torch.float32)
    ids = _prompt()
    out = _gen(model, ids, LimeConfig(mode="incremental", lr=0.05, objective=objective, record="steps"), n=3)
    assert all(r.steps == 1 and all(torch.isfinite(torch.tensor(r.losses)).flatten()) for r in out.records)
    assert out.records[0].step_records[0].explained_value
    zero = _gen(model, ids, LimeConfig(mode="incremental", lr=0.0, objective=objective), n=4)
    assert zero.tokens.tolist() == _greedy(model, {"input_ids": ids}, 4).tolist()


def test_attnlrp_relevance_is_not_the_cp_lrp_one():
    """The rule matters: AttnLRP's keys carry relevance (CP-LRP detaches them), so the vectors differ."""
    model = _model()
    cfg = LimeConfig(mode="incremental", lr=0.0, steps=2, record_relevance=True)
    a = _gen(model, _prompt(), cfg, n=1, attribution=LRP(model, composite="attnlrp")).records[0].relevance_before
    c = _gen(model, _prompt(), cfg, n=1, attribution=LRP(model, composite="cp-lrp")).records[0].relevance_before
    assert (a - c).abs().max() > 1e-3 * c.abs().max()


# ------------------------------------------------------------------------------------------ written-out loop


def _attention_step(W, p, a, K_c, V_c, cos, sin, dk, dv):
    """The current position's attention over cached (post-RoPE) K_c, V_c ``[1, KV, t, D]`` -- leaves whose
    gradient is the one at the rule's input -- with AttnLRP (q, k / 4, v / 2) and Delta after the rule and
    the grouped-query repeat (the released placement). ``a``: ``[1, 1, d]``. Returns the output and its
    own (unperturbed) k, v."""
    cfg = W.cfg
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    q = ref._rotate(F.linear(a, *p["q"]).view(1, 1, H, D).transpose(1, 2), cos, sin)
    k = ref._rotate(F.linear(a, *p["k"]).view(1, 1, KV, D).transpose(1, 2), cos, sin)
    v = F.linear(a, *p["v"]).view(1, 1, KV, D).transpose(1, 2)
    kr, vr = torch.cat([K_c, k], 2), torch.cat([V_c, v], 2)
    q, kr, vr = ref.scale_grad(q, 0.25), ref.scale_grad(kr, 0.25), ref.scale_grad(vr, 0.5)
    g = H // KV
    kr, vr = kr.repeat_interleave(g, dim=1) + dk, vr.repeat_interleave(g, dim=1) + dv
    attn = F.softmax(torch.matmul(q, kr.transpose(2, 3)) * D ** -0.5, dim=-1, dtype=torch.float32).to(q.dtype)
    return F.linear(torch.matmul(attn, vr).transpose(1, 2).reshape(1, 1, H * D), *p["o"]), k.detach(), v.detach()


def _current_forward(model, x_t, cache, t, deltas):
    """Logits of position ``t`` (embedding ``x_t [1, 1, d]``) over ``cache = [(K_c, V_c)]`` per layer, and the
    position's own keys / values per layer."""
    W = ref._weights(model)
    eps = W.cfg.rms_norm_eps
    cos, sin = ref._rope(W.cfg, torch.tensor([[t]]), x_t.dtype)
    cos, sin = cos[:, None], sin[:, None]
    h, own = x_t, []
    for i, p in enumerate(W.layers):
        o, k, v = _attention_step(W, p, ref._rms_norm(h, p["ln1"], eps), *cache[i], cos, sin, *deltas[i])
        own.append((k, v))
        h = h + o
        a = ref._rms_norm(h, p["ln2"], eps)
        prod = ref.scale_grad(ref._silu_identity(F.linear(a, *p["gate"])) * F.linear(a, *p["up"]), 0.5)
        h = h + F.linear(prod, *p["down"])
    return F.linear(ref._rms_norm(h, W.norm, eps), W.lm_head)[0, -1], own


def _prefill(model, x):
    """Post-RoPE keys and values of every position of ``x [1, S, d]`` per layer (the unperturbed cache)."""
    with torch.no_grad():
        out = model.model.language_model(inputs_embeds=x, use_cache=True)
    return [(k, v) for k, v, *_ in output_cache(out)]


def _written_out_loop(model, embeds, modality, steps, lr, kl_weight, tau, n_tokens, updates):
    """Incremental LIME written out (greedy, one row): per token, ``updates`` Adam steps at ``lr * (steps - 1) /
    updates`` on Delta ``[1, H, t + 1, D]`` per layer, emission from a forward with the final Delta."""
    cfg = model.config.text_config
    H, L = cfg.num_attention_heads, cfg.num_hidden_layers
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    embed = model.model.language_model.embed_tokens.weight.detach()
    cache = _prefill(model, embeds[:, :-1])
    x_all, m_all, out = embeds, modality.clone(), []
    for _ in range(n_tokens):
        t = x_all.shape[1] - 1
        deltas = [(torch.zeros(1, H, t + 1, D, dtype=x_all.dtype, requires_grad=True),
                   torch.zeros(1, H, t + 1, D, dtype=x_all.dtype, requires_grad=True)) for _ in range(L)]
        opt = torch.optim.Adam([d for pair in deltas for d in pair], lr=lr * (steps - 1) / updates)
        rec = dict(losses=[], rel=[], kl=[], phi=[])
        for s in range(updates):
            x = x_all[:, -1:].clone().requires_grad_(True)
            leaves = [(k.clone().requires_grad_(True), v.clone().requires_grad_(True)) for k, v in cache]
            logits, own = _current_forward(model, x, leaves, t, deltas)
            if s == 0:
                p_ref, own0, target = F.softmax(logits.detach(), -1), own, int(logits.detach().argmax())
            z = int(logits.detach().argmax())
            wrt = [x] + [tt for pair in leaves for tt in pair]
            grads = torch.autograd.grad(logits[z], wrt, create_graph=True)
            r_cache = sum((lf * g).sum((0, 1, 3)) for lf, g in zip(wrt[1:], grads[1:]))
            phi = torch.cat([r_cache, (x * grads[0]).sum(-1)[0]])
            rel = -F.log_softmax(phi / tau, -1)[m_all].mean()
            kl = (p_ref * (torch.log(p_ref) - F.log_softmax(logits, -1))).sum()
            loss = rel + kl_weight * kl
            for key, val in (("losses", loss), ("rel", rel), ("kl", kl), ("phi", phi)):
                rec[key].append(val.detach().clone())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            final, _ = _current_forward(model, x_all[:, -1:], cache, t, [(a.detach(), b.detach()) for a, b in deltas])
        rec.update(token=int(final.argmax()), unperturbed=target)
        out.append(rec)
        cache = [(torch.cat([k, k1], 2), torch.cat([v, v1], 2)) for (k, v), (k1, v1) in zip(cache, own0)]
        x_all = torch.cat([x_all, embed[rec["token"]][None, None].to(x_all.dtype)], 1)
        m_all = torch.cat([m_all, torch.zeros(1, dtype=torch.bool)])
    return out


@functools.lru_cache(maxsize=None)
def _llava(kv_heads: int):
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=kv_heads, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=4, vision_feature_layer=-1,
                      attn_implementation="eager")
    model = LlavaForConditionalGeneration(cfg).eval().to(torch.float64)
    ids = torch.tensor([[5, 6, IMG, IMG, IMG, IMG, 7, 8, 9]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return model, inputs, ref.llm_input_embeddings(model, inputs), ids[0] == IMG


def _rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("lr, updates", [(3e-4, 1), (0.05, 2)])
def test_agrees_with_written_out_loop(kv_heads, lr, updates):
    model, inputs, embeds, modality = _llava(kv_heads)
    steps, kl_weight, tau, n = 7, 0.1, 0.1, 3
    cfg = LimeConfig(mode="incremental", steps=steps, lr=lr, kl_weight=kl_weight, temperature=tau,
                     fast_updates=updates, record="steps")
    got = lime_generate(model, None, inputs, cfg, max_new_tokens=n)
    loop = _written_out_loop(model, embeds, modality, steps, lr, kl_weight, tau, n, updates)
    assert got.tokens[0].tolist() == [r["token"] for r in loop]
    for rec, want in zip(got.records, loop):
        assert rec.steps == updates and len(rec.step_records) == updates
        assert rec.unperturbed_tokens == [want["unperturbed"]]
        for s, step in enumerate(rec.step_records):
            assert _rel_err(step.relevance[0], want["phi"][s]) < 1e-6
            assert _rel_err(step.loss, want["losses"][s]) < 1e-6
            assert _rel_err(step.rel_loss, want["rel"][s]) < 1e-6
            assert abs(step.kl[0] - float(want["kl"][s])) <= 1e-6 * max(abs(float(want["kl"][s])), 1e-9)
    if lr > 1e-3:  # the larger lr changes tokens: the comparison covers a perturbed cache history
        assert got.changed.any()


# ------------------------------------------------------------------------------------------ the cache


def test_cache_after_a_lime_step_is_the_unperturbed_cache():
    """A LIME step (large lr, so Delta is far from 0) returns the state a plain cached step returns, bit for
    bit, and leaves the state it read untouched."""
    model = _model()
    ids = _prompt()
    lime = IncrementalOptimizer(LRP(model), LimeConfig(mode="incremental", lr=0.5, fast_updates=2))
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
    state = KVCacheState.from_cache(output_cache(out))
    before = [(k.clone(), v.clone()) for k, v in state.pairs]
    x = model.get_input_embeddings()(ids[:, -1:]).detach()
    kw = {"attention_mask": torch.ones_like(ids), "position_ids": torch.tensor([[11]]), "use_cache": True}
    mod = torch.zeros_like(ids, dtype=torch.bool)
    mod[:, SPAN[0]:SPAN[1]] = True
    plain_logits, plain_state = lime.plain_step(state, x, kw)
    with torch.enable_grad():
        emit, ref_logits, nxt, rec = lime.step(state, x, kw, mod, torch.ones_like(mod))
    assert rec.steps == 2 and not torch.allclose(emit, ref_logits)  # the perturbation did something
    torch.testing.assert_close(ref_logits, plain_logits, rtol=1e-12, atol=1e-12)
    assert nxt.length == 12
    for (k, v), (k0, v0), (kb, vb) in zip(nxt.pairs, plain_state.pairs, before):
        assert not k.requires_grad and not v.requires_grad
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert torch.equal(k[..., :11, :], kb) and torch.equal(v[..., :11, :], vb)
    for (k, v), (kb, vb) in zip(state.pairs, before):
        assert torch.equal(k, kb) and torch.equal(v, vb)


# ------------------------------------------------------------------------------------------ Delta = 0


@pytest.mark.parametrize("change", [dict(steps=0), dict(lr=0.0), dict(lr=0.0, fast_updates=2)])
def test_zero_delta_is_cached_greedy(change):
    """steps = 0 or lr = 0: the tokens of model.generate (float32 Llama and float64 LLaVA)."""
    model = _llama(torch.float32)
    ids = _prompt()
    out = _gen(model, ids, LimeConfig(mode="incremental", **change), n=8)
    assert out.tokens.tolist() == _greedy(model, {"input_ids": ids}, 8).tolist()
    assert not out.changed.any()
    llava, inputs, _, _ = _llava(2)
    got = lime_generate(llava, None, inputs, LimeConfig(mode="incremental", **change), max_new_tokens=5)
    assert got.tokens.tolist() == _greedy(llava, inputs, 5).tolist()


def test_every_token_is_optimised():
    """No gate: every generated token runs the inner loop, however confident the model is."""
    model = _model()
    out = _gen(model, _prompt(), LimeConfig(mode="incremental", lr=1e-3), n=6)
    assert all(r.steps == 1 and r.skipped is None for r in out.records)
    assert LimeConfig(mode="incremental").gate is None


# ------------------------------------------------------------------------------------------ batches


def test_batch_rows_are_independent():
    """A left-padded batch of two prompts gives each row the tokens and losses it gets alone (float32: the
    float64 Llama's eager mask overflows to NaN on fully masked padding queries, in model.generate too)."""
    model = _llama(torch.float32)
    a, b = _prompt(12, seed=1), _prompt(10, seed=2)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 2, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cfg = LimeConfig(mode="incremental", lr=0.05, fast_updates=2)
    spans = [[(2, 8)], [(4, 10)]]
    both = _gen(model, ids, cfg, n=4, modality_mask=spans, extra={"attention_mask": mask})
    one = [_gen(model, a, cfg, n=4, modality_mask=(2, 8)), _gen(model, b, cfg, n=4, modality_mask=(2, 8))]
    assert both.changed.any()
    for row, single in enumerate(one):
        assert both.tokens[row].tolist() == single.tokens[0].tolist()
        for rb, rs in zip(both.records, single.records):
            for lb, ls in zip(rb.losses, rs.losses):
                assert abs(lb[row] - ls[0]) <= 1e-5 * abs(ls[0])


# ------------------------------------------------------------------------------------------ records, warnings


def test_step_records_are_strict_json_and_no_deprecation_warning():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        out = _gen(model, _prompt(), LimeConfig(mode="incremental", lr=0.05, fast_updates=2, record="steps"), n=3)
    rec = out.records[1]
    assert len(rec.step_records) == 2 and len(rec.step_records[0].relevance[0]) == 13
    assert len(rec.step_records[1].delta_k_norm[0]) == 2 and rec.step_records[1].delta_k_norm[0][0] > 0
    json.dumps(out.to_dict(), allow_nan=False)


def test_parameters_and_flags_restored():
    model = _llama(torch.float32)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    _gen(model, _prompt(), LimeConfig(mode="incremental", lr=0.1), n=3)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert flags == [p.requires_grad for p in model.parameters()]
    assert "forward" not in model.__dict__


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("kwargs, match", [
    (dict(second_order="exact"), "second_order='exact' is not supported with mode='incremental'"),
    (dict(confidence_gate=0.9), "confidence_gate=0.9 is not supported with mode='incremental'"),
    (dict(share_gate=0.5), "share_gate"),
    (dict(patience=2), "patience"),
    (dict(final_relevance=True), "final_relevance"),
    (dict(emit="cached"), "emit='cached' is not supported"),
    (dict(kv_cache=False), "kv_cache"),
    (dict(mode="incremental_fast"), "mode must be one of 'reference', 'fast', 'incremental'"),
])
def test_unsupported_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LimeConfig(**{"mode": "incremental", **kwargs})


def test_bad_inputs():
    model = _model()
    ids = _prompt()
    with pytest.raises(ValueError, match="last position is perceptual"):
        _gen(model, ids, LimeConfig(mode="incremental"), n=1, modality_mask=(8, 12))
    with pytest.raises(ValueError, match="mode='incremental'"):
        IncrementalOptimizer(LRP(model), LimeConfig())
    with pytest.raises(TypeError, match="lime_attr attribution"):
        IncrementalOptimizer(model, LimeConfig(mode="incremental"))
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                               attn_implementation="eager")).eval()
    with pytest.raises(ValueError, match="sliding-window"):
        _gen(mistral, ids, LimeConfig(mode="incremental"), n=1)


def test_decoding_method_takes_the_mode():
    """The registered "lime" decoding method runs incremental mode (LimeConfig.for_model's preset + mode)."""
    from lime_attr.mitigation.lime_method import LimeMethodConfig, lime_method_generate

    model, inputs, _, _ = _llava(2)
    cfg = LimeMethodConfig(mode="incremental", max_new_tokens=3, overrides={"lr": 0.0})
    assert cfg.lime_config(model).mode == "incremental"
    res = lime_method_generate(model, None, inputs, cfg)
    assert res.tokens == _greedy(model, inputs, 3).tolist()


@pytest.mark.parametrize("perturb, scale", [("v", 0.5), ("k", 0.25)])
def test_placement_before_the_rule_scales_the_gradient(perturb, scale):
    """Every path from a Delta placed before AttnLRP's rule to the loss passes its gradient scaling (v: 1/2,
    k: 1/4): with SGD the first update is exactly that fraction of the one placed after the rule."""
    model = _model()
    norms = {}
    for placement in ("before_rule", "after_rule"):
        cfg = LimeConfig(mode="incremental", lr=0.01, optimizer="sgd", perturb=perturb, delta_placement=placement,
                         delta_heads="kv", fast_updates=2, record="steps")
        rec = _gen(model, _prompt(), cfg, n=1).records[0]
        norms[placement] = torch.tensor(rec.step_records[1].delta_v_norm[0] if perturb == "v"
                                        else rec.step_records[1].delta_k_norm[0])
    assert (norms["after_rule"] > 0).all()
    torch.testing.assert_close(norms["before_rule"], scale * norms["after_rule"], rtol=1e-9, atol=0)


def test_positions_modality_perturbs_only_the_perceptual_reads():
    """positions="modality" (Delta masked to M) runs and updates; with lr = 0 it is still greedy."""
    model = _model()
    out = _gen(model, _prompt(), LimeConfig(mode="incremental", lr=0.05, positions="modality", fast_updates=2,
                                            record="steps"), n=2)
    assert out.records[0].step_records[1].delta_k_norm[0][0] > 0
    zero = _gen(model, _prompt(), LimeConfig(mode="incremental", lr=0.0, positions="modality"), n=4)
    assert zero.tokens.tolist() == _greedy(model, {"input_ids": _prompt()}, 4).tolist()


# ------------------------------------------------------------------------------------------ the whole prompt


@pytest.mark.parametrize("second_order, updates", [("autograd", 1), ("autograd", 2), ("frozen", 1)])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_whole_prompt_first_forward_equals_prefix_cache_and_one_position(second_order, updates, kv_heads):
    """The first token's first forward over the whole prompt (how lime_generate runs it: no separate prompt
    pass) is the computation over the prefix's cache and the last position: the same relevance of every
    position (the earlier positions' inputs get none: their keys / values are read detached), the same
    records, emitted logits and next cache (float64 model, whose RMSNorm computes in float32: to 1e-6)."""
    from lime_attr.mitigation.generate import prompt_embeddings

    model, inputs, _, modality = _llava(kv_heads)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    n = ids.shape[1]
    pos = torch.arange(n)[None]
    embeds = prompt_embeddings(model, ids, mask, pos, {"pixel_values": inputs["pixel_values"]})
    with torch.no_grad():
        prefix = KVCacheState.from_cache(output_cache(model(inputs_embeds=embeds[:, :-1], attention_mask=mask[:, :-1],
                                                            position_ids=pos[:, :-1], use_cache=True)))
    cfg = LimeConfig(mode="incremental", second_order=second_order, lr=0.05, fast_updates=updates,
                     record_relevance=True, record="steps")
    lime = IncrementalOptimizer(LRP(model), cfg)
    kw = {"attention_mask": mask, "use_cache": True}
    mod, valid = modality[None], mask.bool()
    with lime.session():
        whole = lime.step(KVCacheState([]), embeds, {**kw, "position_ids": pos}, mod, valid)
        split = lime.step(prefix, embeds[:, -1:], {**kw, "position_ids": pos[:, -1:]}, mod, valid)
    (e_w, r_w, s_w, rec_w), (e_s, r_s, s_s, rec_s) = whole, split
    assert _rel_err(rec_w.relevance_before, rec_s.relevance_before) < 1e-6
    assert _rel_err(e_w, e_s) < 1e-6 and _rel_err(r_w, r_s) < 1e-6
    assert all(_rel_err(a, b) < 1e-6 for pa, pb in zip(s_w.pairs, s_s.pairs) for a, b in zip(pa, pb))
    assert _rel_err(rec_w.losses, rec_s.losses) < 1e-6
    assert rec_w.steps == rec_s.steps == updates
    assert not torch.equal(e_w, r_w)  # Delta moved the logits


@pytest.mark.parametrize("second_order", ["autograd", "frozen"])
def test_prompt_pass_separate_and_fused_give_the_same_generation(second_order):
    """lime_generate with the prompt's cache filled by a no-grad forward first (``"separate"``, the default:
    the first inner forward is one position) and with the whole prompt in the first inner forward
    (``"fused"``, one forward fewer): the same tokens and records (float64 LLaVA, to 1e-6)."""
    model, inputs, _, _ = _llava(2)
    shapes = []
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda m, a, kw: shapes.append(
        (torch.is_grad_enabled(), kw["inputs_embeds"].shape[1])), with_kwargs=True)
    runs = {}
    try:
        for how in ("separate", "fused"):
            shapes.clear()
            cfg = LimeConfig(mode="incremental", second_order=second_order, lr=0.05, prompt_pass=how,
                             record_relevance=True)
            runs[how] = (lime_generate(model, None, inputs, cfg, max_new_tokens=3), list(shapes))
    finally:
        handle.remove()
    (sep, sep_calls), (fus, fus_calls) = runs["separate"], runs["fused"]
    n = inputs["input_ids"].shape[1]
    first_grad = lambda calls: next(k for g, k in calls if g)  # noqa: E731 - the first inner forward's length
    assert first_grad(sep_calls) == 1 and first_grad(fus_calls) == n
    assert (False, n - 1) in sep_calls and all(k != n - 1 for _, k in fus_calls)  # the separate prefix forward
    assert sep.changed.any()  # the comparison is not trivial
    assert sep.tokens.tolist() == fus.tokens.tolist()
    for a, b in zip(sep.records, fus.records):
        assert _rel_err(a.relevance_before, b.relevance_before) < 1e-6
        assert _rel_err(a.losses, b.losses) < 1e-6


def test_prompt_pass_is_an_incremental_option():
    assert LimeConfig().prompt_pass == "separate"
    with pytest.raises(ValueError, match="prompt_pass='fused' needs mode='incremental'"):
        LimeConfig(mode="fast", prompt_pass="fused")
    with pytest.raises(ValueError, match="prompt_pass"):
        LimeConfig(mode="incremental", prompt_pass="whole")


def test_whole_prompt_needs_an_empty_cache():
    model, inputs, _, modality = _llava(2)
    lime = IncrementalOptimizer(LRP(model), LimeConfig(mode="incremental"))
    state = KVCacheState([(torch.zeros(1, 2, 3, 8, dtype=torch.float64),) * 2] * 2)
    x = torch.zeros(1, 9, 32, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"must be one \(\[B, 1, D\]\) over a cache"):
        lime.step(state, x, {"attention_mask": inputs["attention_mask"]}, modality[None], modality[None])


@pytest.mark.parametrize("second_order", ["autograd", "frozen"])
def test_positions_modality_perturbs_only_the_perceptual_entries(second_order):
    """``positions="modality"``: the keys / values the emission forward's query reads differ from the
    unperturbed ones at the perceptual positions and, after the first layer, at its own position (whose
    entries come from its perturbed hidden state), never at the earlier text positions (read where the kernel
    gets them, through a public attention transform of the session's scope)."""
    from lime_attr.mitigation import LimeSession

    model, inputs, _, modality = _llava(2)
    seen: dict[float, list] = {}
    for lr in (0.0, 0.05):
        cfg = LimeConfig(mode="incremental", second_order=second_order, lr=lr, positions="modality",
                         delta_placement="before_rule")
        attribution = LRP(model)
        reads: list = []
        def record(module, q, k, v, kwargs, reads=reads):
            reads.append((k.detach().clone(), v.detach().clone()))
            return q, k, v

        with LimeSession(model, None, cfg, attribution=attribution) as session:
            with attribution.scope().add_attention_transform(record, stage="after_rule", also_without_grad=True):
                out = session.generate(inputs, max_new_tokens=1)
        seen[lr] = reads[-2:]  # the emission forward: the last call of each of the 2 layers
        assert out.records[0].steps == 1
    cached_text = ~modality
    cached_text[-1] = False  # the current position's own entries: computed from its (perturbed) hidden state
    for layer, ((k0, v0), (k1, v1)) in enumerate(zip(seen[0.0], seen[0.05])):
        for a, b in ((k0, k1), (v0, v1)):
            assert a.shape[-2] == modality.shape[0]
            diff = (a - b).abs().amax(dim=(0, 1, 3))  # per position
            assert float(diff[cached_text].max()) == 0.0
            assert float(diff[modality].min()) > 0.0
            if layer == 0:  # nothing before the first layer is perturbed: its own entries are the plain ones
                assert float(diff[-1]) == 0.0
