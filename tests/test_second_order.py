"""Second order: relevance computed with ``create_graph=True`` is differentiable.

The derivative autograd gives is that of the gradient-form surrogate: every rule-modified node
(``replace_grad``) also carries its *modified* Jacobian when a value it produced is used inside a later
backward formula. It therefore equals the true derivative of the relevance function exactly when no
modified node's output value enters a downstream backward formula nonlinearly (checked here against
central finite differences in float64), and differs otherwise (documented by the xfail test below).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lime_attr import LRP, Composite
from lime_attr.rules import Epsilon

DT = torch.float64
LRP0 = Composite([("site:layer", Epsilon(0.0)), ("site:activation", "identity")])


class Block(nn.Module):
    """A tiny causal attention block; ``p`` is an additive perturbation on the values (LIME-style)."""

    def __init__(self, d: int = 4, fused: bool = False, multiplicative: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d).to(DT) for _ in range(4))
        self.fused = fused
        self.multiplicative = multiplicative
        self.p: torch.Tensor | None = None

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.p is not None:
            v = v * (1 + self.p) if self.multiplicative else v + self.p
        if self.fused:
            with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
                h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            t = x.shape[1]
            s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            h = torch.softmax(s, -1) @ v
        return self.o(h).sum(1)


def relu_mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(DT)


def central_difference(fn, p: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    out = torch.zeros_like(p)
    flat = out.view(-1)
    for i in range(p.numel()):
        e = torch.zeros_like(p).view(-1)
        e[i] = h
        e = e.view_as(p)
        flat[i] = (fn(p + e) - fn(p - e)) / (2 * h)
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------- differentiability


@pytest.mark.parametrize("composite", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("fused", [False, True])
def test_relevance_is_differentiable(composite, fused):
    block = Block(fused=fused)
    x = torch.randn(2, 5, 4, dtype=DT, requires_grad=True)
    p = torch.zeros(5, 4, dtype=DT, requires_grad=True)
    block.p = p
    rel, delta = LRP(block, composite).attribute(x, target=1, create_graph=True, return_convergence_delta=True)
    assert rel.requires_grad and delta.requires_grad
    w = torch.randn_like(rel)
    gx, gp = torch.autograd.grad((rel * w).sum(), (x, p), allow_unused=True)
    assert torch.isfinite(gx).all() and gx.abs().sum() > 0
    if composite == "attnlrp":
        assert torch.isfinite(gp).all() and gp.abs().sum() > 0
    else:  # CP-LRP: relevance flows through v only and is linear there; it does not depend on a shift of v
        assert gp is None
    # without create_graph nothing keeps a graph
    rel0 = LRP(block, composite).attribute(x.detach(), target=1)
    assert not rel0.requires_grad
    torch.testing.assert_close(rel.detach(), rel0, rtol=0, atol=0)


def test_relevance_of_llama_is_differentiable_wrt_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).to(DT).eval()
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3, 4]])).detach().requires_grad_(True)
    rel = LRP(model, "attnlrp").attribute(emb, target=5, create_graph=True)
    (g,) = torch.autograd.grad(rel[0, :2].sum(), emb)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


# ------------------------------------------------------------ exact cases: agreement with finite differences


def test_lrp0_relu_network_second_order_matches_finite_differences():
    """LRP-0 + identity on ReLU: every modified Jacobian equals the true one a.e., so autograd's
    derivative of the relevance is exact, w.r.t. the input and w.r.t. a multiplicative hidden perturbation."""
    model = relu_mlp()
    x = torch.randn(2, 5, dtype=DT)
    w = torch.randn(2, 5, dtype=DT)
    delta = torch.zeros(2, 8, dtype=DT)

    def hook(mod, args, out):
        return out * (1 + delta)

    handle = model[2].register_forward_hook(hook)
    try:
        def loss(xx, cg=False):
            return (LRP(model, LRP0).attribute(xx, target=[0, 2], create_graph=cg) * w).sum()

        xr = x.clone().requires_grad_(True)
        (gx,) = torch.autograd.grad(loss(xr, True), xr)
        assert rel_error(gx, central_difference(lambda xx: loss(xx), x)) < 1e-6

        def loss_p(p, cg=False):
            nonlocal delta
            delta = p * 1.0  # a non-leaf: a parameter-like constant for the op mode
            return (LRP(model, LRP0).attribute(x, target=[0, 2], create_graph=cg) * w).sum()

        p0 = (torch.randn(2, 8, dtype=DT) * 0.1).requires_grad_(True)
        (gp,) = torch.autograd.grad(loss_p(p0, True), p0)
        assert rel_error(gp, central_difference(lambda p: loss_p(p), p0.detach())) < 1e-6
    finally:
        handle.remove()


@pytest.mark.parametrize("fused", [False, True])
def test_cp_lrp_block_second_order_wrt_value_perturbation(fused):
    """CP-LRP: relevance flows through the values only; with the attention weights constant the
    relevance is linear in a multiplicative perturbation of v, and its derivative matches finite differences."""
    block = Block(fused=fused, multiplicative=True)
    x = torch.randn(1, 5, 4, dtype=DT)
    w = torch.randn(1, 5, 4, dtype=DT)

    def loss(p, cg=False):
        # p * 1.0 is a non-leaf: the op mode treats it as a parameter-like constant, not as an input
        block.p = p * 1.0
        return (LRP(block, "cp-lrp").attribute(x, target=2, create_graph=cg) * w).sum()

    p0 = (torch.randn(5, 4, dtype=DT) * 0.1).requires_grad_(True)
    (g,) = torch.autograd.grad(loss(p0, True), p0)
    assert rel_error(g, central_difference(loss, p0.detach())) < 1e-6


@pytest.mark.xfail(strict=True, reason=(
    "gradient-form rules substitute Jacobians by value (replace_grad): in double backward the scaled "
    "factors of the bilinear rule (v * 1/2 at A V) also scale the *value* dependence of A's gradient "
    "on v, so autograd's derivative of AttnLRP relevance w.r.t. v is off by a factor 1/2 on that path "
    "(relative error 0.5). Needs bilinear/product rules with exact double backward (see report)."))
def test_attnlrp_block_second_order_wrt_value_perturbation_matches_finite_differences():
    block = Block()
    x = torch.randn(1, 5, 4, dtype=DT)
    w = torch.randn(1, 5, 4, dtype=DT)

    def loss(p, cg=False):
        block.p = p
        return (LRP(block, "attnlrp").attribute(x, target=2, create_graph=cg) * w).sum()

    p0 = (torch.randn(5, 4, dtype=DT) * 0.1).requires_grad_(True)
    (g,) = torch.autograd.grad(loss(p0, True), p0)
    assert rel_error(g, central_difference(loss, p0.detach())) < 1e-6
