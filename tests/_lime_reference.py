r"""An independent, written-out LIME loop for the comparison tests (issue 14).

Nothing here uses lime_attr: no scope, no hooks on the decoder, no rules. It reads the weights of a Hugging
Face ``LlavaForConditionalGeneration`` whose language model is a Llama, and computes

* :func:`llama_forward`: the Llama decoder forward on given input embeddings, with AttnLRP in gradient form
  written out (RMSNorm with the normaliser detached; the gradients of q and k scaled by 1/4 and of v by 1/2
  at the attention function's inputs; the identity rule on SiLU, ``f(x) / x`` a constant; the gradient of the
  gate * up product halved; everything else the plain gradient) and additive perturbations of the keys and
  values. Where the perturbation sits is a switch:

  - ``delta_heads="query", delta_before_rule=False`` (the released code, ItaiAllouche/lime): inside the
    attention function, *after* the 1/4, 1/2 gradient division and after the grouped-query repeat, one
    slice per query head, ``[batch, n_heads, seq, head_dim]``;
  - ``delta_heads="kv", delta_before_rule=True`` (what lime_attr does before issue 14 is fixed): before the
    division, one slice per key-value head, ``[batch, n_kv_heads, seq, head_dim]``;
  - the two mixed settings separate the two differences: ``("query", True)`` per query head but before
    the division; ``("kv", False)`` per kv head, after the division.

* :func:`lime_loop`: the LIME loop of ``shared/reference/lime-method.md`` for greedy decoding, one
  generated token at a time: reference logits once per token (no perturbation); ``steps`` inner steps of
  a full forward of the whole sequence, the explained token ``z* = argmax`` of that forward's last logits,
  the relevance ``Phi = sum_d x * dLRP(z*)/dx`` at the input embeddings with ``create_graph``, ``L_rel =
  -mean_{i in M} log softmax(Phi / tau)_i``, ``L_KL = KL(p_ref || p_Delta)`` at the last position
  (``kl_div(log p_Delta, p_ref, reduction="batchmean")`` in the released code: a sum over the vocabulary for
  one row), ``L = L_rel + lambda L_KL``, one Adam step on zero-initialised Delta_K, Delta_V; the token is
  emitted from the logits of the last forward (before the last update, the released code's quirk and
  lime_attr's ``mode="reference"`` default ``emit="last_forward"``); Delta and Adam are discarded per
  token; stop at EOS or after ``max_new_tokens``.

Numerics follow the Hugging Face Llama exactly (its RMSNorm and eager softmax compute in float32 even in a
float64 model, and its RoPE angles in float32), so that the forward values equal the model's logits to
rounding; the gradients of the norm use the detached normaliser in the input's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def scale_grad(t: Tensor, c: float) -> Tensor:
    """``t`` in the forward pass (exactly: ``t - t.detach()`` is 0), gradient multiplied by ``c``."""
    return t.detach() + c * (t - t.detach())


def llm_input_embeddings(model: nn.Module, inputs: dict) -> Tensor:
    """The language model's input embeddings (image features already scattered in), read off the Hugging
    Face forward: what the released code captures with a pre-hook on the language model."""
    got: dict = {}

    def grab(module, args, kwargs):
        got.setdefault("x", kwargs.get("inputs_embeds"))

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    finally:
        handle.remove()
    return got["x"].detach()


@dataclass
class _Weights:
    cfg: object
    layers: list
    norm: Tensor
    lm_head: Tensor
    embed: Tensor


def _weights(model: nn.Module) -> _Weights:
    """The weights, detached (the loop never builds a graph to the parameters)."""
    lm = model.model.language_model

    def lin(m: nn.Linear) -> tuple:
        return m.weight.detach(), None if m.bias is None else m.bias.detach()

    layers = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        layers.append(dict(ln1=layer.input_layernorm.weight.detach(),
                           ln2=layer.post_attention_layernorm.weight.detach(), q=lin(a.q_proj), k=lin(a.k_proj), v=lin(a.v_proj), o=lin(a.o_proj),
                           gate=lin(m.gate_proj), up=lin(m.up_proj), down=lin(m.down_proj)))
    return _Weights(model.config.text_config, layers, lm.norm.weight.detach(), model.lm_head.weight.detach(),
                    lm.embed_tokens.weight.detach())


def _rms_norm(h: Tensor, w: Tensor, eps: float) -> Tensor:
    """Value: the HF Llama RMSNorm (float32 inside). Gradient: ``w / sigma`` with ``sigma`` detached."""
    h32 = h.to(torch.float32)
    value = w * (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    sigma = torch.sqrt(h.detach().pow(2).mean(-1, keepdim=True) + eps)
    lin = h / sigma * w
    return value.detach() + (lin - lin.detach())


def _silu_identity(g: Tensor) -> Tensor:
    """SiLU with the identity rule: gradient ``f(x) / x`` (0 where ``x == 0``), a constant."""
    y = F.silu(g)
    ratio = torch.where(g == 0, torch.zeros_like(g), y / g).detach()
    return y.detach() + ratio * (g - g.detach())


def _rope(cfg, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin of the default RoPE, angles in float32 as the HF Llama computes them."""
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rot * sin


