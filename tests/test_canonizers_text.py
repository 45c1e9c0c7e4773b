"""Canonizers of the text families (issue 3): properties on tiny random models.

Every model here is built from its config class (no downloads): hidden 16, one or two layers, vocab 50,
sequences of 6 tokens. "RMSNorm families" compute their norms in float32 even in a float64 model
(transformers casts ``hidden_states.to(torch.float32)``), which limits any float64 comparison that goes
through them to about 1e-7 relative; those tests state the looser bound and why.
"""
from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf

from lime_attr import LRP
from lime_attr.canonizers import available_canonizers, get_canonizer
from lime_attr.canonizers import base as canon_base
from lime_attr.errors import UncoveredOpError, UnsupportedModelError
from lime_attr.scope import lrp_scope

H, V, T = 16, 50, 6
_COMMON = dict(vocab_size=V, hidden_size=H, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32)


def _dec(**kw):
    d = dict(_COMMON, intermediate_size=32, num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)
    d.update(kw)
    return d


FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, _dec()),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, _dec(sliding_window=None)),
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, _dec()),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, _dec()),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, _dec()),
    "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM,
               _dec(final_logit_softcapping=3.0, attn_logit_softcapping=5.0, sliding_window=4)),
    "gemma3_text": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM,
                    _dec(final_logit_softcapping=3.0, sliding_window=4, num_hidden_layers=2,
                         layer_types=["sliding_attention", "full_attention"])),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, _dec()),
    "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel,
             dict(vocab_size=V, n_embd=H, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                  attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "bert": (tf.BertConfig, tf.BertForSequenceClassification,
             dict(_COMMON, intermediate_size=32, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)),
    "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM,
                  _dec(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, decoder_sparse_step=1)),
    "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM,
                _dec(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}
ALL = list(FAMILIES)
MOE = {"qwen3_moe", "mixtral"}
NO_SDPA = {"gemma2"}  # transformers: Gemma 2 supports eager only (SDPA has no attention soft-capping)
EXACT = {"gpt2", "bert"}  # float64 throughout (LayerNorm, no float32 cast)
RMS_TOL = 1e-6  # float32 RMSNorm inside a float64 model: ~1e-7 relative at best


