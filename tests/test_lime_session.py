"""``LimeSession``: many generations with the LRP scope installed once.

* every generation of a session gives the tokens and records ``lime_generate`` gives for the same inputs
  and config, bit for bit, in every mode (fast with and without the gate, with the activation checkpoint,
  reference, incremental with both second orders);
* the scope is installed once per session, not once per generation;
* on exit, also after an error inside the block, the model computes bit-identical outputs and gradients,
  with no hook, instance forward, parameter flag or attention setting left behind;
* misuse is refused by name.
"""
from __future__ import annotations

import json

import pytest
import torch

from lime_attr import LRP
from lime_attr.mitigation import LimeConfig, LimeSession, lime_generate
from test_lime_incremental import _llava

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "fast": LimeConfig(lr=0.05, confidence_gate=None, record="steps"),
    "fast-gated": LimeConfig(lr=0.05, confidence_gate=0.2),
    "fast-checkpoint": LimeConfig(lr=0.05, confidence_gate=None, activation_checkpoint=True),
    "reference": LimeConfig(mode="reference", steps=3, lr=0.05),
    "incremental": LimeConfig(mode="incremental", lr=0.05, record="steps"),
    "incremental-frozen": LimeConfig(mode="incremental", second_order="frozen", lr=0.05),
}


def _inputs(inputs: dict, seed: int) -> dict:
    """The LLaVA test prompt with another image."""
    pixels = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(seed),
                         dtype=inputs["pixel_values"].dtype)
    return {**inputs, "pixel_values": pixels}


def _as_json(out) -> str:
    return json.dumps([r.to_dict() for r in out.records], sort_keys=True)


def _state(model) -> dict:
    """What a scope could leave behind on the model."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return {"hooks": hooks, "instance_forward": "forward" in model.__dict__,
            "flags": [p.requires_grad for p in model.parameters()],
            "attn": [getattr(m.config, "_attn_implementation_internal", None) for m in model.modules()
                     if hasattr(m, "config")]}


def _outputs_and_grads(model, inputs: dict) -> tuple:
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    logits[0, -1].max().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return logits.detach(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_session_generations_equal_lime_generate(name):
    model, inputs, _, _ = _llava(2)
    cfg = CONFIGS[name]
    items = [_inputs(inputs, seed) for seed in (1, 2, 3)]
    expected = [lime_generate(model, None, it, cfg, max_new_tokens=3) for it in items]
    with LimeSession(model, None, cfg) as session:
        got = [session.generate(it, max_new_tokens=3) for it in items]
    for e, g in zip(expected, got):
        assert torch.equal(e.tokens, g.tokens)
        assert _as_json(e) == _as_json(g)
    assert any(r.skipped is None for out in got for r in out.records)  # the inner loop ran


def test_scope_installed_once_per_session(scope_entries):
    model, inputs, _, _ = _llava(2)
    entered = scope_entries
    cfg = CONFIGS["incremental-frozen"]
    with LimeSession(model, None, cfg) as session:
        for seed in (1, 2, 3):
            session.generate(_inputs(inputs, seed), max_new_tokens=2)
    assert len(entered) == 1
    attribution = LRP(model)
    for seed in (1, 2, 3):
        lime_generate(model, None, _inputs(inputs, seed), cfg, max_new_tokens=2, attribution=attribution)
    assert len(entered) == 4  # lime_generate: once per call


@pytest.mark.parametrize("fail", [False, True], ids=["clean-exit", "error-inside"])
def test_model_restored_exactly(fail):
    model, inputs, _, _ = _llava(2)
    model.set_attn_implementation("sdpa")  # the session switches to eager and must switch back
    before, grads_before, state_before = *_outputs_and_grads(model, inputs), _state(model)
    session = LimeSession(model, None, CONFIGS["fast"])
    with pytest.raises(ValueError) if fail else _null():
        with session:
            assert session.active
            assert "forward" in model.__dict__  # installed
            session.generate(_inputs(inputs, 1), max_new_tokens=2)
            if fail:
                raise ValueError("boom")
    assert not session.active
    assert _state(model) == state_before
    after, grads_after = _outputs_and_grads(model, inputs)
    assert torch.equal(before, after)
    assert all(torch.equal(a, b) for a, b in zip(grads_before, grads_after))


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_misuse_is_refused_by_name():
    model, inputs, _, _ = _llava(2)
    session = LimeSession(model, None, CONFIGS["incremental"])
    with pytest.raises(RuntimeError, match="needs the session entered"):
        session.generate(inputs, max_new_tokens=1)
    with session:
        with pytest.raises(RuntimeError, match="already entered"):
            session.__enter__()
        with pytest.raises(TypeError, match="takes no `attribution`"):
            session.generate(inputs, max_new_tokens=1, attribution=LRP(model))
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['max_tokens'\]"):
            session.generate(inputs, max_tokens=1)
        with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
            session.generate(inputs, max_new_tokens=-1)
        assert session.generate(inputs, max_new_tokens=1).tokens.shape == (1, 1)  # still usable
    with pytest.raises(TypeError, match="config must be a LimeConfig"):
        LimeSession(model, None, {"lr": 0.1})