def _add(t: Tensor, d: Optional[Tensor]) -> Tensor:
    return t if d is None else t + d


def _attention(W: _Weights, p: dict, a: Tensor, cos: Tensor, sin: Tensor, dk: Optional[Tensor],
               dv: Optional[Tensor], delta_heads: str, delta_before_rule: bool) -> Tensor:
    cfg = W.cfg
    B, S, _ = a.shape
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    q = F.linear(a, *p["q"]).view(B, S, H, D).transpose(1, 2)
    k = F.linear(a, *p["k"]).view(B, S, KV, D).transpose(1, 2)
    v = F.linear(a, *p["v"]).view(B, S, KV, D).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    g = H // KV
    if delta_heads == "query" and delta_before_rule:  # (a variant, to separate the two differences)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if delta_before_rule:  # lime_attr today: the attention transform runs before the rule
        k, v = _add(k, dk), _add(v, dv)
    # AttnLRP at the attention function's inputs (LXT's wrapper): q, k gradients / 4, v / 2
    q, k, v = scale_grad(q, 0.25), scale_grad(k, 0.25), scale_grad(v, 0.5)
    if delta_heads == "kv" and not delta_before_rule:
        k, v = _add(k, dk), _add(v, dv)
    if delta_heads == "kv" or not delta_before_rule:  # the grouped-query repeat (kv head j -> query heads j*g..)
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    if delta_heads == "query" and not delta_before_rule:  # the released code: after the division and the repeat
        k, v = _add(k, dk), _add(v, dv)
    scores = torch.matmul(q, k.transpose(2, 3)) * D ** -0.5
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    scores = scores + torch.zeros(S, S, dtype=scores.dtype).masked_fill(~causal, torch.finfo(scores.dtype).min)
    attn = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(attn, v).transpose(1, 2).reshape(B, S, H * D)
    return F.linear(out, *p["o"])


def llama_forward(model: nn.Module, x: Tensor, deltas: Optional[dict] = None, delta_heads: str = "query",
                  delta_before_rule: bool = False) -> Tensor:
    """Logits ``[batch, seq, vocab]`` of the LLaVA's language model on input embeddings ``x`` (positions
    ``0..seq-1``, no padding), AttnLRP in gradient form, ``deltas = {layer: (Delta_K, Delta_V)}`` added to
    the keys and values as the switches say (see the module docstring)."""
    if delta_heads not in ("query", "kv"):
        raise ValueError(f"delta_heads must be 'query' or 'kv', got {delta_heads!r}")
    W = _weights(model)
    eps = W.cfg.rms_norm_eps
    S = x.shape[1]
    cos, sin = _rope(W.cfg, torch.arange(S)[None], x.dtype)
    cos, sin = cos[:, None], sin[:, None]
    h = x
    for i, p in enumerate(W.layers):
        dk, dv = (deltas or {}).get(i, (None, None))
        h = h + _attention(W, p, _rms_norm(h, p["ln1"], eps), cos, sin, dk, dv, delta_heads, delta_before_rule)
        a = _rms_norm(h, p["ln2"], eps)
        prod = scale_grad(_silu_identity(F.linear(a, *p["gate"])) * F.linear(a, *p["up"]), 0.5)
        h = h + F.linear(prod, *p["down"])
    return F.linear(_rms_norm(h, W.norm, eps), W.lm_head)


