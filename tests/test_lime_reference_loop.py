"""``mode="reference"`` against an independent, written-out LIME loop (issue 14, item 1's test).

The loop (``tests/_lime_reference.py``) is plain autograd on manually placed perturbations: a hand-written
Llama forward with AttnLRP in gradient form, no lime_attr scope, no hooks. It runs on tiny LLaVA-shaped
models (CLIP tower + projector + Llama) in float64, with multi-head (4 / 4) and grouped-query (4 / 2)
attention, at the paper's lr and at an lr that changes the emitted tokens.

* ``mode="reference"`` with its defaults (``delta_heads="query"``, ``delta_placement="after_rule"``: the
  released code's placement) agrees with the loop's released placement on the emitted tokens, the explained
  token of every inner step, and every per-step quantity (losses, KL, relevance of every position, the top
  logits, the norms of Delta_K and Delta_V per layer) to 1e-6 relative, at both learning rates, with
  multi-head and with grouped-query attention.
* The options ``delta_heads="kv", delta_placement="before_rule"`` (lime_attr's placement before issue 14:
  one slice per key-value head, added before AttnLRP's 1/4, 1/2 gradient division) agree with the loop's
  switch for that placement: the loop's switches are exactly the two differences.

The relevance loss of every step also pins the explained token (the runner-up token's loss differs by
orders of magnitude more than the tolerance, checked).
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import _lime_reference as ref
from lime_attr import LRP
from lime_attr.attribution import ModalityAttribution
from lime_attr.mitigation import LimeConfig, lime_generate

pytestmark = pytest.mark.usefixtures("one_thread")

IMG = 63
PAPER_LR = 3e-4
TOKEN_LR = 0.1  # changes the emitted tokens vs greedy on both models (asserted)
STEPS, KL_WEIGHT, TAU, N_TOKENS = 7, 0.1, 0.1, 3
RTOL = 1e-6
# KL at Delta = 0 is 0 up to rounding: lime_attr computes sum p (log_softmax(ref) - log_softmax(l)), the loop
# (as the released code's kl_div) sum p (log p - log_softmax(l)); log(softmax) and log_softmax differ by ~1e-16
KL_ATOL = 1e-15
HEADS = {"mha": 4, "gqa": 2}  # key-value heads of a 4-query-head Llama

CURRENT = dict(delta_heads="kv", delta_before_rule=True)  # lime_attr before issue 14
RELEASED = dict(delta_heads="query", delta_before_rule=False)  # ItaiAllouche/lime
EARLIER_OPTIONS = dict(delta_heads="kv", delta_placement="before_rule")  # reproduces CURRENT in lime_attr

@functools.lru_cache(maxsize=None)
def _case(name: str) -> tuple:
    """``(model, inputs, embeds, modality)``: a float64 tiny LLaVA, a prompt with a 4-token image."""
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=HEADS[name], max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=4, vision_feature_layer=-1,
                      attn_implementation="eager")
    model = LlavaForConditionalGeneration(cfg).eval().to(torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.tensor([[5, 6, IMG, IMG, IMG, IMG, 7, 8, 9]])
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    return model, inputs, ref.llm_input_embeddings(model, inputs), ids[0] == IMG


@functools.lru_cache(maxsize=None)
def _lime_attr(name: str, lr: float, eos=None, placement: str = "released"):
    model, inputs, _, _ = _case(name)
    options = EARLIER_OPTIONS if placement == "current" else {}
    cfg = LimeConfig(mode="reference", steps=STEPS, lr=lr, kl_weight=KL_WEIGHT, temperature=TAU, record_relevance=True,
                     record="steps", **options)
    return lime_generate(model, None, inputs, cfg, max_new_tokens=N_TOKENS, eos_token_id=eos)


@functools.lru_cache(maxsize=None)
def _loop(name: str, lr: float, placement: str, eos=None):
    model, _, embeds, modality = _case(name)
    switch = CURRENT if placement == "current" else RELEASED
    return ref.lime_loop(model, embeds, modality, steps=STEPS, lr=lr, kl_weight=KL_WEIGHT, tau=TAU,
                         max_new_tokens=N_TOKENS, eos=eos, runner_up=placement == "current", **switch)


def _greedy(name: str) -> list:
    model, inputs, _, _ = _case(name)
    return model.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()


def _err(a, b, atol: float = 0.0) -> float:
    """Largest relative difference, elementwise for lists of scalars, of the part of ``|a - b|`` above
    ``atol`` (0 where both are 0)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = torch.maximum(a.abs(), b.abs())
    diff = ((a - b).abs() - atol).clamp_min(0.0)
    d = torch.where(diff == 0, torch.zeros_like(scale), diff / scale.clamp_min(1e-300))
    return float(d.max()) if d.numel() else 0.0


