"""LIME's activation checkpoint (``LimeConfig.activation_checkpoint``): the same numbers, less graph, restored.

* Against the written-out released loop (``tests/_lime_reference.py``, float64 tiny LLaVA, multi-head and
  grouped-query attention, the paper's lr and a token-changing lr): with the checkpoint on, reference mode
  emits and explains the same tokens and every per-step quantity agrees to 1e-6 relative -- the same check
  as ``test_lime_reference_loop.py`` without it.
* Checkpoint on against off, fast mode and Qwen2-VL's M-RoPE positions: the same tokens and records.
* The largest amount of saved-for-backward tensor memory alive during LIME is far smaller with it.
* Layers are restored exactly; bad settings are clear errors.
"""
from __future__ import annotations

import functools
import platform

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lime_attr import LRP
from lime_attr.mitigation import LimeConfig, LimeOptimizer, lime_generate
from lime_attr.mitigation.optimizer import decoder_layers
from test_vcd import qwen2vl  # noqa: F401 - the fixture
from test_lime_reference_loop import (KL_WEIGHT, N_TOKENS, PAPER_LR, RTOL, STEPS, TAU, TOKEN_LR, _case, _errors,
                                      _explained, _lime_attr_explained, _loop, _tokens)

pytestmark = pytest.mark.usefixtures("one_thread")

SPAN = (2, 8)


@functools.lru_cache(maxsize=None)
def _checkpointed(name: str, lr: float):
    model, inputs, _, _ = _case(name)
    cfg = LimeConfig(mode="reference", steps=STEPS, lr=lr, kl_weight=KL_WEIGHT, temperature=TAU, record_relevance=True,
                     record="steps", activation_checkpoint=True)
    return lime_generate(model, None, inputs, cfg, max_new_tokens=N_TOKENS)


@pytest.mark.parametrize("lr", [PAPER_LR, TOKEN_LR])
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_checkpointed_reference_mode_agrees_with_the_written_out_loop(name, lr):
    out, loop = _checkpointed(name, lr), _loop(name, lr, "released")
    assert out.tokens[0].tolist() == _tokens(loop)
    assert _lime_attr_explained(out) == _explained(loop)
    errors = _errors(name, out, loop)
    assert max(errors.values()) < RTOL, errors


def _llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="eager", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval().to(torch.float64)


def _records_agree(a, b, rtol: float = 1e-6) -> None:
    assert a.tokens.tolist() == b.tokens.tolist()
    for ra, rb in zip(a.records, b.records, strict=True):
        assert len(ra.step_records) == len(rb.step_records)
        for sa, sb in zip(ra.step_records, rb.step_records):
            assert sa.explained == sb.explained
            for key in ("loss", "rel_loss", "kl", "relevance", "top_logits", "delta_k_norm", "delta_v_norm"):
                x = torch.as_tensor(getattr(sa, key), dtype=torch.float64)
                y = torch.as_tensor(getattr(sb, key), dtype=torch.float64)
                assert torch.allclose(x, y, rtol=rtol, atol=1e-10), (key, x, y)