def relevance(model: nn.Module, x: Tensor, target: Optional[int] = None, **kw) -> tuple[Tensor, Tensor, int]:
    """``(Phi [seq], last logits [vocab], target)`` for one row: ``Phi = sum_d x * dLRP(z_target)/dx``,
    first order (no graph), ``target`` default the argmax."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = llama_forward(model, x, **kw)[0, -1]
        t = int(logits.detach().argmax()) if target is None else int(target)
        (g,) = torch.autograd.grad(logits[t], x)
    return (x.detach() * g).sum(-1)[0], logits.detach(), t


@dataclass
class StepRecord:
    """One inner step: the explained token, the relevance, the losses, the top logits of that forward and
    the norms (Frobenius) of Delta_K and Delta_V per perturbed layer *used in that forward*."""

    explained: int
    relevance: Tensor
    loss: float
    rel_loss: float
    kl: float
    top_ids: list
    top_logits: list
    dk_norms: list
    dv_norms: list
    runner_up_rel_loss: float = math.nan


@dataclass
class TokenResult:
    token: int
    unperturbed: int
    steps: list = field(default_factory=list)
    final_dk_norms: list = field(default_factory=list)
    final_dv_norms: list = field(default_factory=list)


def _rel_loss(phi: Tensor, modality: Tensor, tau: float) -> Tensor:
    return -F.log_softmax(phi / tau, dim=-1)[modality].mean()


def step_loss(model: nn.Module, x_all: Tensor, deltas: dict, modality: Tensor, p_ref: Tensor,
              kl_weight: float = 0.1, tau: float = 0.1, **kw) -> dict:
    """One inner step's forward, relevance (``create_graph``) and loss, for one row (``kw``: the placement
    switches of :func:`llama_forward`). Returns ``loss``, ``rel_loss``, ``kl`` (with graphs), the explained
    token ``z``, the relevance ``phi`` and the last ``logits``."""
    x = x_all.detach().clone().requires_grad_(True)
    logits = llama_forward(model, x, deltas, **kw)[0, -1]
    z = int(logits.detach().argmax())
    (g,) = torch.autograd.grad(logits[z], x, create_graph=True)
    phi = (x * g).sum(-1)[0]
    rel_loss = _rel_loss(phi, modality, tau)
    kl = (p_ref * (torch.log(p_ref) - F.log_softmax(logits, -1))).sum()
    return dict(loss=rel_loss + kl_weight * kl, rel_loss=rel_loss, kl=kl, z=z, phi=phi, logits=logits)


def lime_loop(model: nn.Module, embeds: Tensor, modality: Tensor, steps: int = 7, lr: float = 3e-4,
              kl_weight: float = 0.1, tau: float = 0.1, max_new_tokens: int = 3, eos: Optional[int] = None,
              delta_heads: str = "query", delta_before_rule: bool = False, top_k: int = 5,
              runner_up: bool = False) -> list:
    """The written-out LIME loop (greedy, one row); a :class:`TokenResult` per generated token.

    ``embeds`` ``[1, S, d]``: the language model's input embeddings; ``modality`` ``[S]`` bool: the
    perceptual positions M. ``runner_up=True`` also records, per step, the relevance loss the runner-up
    token would have given (first order), to show that the loss identifies the explained token.
    """
    cfg = model.config.text_config
    H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // H
    heads = H if delta_heads == "query" else KV
    kw = dict(delta_heads=delta_heads, delta_before_rule=delta_before_rule)
    embed = model.model.language_model.embed_tokens.weight.detach()
    x_all, m_all = embeds.detach(), modality.clone()
    out = []
    for _ in range(max_new_tokens):
        S = x_all.shape[1]
        with torch.no_grad():
            ref = llama_forward(model, x_all)[0, -1]
        p_ref = F.softmax(ref, -1)
        deltas = {l: (torch.zeros(1, heads, S, D, dtype=x_all.dtype, requires_grad=True),
                      torch.zeros(1, heads, S, D, dtype=x_all.dtype, requires_grad=True))
                  for l in range(cfg.num_hidden_layers)}
        opt = torch.optim.Adam([d for pair in deltas.values() for d in pair], lr=lr)
        res = TokenResult(token=-1, unperturbed=int(ref.argmax()))
        last = ref
        for _s in range(steps):
            o = step_loss(model, x_all, deltas, m_all, p_ref, kl_weight, tau, **kw)
            top = o["logits"].detach().topk(top_k)
            rec = StepRecord(o["z"], o["phi"].detach().clone(), float(o["loss"].detach()),
                             float(o["rel_loss"].detach()), float(o["kl"].detach()), top.indices.tolist(),
                             top.values.tolist(), [float(deltas[l][0].detach().norm()) for l in sorted(deltas)],
                             [float(deltas[l][1].detach().norm()) for l in sorted(deltas)])
            if runner_up:
                other = int(top.indices[1]) if top.indices[0] == o["z"] else int(top.indices[0])
                frozen = {l: (a.detach(), b.detach()) for l, (a, b) in deltas.items()}
                rec.runner_up_rel_loss = float(_rel_loss(relevance(model, x_all, other, deltas=frozen, **kw)[0],
                                                         m_all, tau))
            res.steps.append(rec)
            last = o["logits"].detach()
            opt.zero_grad()
            o["loss"].backward()
            opt.step()
            del o
        res.final_dk_norms = [float(deltas[l][0].detach().norm()) for l in sorted(deltas)]
        res.final_dv_norms = [float(deltas[l][1].detach().norm()) for l in sorted(deltas)]
        res.token = int(last.argmax())  # the last forward's logits: before the last update
        del opt, deltas
        out.append(res)
        x_all = torch.cat([x_all, embed[res.token][None, None].detach().to(x_all.dtype)], 1)
        m_all = torch.cat([m_all, torch.zeros(1, dtype=torch.bool)])
        if eos is not None and res.token == eos:
            break
    return out


def share(phi: Tensor, modality: Tensor) -> float:
    """The perceptual share of relevance ``sum_M |Phi| / sum |Phi|`` (the paper's "modality reliance")."""
    a = phi.abs()
    return float(a[modality].sum() / a.sum())


def focus(phi: Tensor, modality: Tensor, tau: float = 0.1) -> float:
    """The mass of ``softmax(Phi / tau)`` on the perceptual positions (what the objective raises)."""
    return float(F.softmax(phi / tau, -1)[modality].sum())