def _vec_err(a, b) -> float:
    """Largest difference of two vectors relative to the larger max-norm."""
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(), torch.as_tensor(b, dtype=torch.float64).flatten()
    return float((a - b).abs().max() / torch.maximum(a.abs().max(), b.abs().max()))


def _errors(name: str, out, loop) -> dict:
    """Every per-step quantity ``lime_generate`` records today against the loop's: the largest relative error."""
    assert len(out.records) == len(loop)
    e = {k: 0.0 for k in ("losses", "rel_losses", "kl", "relevance_before", "relevance_after", "share", "focus")}
    for rec, tok in zip(out.records, loop):
        assert rec.steps == len(tok.steps) == STEPS
        first, last = tok.steps[0], tok.steps[-1]
        mod = _modality(name, rec.relevance_after.shape[1])
        got = {"losses": ([l[0] for l in rec.losses], [s.loss for s in tok.steps]),
               "rel_losses": ([l[0] for l in rec.rel_losses], [s.rel_loss for s in tok.steps]),
               "kl": ([l[0] for l in rec.kl], [s.kl for s in tok.steps]),
               "share": ([rec.share_before[0], rec.share_after[0]],
                         [ref.share(first.relevance, mod), ref.share(last.relevance, mod)]),
               "focus": ([rec.focus_before[0], rec.focus_after[0]],
                         [ref.focus(first.relevance, mod, TAU), ref.focus(last.relevance, mod, TAU)])}
        for k, (a, b) in got.items():
            e[k] = max(e[k], _err(a, b, KL_ATOL if k == "kl" else 0.0))
        e["relevance_before"] = max(e["relevance_before"], _vec_err(rec.relevance_before[0], first.relevance))
        e["relevance_after"] = max(e["relevance_after"], _vec_err(rec.relevance_after[0], last.relevance))
        for mine, theirs in zip(rec.step_records, tok.steps):  # record="steps": every inner step
            for key, a, b in (("relevance", mine.relevance[0], theirs.relevance),
                              ("top_logits", mine.top_logits[0][:len(theirs.top_logits)], theirs.top_logits),
                              ("delta_k_norm", mine.delta_k_norm[0], theirs.dk_norms),
                              ("delta_v_norm", mine.delta_v_norm[0], theirs.dv_norms)):
                err = _vec_err(a, b) if key == "relevance" else _err(a, b)
                e[key] = max(e.get(key, 0.0), err)
    return e


def _lime_attr_explained(out) -> list:
    return [[s.explained[0] for s in rec.step_records] for rec in out.records]


def _modality(name: str, length: int) -> torch.Tensor:
    """The perceptual positions of a sequence of ``length``: the prompt's image run (generated tokens are text)."""
    m = _case(name)[3]
    return torch.cat([m, torch.zeros(length - m.numel(), dtype=torch.bool)])


def _tokens(loop) -> list:
    return [t.token for t in loop]


def _explained(loop) -> list:
    return [[s.explained for s in t.steps] for t in loop]


# ------------------------------------------------------------------------------------------ the loop itself