@pytest.mark.parametrize("perturb", ["kv", "v"])
def test_fast_mode_with_and_without_checkpoint_agree(perturb):
    model = _llama()
    ids = torch.randint(1, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    runs = [lime_generate(model, None, {"input_ids": ids}, LimeConfig(mode="fast", lr=0.05, confidence_gate=None,
                                                                      perturb=perturb, layers=[0, 2], record="steps",
                                                                      activation_checkpoint=ck),
                          max_new_tokens=3, modality_mask=SPAN) for ck in (False, True)]
    _records_agree(*runs)


def test_heap_release_runs_before_each_recomputation_and_changes_no_number(monkeypatch):
    """``release_heap`` (default on) calls ``malloc_trim`` before each CPU recomputation: three per layer and
    update (the relevance node's forward, its double backward, the KL term's first-order backward); off, never.
    The records are the same either way."""
    import lime_attr.mitigation.checkpoint as checkpoint
    from lime_attr.mitigation.heap import heap_release_available, release_freed_heap

    calls = []
    monkeypatch.setattr(checkpoint, "release_freed_heap", lambda: calls.append(1) or release_freed_heap())
    model = _llama(layers=3)
    ids = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    runs = []
    for release in (True, False):
        calls.clear()
        cfg = LimeConfig(mode="fast", lr=0.05, confidence_gate=None, fast_updates=2, record="steps",
                         activation_checkpoint=True, release_heap=release)
        runs.append(lime_generate(model, None, {"input_ids": ids}, cfg, max_new_tokens=2, modality_mask=SPAN))
        assert len(calls) == (2 * 2 * 3 * 3 if release else 0)  # tokens x updates x layers x recomputations
    _records_agree(*runs, rtol=0.0)
    assert isinstance(release_freed_heap(), bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert heap_release_available()


def test_mrope_model_with_and_without_checkpoint_agree(qwen2vl):
    model, proc, enc = qwen2vl  # a tiny Qwen2-VL, a left-padded batch of two (3-D M-RoPE positions)
    runs = [lime_generate(model, proc, enc, LimeConfig(mode="reference", steps=3, lr=0.05, record="steps",
                                                       activation_checkpoint=ck), max_new_tokens=2)
            for ck in (False, True)]
    _records_agree(*runs, rtol=1e-4)  # float32


class _SavedBytes:
    """Peak bytes of the storages of saved-for-backward tensors alive at once (``saved_tensors_hooks``), each
    storage counted once, the model's parameters not counted."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.refs: dict[int, list] = {}  # storage pointer -> [holders, bytes]
        self.live = self.peak = 0

    def pack(self, t: torch.Tensor):
        return _Held(t, self)

    @staticmethod
    def unpack(held: "_Held") -> torch.Tensor:
        return held.tensor

    def add(self, ptr: int, nbytes: int) -> None:
        if ptr in self.skip:
            return
        entry = self.refs.setdefault(ptr, [0, nbytes])
        if entry[0] == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        entry[0] += 1

    def remove(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[ptr]


class _Held:
    def __init__(self, tensor: torch.Tensor, counter: _SavedBytes) -> None:
        storage = tensor.untyped_storage()
        self.tensor, self.counter, self.ptr = tensor, counter, storage.data_ptr()
        counter.add(self.ptr, storage.nbytes())

    def __del__(self) -> None:
        self.counter.remove(self.ptr)


def test_checkpoint_keeps_far_less_graph_alive():
    """Without the checkpoint the saved graph grows with the depth (every layer's graphs); with it, by two
    hidden-state tensors and Delta per layer."""
    ids = torch.randint(1, 64, (1, 96), generator=torch.Generator().manual_seed(2))
    peaks = {}
    for layers in (2, 8):
        model = _llama(layers=layers)
        for ck in (False, True):
            counter = _SavedBytes(model)
            with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
                lime_generate(model, None, {"input_ids": ids}, LimeConfig(mode="reference", steps=2, lr=0.05,
                                                                          activation_checkpoint=ck),
                              max_new_tokens=1, modality_mask=(4, 80))
            peaks[layers, ck] = counter.peak
    assert peaks[8, False] > 3 * peaks[2, False], peaks
    assert peaks[8, True] < 2 * peaks[2, True], peaks
    assert peaks[8, True] < 0.4 * peaks[8, False], peaks


def test_layers_are_restored_exactly_and_parameters_untouched():
    model = _llama(layers=2)
    layers = decoder_layers(model)
    own = layers[1].forward = layers[1].forward  # an instance attribute that must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lime_generate(model, None, {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])},
                  LimeConfig(steps=2, lr=0.1, activation_checkpoint=True), max_new_tokens=2, modality_mask=SPAN)
    assert "forward" not in layers[0].__dict__
    assert layers[1].__dict__["forward"] is own
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(activation_checkpoint="yes"), TypeError, "activation_checkpoint must be a bool"),
    (dict(activation_checkpoint=True, second_order="exact"), ValueError, "second_order='autograd' only"),
    (dict(activation_checkpoint=True, release_heap="auto"), TypeError, "release_heap must be a bool"),
])
def test_bad_settings_are_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        LimeConfig(**kwargs)


def test_model_without_decoder_layers_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="activation_checkpoint checkpoints the language model's decoder layers"):
        LimeOptimizer(LRP(model), LimeConfig(activation_checkpoint=True))


def test_scope_checking_every_forward_is_a_clear_error():
    model = _llama(layers=2)
    lrp = LRP(model)
    lrp.scope().check_ops = "always"
    with pytest.raises(ValueError, match="check_ops='always'"):
        lime_generate(model, None, {"input_ids": torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])},
                      LimeConfig(mode="reference", steps=2, activation_checkpoint=True), max_new_tokens=1,
                      modality_mask=SPAN,
                      attribution=lrp)
