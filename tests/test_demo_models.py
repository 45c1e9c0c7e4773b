"""Tests of the embedded demo models, their data generators, processors and held-out sets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lime_attr.models import (
    available_builtins,
    builtin_path,
    description_items,
    format_prompt,
    load_builtin,
    load_model,
    make_clips,
    make_scenes,
    pope_questions,
    pope_splits,
)
from lime_attr.models.accuracy import description_metrics, generate_answers, parse_yes_no, pope_metrics
from lime_attr.models.processing import (
    NUM_AUDIO_TOKENS,
    NUM_IMAGE_TOKENS,
    build_digits_processor,
    build_tones_processor,
    existence_question,
)
from lime_attr.models.scenes import CANVAS_SIZE, DIGIT_PRIOR, digit_pools
from lime_attr.models.sounds import CLIP_SECONDS, SAMPLING_RATE, SOUND_PRIOR
from lime_attr.models.train import MAX_TOTAL_BYTES, directory_bytes

NAMES = ("digits-llava", "tones-qwen2audio")


@pytest.fixture(scope="module", params=NAMES)
def builtin(request):
    name = request.param
    model, processor = load_builtin(name)
    return name, model, processor


def _media(name, items):
    if name == "digits-llava":
        return {"images": [it.image for it in items]}
    return {"audio": [it.audio for it in items], "sampling_rate": SAMPLING_RATE}


# --------------------------------------------------------------------------- scenes and clips


def test_scenes_are_deterministic():
    a, b = make_scenes(6, seed=3), make_scenes(6, seed=3)
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image)
        assert (x.digits, x.boxes, x.sample_ids) == (y.digits, y.boxes, y.sample_ids)
    assert not all(np.array_equal(x.image, y.image) for x, y in zip(a, make_scenes(6, seed=4)))


def test_digit_pools_are_disjoint_and_cover_the_data():
    train, held = digit_pools("train"), digit_pools("heldout")
    targets = load_digits().target
    for cls in range(10):
        assert set(train[cls]).isdisjoint(held[cls])
        assert set(train[cls]) | set(held[cls]) == set(np.flatnonzero(targets == cls))
        assert np.all(targets[train[cls]] == cls)
    scene = make_scenes(20, seed=0, split="heldout")
    for s in scene:
        for digit, sample in s.sample_ids.items():
            assert sample in held[int(digit)]


def test_scene_boxes_hold_the_digits():
    images = load_digits().images
    for scene in make_scenes(30, seed=1):
        assert scene.image.shape == (CANVAS_SIZE, CANVAS_SIZE, 3) and scene.image.dtype == np.uint8
        assert 1 <= len(scene.digits) <= 4 and scene.digits == sorted(scene.digits)
        assert set(scene.boxes) == set(scene.digits)
        inside = np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=bool)
        for digit, (x0, y0, x1, y1) in scene.boxes.items():
            glyph = images[scene.sample_ids[digit]] / 16.0 * 255.0
            region = scene.image[y0:y1, x0:x1, 0].astype(float)
            assert region.shape == glyph.shape
            ink = glyph > 40
            assert np.allclose(region[ink], glyph[ink], atol=1.0)  # the digit is drawn in its box
            inside[y0:y1, x0:x1] = True
        assert scene.image[~inside].max() < 40  # no ink outside the boxes
        # boxes are disjoint cells
        assert inside.sum() == 64 * len(scene.digits)


def test_clips_are_deterministic_and_spans_hold_energy():
    a, b = make_clips(8, seed=5), make_clips(8, seed=5)
    for x, y in zip(a, b):
        assert np.array_equal(x.audio, y.audio) and x.spans == y.spans
    for clip in a:
        assert clip.audio.shape == (int(CLIP_SECONDS * SAMPLING_RATE),) and clip.audio.dtype == np.float32
        assert np.abs(clip.audio).max() <= 1.0
        outside = np.ones(len(clip.audio), dtype=bool)
        spans = sorted(clip.spans.values())
        for (s0, e0), (s1, _) in zip(spans, spans[1:]):
            assert e0 <= s1  # no overlap
        for name, (start, end) in clip.spans.items():
            assert 0.0 <= start < end <= CLIP_SECONDS
            outside[int(start * SAMPLING_RATE) : int(end * SAMPLING_RATE)] = False
        floor = np.sqrt(np.mean(clip.audio[outside] ** 2))
        frame = SAMPLING_RATE // 50  # 20 ms
        for name, (start, end) in clip.spans.items():
            seg = clip.audio[int(start * SAMPLING_RATE) : int(end * SAMPLING_RATE)]
            frames = seg[: len(seg) // frame * frame].reshape(-1, frame)
            frame_rms = np.sqrt(np.mean(frames**2, axis=1))
            assert np.sqrt(np.mean(seg**2)) > 2 * floor, name  # more energy than the floor overall
            assert frame_rms.max() > 4 * floor, name  # and loud frames (clicks are sparse)


@pytest.mark.parametrize("prior", [DIGIT_PRIOR, SOUND_PRIOR], ids=["digits", "sounds"])
def test_cooccurrence_prior_strength(prior):
    _, train = prior.statistics()
    _, held = prior.statistics(partner_prob=0.5)
    for a, b in prior.pairs:
        i, j = prior.names.index(a), prior.names.index(b)
        assert train[i, j] > 0.8 and train[j, i] > 0.8
        assert 0.3 < held[i, j] < 0.65
        others = [k for k in range(prior.num_objects) if k not in (i, j)]
        assert train[i, others].max() < 0.65
    popular = [prior.names[i] for i in prior.popular_order()[:2]]
    heavy = {n for n, w in zip(prior.names, prior.weights) if w > 1}
    assert set(popular) <= heavy


# --------------------------------------------------------------------------- POPE / description sets


def _negatives_by_item(questions):
    out: dict[int, list[str]] = {}
    for q in questions:
        if q.label == "no":
            out.setdefault(q.item_id, []).append(q.object)
    return out


@pytest.mark.parametrize("task", ["vision", "audio"])
def test_pope_sets_are_balanced_and_sampled_correctly(task):
    prior = DIGIT_PRIOR if task == "vision" else SOUND_PRIOR
    model_name = "digits-llava" if task == "vision" else "tones-qwen2audio"
    splits = pope_splits(task)
    positives = None
    for split, questions in splits.items():
        assert len(questions) >= 300
        labels = [q.label for q in questions]
        assert labels.count("yes") * 2 == len(labels)
        for q in questions:
            assert (q.object in q.present) == (q.label == "yes")
            assert q.split == split and q.prompt == format_prompt(model_name, q.question)
            assert (q.region is not None) == (q.label == "yes")
        pos = [(q.item_id, q.object) for q in questions if q.label == "yes"]
        positives = positives or pos
        assert pos == positives  # the same positives in every split
    present = {q.item_id: q.present for q in splits["random"]}
    order = [prior.names[i] for i in prior.popular_order()]
    for item, negs in _negatives_by_item(splits["popular"]).items():
        absent = [o for o in order if o not in present[item]]
        assert negs == absent[: len(negs)]
    broken_items = hits = 0
    for item, negs in _negatives_by_item(splits["adversarial"]).items():
        partners = [prior.partner_of(o) for o in present[item]]
        broken = [p for p in partners if p is not None and p not in present[item]]
        if broken:
            broken_items += 1
            hits += any(n in broken for n in negs)
    assert broken_items >= 20 and hits == broken_items
    random_negatives = {o for negs in _negatives_by_item(splits["random"]).values() for o in negs}
    assert len(random_negatives) == prior.num_objects


def test_pope_is_deterministic_and_description_set_consistent():
    a = pope_questions("vision", "adversarial", n_items=10)
    b = pope_questions("digits-llava", "adversarial", n_items=10)
    assert [(q.question, q.label, q.item_id) for q in a] == [(q.question, q.label, q.item_id) for q in b]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b))
    items = description_items("audio", n_items=10)
    assert all(it.reference == " ".join(it.objects) and set(it.spans) == set(it.objects) for it in items)
    assert all(it.audio is not None and it.image is None for it in items)


def test_metrics_helpers():
    assert parse_yes_no("Yes, there is.") == "yes" and parse_yes_no("no") == "no" and parse_yes_no("") == "no"
    m = pope_metrics(["yes", "no", "yes", "no"], ["yes", "no", "no", "yes"])
    assert m["accuracy"] == 0.5 and m["yes_ratio"] == 0.5
    d = description_metrics([["3", "8"], ["1"]], ["3 8", "1 7"], [str(i) for i in range(10)])
    assert d["exact_match"] == 0.5 and d["chair_i"] == pytest.approx(1 / 4) and d["chair_s"] == 0.5


# --------------------------------------------------------------------------- tokenizers and processors


@pytest.mark.parametrize("build", [build_digits_processor, build_tones_processor], ids=NAMES)
def test_tokenizer_round_trip(build):
    tok = build().tokenizer
    name = "digits-llava" if build is build_digits_processor else "tones-qwen2audio"
    objects = [str(d) for d in range(10)] if name == "digits-llava" else list(SOUND_PRIOR.names)
    for obj in objects:
        text = existence_question(name, obj)
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == text.lower().replace("?", " ?")
    assert tok.decode(tok("yes </s>", add_special_tokens=False)["input_ids"]) == "yes </s>"
    assert tok("unseen words")["input_ids"][1:] == [tok.unk_token_id] * 2
    for special in tok.all_special_tokens:
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1


def test_processors_expand_placeholders_to_model_features(builtin):
    name, model, processor = builtin
    items = pope_questions(name, "random", n_items=3)[:4]
    enc = processor(text=[q.prompt for q in items], return_tensors="pt", padding=True, **_media(name, items))
    if name == "digits-llava":
        n_tokens = (enc["input_ids"] == model.config.image_token_id).sum(dim=1)
        vision = model.config.vision_config
        expected = (vision.image_size // vision.patch_size) ** 2  # CLS dropped ("default" strategy)
        assert expected == NUM_IMAGE_TOKENS
        with torch.no_grad():
            features = model.get_image_features(pixel_values=enc["pixel_values"])
        features = getattr(features, "pooler_output", features)  # per-image (tokens, hidden) features
        n_features = sum(int(f.shape[-2]) for f in features)
    else:
        n_tokens = (enc["input_ids"] == model.config.audio_token_id).sum(dim=1)
        _, out_lengths = model.model.audio_tower._get_feat_extract_output_lengths(enc["feature_attention_mask"].sum(-1))
        expected = int(out_lengths[0])
        assert expected == NUM_AUDIO_TOKENS
        n_features = int(out_lengths.sum())
    assert n_tokens.tolist() == [expected] * len(items)
    assert n_features == expected * len(items)
    with torch.no_grad():
        out = model(**enc)
    assert out.logits.shape[:2] == enc["input_ids"].shape


def test_chat_template_matches_prompt_format(builtin):
    name, _, processor = builtin
    media = "image" if name == "digits-llava" else "audio"
    question = existence_question(name, "3" if media == "image" else "tone")
    messages = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tok = processor.tokenizer
    assert tok(rendered, add_special_tokens=False)["input_ids"] == tok(format_prompt(name, question))["input_ids"]


# --------------------------------------------------------------------------- shipped weights


def test_builtins_are_installed_and_small():
    assert available_builtins() == list(NAMES)
    total = sum(directory_bytes(builtin_path(n)) for n in NAMES)
    assert total <= MAX_TOTAL_BYTES
    for name in NAMES:
        path = builtin_path(name)
        assert (path / "model.safetensors").is_file() and (path / "README.md").is_file()
        record = json.loads((path / "eval_results.json").read_text())
        assert record["heldout"]["pope_random"]["accuracy"] > 0.85
        assert str(round(record["heldout"]["pope_random"]["accuracy"], 3)) in (path / "README.md").read_text()


def test_load_builtin_uses_from_pretrained_classes(builtin):
    name, model, processor = builtin
    expected = {
        "digits-llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
        "tones-qwen2audio": ("Qwen2AudioForConditionalGeneration", "Qwen2AudioProcessor"),
    }
    assert (type(model).__name__, type(processor).__name__) == expected[name]
    assert model.config._attn_implementation == "sdpa" and not model.training
    again, _ = load_model(f"builtin:{name}", dtype=torch.float64)
    assert next(again.parameters()).dtype == torch.float64
    local, _ = load_model(str(builtin_path(name)))
    assert type(local) is type(model)


def test_eager_attention_matches_sdpa(builtin):
    name, model, processor = builtin
    eager, _ = load_builtin(name, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    items = pope_questions(name, "adversarial", n_items=2)[:2]
    enc = processor(text=[q.prompt for q in items], return_tensors="pt", padding=True, **_media(name, items))
    with torch.no_grad():
        torch.testing.assert_close(eager(**enc).logits, model(**enc).logits, atol=1e-4, rtol=1e-4)


def test_builtins_answer_heldout_questions(builtin):
    name, model, processor = builtin
    questions = pope_questions(name, "random", n_items=20, seed=777)[:40]
    assert len(questions) == 40
    answers = generate_answers(model, processor, questions, max_new_tokens=2)
    accuracy = np.mean([parse_yes_no(a) == q.label for a, q in zip(answers, questions)])
    assert accuracy > 0.7, (name, accuracy)


def test_load_model_reports_offline_hub_failure(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(OSError, match="builtin:digits-llava"):
        load_model("some-org/some-missing-model")
