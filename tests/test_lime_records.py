"""LIME's public diagnostics (record="steps"), their JSON, the trajectory plot, precision="model", the
released Delta layout options, and generation through transformers' current cache API (no deprecation)."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lime_attr.mitigation import LimeConfig, StepRecord, TokenRecord, lime_generate
from lime_attr.visualize import lime_trajectory

SPAN = (2, 8)  # fake "perceptual" positions of the text-only model

pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, attn_implementation="eager",
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


class Tok:
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _prompt(batch: int = 1) -> dict:
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (batch, 12))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_step_records_hold_every_inner_step_and_serialise_strictly(mode):
    model, steps = _llama(), 3
    cfg = LimeConfig(steps=steps, lr=5e-2, mode=mode, record="steps", top_k_logits=4, confidence_gate=None,
                     fast_updates=None)
    out = lime_generate(model, Tok(), _prompt(batch=2), cfg, max_new_tokens=2, modality_mask=SPAN)
    for rec in out.records:
        assert isinstance(rec, TokenRecord) and len(rec.step_records) == steps
        for s, step in enumerate(rec.step_records):
            assert isinstance(step, StepRecord) and step.step == s
            assert len(step.explained) == 2 and len(step.relevance[0]) == 12 + rec.index
            assert len(step.top_tokens[0]) == 4 and step.top_logits[0] == sorted(step.top_logits[0], reverse=True)
            assert step.top_tokens[0][0] == step.explained[0]  # greedy: the explained token is the argmax
            for row in range(2):
                assert step.loss[row] == pytest.approx(step.rel_loss[row] + cfg.kl_weight * step.kl[row], rel=1e-5)
                assert step.loss[row] == pytest.approx(rec.losses[s][row], rel=1e-6)
            assert len(step.delta_k_norm[0]) == 2 and len(step.delta_v_norm[1]) == 2  # one norm per layer
        assert rec.step_records[0].delta_k_norm[0] == [0.0, 0.0]  # the first forward runs with Delta = 0
        assert min(rec.step_records[1].delta_v_norm[0]) > 0
    text = json.dumps(out.to_dict(), allow_nan=False)
    back = json.loads(text)
    assert len(back["records"][0]["step_records"]) == steps


def test_records_without_steps_and_gated_tokens_say_why():
    model = _llama()
    out = lime_generate(model, Tok(), _prompt(), LimeConfig(steps=2, mode="fast", confidence_gate=0.0),
                        max_new_tokens=2, modality_mask=SPAN)
    rec = out.records[0]
    assert rec.skipped == "confidence" and "confidence_gate 0.0" in rec.skip_reason and rec.step_records == []
    assert json.loads(json.dumps(out.to_dict(), allow_nan=False))["records"][0]["share_before"] == [None]
    with pytest.raises(ValueError, match="record='steps'"):
        lime_trajectory(rec)


def test_trajectory_plot_of_one_token(tmp_path):
    model = _llama()
    cfg = LimeConfig(steps=4, lr=5e-2, mode="reference", record="steps")
    out = lime_generate(model, Tok(), _prompt(), cfg, max_new_tokens=1, modality_mask=SPAN)
    fig = lime_trajectory(out.records[0], path=tmp_path / "t.png")
    assert len(fig.axes) == 4 and (tmp_path / "t.png").stat().st_size > 0
    lime_trajectory(out.to_dict()["records"][0])  # the JSON form plots the same


def test_precision_model_computes_in_the_model_dtype():
    model = _llama(torch.bfloat16)
    rel = {}
    for precision in ("float32", "model"):
        cfg = LimeConfig(steps=2, lr=5e-2, mode="reference", record="steps", precision=precision)
        out = lime_generate(model, Tok(), _prompt(), cfg, max_new_tokens=1, modality_mask=SPAN)
        rel[precision] = torch.tensor(out.records[0].step_records[0].relevance[0])
    as_bf16 = lambda t: t.to(torch.bfloat16).to(torch.float32)  # noqa: E731
    assert torch.equal(rel["model"], as_bf16(rel["model"]))  # every value is a bfloat16
    assert not torch.equal(rel["float32"], as_bf16(rel["float32"]))  # upcast: float32 values


@pytest.mark.parametrize("kwargs, match", [
    (dict(delta_heads="layer"), "delta_heads must be one of"),
    (dict(delta_placement="inside"), "delta_placement must be one of"),
    (dict(precision="bf16"), "precision must be one of"),
    (dict(record="all"), "record must be one of"),
    (dict(top_k_logits=0), "top_k_logits must be an int >= 1"),
])
def test_bad_lime_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LimeConfig(**kwargs)


def test_released_layout_is_the_default_and_kv_stays_available():
    ref = LimeConfig(mode="reference")
    assert (ref.heads, ref.placement, ref.precision) == ("query", "after_rule", "float32")
    model = _llama()
    outs = {}
    for heads in ("query", "kv"):
        cfg = LimeConfig(steps=2, lr=5e-2, mode="reference", record="steps", delta_heads=heads)
        outs[heads] = lime_generate(model, Tok(), _prompt(), cfg, max_new_tokens=1, modality_mask=SPAN)
    # 4 query heads over 2 kv heads: the per-query-head perturbation has twice the entries, so its norm after the
    # first Adam step (each entry moves by about lr) is about sqrt(2) times the per-kv-head one
    q = outs["query"].records[0].step_records[1].delta_k_norm[0][0]
    kv = outs["kv"].records[0].step_records[1].delta_k_norm[0][0]
    assert q / kv == pytest.approx(2 ** 0.5, rel=0.05)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_generation_raises_no_transformers_deprecation(mode):
    model = _llama()
    cfg = LimeConfig(steps=2, mode=mode, confidence_gate=None if mode == "fast" else "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lime_generate(model, Tok(), _prompt(), cfg, max_new_tokens=3, modality_mask=SPAN)
    # any deprecation at all (transformers' own are attributed to torch's module call, not to a transformers file)
    bad = [f"{w.filename}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert not bad, bad