def make(family: str, attn: str = "eager", dtype=torch.float64, seed: int = 0, **over):
    cfg_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_cls(cfg_cls(**{**kw, **over}, attn_implementation=attn))
    model = model.to(dtype).eval()
    with torch.no_grad():  # non-trivial values everywhere (norm weights, biases) instead of the init's 0/1
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def zero_biases(model):
    """Biases and additive embeddings (positions, token types) are constants that absorb relevance."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type" in name or "wpe" in name:
                p.zero_()
    return model


def target_of(family: str) -> int:
    return 1 if family == "bert" else 3


def logit(model, emb, family, **kw):
    """The explained scalar (class logit for BERT, token logit at the last position otherwise)."""
    with torch.no_grad():
        out = model(inputs_embeds=emb, **kw).logits
    return out[:, target_of(family)] if family == "bert" else out[:, -1, target_of(family)]


def embeds(dtype=torch.float64, batch=1, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, T, H, generator=g, dtype=torch.float64).to(dtype)


def attrs(family, composite="attnlrp", attn="eager", model=None, emb=None, **kw):
    model = model if model is not None else make(family, attn)
    emb = embeds() if emb is None else emb
    return LRP(model, composite=composite).attribute(emb, target=target_of(family), **kw)


def relerr(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------- registry

def test_registered_text_families():
    for family in ALL:
        assert family in available_canonizers()
        assert get_canonizer(family).model_types[0] == family


# ------------------------------------------------------------------------------------- 1 conservation

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ALL)
def test_cp_lrp_conserves(family, attn):
    if attn == "sdpa" and family in NO_SDPA:
        pytest.skip("transformers has no SDPA for this family")
    model = zero_biases(make(family, attn))
    emb = embeds()
    rel, delta = LRP(model, composite="cp-lrp").attribute(emb, target=target_of(family),
                                                          return_convergence_delta=True)
    total = rel.sum() + delta.sum()  # the explained output, as computed inside the scope
    assert torch.isfinite(rel).all()
    if family not in MOE:  # (MoE experts run grouped_mm outside a scope: no float64 kernel on CPU)
        torch.testing.assert_close(total, logit(model, emb, family).sum(), rtol=1e-12, atol=1e-12)
    # 1e-8 where the model is float64 throughout; RMSNorm families cast to float32 inside their norms
    tol = 1e-8 if family in EXACT else RMS_TOL
    assert abs(float(delta.sum())) / abs(float(total)) <= tol


# ---------------------------------------------------------------- 2 AttnLRP vs written-out relevance

def _lin(x, w, r, b=None):
    """LRP-0 through ``z = x w^T + b``: ``R_x = x * ((R_z / z) w)`` (the bias absorbs its share)."""
    z = x @ w.T + (0 if b is None else b)
    return x * ((r / z) @ w)


def _split(a, b, r):
    """LRP-0 through ``s = a + b``: each summand gets its share ``a / s``."""
    s = a + b
    return a / s * r, b / s * r


def _attention_head(q, k, v, scale, r_out):
    """Softmax + bilinear rules (AttnLRP) for one causal head; returns R_q, R_k, R_v."""
    n = q.shape[0]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    s = scale * q @ k.T
    a = torch.softmax(s.masked_fill(~causal, float("-inf")), dim=-1)
    o = a @ v
    ratio = r_out / (2 * o)                                  # bilinear A V: half to each factor
    r_a = a * (ratio @ v.T)
    r_v = v * (a.T @ ratio)
    r_s = s * (r_a - a * r_a.sum(-1, keepdim=True))          # softmax rule, masked logits get 0
    r_s = r_s.masked_fill(~causal, 0.0)
    ratio_s = torch.where(causal, r_s / (2 * s), torch.zeros_like(s))  # bilinear q k^T
    return q * (scale * ratio_s @ k), k * (scale * ratio_s.T @ q), r_v


def _layer_norm_rel(x, y, w, r, eps):
    """Norm rule for LayerNorm: sigma constant, mean subtraction linear, bias absorbs."""
    sigma = ((x - x.mean(-1, keepdim=True)) ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    g = (r / y) * w / sigma
    return x * (g - g.mean(-1, keepdim=True))


def _explicit_llama(model, emb, tok):
    """A written-out AttnLRP relevance for a one-block Llama (float64, no float32 casts)."""
    x0 = emb[0]
    layer, core = model.model.layers[0], model.model
    at, mlp = layer.self_attn, layer.mlp
    nh, nkv, hd = model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim

    def rms(x, w, eps):
        return x / x.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * w

    eps = model.config.rms_norm_eps
    n1 = rms(x0, layer.input_layernorm.weight, eps)
    q, k, v = n1 @ at.q_proj.weight.T, n1 @ at.k_proj.weight.T, n1 @ at.v_proj.weight.T
    cos, sin = core.rotary_emb(emb, torch.arange(T)[None])
    cos, sin = cos[0], sin[0]
    half = hd // 2
    rot = torch.zeros(hd, hd, dtype=emb.dtype)  # rotate_half(x) = x @ rot
    rot[torch.arange(half) + half, torch.arange(half)] = -1.0
    rot[torch.arange(half), torch.arange(half) + half] = 1.0
    rope = torch.diag_embed(cos) + rot[None] * sin[:, None, :]  # [T, hd_in, hd_out], x_rot = x @ rope[t]

    def apply_rope(x):  # x: [T, heads, hd]
        return torch.einsum("thi,tij->thj", x, rope)

    def rope_rel(x, r):
        return x * torch.einsum("thj,tij->thi", r / apply_rope(x), rope)

    qh, kh, vh = q.view(T, nh, hd), k.view(T, nkv, hd), v.view(T, nkv, hd)
    qr, kr = apply_rope(qh), apply_rope(kh)
    groups = nh // nkv
    heads = [torch.softmax((qr[:, h] @ kr[:, h // groups].T * hd ** -0.5).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")), -1) @ vh[:, h // groups] for h in range(nh)]
    ocat = torch.cat(heads, -1)
    attn = ocat @ at.o_proj.weight.T
    x1 = x0 + attn
    n2 = rms(x1, layer.post_attention_layernorm.weight, eps)
    gate, up = n2 @ mlp.gate_proj.weight.T, n2 @ mlp.up_proj.weight.T
    p = torch.nn.functional.silu(gate) * up
    m_out = p @ mlp.down_proj.weight.T
    x2 = x1 + m_out
    nf = rms(x2, core.norm.weight, eps)
    logits = nf @ model.lm_head.weight.T
    r_logits = torch.zeros_like(logits)
    r_logits[-1, tok] = logits[-1, tok]
    # backward, rule by rule
    r_x2 = _lin(nf, model.lm_head.weight, r_logits)        # RMSNorm: identity (1/rms constant)
    r_x1, r_m = _split(x1, m_out, r_x2)
    r_p = _lin(p, mlp.down_proj.weight, r_m)
    r_n2 = _lin(n2, mlp.gate_proj.weight, r_p / 2) + _lin(n2, mlp.up_proj.weight, r_p / 2)  # uniform; silu: identity
    r_x1 = r_x1 + r_n2
    r_x0, r_attn = _split(x0, attn, r_x1)
    r_o = _lin(ocat, at.o_proj.weight, r_attn).view(T, nh, hd)
    r_qr, r_kr, r_v = torch.zeros_like(qr), torch.zeros_like(kr), torch.zeros_like(vh)
    for h in range(nh):
        a, b, c = _attention_head(qr[:, h], kr[:, h // groups], vh[:, h // groups], hd ** -0.5, r_o[:, h])
        r_qr[:, h] += a
        r_kr[:, h // groups] += b
        r_v[:, h // groups] += c
    r_n1 = (_lin(n1, at.q_proj.weight, rope_rel(qh, r_qr).reshape(T, -1))
            + _lin(n1, at.k_proj.weight, rope_rel(kh, r_kr).reshape(T, -1))
            + _lin(n1, at.v_proj.weight, r_v.reshape(T, -1)))
    return r_x0 + r_n1


def _explicit_gpt2(model, emb, tok):
    """A written-out AttnLRP relevance for a one-block GPT-2 (biases kept: they absorb relevance)."""
    tr, blk = model.transformer, model.transformer.h[0]
    eps = model.config.layer_norm_epsilon
    nh, hd = model.config.n_head, H // model.config.n_head

    def ln(x, mod):
        return torch.nn.functional.layer_norm(x, (H,), mod.weight, mod.bias, eps)

    def conv(x, mod):
        return x @ mod.weight + mod.bias

    def conv_rel(x, mod, r):
        return _lin(x, mod.weight.T, r, mod.bias)

    def ln_rel(x, mod, r):
        return _layer_norm_rel(x, ln(x, mod), mod.weight, r, eps)

    e = emb[0]
    x0 = e + tr.wpe.weight[:T]
    n1 = ln(x0, blk.ln_1)
    qkv = conv(n1, blk.attn.c_attn)
    q, k, v = (t.view(T, nh, hd) for t in qkv.split(H, -1))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    ocat = torch.cat([torch.softmax((q[:, h] @ k[:, h].T * hd ** -0.5).masked_fill(~causal, float("-inf")), -1)
                      @ v[:, h] for h in range(nh)], -1)
    attn = conv(ocat, blk.attn.c_proj)
    x1 = x0 + attn
    n2 = ln(x1, blk.ln_2)
    hmid = conv(n2, blk.mlp.c_fc)
    act = blk.mlp.act(hmid)
    m_out = conv(act, blk.mlp.c_proj)
    x2 = x1 + m_out
    nf = ln(x2, tr.ln_f)
    logits = nf @ model.lm_head.weight.T
    r_logits = torch.zeros_like(logits)
    r_logits[-1, tok] = logits[-1, tok]
    r_x2 = ln_rel(x2, tr.ln_f, _lin(nf, model.lm_head.weight, r_logits))
    r_x1, r_m = _split(x1, m_out, r_x2)
    r_h = conv_rel(act, blk.mlp.c_proj, r_m)                 # GELU: identity
    r_x1 = r_x1 + ln_rel(x1, blk.ln_2, conv_rel(n2, blk.mlp.c_fc, r_h))
    r_x0, r_attn = _split(x0, attn, r_x1)
    r_o = conv_rel(ocat, blk.attn.c_proj, r_attn).view(T, nh, hd)
    parts = [_attention_head(q[:, h], k[:, h], v[:, h], hd ** -0.5, r_o[:, h]) for h in range(nh)]
    r_qkv = torch.cat([torch.cat([p[i] for p in parts], -1) for i in range(3)], -1)
    r_x0 = r_x0 + ln_rel(x0, blk.ln_1, conv_rel(n1, blk.attn.c_attn, r_qkv))
    r_e, _ = _split(e, tr.wpe.weight[:T], r_x0)             # position embeddings: a bias
    return r_e


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attnlrp_matches_written_out_rules(family, attn):
    model = make(family, attn)
    emb = embeds()
    tok = target_of(family)
    rel = LRP(model, "attnlrp").attribute(emb, target=tok)[0]
    with torch.no_grad():
        ref = (_explicit_llama if family == "llama" else _explicit_gpt2)(model, emb, tok)
    # gpt2 is float64 end to end; llama's forward rounds its RMSNorms to float32 (the reference does not)
    assert relerr(rel, ref) <= (1e-10 if family == "gpt2" else 1e-6)


# -------------------------------------------------------------------------------- 3 eager == sdpa

@pytest.mark.parametrize("family", [f for f in ALL if f not in NO_SDPA])
def test_eager_and_sdpa_agree(family):
    emb = embeds()
    r_eager = attrs(family, attn="eager", emb=emb)
    r_sdpa = attrs(family, attn="sdpa", emb=emb)
    # the two kernels differ by float64 rounding (~1e-16); RMSNorm families then round to float32 in
    # their norms, which turns those into ~1e-8 relative differences
    assert relerr(r_sdpa, r_eager) <= (1e-10 if family in EXACT else 1e-6)


# ------------------------------------------------------------------------------- 4 exact restoration

def _train_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ALL)
def test_scope_restores_model_exactly(family):
    model = make(family, "sdpa" if family not in NO_SDPA else "eager", dtype=torch.float32)
    fresh = copy.deepcopy(model)
    impl = model.config._attn_implementation
    experts = getattr(model.config, "_experts_implementation", None)
    LRP(model, "attnlrp").attribute(embeds(torch.float32), target=target_of(family))
    assert model.config._attn_implementation == impl
    assert getattr(model.config, "_experts_implementation", None) == experts
    assert "forward" not in model.__dict__
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    ids = torch.randint(3, V, (2, T), generator=torch.Generator().manual_seed(0))
    model.train(), fresh.train()
    out_a, grads_a = _train_step(model, ids)
    out_b, grads_b = _train_step(fresh, ids)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)


# ------------------------------------------------------------------------------------------ 5 dtypes

@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_low_precision_dtypes(family):
    ref_model = make(family, dtype=torch.float32)
    emb = embeds(torch.float32)
    ref = attrs(family, model=ref_model, emb=emb)
    for dtype, tol in ((torch.bfloat16, 0.15), (torch.float16, 0.05)):
        model = copy.deepcopy(ref_model).to(dtype)
        try:
            rel = attrs(family, model=model, emb=emb.to(dtype))
        except FloatingPointError as e:  # the documented alternative for fp16: a clear error, never NaN
            assert dtype == torch.float16 and "bfloat16" in str(e)
            continue
        assert rel.dtype == dtype and torch.isfinite(rel).all()
        assert relerr(rel.float(), ref) <= tol


def test_fp16_overflow_in_backward_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 1, bias=False)).half()
    with torch.no_grad():
        model[0].weight.fill_(300.0)
        model[1].weight.fill_(300.0)
    x = torch.full((1, 4), 1e-5, dtype=torch.float16)
    assert torch.isfinite(model(x)).all()  # the forward is fine, the gradient (3.6e5) is not
    with pytest.raises(FloatingPointError, match="float16.*bfloat16"):
        LRP(model, "attnlrp").attribute(x, target=0)


# ---------------------------------------------------------------------------------------- 6 batching

@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3_text", "bert"])
def test_padded_batch_matches_single_examples(family, attn):
    # eager Llama / Gemma upcast the attention softmax to float32: in a float64 model the padding mask
    # (float64 min) becomes -inf there, fully masked pad rows give NaN even in the plain gradient, so
    # those run in float32
    dtype = torch.float32 if attn == "eager" and family not in EXACT else torch.float64
    model = make(family, attn, dtype=dtype)
    emb = embeds(dtype, batch=2)
    short = 4
    left = family != "bert"  # decoders: left padding; BERT (classified at [CLS], position 0): right padding
    mask = torch.ones(2, T, dtype=torch.long)
    pad = slice(0, T - short) if left else slice(short, T)
    keep = slice(T - short, T) if left else slice(0, short)
    mask[1, pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = LRP(model, "attnlrp").attribute(emb, target=target_of(family), attention_mask=mask, position_ids=pos)
    assert torch.isfinite(batch).all()
    alone0 = attrs(family, model=model, emb=emb[:1])
    alone1 = attrs(family, model=model, emb=emb[1:, keep])
    tol = 1e-10 if family in EXACT else (1e-6 if dtype == torch.float64 else 1e-4)
    assert relerr(batch[0], alone0[0]) <= tol
    assert relerr(batch[1, keep], alone1[0]) <= tol


# ------------------------------------------------------------------------------ 7 gradient checkpointing

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing_keeps_relevance(family):
    model = make(family)
    emb = embeds()
    ref = attrs(family, model=model, emb=emb)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_enable in 5.x
        model.gradient_checkpointing_enable()
    model.train()  # checkpointing is active in training mode only; all dropouts are 0
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert layers
    rel = attrs(family, model=model, emb=emb)
    assert all(m.gradient_checkpointing for m in layers)  # restored
    torch.testing.assert_close(rel, ref, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------- 8 isolation

def _grad_rel(model, emb, family):
    emb = emb.clone().requires_grad_(True)
    out = model(inputs_embeds=emb).logits
    y = out[0, target_of(family)] if family == "bert" else out[0, -1, target_of(family)]
    (g,) = torch.autograd.grad(y, emb)
    return emb.detach() * g


def test_two_families_in_one_process_do_not_interfere():
    a, b = make("llama"), make("gpt2")
    ea, eb = embeds(seed=3), embeds(seed=4)
    ref_a = attrs("llama", "attnlrp", model=a, emb=ea)
    ref_b = attrs("gpt2", "cp-lrp", model=b, emb=eb)
    # nested
    with lrp_scope(a, "attnlrp"):
        with lrp_scope(b, "cp-lrp"):
            ra, rb = _grad_rel(a, ea, "llama"), _grad_rel(b, eb, "gpt2")
        ra2 = _grad_rel(a, ea, "llama")
    for x, y in ((ra, ref_a), (rb, ref_b), (ra2, ref_a)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    # interleaved: entered a, b; left a before using b; LRP.attribute of one inside the other's scope
    scope_a = lrp_scope(a, "attnlrp")
    scope_b = lrp_scope(b, "cp-lrp")
    scope_a.__enter__()
    scope_b.__enter__()
    ra = _grad_rel(a, ea, "llama")
    scope_a.__exit__(None, None, None)
    rb = _grad_rel(b, eb, "gpt2")
    ra_in_b = attrs("llama", "attnlrp", model=a, emb=ea)
    scope_b.__exit__(None, None, None)
    for x, y in ((ra, ref_a), (rb, ref_b), (ra_in_b, ref_a)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    assert a.config._attn_implementation == "eager" and b.config._attn_implementation == "eager"


# ------------------------------------------------------------------------------------- 9 op coverage

class _ExpGatedMLP(tf.models.llama.modeling_llama.LlamaMLP):
    """A Llama MLP with one more, uncovered gate: ``mlp(x) * exp(x)``."""

    def forward(self, x):
        return super().forward(x) * torch.exp(x)


class _SigmoidGatedMLP(tf.models.llama.modeling_llama.LlamaMLP):
    """A Llama MLP with an extra ``sigmoid(x)`` gate: a product and an activation, both have rules."""

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(x)


def _with_mlp(cls):
    model = make("llama")
    old = model.model.layers[0].mlp
    new = cls(model.config).to(torch.float64)
    new.load_state_dict(old.state_dict())
    model.model.layers[0].mlp = new
    return model


def test_uncovered_gate_raises():
    model = _with_mlp(_ExpGatedMLP)
    with pytest.raises(UncoveredOpError, match="exp.*model.layers.0.mlp"):
        attrs("llama", model=model)


def test_extra_gate_with_rules_is_ruled_not_ignored():
    model = _with_mlp(_SigmoidGatedMLP)
    lrp = LRP(model, "attnlrp")
    lrp.attribute(embeds(), target=3)
    assert {"product:mul", "activation:sigmoid"} <= lrp.scope().ruled_ops


def test_unsupported_model_type_lists_supported():
    model = make("llama")
    model.config.model_type = "made_up_family"
    with pytest.raises(UnsupportedModelError) as err:
        attrs("llama", model=model)
    for family in ("llama", "gpt2", "bert", "qwen3_moe"):
        assert family in str(err.value)


def test_real_family_without_canonizer_raises():
    cfg = tf.OPTConfig(vocab_size=V, hidden_size=H, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=H, max_position_embeddings=32)
    model = tf.OPTForCausalLM(cfg).double().eval()
    with pytest.raises(UnsupportedModelError, match="'opt'"):
        LRP(model).attribute(embeds(), target=3)


# ------------------------------------------------------------------------------ 10 latent relevance

def test_latent_relevance_of_the_residual_stream_sums_to_the_logit():
    model = zero_biases(make("llama", num_hidden_layers=2))
    emb = embeds()
    names = ["model.layers.0", "model.layers.1", "model.norm", "model.layers.0.mlp"]
    rel, delta, latent = LRP(model, "cp-lrp").attribute(emb, target=3, return_convergence_delta=True, latent=names)
    y = float(rel.sum() + delta.sum())
    assert list(latent) == names and all(latent[n].shape == (1, T, H) for n in names)
    for name in names[:3]:  # complete cuts through the network conserve (float32 RMSNorm: 1e-6)
        assert abs(float(latent[name].sum()) - y) / abs(y) <= RMS_TOL
    # without latent the input relevance is the same
    torch.testing.assert_close(rel, attrs("llama", "cp-lrp", model=model, emb=emb), rtol=0, atol=0)


def test_latent_relevance_bert_and_errors():
    model = zero_biases(make("bert"))
    rel, latent = LRP(model, "cp-lrp").attribute(embeds(), target=1, latent=["bert.encoder.layer.0",
                                                                              "bert.pooler"])
    assert abs(float(latent["bert.encoder.layer.0"].sum() - rel.sum())) <= 1e-10
    assert latent["bert.pooler"].shape == (1, H)
    with pytest.raises(KeyError, match="model.layers.0"):
        LRP(make("llama"), "attnlrp").attribute(embeds(), target=3, latent=["model.layers.00"])


def test_latent_relevance_is_differentiable():
    model = make("gpt2")
    emb = embeds()
    rel, latent = LRP(model, "attnlrp").attribute(emb, target=3, create_graph=True, latent=["transformer.h.0"])
    assert latent["transformer.h.0"].requires_grad
    (g,) = torch.autograd.grad(latent["transformer.h.0"].pow(2).sum(), model.transformer.h[0].mlp.c_fc.weight)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------ MoE and soft-capping specifics

@pytest.mark.parametrize("family, over", [("qwen3_moe", {}), ("qwen3_moe", {"norm_topk_prob": True}),
                                          ("mixtral", {})])
def test_moe_products_router_and_renormalisation_are_ruled(family, over):
    model = zero_biases(make(family, **over))
    lrp = LRP(model, "attnlrp")
    lrp.attribute(embeds(), target=3)
    ruled = lrp.scope().ruled_ops
    assert {"product:mul", "softmax:softmax"} <= ruled
    # top-k weights / their sum (Mixtral always, Qwen3-MoE with norm_topk_prob): the norm rule
    assert ("norm:div_" in ruled) == (family == "mixtral" or bool(over))
    assert model.config._experts_implementation != "eager"  # restored (grouped_mm by default)
    rel, delta = LRP(model, "cp-lrp").attribute(embeds(), target=3, return_convergence_delta=True)
    assert abs(float(delta.sum())) / abs(float(rel.sum() + delta.sum())) <= RMS_TOL


def test_normalising_division_outside_a_declared_module_raises():
    model = make("qwen3_moe", norm_topk_prob=True)
    canon = get_canonizer("qwen3_moe")
    canon.normalizing_modules = ()  # the instance only
    with pytest.raises(UncoveredOpError, match="div_"):
        LRP(model, "attnlrp", canonizer=canon).attribute(embeds(), target=3)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma"])
def test_declared_gated_mlp_is_ruled_once(family):
    """The declared ``act(gate) * up`` is ruled by the canonizer's hooks, not a second time by the op mode."""
    model = zero_biases(make(family))
    lrp = LRP(model, "attnlrp")
    lrp.attribute(embeds(), target=3)
    assert not any(op.startswith("product:") for op in lrp.scope().ruled_ops)


