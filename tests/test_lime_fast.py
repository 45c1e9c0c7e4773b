"""LIME fast mode: the defaults (confidence gate, compressed schedule, per-step target), their exactness
claims where they are exact, the lazily entered scope, the final relevance, and errors."""
from __future__ import annotations

import pytest
import torch
from lime_attr import LRP
from lime_attr.mitigation import LimeConfig, lime_generate
from lime_attr.mitigation.config import FAST_CONFIDENCE_GATE, FAST_UPDATES
from test_lime import _llama  # the same tiny Llama
from test_vcd import qwen2vl  # noqa: F401 - the fixture

SPAN = (2, 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def prompt():
    torch.manual_seed(1)
    return torch.randint(1, 64, (1, 12))


def _greedy(model, ids, n):
    return model.generate(ids, max_new_tokens=n, do_sample=False)[:, ids.shape[1]:]


def _gen(model, prompt, cfg, n=5, **kw):
    return lime_generate(model, None, {"input_ids": prompt}, cfg, max_new_tokens=n, modality_mask=SPAN, **kw)


# ------------------------------------------------------------------------------------------ config


def test_fast_defaults_resolve_and_reference_ignores_them():
    fast = LimeConfig()
    assert fast.mode == "fast" and fast.gate == FAST_CONFIDENCE_GATE == 0.99
    assert fast.schedule == (FAST_UPDATES, pytest.approx(3e-4 * 6 / FAST_UPDATES))
    assert fast.target_rule == "per_step" and fast.emit_from == "final"
    ref = LimeConfig(mode="reference")
    assert ref.gate is None and ref.schedule == (7, 3e-4) and ref.target_rule == "per_step"
    assert LimeConfig(fast_updates=None).schedule == (7, 3e-4)  # the previous fast behaviour
    assert LimeConfig(steps=4, lr=1.0, fast_updates=1).schedule == (1, 3.0)
    assert LimeConfig(steps=3, lr=1.0, fast_updates=5).schedule == (2, 1.0)  # never more than steps - 1
    assert LimeConfig(steps=1).schedule[0] == 0 and LimeConfig(steps=0).schedule[0] == 0
    assert LimeConfig(confidence_gate=None).gate is None and LimeConfig(confidence_gate=0.5).gate == 0.5
    # presets keep the paper's lr / lambda; the fast defaults come on top
    a = LimeConfig.for_model("qwen2_audio")
    assert (a.lr, a.kl_weight, a.gate) == (5e-4, 7e-3, 0.99)
    assert a.schedule == (2, pytest.approx(5e-4 * 3))


@pytest.mark.parametrize("kwargs, match", [
    (dict(fast_updates=0), "fast_updates must be 'auto', None"),
    (dict(fast_updates=1.5), "fast_updates"),
    (dict(fast_updates="two"), "fast_updates"),
    (dict(fast_updates=True), "fast_updates"),
    (dict(confidence_gate="always"), r"confidence_gate must be None or a number in \[0, 1\], or 'auto'"),
    (dict(confidence_gate=-0.1), "confidence_gate"),
    (dict(final_relevance="yes"), "final_relevance must be a bool"),
])
def test_new_options_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LimeConfig(**kwargs)


# ------------------------------------------------------------------------------------------ exact claims


@pytest.mark.parametrize("extra", [dict(), dict(confidence_gate=None), dict(fast_updates=1), dict(fast_updates=None)])
@pytest.mark.parametrize("change", [dict(lr=0.0), dict(steps=0), dict(steps=1, lr=0.5)])
def test_no_effective_update_reproduces_greedy(model, prompt, extra, change):
    """lr = 0, steps = 0, and (with the compressed schedule) steps = 1 -- reference mode emits the
    unperturbed token then -- give plain greedy decoding token for token."""
    if extra.get("fast_updates", "auto") is None and change.get("steps") == 1:
        pytest.skip("fast_updates=None runs `steps` updates at lr: one real update")
    out = _gen(model, prompt, LimeConfig(**extra, **change), n=8)
    assert out.tokens.tolist() == _greedy(model, prompt, 8).tolist()
    assert not out.changed.any()


@pytest.mark.parametrize("steps,lr", [(3, 0.3), (4, 0.1)])
def test_uncompressed_fast_schedule_reproduces_reference(model, prompt, steps, lr):
    """fast_updates = steps - 1 (no compression: scale 1), per-step target and no gate: the same
    perturbation as reference mode, which discards its last update -- so the same tokens, with one
    full-graph step fewer per token (replaced by a forward without graph)."""
    ref = _gen(model, prompt, LimeConfig(mode="reference", steps=steps, lr=lr, kl_weight=0.0), n=6,
               record_events=True)
    fast = _gen(model, prompt, LimeConfig(steps=steps, lr=lr, kl_weight=0.0, fast_updates=steps - 1,
                                          confidence_gate=None), n=6, record_events=True)
    assert fast.tokens.tolist() == ref.tokens.tolist()
    assert ref.changed.any()  # not trivial
    assert sum(e[0] == "relevance" for e in fast.events) == (steps - 1) * 6
    assert sum(e[0] == "relevance" for e in ref.events) == steps * 6
    assert all(r.steps == steps - 1 for r in fast.records)


def test_compressed_schedule_first_update_is_the_scaled_reference_update(model, prompt):
    """Adam's first update is lr * g / (|g| + eps) ~ lr * sign(g): one update at (steps - 1) * lr is the
    reference's first update scaled by steps - 1. Checked on the perturbation itself."""
    from lime_attr.mitigation import LimeOptimizer
    from lime_attr.mitigation.optimizer import _InnerOptimizer

    emb = model.get_input_embeddings()(prompt).detach()
    mod = torch.zeros_like(prompt, dtype=torch.bool)
    mod[:, SPAN[0]:SPAN[1]] = True
    deltas = {}
    for name, cfg in (("one", LimeConfig(steps=2, lr=1e-3, fast_updates=None, confidence_gate=None)),
                      ("scaled", LimeConfig(steps=5, lr=1e-3, fast_updates=1, confidence_gate=None))):
        lime = LimeOptimizer(LRP(model), cfg)
        captured = []
        orig = _InnerOptimizer.step

        def spy(self, *a, **k):
            r = orig(self, *a, **k)
            captured.append([p.detach().clone() for p in self.params])
            return r

        _InnerOptimizer.step = spy
        try:
            lime.optimize(emb, {"use_cache": False}, mod, torch.ones_like(mod))
        finally:
            _InnerOptimizer.step = orig
        deltas[name] = captured[0]
    for a, b in zip(deltas["one"], deltas["scaled"]):
        torch.testing.assert_close(b, 4 * a, rtol=1e-5, atol=1e-9)


def test_gated_generation_never_enters_the_scope(model, prompt, monkeypatch):
    """The LRP scope is entered lazily: with every token gated no hook is installed at all, and the tokens
    are greedy's; with the gate off it is installed once per generation."""
    lrp = LRP(model)
    scope = lrp.scope()
    calls = []
    install = scope._install
    monkeypatch.setattr(scope, "_install", lambda: (calls.append(1), install())[1])
    out = _gen(model, prompt, LimeConfig(lr=0.5, confidence_gate=0.0), n=4, attribution=lrp)
    assert calls == [] and out.tokens.tolist() == _greedy(model, prompt, 4).tolist()
    assert all(r.skipped == "confidence" for r in out.records)
    _gen(model, prompt, LimeConfig(lr=0.5, confidence_gate=None), n=4, attribution=lrp)
    assert calls == [1]
    assert "forward" not in model.__dict__


def test_gate_fires_only_below_the_threshold(model, prompt):
    """Mixed gating inside one generation: a gate between the tokens' confidences optimises only the
    uncertain ones; the confident ones are greedy's (exact)."""
    with torch.no_grad():
        ids = prompt
        confs = []
        for _ in range(6):
            p = model(ids).logits[0, -1].softmax(-1)
            confs.append(float(p.max()))
            ids = torch.cat([ids, p.argmax().view(1, 1)], 1)
    gate = sorted(confs)[len(confs) // 2]
    out = _gen(model, prompt, LimeConfig(lr=0.0, confidence_gate=gate), n=6)
    assert out.tokens.tolist() == _greedy(model, prompt, 6).tolist()
    for r, c in zip(out.records, confs):
        assert (r.skipped == "confidence") == (c >= gate)


def test_final_relevance(model, prompt):
    """final_relevance: share_after is the relevance under the perturbation the token is emitted from; it
    does not change the tokens, and with lr = 0 it equals share_before."""
    cfg = LimeConfig(lr=0.3, steps=3, confidence_gate=None, kl_weight=0.0)
    plain = _gen(model, prompt, cfg, n=4)
    fin = _gen(model, prompt, cfg.replace(final_relevance=True, record_relevance=True), n=4, record_events=True)
    assert fin.tokens.tolist() == plain.tokens.tolist()
    assert ("emit", "final") in fin.events
    assert not torch.allclose(fin.share_after, plain.share_after)
    assert ((fin.share_after > 0) & (fin.share_after < 1)).all()
    zero = _gen(model, prompt, cfg.replace(lr=0.0, fast_updates=None, final_relevance=True), n=3)
    torch.testing.assert_close(zero.share_after, zero.share_before, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_inner_optimizer_is_torch_optim_bit_for_bit(kind):
    """Fast mode's inner optimiser does torch.optim's single-tensor arithmetic (the CPU default): equal bit
    for bit over several steps, a parameter without a gradient at some step included."""
    from lime_attr.mitigation.optimizer import _InnerOptimizer

    gen = torch.Generator().manual_seed(0)
    a = [torch.zeros(2, 3, 5, requires_grad=True), torch.zeros(4, requires_grad=True)]
    b = [t.detach().clone().requires_grad_(True) for t in a]
    ref = (torch.optim.Adam(a, lr=3e-3, foreach=False) if kind == "adam"
           else torch.optim.SGD(a, lr=3e-3, foreach=False))
    mine = _InnerOptimizer(b, 3e-3, kind)
    for step in range(5):
        grads = [torch.randn(t.shape, generator=gen) * 10 ** (step - 2) for t in a]
        if step == 1:
            grads[1] = None
        for p, q, g in zip(a, b, grads):
            p.grad = None if g is None else g.clone()
            q.grad = None if g is None else g.clone()
        ref.step()
        mine.step()
        ref.zero_grad(set_to_none=True)
        mine.zero_grad()
        for p, q in zip(a, b):
            assert torch.equal(p, q), (step, (p - q).abs().max())


def test_emission_forward_runs_without_grad_and_equals_the_grad_enabled_one(model, prompt, monkeypatch):
    """The emission forward (after the last update) runs under no_grad, its Delta added by the no-grad
    attention transform (no rule, no graph); its logits are those of the same forward with gradients enabled
    (the rules' forward values are the plain ones)."""
    import contextlib

    from lime_attr.mitigation.optimizer import LimeOptimizer

    calls = []
    handle = model.register_forward_hook(  # the inner and emission forwards take inputs_embeds, the cached steps ids
        lambda m, a, kw, out: calls.append((torch.is_grad_enabled(), out.logits[:, -1].detach().clone()))
        if kw.get("inputs_embeds") is not None else None, with_kwargs=True)
    cfg = LimeConfig(mode="fast", steps=3, lr=0.3, kl_weight=0.0, confidence_gate=None, emit="final")
    try:
        new = _gen(model, prompt, cfg, n=3, record_events=True)
        no_grad = [c for c in calls]
        calls.clear()

        @contextlib.contextmanager
        def with_grad(self):  # the previous emission: the same Delta, gradients enabled (rules run)
            self._grad_deltas = False
            with torch.enable_grad():
                yield

        monkeypatch.setattr(LimeOptimizer, "_emitting_without_grad", with_grad)
        old = _gen(model, prompt, cfg, n=3)
    finally:
        handle.remove()
    assert new.changed.any()  # the perturbation moved tokens: the comparison is not trivial
    assert new.tokens.tolist() == old.tokens.tolist()
    # per token: 2 inner forwards (grad), then the emission; after the first token also the prompt's deferred
    # no-grad forward (the later cached steps take input ids, so they are not recorded)
    assert [grad for grad, _ in no_grad] == [True, True, False, False, True, True, False, True, True, False]
    emissions_new = [no_grad[i] for i in (2, 6, 9)]
    with_grad_calls = [c for c in calls if c[0]]
    assert len(with_grad_calls) == 9
    emissions_old = with_grad_calls[2::3]
    assert len(emissions_new) == 3 and len(emissions_old) == 3
    for (_, a), (_, b) in zip(emissions_new, emissions_old):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 6])
def test_ungated_generation_defers_the_prompt_forward_with_the_same_results(model, prompt, n_tokens):
    """Without a gate nothing needs the prompt's own forward before the first inner loop: it is left out (one
    token) or run with the first cached step (more tokens), and every token, unperturbed token and record is
    the gated-but-never-firing run's (confidence_gate=1.0 runs the prompt forward first)."""
    calls = []
    handle = model.register_forward_hook(  # completed forwards (the embeddings' capture stops before the model)
        lambda m, a, kw, out: calls.append("ids" if kw.get("input_ids") is not None else "embeds"), with_kwargs=True)
    base = dict(mode="fast", steps=3, lr=0.3, kl_weight=0.1)
    try:
        deferred = _gen(model, prompt, LimeConfig(confidence_gate=None, **base), n=n_tokens)
        deferred_calls = list(calls)
        calls.clear()
        upfront = _gen(model, prompt, LimeConfig(confidence_gate=1.0, **base), n=n_tokens)
    finally:
        handle.remove()
    assert calls[0] == "ids" and deferred_calls[0] == "embeds"  # the prompt forward ran first only when gated
    assert deferred_calls.count("ids") == max(n_tokens - 2, 0)  # cached steps after the deferred one
    assert len(deferred_calls) == len(calls) - 1  # one model forward fewer
    assert deferred.changed.any()
    assert deferred.tokens.tolist() == upfront.tokens.tolist()
    for a, b in zip(deferred.records, upfront.records):
        assert a.unperturbed_tokens == b.unperturbed_tokens and a.changed == b.changed
        assert a.share_before == pytest.approx(b.share_before, abs=1e-6)
        assert sum(a.kl, []) == pytest.approx(sum(b.kl, []), abs=1e-6)


def test_deferred_prompt_forward_keeps_mrope_positions(qwen2vl):
    """A tiny Qwen2-VL (3-D M-RoPE positions, a left-padded batch of two): the ungated run, whose prompt
    forward is deferred to the first cached step, emits the never-firing gated run's tokens and records."""
    model, proc, enc = qwen2vl
    base = dict(mode="fast", steps=3, lr=0.3, kl_weight=0.1)
    runs = [lime_generate(model, proc, enc, LimeConfig(confidence_gate=gate, **base), max_new_tokens=4)
            for gate in (None, 1.0)]
    assert runs[0].tokens.tolist() == runs[1].tokens.tolist()
    for a, b in zip(runs[0].records, runs[1].records):
        assert a.unperturbed_tokens == b.unperturbed_tokens
        assert a.share_before == pytest.approx(b.share_before, abs=1e-5)
