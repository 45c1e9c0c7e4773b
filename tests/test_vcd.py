"""VCD baseline (formula, cache, noise schedule) and LIME on a tiny LLaVA."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LogitsProcessorList

from lime_attr.mitigation import LimeConfig, VCDLogitsProcessor, lime_generate, vcd_noise
from lime_attr.mitigation.vcd import vcd_noise_level

IMG = 63


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llava():
    torch.manual_seed(0)
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    tc = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=None,
                     eos_token_id=None)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=IMG, image_seq_length=4,
                      vision_feature_layer=-1, attn_implementation="eager")
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def inputs():
    ids = torch.tensor([[5, 6, IMG, IMG, IMG, IMG, 7, 8, 9]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def test_noise_schedule():
    a = vcd_noise_level(500)
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    assert a == pytest.approx(float(torch.prod(1 - betas[:501])))
    assert a == pytest.approx(0.7448, abs=1e-3)  # the schedule's value at the VCD default step
    assert vcd_noise_level(0) == pytest.approx(1 - float(betas[0]))
    x = torch.full((4, 3, 64, 64), 2.0)
    y = vcd_noise(x, 500, generator=torch.Generator().manual_seed(0))
    assert float((y.mean() - math.sqrt(a) * 2.0).abs()) < 0.02
    assert float((y.std() - math.sqrt(1 - a)).abs()) < 0.02
    with pytest.raises(ValueError):
        vcd_noise_level(1000)


def test_vcd_formula_by_hand(llava, inputs):
    noised = dict(inputs, pixel_values=vcd_noise(inputs["pixel_values"], 500, generator=torch.Generator().manual_seed(1)))
    vcd = VCDLogitsProcessor(llava, noised, alpha=1.0, beta=0.1)
    ids = inputs["input_ids"]
    with torch.no_grad():
        clean = llava(**inputs).logits[:, -1].float()
        dirty = llava(**noised).logits[:, -1].float()
    got = vcd(ids, clean.clone())
    assert got.shape == clean.shape
    # hand computation, written out element by element
    p = torch.softmax(clean, -1)[0]
    for v in range(clean.shape[1]):
        if p[v] >= 0.1 * p.max():
            assert float(got[0, v]) == pytest.approx(2 * float(clean[0, v]) - float(dirty[0, v]), abs=1e-4)
        else:
            assert got[0, v] == float("-inf")
    assert torch.isfinite(got).sum() >= 1


def test_vcd_cache_matches_recompute(llava, inputs):
    noised = dict(inputs, pixel_values=vcd_noise(inputs["pixel_values"], 500, generator=torch.Generator().manual_seed(2)))
    vcd = VCDLogitsProcessor(llava, noised, alpha=0.5, beta=0.0)
    seq = inputs["input_ids"]
    for extra in ([11], [11, 12], [11, 12, 13]):
        ids = torch.cat([seq, torch.tensor([extra])], 1)
        got = vcd.noised_logits(ids)
        with torch.no_grad():
            full = llava(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=noised["pixel_values"]).logits[:, -1]
        torch.testing.assert_close(got, full.float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="does not start with the prompt"):
        vcd.noised_logits(torch.zeros(1, 12, dtype=torch.long))


def test_vcd_in_generate(llava, inputs):
    vcd = VCDLogitsProcessor.from_inputs(llava, inputs, generator=torch.Generator().manual_seed(0))
    out = llava.generate(**inputs, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([vcd]))
    assert out.shape == (1, 13)
    assert vcd.seen == 12  # its own cache followed the sequence
    # alpha = 0 and beta = 0 is plain greedy
    plain = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
    vcd0 = VCDLogitsProcessor.from_inputs(llava, inputs, alpha=0.0, beta=0.0)
    same = llava.generate(**inputs, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([vcd0]))
    assert same.tolist() == plain.tolist()
    with pytest.raises(ValueError, match="image"):
        VCDLogitsProcessor.from_inputs(llava, {"input_ids": inputs["input_ids"]})


def test_lime_on_tiny_llava(llava, inputs):
    """Spans found from the image placeholder; lr = 0 is plain greedy; updates move the relevance."""
    plain = llava.generate(**inputs, max_new_tokens=4, do_sample=False)[:, 9:]
    out = lime_generate(llava, None, inputs, LimeConfig.for_model(llava, lr=0.0, steps=1), max_new_tokens=4)
    assert out.tokens.tolist() == plain.tolist()
    recs = []
    lime_generate(llava, None, inputs, LimeConfig.for_model(llava, lr=0.05, steps=4, mode="reference", target="fixed"),
                  max_new_tokens=1, callback=recs.append)
    rel = [r[0] for r in recs[0].rel_losses]
    assert rel[-1] < rel[0], rel
    assert recs[0].focus_after[0] > recs[0].focus_before[0]


def test_lime_with_modality_attribution(llava, inputs):
    """LIME sits on any attribution with a scope: ModalityAttribution (AttnLRP in the language model) gives
    the same optimisation as LRP."""
    from lime_attr.attribution.modality import ModalityAttribution

    cfg = LimeConfig(steps=2, lr=0.05)
    a = lime_generate(llava, None, inputs, cfg, max_new_tokens=2)
    b = lime_generate(llava, None, inputs, cfg, max_new_tokens=2, attribution=ModalityAttribution(llava))
    assert a.tokens.tolist() == b.tokens.tolist()
    assert [l[0] for l in a.records[0].losses] == pytest.approx([l[0] for l in b.records[0].losses], rel=1e-5)


# ------------------------------------------------------------------------------------------ Qwen2-VL / Qwen2-Audio

QVL_WORDS = ["<unk>", "<pad>", "<s>", "</s>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
             "what", "is", "in", "the", "image", "?", "a", "cat", "dog", "and", "left", "right"]
QVL_IMG = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def qwen2vl():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    t = Tokenizer(WordLevel({w: i for i, w in enumerate(QVL_WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>", padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": QVL_WORDS[4:8]})
    kw = dict(patch_size=4, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=64, max_pixels=32 * 32, **kw),
                            tokenizer=tok, video_processor=Qwen2VLVideoProcessor(**kw))
    text = dict(vocab_size=len(QVL_WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 1e4},
                bos_token_id=2, eos_token_id=None, pad_token_id=1)
    cfg = Qwen2VLConfig(text_config=text, image_token_id=5, video_token_id=7, vision_start_token_id=4,
                        vision_end_token_id=6, pad_token_id=1,
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3, mlp_ratio=2))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    model.generation_config.eos_token_id = None
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")) for _ in range(2)]
    enc = proc(images=images, text=[f"what is in the {QVL_IMG} image ?", f"{QVL_IMG} what"], return_tensors="pt",
               padding=True)
    return model, proc, dict(enc.items())


def test_qwen2vl_lime_batch_and_vcd_cache(qwen2vl):
    model, proc, enc = qwen2vl
    P = enc["input_ids"].shape[1]
    plain = model.generate(**enc, max_new_tokens=4, do_sample=False)[:, P:]
    out = lime_generate(model, proc, enc, LimeConfig.for_model(model, lr=0.0, steps=1), max_new_tokens=4)
    assert out.tokens.tolist() == plain.tolist()  # M-RoPE positions continued correctly, left padding
    out = lime_generate(model, proc, enc, LimeConfig.for_model(model, lr=0.05, steps=2), max_new_tokens=2)
    assert out.tokens.shape == (2, 2)
    # VCD's own cache on an M-RoPE model equals a full recompute of the noised sequence
    vcd = VCDLogitsProcessor.from_inputs(model, enc, generator=torch.Generator().manual_seed(0))
    ids = torch.cat([enc["input_ids"], torch.tensor([[9, 10], [11, 12]])], 1)
    vcd.noised_logits(ids[:, :P])
    got = vcd.noised_logits(ids)
    full_kw = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    full_kw["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros(2, 2, dtype=torch.long)], 1)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.cat([enc["attention_mask"], torch.ones(2, 2, dtype=torch.long)], 1),
                     pixel_values=vcd.extra["pixel_values"], **full_kw).logits[:, -1]
    torch.testing.assert_close(got, full.float(), rtol=1e-4, atol=1e-5)


def test_qwen2audio_lime():
    from lime_attr.models.architectures import build_model
    from lime_attr.models.processing import build_tones_processor, description_question, format_prompt

    proc = build_tones_processor()
    model = build_model("tones-qwen2audio", proc.tokenizer, seed=0).eval()
    wave = np.random.default_rng(0).standard_normal(16000).astype("float32") * 0.1
    enc = proc(audio=[wave], text=[format_prompt("tones-qwen2audio", description_question("tones-qwen2audio"))],
               return_tensors="pt", sampling_rate=16000, padding=True)
    P = enc["input_ids"].shape[1]
    plain = model.generate(**enc, max_new_tokens=3, do_sample=False)[:, P:]
    out = lime_generate(model, proc, enc, LimeConfig.for_model(model, lr=0.0, steps=1), max_new_tokens=3)
    assert out.tokens.tolist() == plain[:, :out.tokens.shape[1]].tolist()
    assert LimeConfig.for_model(model).kl_weight == 7e-3
    assert model.config._attn_implementation == "sdpa"  # LIME's eager switch was undone