@pytest.mark.parametrize("name", list(HEADS))
def test_hand_written_forward_equals_the_hf_logits(name):
    model, inputs, embeds, _ = _case(name)
    with torch.no_grad():
        hf = model(**inputs, use_cache=False).logits
        mine = ref.llama_forward(model, embeds)
        cfg = model.config.text_config
        zero = torch.zeros(1, cfg.num_attention_heads, embeds.shape[1], 8, dtype=torch.float64)
        zeros = {l: (zero, zero) for l in range(cfg.num_hidden_layers)}
        with_zero_delta = ref.llama_forward(model, embeds, zeros, **RELEASED)
    assert float((hf - mine).abs().max()) <= 1e-10 * float(hf.abs().max())
    assert torch.equal(with_zero_delta, mine)


@pytest.mark.parametrize("name", list(HEADS))
def test_hand_written_relevance_equals_lime_attr_attnlrp(name):
    """Delta = 0: the written-out AttnLRP relevance at the LLM input embeddings is lime_attr's, both through
    ``ModalityAttribution`` (which finds the embeddings itself) and ``LRP(model, "attnlrp")`` on them."""
    model, inputs, embeds, _ = _case(name)
    phi, _, target = ref.relevance(model, embeds)
    res = ModalityAttribution(model).attribute(inputs)
    assert res.target_ids.tolist() == [[target]]
    assert _vec_err(res.token_relevance[0], phi) <= 1e-10
    lrp = LRP(model, "attnlrp").attribute(embeds, target=target).sum(-1)[0]
    assert _vec_err(lrp, phi) <= 1e-10


@pytest.mark.parametrize("heads, before", [("kv", True), ("query", True), ("kv", False)],
                         ids=["current", "query-before-rule", "kv-after-rule"])
@pytest.mark.parametrize("name", list(HEADS))
def test_the_placements_differ_only_by_the_division_and_the_head_sharing(name, heads, before):
    """At the same forward values, the gradient reaching a Delta placed before the rule is exactly 1/4 (keys),
    1/2 (values) of the released code's, and a Delta per kv head gets the sum over the query heads of its
    group: the two differences, and nothing else."""
    model, _, embeds, modality = _case(name)
    cfg = model.config.text_config
    H, KV, S = cfg.num_attention_heads, cfg.num_key_value_heads, embeds.shape[1]
    n = KV if heads == "kv" else H
    g = torch.Generator().manual_seed(1)
    mine = {l: tuple((0.05 * torch.randn(1, n, S, 8, generator=g, dtype=torch.float64)).requires_grad_(True)
                     for _ in range(2)) for l in range(cfg.num_hidden_layers)}
    rep = H // n
    released = {l: tuple(d.detach().repeat_interleave(rep, 1).requires_grad_(True) for d in pair)
                for l, pair in mine.items()}
    with torch.no_grad():
        p_ref = torch.softmax(ref.llama_forward(model, embeds)[0, -1], -1)
    a = ref.step_loss(model, embeds, mine, modality, p_ref, KL_WEIGHT, TAU, delta_heads=heads, delta_before_rule=before)
    b = ref.step_loss(model, embeds, released, modality, p_ref, KL_WEIGHT, TAU, **RELEASED)
    assert a["z"] == b["z"] and float(a["loss"].detach()) == pytest.approx(float(b["loss"].detach()), rel=1e-12)
    ga = torch.autograd.grad(a["loss"], [d for pair in mine.values() for d in pair])
    gb = torch.autograd.grad(b["loss"], [d for pair in released.values() for d in pair])
    for i, (x, y) in enumerate(zip(ga, gb)):
        c = (0.25 if i % 2 == 0 else 0.5) if before else 1.0
        assert _vec_err(x, c * y.view(1, n, rep, S, 8).sum(2)) <= 1e-10


# ------------------------------------------------------------------------------------------ against lime_attr

