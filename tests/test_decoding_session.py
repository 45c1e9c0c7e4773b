"""Decoding sessions: many generations with one registered method, its set-up done once.

* ``"lime"``'s session (one ``LimeSession``) gives ``decode``'s answers, tokens and details for every input
  and installs the LRP scope once (counted); a method without a session runs ``generate`` per call;
* a custom method's session is entered once and left at the end of the block; a bad one is refused;
* the evaluation harness runs each benchmark in one session: the scope is installed once for all its
  splits, and the scored results are those of the harness without the session.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import pytest

from lime_attr.generation import DecodingConfig, GenerationResult, generation_session, prepare_inputs
from lime_attr.mitigation import (DecodingMethod, DecodingMethodConfig, LimeMethodConfig, decode, decoding_session,
                                  get_decoding_method, register_decoding_method, unregister_decoding_method)

models = pytest.importorskip("lime_attr.models")
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif("digits-llava" not in models.available_builtins(), reason="demo weights not installed")]


@pytest.fixture(scope="module")
def digits():
    model, processor = models.load_model("builtin:digits-llava")
    items = models.pope_questions("digits-llava", "random", n_items=2)[:3]
    encs = [prepare_inputs(model, processor, [it.prompt], images=[it.image]) for it in items]
    return model, processor, encs


@pytest.mark.parametrize("config", [
    LimeMethodConfig(max_new_tokens=2, overrides={"lr": 0.05, "confidence_gate": None}),
    LimeMethodConfig(mode="incremental", max_new_tokens=2, overrides={"lr": 0.05, "second_order": "frozen"}),
    LimeMethodConfig(max_new_tokens=2, do_sample=True, temperature=0.7, seed=3,
                     overrides={"lr": 0.05, "confidence_gate": None}),
], ids=["fast", "incremental-frozen", "sampled"])
def test_lime_session_gives_decodes_answers_and_installs_the_scope_once(digits, scope_entries, config):
    model, processor, encs = digits
    expected = [decode(model, processor, enc, "lime", config) for enc in encs]
    assert len(scope_entries) == len(encs)
    scope_entries.clear()
    with decoding_session(model, processor, "lime", config) as run:
        got = [run(enc) for enc in encs]
    assert len(scope_entries) == 1
    for e, g in zip(expected, got):
        assert (e.texts, e.tokens, e.details) == (g.texts, g.tokens, g.details)
        assert g.seconds > 0


def test_a_method_without_a_session_runs_generate_per_call(digits):
    model, processor, encs = digits
    cfg = DecodingConfig("greedy", max_new_tokens=2)
    with generation_session(model, processor, cfg) as run:
        got = [run(enc).tokens for enc in encs]
    assert got == [decode(model, processor, enc, "greedy", cfg.method_config()).tokens for enc in encs]


@dataclass(frozen=True)
class _CountConfig(DecodingMethodConfig):
    pass


def test_a_custom_methods_session_is_entered_once_and_left(digits):
    model, processor, encs = digits
    events = []

    @contextlib.contextmanager
    def session(model, processor, config):
        events.append("enter")
        yield lambda inputs: GenerationResult(["x"], [[len(events)]])
        events.append("exit")

    method = DecodingMethod("counted", _CountConfig, lambda *a: GenerationResult(["y"], [[0]]), session=session)
    register_decoding_method(method)
    try:
        with decoding_session(model, processor, "counted") as run:
            texts = [run(enc).texts[0] for enc in encs]
            assert events == ["enter"]
        assert events == ["enter", "exit"] and texts == ["x"] * len(encs)
        assert decode(model, processor, encs[0], "counted").texts == ["y"]  # decode: generate, no session
    finally:
        unregister_decoding_method("counted")
    with pytest.raises(TypeError, match="session must be callable"):
        DecodingMethod("bad", _CountConfig, lambda *a: None, session="not callable")
    bad = DecodingMethod("bad-result", _CountConfig, lambda *a: None,
                         session=lambda m, p, c: contextlib.nullcontext(lambda inputs: "text"))
    register_decoding_method(bad)
    try:
        with decoding_session(model, processor, "bad-result") as run, \
                pytest.raises(TypeError, match="returned str, not a GenerationResult"):
            run(encs[0])
    finally:
        unregister_decoding_method("bad-result")


def test_the_harness_installs_the_scope_once_per_benchmark(scope_entries):
    from lime_attr.evaluation.harness import run_benchmark

    cfg = DecodingConfig("lime", max_new_tokens=1, lime_mode="incremental",
                         lime_overrides={"lr": 0.05, "second_order": "frozen"})
    with_session = run_benchmark("pope", "builtin:digits-llava", cfg, split="all", limit=3, progress=False)
    assert len(scope_entries) == 1  # one session for the three splits' nine questions
    lime = get_decoding_method("lime")
    register_decoding_method(dataclasses.replace(lime, session=None), overwrite=True)
    try:
        per_call = run_benchmark("pope", "builtin:digits-llava", cfg, split="all", limit=3, progress=False)
    finally:
        register_decoding_method(lime, overwrite=True)
    assert len(scope_entries) == 1 + 9
    assert [r.to_dict(include_items=True) for r in with_session] == [r.to_dict(include_items=True) for r in per_call]
