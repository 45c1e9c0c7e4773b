"""ModalityAttribution, spans and modality metrics on tiny LLaVA / Qwen2-VL / Qwen2-Audio models.

All models are built from configs (random weights, no downloads): the demo models' architectures and
processors from ``lime_attr.models`` (LLaVA with a CLIP tower, Qwen2-Audio) and a tiny Qwen2-VL with a
locally built word-level tokenizer.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from captum.attr import Attribution
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import (PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor)

from lime_attr.attribution.modality import ModalityAttribution, ModalityResult
from lime_attr.canonizers import available_canonizers
from lime_attr.metrics import breakdown, grounding_score, modality_reliance, top_tokens
from lime_attr.modality import ModalitySpec, find_spans, modality_spec, split_pixel_relevance
from lime_attr.models.architectures import build_model
from lime_attr.models.processing import (NUM_AUDIO_FRAMES, NUM_AUDIO_TOKENS, NUM_IMAGE_TOKENS, PATCH_SIZE,
                                         build_digits_processor, build_tones_processor, description_question,
                                         existence_question, format_prompt)
from lime_attr.models.scenes import CANVAS_SIZE
from lime_attr.models.sounds import CLIP_SECONDS

# the demo models' sizes (they may change; the tests follow them)
S, NT, G = CANVAS_SIZE, NUM_IMAGE_TOKENS, CANVAS_SIZE // PATCH_SIZE

_MISSING = [f for f in ("llava", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "clip") if f not in available_canonizers()]
needs_canonizers = pytest.mark.skipif(bool(_MISSING), reason=f"canonizers not registered yet: {_MISSING}")


# ------------------------------------------------------------------------------------------------ fixtures



def _assert_batch_equal(batched, single):
    """Batch vs single agree to float32 precision *relative to the scale of the relevance*: the models'
    RMSNorms compute in float32 even in a float64 model, so padding changes rounding at ~1e-7 of the
    largest activations; a per-element relative tolerance would be meaningless on near-zero entries."""
    scale = single.abs().max().item()
    torch.testing.assert_close(batched, single, rtol=0, atol=1e-6 * scale + 1e-12)

def _rng_image(seed: int, h: int = CANVAS_SIZE, w: int = CANVAS_SIZE) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype("uint8")


def _conservative(model: torch.nn.Module) -> torch.nn.Module:
    """float64 copy with every bias and every constant added to the perceptual path set to 0 (position
    and class embeddings): under CP-LRP the encoder is then exactly conservative."""
    m = copy.deepcopy(model).double()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "position_embedding" in name or "class_embedding" in name \
                    or "embed_positions" in name:
                p.zero_()
    return m


@pytest.fixture(scope="module")
def llava():
    proc = build_digits_processor()
    model = build_model("digits-llava", proc.tokenizer, seed=0).eval()
    return model, proc


@pytest.fixture(scope="module")
def llava_attr(llava):
    return ModalityAttribution(llava[0], llava[1])


def _llava_inputs(proc, prompts_images, dtype=torch.float32):
    texts = ["user : " + "<image> " * len(ims) + f"{q} assistant :" for q, ims in prompts_images]
    images = [im for _, ims in prompts_images for im in ims]
    enc = proc(images=images, text=texts, return_tensors="pt", padding=True)
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


@pytest.fixture(scope="module")
def audio():
    proc = build_tones_processor()
    model = build_model("tones-qwen2audio", proc.tokenizer, seed=0).eval()
    return model, proc


def _audio_inputs(proc, n=1, seconds=CLIP_SECONDS, dtype=torch.float32):
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(16000 * seconds)).astype("float32") * 0.1 for _ in range(n)]
    text = [format_prompt("tones-qwen2audio", description_question("tones-qwen2audio"))] * n
    enc = proc(audio=waves, text=text, return_tensors="pt", sampling_rate=16000, padding=True)
    enc["input_features"] = enc["input_features"].to(dtype)
    return enc, waves


QVL_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
             "what", "is", "in", "the", "image", "?", "a", "cat", "dog", "and", "left", "right"]


def _qvl_processor():
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(QVL_WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": QVL_WORDS[4:8]})
    kw = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=64, max_pixels=32 * 32, **kw),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw))
    return proc


_QVL_TEXT = dict(vocab_size=len(QVL_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                 rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
                 bos_token_id=2, eos_token_id=3, pad_token_id=1)
_QVL_IDS = dict(image_token_id=5, video_token_id=7, vision_start_token_id=4, vision_end_token_id=6, pad_token_id=1)


@pytest.fixture(scope="module")
def qwen2vl():
    proc = _qvl_processor()
    cfg = Qwen2VLConfig(
        text_config=_QVL_TEXT,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3, mlp_ratio=2), **_QVL_IDS)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    return model, proc


def _qvl_inputs(proc, texts, images, dtype=torch.float32):
    enc = proc(images=images, text=texts, return_tensors="pt", padding=True)
    enc["pixel_values"] = enc["pixel_values"].to(dtype)
    return enc


QVL_IMG = "<|vision_start|><|image_pad|><|vision_end|>"


# ------------------------------------------------------------------------------------------------ spans


def test_spans_runs_two_adjacent_images_and_left_padding():
    spec = ModalitySpec("llava", {9: "image"}, tokens_per_item={"image": 3})
    ids = torch.tensor([[0, 0, 1, 9, 9, 9, 9, 9, 9, 2, 3],
                        [0, 0, 0, 0, 0, 1, 9, 9, 9, 2, 3]])
    mask = (torch.arange(11) >= torch.tensor([[2], [5]])).long()
    s = find_spans(ids, spec, mask)
    assert s[0] == {"image": [(3, 6), (6, 9)], "text": [(2, 3), (9, 11)]}
    assert s[1] == {"image": [(6, 9)], "text": [(5, 6), (9, 11)]}
    # a pad id that equals the placeholder is still not counted where the mask is 0
    ids2 = torch.tensor([[9, 9, 1, 9, 9, 9, 2]])
    s2 = find_spans(ids2, spec, torch.tensor([[0, 0, 1, 1, 1, 1, 1]]))
    assert s2[0] == {"image": [(3, 6)], "text": [(2, 3), (6, 7)]}


def test_spans_markers_inclusive_and_errors():
    spec = ModalitySpec("qwen2_vl", {5: "image", 7: "video"}, markers={4: (6, "image")})
    ids = torch.tensor([[1, 1, 2, 4, 5, 5, 6, 8, 4, 7, 7, 6, 9]])
    mask = torch.tensor([[0, 0] + [1] * 11])
    s = find_spans(ids, spec, mask)[0]
    assert s == {"image": [(3, 7)], "video": [(8, 12)], "text": [(2, 3), (7, 8), (12, 13)]}
    with pytest.raises(ValueError, match="unterminated"):
        find_spans(torch.tensor([[2, 4, 5, 5]]), spec)
    with pytest.raises(ValueError, match="sequence length"):
        find_spans(ids, spec, mask, sequence_length=20)
    aspec = ModalitySpec("qwen2_audio", {5: "audio"}, markers={4: (6, "audio")})
    assert find_spans(torch.tensor([2, 4, 5, 5, 6, 9]), aspec)[0] == {"audio": [(1, 5)], "text": [(0, 1), (5, 6)]}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from([2, 3, 9, 9, 9, 4, 5, 6]), min_size=1, max_size=14), min_size=1, max_size=3),
       st.integers(0, 4), st.booleans())
def test_spans_partition_the_unpadded_positions(rows, max_pad, markers):
    """Property: every non-padding position lies in exactly one span, padding in none, spans are
    half-open, non-empty and inside the sequence, and perceptual spans hold placeholders (or markers)."""
    width = max(len(r) for r in rows) + max_pad
    ids = torch.full((len(rows), width), 9, dtype=torch.long)  # pad id = the placeholder id on purpose
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    spec = (ModalitySpec("q", {5: "image"}, markers={4: (6, "image")}) if markers
            else ModalitySpec("l", {9: "image"}, tokens_per_item={"image": 2}))
    try:
        spans = find_spans(ids, spec, mask)
    except ValueError as e:  # an unterminated marker pair is an error, not a silent span
        assert markers and "unterminated" in str(e)
        return
    for b, row in enumerate(spans):
        cover = torch.zeros(width, dtype=torch.long)
        for kind, sp in row.items():
            for s0, e0 in sp:
                assert 0 <= s0 < e0 <= width
                cover[s0:e0] += 1
                if kind == "image":
                    seg = ids[b, s0:e0].tolist()
                    assert (seg[0] == 4 and seg[-1] == 6) if markers and seg[0] == 4 else all(t in (5, 9) for t in seg)
        assert torch.equal(cover, mask[b])


def test_modality_spec_from_configs(llava, audio, qwen2vl):
    s = modality_spec(llava[0], llava[1])
    assert s.placeholders == {llava[0].config.image_token_id: "image"} and not s.markers
    assert s.tokens_per_item["image"] == NT
    s = modality_spec(qwen2vl[0], qwen2vl[1])
    assert s.markers == {4: (6, "image")} and s.placeholders == {5: "image", 7: "video"}
    tok = audio[1].tokenizer
    s = modality_spec(audio[0], audio[1])
    bos, eos = tok.convert_tokens_to_ids(["<|audio_bos|>", "<|audio_eos|>"])
    assert s.markers == {bos: (eos, "audio")}
    with pytest.raises(ValueError, match="audio_bos"):
        modality_spec(audio[0].config, None)


def test_qwen2vl_patch_order_inverts_the_processor(qwen2vl):
    """The heatmap layout inverts the processor's patch flattening: applied to pixel_values themselves it
    gives back the normalised image (summed over channels and the 2 temporal copies)."""
    model, proc = qwen2vl
    img = _rng_image(3, 16, 24)
    enc = _qvl_inputs(proc, [f"<s> {QVL_IMG} image ?"], [img], torch.float64)
    (pix, patches, raw), = split_pixel_relevance(enc["pixel_values"], dict(enc), model.config, "image")
    ip = proc.image_processor
    norm = (img / 255.0 - np.array(ip.image_mean)) / np.array(ip.image_std)
    np.testing.assert_allclose(pix.numpy(), 2 * norm.sum(-1), rtol=1e-5, atol=1e-5)
    assert patches.shape == (4, 6)


# ------------------------------------------------------------------------------------------------ llava


@needs_canonizers
def test_llava_single_token(llava, llava_attr):
    model, proc = llava
    enc = _llava_inputs(proc, [(existence_question("digits-llava", "7"), [_rng_image(0)])])
    res = llava_attr.attribute(enc)
    assert isinstance(llava_attr, Attribution) and isinstance(res, ModalityResult)
    with torch.no_grad():
        logits = model(**enc).logits[0, -1]
    assert int(res.target_ids[0, 0]) == int(logits.argmax())  # greedy next token
    torch.testing.assert_close(res.logit[0, 0], logits.max(), rtol=1e-5, atol=1e-5)
    seq = enc["input_ids"].shape[1]
    assert res.token_relevance.shape == (1, seq)
    assert res.spans[0]["image"] == [(3, 3 + NT)] and sum(e - s for s, e in res.spans[0]["text"]) == seq - NT
    # shares sum to 1 (signed and absolute); absolute shares lie in [0, 1]
    torch.testing.assert_close(sum(res.shares.values()), torch.ones(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum(res.shares_abs.values()), torch.ones(1), rtol=1e-5, atol=1e-5)
    assert all(0 <= float(v) <= 1 for v in res.shares_abs.values())
    torch.testing.assert_close(modality_reliance(res), res.shares_abs["image"])
    torch.testing.assert_close(modality_reliance(res, signed=True), res.shares["image"])
    (hm,) = res.heatmaps[0]
    assert hm.relevance.shape == (S, S) and hm.patches.shape == (G, G) and hm.token_relevance.shape == (NT,)
    assert hm.input.shape == (S, S, 3) and 0 <= hm.input.min() and hm.input.max() <= 1
    assert "image" in str(res) and "|share|" in str(res)


@needs_canonizers
def test_llava_conservation_pixels_vs_image_tokens(llava):
    """CP-LRP in the vision tower and projector, zero biases and zero position / class embeddings, float64:
    every step (conv patch embedding, LayerNorm with detached scale, value path of attention, identity
    GELU, linear layers, residual sums) is conservative, so sum over pixels of R == sum over the image's
    token positions of R (the relevance arriving at the image features), per image."""
    model, proc = llava
    m = _conservative(model)
    attr = ModalityAttribution(m, proc)
    enc = _llava_inputs(proc, [("is there a 7 in the image ?", [_rng_image(1), _rng_image(2)]),
                               ("is there a 3 ?", [_rng_image(4)])], torch.float64)
    res = attr.attribute(enc)
    hms = [h for row in res.heatmaps for h in row]
    assert [len(r) for r in res.heatmaps] == [2, 1]
    for h in hms:
        tok = h.token_relevance.sum()
        assert abs(float(tok)) > 1e-8
        torch.testing.assert_close(h.relevance.sum(), tok, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h.patches.sum(), tok, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(h.raw.sum(), tok, rtol=1e-9, atol=1e-12)
    # with AttnLRP in the tower instead, the softmax rule does not conserve: totals differ
    res2 = ModalityAttribution(m, proc, vision_composite="attnlrp").attribute(enc)
    h2 = res2.heatmaps[0][0]
    assert not torch.allclose(h2.relevance.sum(), h2.token_relevance.sum(), rtol=1e-6)


@needs_canonizers
def test_llava_two_images_left_padding_batch_equals_single(llava):
    model, proc = llava
    m = copy.deepcopy(model).double()
    attr = ModalityAttribution(m, proc)
    items = [("is there a 7 in the image ?", [_rng_image(1), _rng_image(2)]), ("is there a 3 ?", [_rng_image(4)])]
    enc = _llava_inputs(proc, items, torch.float64)
    mask = enc["attention_mask"]
    assert (mask[1] == 0).any() and mask[1, 0] == 0  # row 1 is left-padded
    res = attr.attribute(enc)
    assert res.spans[0]["image"] == [(3, 3 + NT), (3 + NT, 3 + 2 * NT)]
    pad = int((mask[1] == 0).sum())
    assert res.spans[1]["image"] == [(pad + 3, pad + 3 + NT)]
    assert all(s >= pad for s, _ in res.spans[1]["text"])
    assert float(res.token_relevance[1, :pad].abs().sum()) == 0.0
    for b, item in enumerate(items):
        single = attr.attribute(_llava_inputs(proc, [item], torch.float64))
        n = single.token_relevance.shape[1]
        _assert_batch_equal(res.token_relevance[b, -n:], single.token_relevance[0])
        assert int(res.target_ids[b, 0]) == int(single.target_ids[0, 0])
        for h, hs in zip(res.heatmaps[b], single.heatmaps[0]):
            _assert_batch_equal(h.relevance, hs.relevance)


@needs_canonizers
def test_llava_answer_sum_and_per_token(llava, llava_attr):
    model, proc = llava
    tok = proc.tokenizer
    enc = _llava_inputs(proc, [(existence_question("digits-llava", "7"), [_rng_image(0)])])
    answer = tok.convert_tokens_to_ids(["yes", "</s>"])
    res_sum = llava_attr.attribute(enc, target=answer)
    res_tok = llava_attr.attribute(enc, target=answer, mode="per_token")
    L = enc["input_ids"].shape[1]
    assert res_sum.token_relevance.shape == (1, L + 1)
    assert res_sum.spans[0]["generated"] == [(L, L + 1)]
    assert res_tok.per_token_relevance.shape == (1, 2, L + 1)
    # linearity of the modified backward pass: relevance of the summed logits = sum of per-token relevances
    torch.testing.assert_close(res_sum.token_relevance, res_tok.token_relevance, rtol=1e-4, atol=1e-6)
    # causality: the first answer token gets no relevance from the appended answer token
    assert float(res_tok.per_token_relevance[0, 0, L:].abs().sum()) == 0.0
    # the explained logits are the model's own at those positions
    ids2 = torch.cat([enc["input_ids"], torch.tensor([[answer[0]]])], 1)
    with torch.no_grad():
        lg = model(input_ids=ids2, attention_mask=torch.ones_like(ids2), pixel_values=enc["pixel_values"]).logits
    torch.testing.assert_close(res_sum.logit[0], torch.stack([lg[0, L - 1, answer[0]], lg[0, L, answer[1]]]),
                               rtol=1e-5, atol=1e-5)
    # int target and a [batch] tensor target
    r1 = llava_attr.attribute(enc, target=answer[0])
    torch.testing.assert_close(r1.token_relevance, res_tok.per_token_relevance[:, 0, :L], rtol=1e-4, atol=1e-6)
    assert llava_attr.attribute(enc, target=torch.tensor([answer[0]])).target_ids.tolist() == [[answer[0]]]


@needs_canonizers
def test_llava_create_graph(llava):
    """Relevance stays differentiable (LIME's objective). CPU SDPA has no double backward: eager attention."""
    proc = llava[1]
    model = build_model("digits-llava", proc.tokenizer, attn_implementation="eager", seed=0).eval()
    enc = _llava_inputs(proc, [(existence_question("digits-llava", "2"), [_rng_image(5)])])
    res = ModalityAttribution(model, proc).attribute(enc, create_graph=True)
    assert res.token_relevance.requires_grad
    w = model.model.multi_modal_projector.linear_2.weight
    (g,) = torch.autograd.grad(modality_reliance(res, signed=True).sum(), w)
    assert torch.isfinite(g).all() and float(g.abs().sum()) > 0


@needs_canonizers
def test_llava_errors(llava, llava_attr, audio):
    model, proc = llava
    enc = _llava_inputs(proc, [(existence_question("digits-llava", "7"), [_rng_image(0)])])
    text_only = proc.tokenizer(["user : is there a 7 ? assistant :"], return_tensors="pt")
    with pytest.raises(ValueError, match="no image/audio tokens"):
        llava_attr.attribute(dict(text_only))
    vocab = model.get_input_embeddings().num_embeddings
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llava_attr.attribute(enc, target=vocab)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        llava_attr.attribute(enc, target=[1, -2])
    with pytest.raises(ValueError, match="mode"):
        llava_attr.attribute(enc, mode="mean")
    with pytest.raises(TypeError, match="processor's output"):
        llava_attr.attribute(enc["input_ids"])
    # a processor of another model: no <image> token (audio processor) / no <|audio_bos|> (image processor)
    with pytest.raises(ValueError, match="processor does not match"):
        ModalityAttribution(audio[0], proc)
    with pytest.raises(ValueError, match="processor does not match"):
        ModalityAttribution(model, audio[1])
    bigger = build_digits_processor()
    bigger.tokenizer.add_tokens([f"extra{i}" for i in range(vocab - len(bigger.tokenizer) + 1)])
    with pytest.raises(ValueError, match="embedding has"):
        ModalityAttribution(model, bigger)
    other = copy.deepcopy(model)
    other.config.image_token_id = proc.tokenizer.convert_tokens_to_ids("yes")
    with pytest.raises(ValueError, match="expects"):
        ModalityAttribution(other, proc)
    right = dict(enc)
    right["attention_mask"] = enc["attention_mask"].clone()
    right["attention_mask"][0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        llava_attr.attribute(right, target=[3, 4])
    with pytest.raises(ValueError, match="right-padded"):
        llava_attr.attribute(right)


# ------------------------------------------------------------------------------------------------ qwen2-vl


@needs_canonizers
def test_qwen2vl_spans_heatmaps_conservation(qwen2vl):
    model, proc = qwen2vl
    m = _conservative(model)
    attr = ModalityAttribution(m, proc)
    texts = [f"<s> what is in the {QVL_IMG} left and {QVL_IMG} right ?", f"<s> {QVL_IMG} image ?"]
    images = [_rng_image(1, 16, 24), _rng_image(2, 16, 16), _rng_image(3, 24, 16)]
    enc = _qvl_inputs(proc, texts, images, torch.float64)
    res = attr.attribute(enc)
    ids = res.input_ids
    for b, row in enumerate(res.spans):
        for s, e in row["image"]:
            assert int(ids[b, s]) == 4 and int(ids[b, e - 1]) == 6  # markers inclusive
    assert [len(s["image"]) for s in res.spans] == [2, 1]
    assert [tuple(h.relevance.shape) for h in res.heatmaps[0]] == [(16, 24), (16, 16)]
    assert tuple(res.heatmaps[1][0].relevance.shape) == (24, 16)
    assert res.heatmaps[0][0].token_relevance.shape == (6,)
    for row in res.heatmaps:
        for h in row:
            torch.testing.assert_close(h.relevance.sum(), h.token_relevance.sum(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(sum(res.shares_abs.values()), torch.ones(2, dtype=torch.float64))
    # batch vs single (row 1 is left-padded; Qwen2-VL computes its 3-D positions from the mask)
    single = attr.attribute(_qvl_inputs(proc, texts[1:], images[2:], torch.float64))
    n = single.token_relevance.shape[1]
    torch.testing.assert_close(res.token_relevance[1, -n:], single.token_relevance[0], rtol=1e-6, atol=1e-9)
    # an answer: the appended tokens extend the per-token inputs (mm_token_type_ids) too
    ans = attr.attribute(_qvl_inputs(proc, texts[1:], images[2:], torch.float64), target=[15, 17, 16])
    assert ans.spans[0]["generated"] == [(n, n + 2)] and ans.logit.shape == (1, 3)
    g = grounding_score(res, box=(0, 0, 12, 16), row=0, item=0) + grounding_score(res, box=(12, 0, 24, 16), row=0)
    assert g == pytest.approx(1.0)
    assert grounding_score(res, box=(0, 0, 24, 16), level="tokens") == pytest.approx(1.0)


@needs_canonizers
def test_qwen2_5_vl_conservation():
    """Qwen2.5-VL (window attention, gated vision MLP, RMSNorm): same spans and exact-up-to-float32
    conservation (its RMSNorm computes in float32 even in a float64 model, hence rtol 1e-6)."""
    proc = _qvl_processor()
    cfg = Qwen2_5_VLConfig(text_config=_QVL_TEXT, vision_config=dict(
        depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16, fullatt_block_indexes=[1]),
        **_QVL_IDS)
    torch.manual_seed(0)
    m = _conservative(Qwen2_5_VLForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval())
    enc = _qvl_inputs(proc, [f"<s> what is in the {QVL_IMG} left and {QVL_IMG} right ?"],
                      [_rng_image(1, 16, 24), _rng_image(2, 16, 16)], torch.float64)
    res = ModalityAttribution(m, proc).attribute(enc)
    assert [tuple(h.relevance.shape) for h in res.heatmaps[0]] == [(16, 24), (16, 16)]
    for h in res.heatmaps[0]:
        assert abs(float(h.token_relevance.sum())) > 1e-8
        torch.testing.assert_close(h.relevance.sum(), h.token_relevance.sum(), rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------------------------------------ qwen2-audio


@needs_canonizers
def test_qwen2audio_spans_seconds_conservation(audio):
    model, proc = audio
    m = _conservative(model)
    attr = ModalityAttribution(m, proc)
    enc, _ = _audio_inputs(proc, n=1, dtype=torch.float64)
    res = attr.attribute(enc)
    tok = proc.tokenizer
    (s, e), = res.spans[0]["audio"]
    assert res.input_ids[0, s] == tok.convert_tokens_to_ids("<|audio_bos|>")
    assert res.input_ids[0, e - 1] == tok.convert_tokens_to_ids("<|audio_eos|>")
    (hm,) = res.heatmaps[0]
    assert hm.kind == "audio" and hm.relevance.shape == (NUM_AUDIO_FRAMES,)
    assert hm.token_relevance.shape == (NUM_AUDIO_TOKENS,)
    assert hm.seconds_per_frame == pytest.approx(proc.feature_extractor.hop_length / 16000)
    assert float(hm.times[-1]) == pytest.approx((NUM_AUDIO_FRAMES - 1) * hm.seconds_per_frame)
    torch.testing.assert_close(hm.relevance.sum(), hm.token_relevance.sum(), rtol=1e-9, atol=1e-12)
    # shares: audio span includes the bos/eos markers
    torch.testing.assert_close(sum(res.shares.values()), torch.ones(1, dtype=torch.float64))
    half = CLIP_SECONDS / 2
    first = grounding_score(res, time_span=(0.0, half))
    assert 0 <= first <= 1 and first + grounding_score(res, time_span=(half, 2 * half)) == pytest.approx(1.0)
    assert grounding_score(res, time_span=(0, CLIP_SECONDS), level="tokens") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="time_span"):
        grounding_score(res, box=(0, 0, 1, 1))


@needs_canonizers
def test_qwen2audio_batch_of_different_lengths_equals_single(audio):
    """Two clips of different length in one left-padded batch: padded mel frames are cut from the
    heatmap (feature_attention_mask) and each row equals its prompt explained alone."""
    model, proc = audio
    m = copy.deepcopy(model).double()
    attr = ModalityAttribution(m, proc)
    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(int(16000 * CLIP_SECONDS / 2)).astype("float32") * 0.1,
             rng.standard_normal(int(16000 * CLIP_SECONDS)).astype("float32") * 0.1]
    texts = [format_prompt("tones-qwen2audio", description_question("tones-qwen2audio")),
             format_prompt("tones-qwen2audio", existence_question("tones-qwen2audio", "hum"))]

    def enc_of(w, t):
        e = proc(audio=w, text=t, return_tensors="pt", sampling_rate=16000, padding=True)
        e["input_features"] = e["input_features"].double()
        return e

    res = attr.attribute(enc_of(waves, texts))
    assert [h.relevance.shape[0] for row in res.heatmaps for h in row] == [NUM_AUDIO_FRAMES // 2, NUM_AUDIO_FRAMES]
    for b in range(2):
        single = attr.attribute(enc_of(waves[b:b + 1], texts[b:b + 1]))
        n = single.token_relevance.shape[1]
        _assert_batch_equal(res.token_relevance[b, -n:], single.token_relevance[0])
        _assert_batch_equal(res.heatmaps[b][0].relevance, single.heatmaps[0][0].relevance)


# ------------------------------------------------------------------------------------------------ metrics


@needs_canonizers
def test_metrics_printable(llava, llava_attr):
    model, proc = llava
    enc = _llava_inputs(proc, [(existence_question("digits-llava", "7"), [_rng_image(0)])])
    res = llava_attr.attribute(enc)
    top = top_tokens(res, 5, proc.tokenizer)
    assert len(top) == 5 and "rank" in str(top)
    vals = [abs(r) for _, _, _, r in top]
    assert vals == sorted(vals, reverse=True)
    assert {k for _, _, k, _ in top} <= {"image", "text"}
    b = breakdown(res)
    assert "image" in str(b) and "text" in str(b)
    d = b.as_dict()
    assert d["image"]["tokens"] == NT
    assert sum(v["share_abs"] for v in d.values()) == pytest.approx(1.0)
    # grounding: the whole image is 1, two halves add to 1, a mask equals the same box
    h = S // 2
    assert grounding_score(res, box=(0, 0, S, S)) == pytest.approx(1.0)
    left = grounding_score(res, box=(0, 0, h, S))
    assert left + grounding_score(res, box=(h, 0, S, S)) == pytest.approx(1.0)
    mask = np.zeros((S, S), bool)
    mask[:, :h] = True
    assert grounding_score(res, mask=mask) == pytest.approx(left)
    assert grounding_score(res, mask=mask[::PATCH_SIZE, ::PATCH_SIZE], level="patches") == pytest.approx(
        grounding_score(res, box=(0, 0, h, S), level="patches"))
    assert 0 <= grounding_score(res, box=(0, 0, h, S), level="tokens") <= 1
    with pytest.raises(ValueError, match="exactly one"):
        grounding_score(res)
    with pytest.raises(IndexError):
        grounding_score(res, box=(0, 0, 1, 1), item=3)