CASES = [("mha", PAPER_LR), ("mha", TOKEN_LR), ("gqa", PAPER_LR), ("gqa", TOKEN_LR)]
IDS = [f"{n}-lr{lr:g}" for n, lr in CASES]


@pytest.mark.parametrize("name", list(HEADS))
def test_token_changing_lr_changes_the_tokens(name):
    greedy = _greedy(name)
    assert _tokens(_loop(name, PAPER_LR, "released")) == greedy  # on these random models the paper's lr changes none
    assert _tokens(_loop(name, TOKEN_LR, "released")) != greedy
    assert _lime_attr(name, TOKEN_LR).tokens[0].tolist() != greedy
    assert _lime_attr(name, TOKEN_LR, placement="current").tokens[0].tolist() != greedy


@pytest.mark.parametrize("name, lr", CASES, ids=IDS)
def test_current_placement_loop_agrees_with_lime_attr(name, lr):
    """The switch reproducing lime_attr's placement (before the division, per kv head): emitted and unperturbed
    tokens identical, every recorded per-step quantity within 1e-6, and the relevance loss pins the explained
    token (the runner-up's differs by far more than the tolerance)."""
    out, loop = _lime_attr(name, lr, placement="current"), _loop(name, lr, "current")
    assert out.tokens[0].tolist() == _tokens(loop)
    assert _lime_attr_explained(out) == _explained(loop)
    assert [r.unperturbed_tokens[0] for r in out.records] == [t.unperturbed for t in loop]
    errors = _errors(name, out, loop)
    assert max(errors.values()) <= RTOL, errors
    gaps = [abs(s.rel_loss - s.runner_up_rel_loss) / abs(s.rel_loss) for t in loop for s in t.steps]
    assert min(gaps) > 1e3 * RTOL


def test_released_first_step_agrees_with_lime_attr():
    """Where Delta = 0 (the first inner step) the placement does not matter: the released loop agrees."""
    for name in HEADS:
        out, loop = _lime_attr(name, PAPER_LR), _loop(name, PAPER_LR, "released")
        rec, first = out.records[0], loop[0].steps[0]
        assert rec.unperturbed_tokens[0] == loop[0].unperturbed
        assert _err([rec.losses[0][0], rec.rel_losses[0][0]], [first.loss, first.rel_loss]) <= RTOL
        assert rec.kl[0][0] == 0.0 and abs(first.kl) <= KL_ATOL
        assert _vec_err(rec.relevance_before[0], first.relevance) <= RTOL


def test_eos_stops_both():
    name = "mha"
    eos = _tokens(_loop(name, PAPER_LR, "released"))[1]
    loop = _loop(name, PAPER_LR, "released", eos=eos)
    out = _lime_attr(name, PAPER_LR, eos=eos)
    assert _tokens(loop) == out.tokens[0].tolist() == _tokens(_loop(name, PAPER_LR, "released"))[:2]


@pytest.mark.parametrize("name, lr", CASES, ids=IDS)
def test_released_loop_emits_the_same_tokens(name, lr):
    assert _lime_attr(name, lr).tokens[0].tolist() == _tokens(_loop(name, lr, "released"))


@pytest.mark.parametrize("name, lr", CASES, ids=IDS)
def test_released_loop_explains_the_same_tokens(name, lr):
    """The explained token of every inner step (``record="steps"``) is the released loop's."""
    assert _lime_attr_explained(_lime_attr(name, lr)) == _explained(_loop(name, lr, "released"))


@pytest.mark.parametrize("name, lr", CASES, ids=IDS)
def test_released_loop_agrees_with_lime_attr_per_step(name, lr):
    """Losses, relevance loss, KL, relevance (every step), share, focus, top logits and the Delta norms per layer
    within 1e-6 relative."""
    out, loop = _lime_attr(name, lr), _loop(name, lr, "released")
    errors = _errors(name, out, loop)
    assert max(errors.values()) <= RTOL, errors