def test_gemma2_final_softcap_gets_the_identity_rule():
    model = zero_biases(make("gemma2"))
    lrp = LRP(model, "cp-lrp")
    rel, delta = lrp.attribute(embeds(), target=3, return_convergence_delta=True)
    assert "activation:tanh" in lrp.scope().ruled_ops  # c * tanh(z / c) on the logits
    assert abs(float(delta.sum())) / abs(float(rel.sum() + delta.sum())) <= RMS_TOL


# ------------------------------------------------------------------------ docs: writing a canonizer

def _doc_example() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "writing_a_canonizer.rst").read_text()
    blocks = re.findall(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", text)
    code = "\n".join(b for b in blocks if "register_canonizer" in b)
    return "\n".join(line[4:] for line in code.splitlines())


def test_writing_a_canonizer_example_runs():
    code = _doc_example()
    assert code and len(code.strip().splitlines()) < 60
    before = {mt: type(canon_base.get_canonizer(mt)) for mt in canon_base.available_canonizers()}
    namespace: dict = {}
    try:
        exec(compile(code, "writing_a_canonizer.rst", "exec"), namespace)
        assert namespace["delta"].abs().max() / namespace["logit"].abs() <= RMS_TOL
    finally:
        for mt in set(canon_base.available_canonizers()) - set(before):
            canon_base.unregister_canonizer(mt)
    assert {mt: type(canon_base.get_canonizer(mt)) for mt in canon_base.available_canonizers()} == before


@pytest.mark.parametrize("family", ALL)
def test_epsilon_read_in_the_backward_equals_a_forward_factor(family, monkeypatch):
    """AttnLRP with epsilon > 0 on every linear layer: reading |z| (and the SiLU / GELU identity ratio) in
    the backward pass gives bit for bit the relevance of factors computed in the forward pass, and no
    family writes into a layer output in place after the rule (that would raise)."""
    from lime_attr import get_composite
    from lime_attr.rules import _grad, builtin

    comp = get_composite("attnlrp", epsilon=1e-3)
    lazy = attrs(family, composite=comp)

    def eager(y, eps):
        return _grad.mul_grad_hook(y, _grad.epsilon_factor(y, eps))

    monkeypatch.setattr(builtin, "epsilon_grad_hook", eager)
    monkeypatch.setattr(builtin, "is_kept", lambda t: False)
    assert torch.equal(lazy, attrs(family, composite=comp))
