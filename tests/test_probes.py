"""Prior probes, textual renderings and the two-stage training recipe of the demo models."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lime_attr.models import PROBE_CONDITIONS, prior_descriptions, prior_probe, probe_capacity
from lime_attr.models.accuracy import evaluate_probes, first_answer_tokens, generate_answers, partner_hallucination_rate
from lime_attr.models.processing import BLANK_WORD, NUM_AUDIO_TOKENS, NUM_IMAGE_TOKENS, build_digits_processor
from lime_attr.models.rendering import AUDIO_TOKEN_SECONDS, shown_objects, slot_words, text_prompt
from lime_attr.models.scenes import CELL_SIZE, DIGIT_PRIOR, GRID, make_scene
from lime_attr.models.sounds import SAMPLING_RATE, SOUND_PRIOR, make_clip

NAMES = ("digits-llava", "tones-qwen2audio")
PRIORS = {"digits-llava": DIGIT_PRIOR, "tones-qwen2audio": SOUND_PRIOR}


# ------------------------------------------------------------------------------------------ probes


def _fingerprint(name: str, condition: str) -> str:
    digest = hashlib.sha256()
    for it in prior_probe(name, condition, n=30, seed=3):
        digest.update(repr((it.prompt, it.label, it.present, sorted(it.regions.items()))).encode())
        digest.update((it.image if it.image is not None else it.waveform).tobytes())
    return digest.hexdigest()


def test_probes_are_deterministic_across_processes():
    code = (
        "import sys; sys.path.insert(0, {tests!r}); from test_probes import _fingerprint, NAMES, PROBE_CONDITIONS;"
        "print([_fingerprint(n, c) for n in NAMES for c in PROBE_CONDITIONS])"
    ).format(tests=os.path.dirname(__file__))
    outputs = []
    for hash_seed in ("1", "987"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        outputs.append(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    here = str([_fingerprint(n, c) for n in NAMES for c in PROBE_CONDITIONS])
    assert outputs[0].strip() == outputs[1].strip() == here


def _ink_in_cell(image: np.ndarray, box: tuple[int, int, int, int]) -> float:
    x0, y0, x1, y1 = box
    return float(image[y0:y1, x0:x1, 0].max())


def _energy(waveform: np.ndarray, span: tuple[float, float]) -> float:
    a, b = int(span[0] * SAMPLING_RATE), int(span[1] * SAMPLING_RATE)
    return float(np.sqrt(np.mean(waveform[a:b] ** 2)))


def _floor(waveform: np.ndarray, spans) -> float:
    quiet = np.ones(len(waveform), dtype=bool)
    for start, end in spans:
        quiet[int(start * SAMPLING_RATE) : int(end * SAMPLING_RATE)] = False
    return float(np.sqrt(np.mean(waveform[quiet] ** 2)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("condition", PROBE_CONDITIONS)
def test_probe_labels_agree_with_the_scenes(name, condition):
    prior = PRIORS[name]
    items = prior_probe(name, condition, n=40, seed=1)
    assert len(items) == 40
    for it in items:
        a, b = it.pair
        assert (a, b) in prior.pairs
        assert it.label == ("yes" if it.object in it.present else "no")
        n_pair_present = (a in it.present) + (b in it.present)
        expected = {"conflict": 1, "control": 1, "consistent_yes": 2, "consistent_no": 0}[condition]
        assert n_pair_present == expected
        if condition == "conflict":
            assert it.object == it.partner and it.partner not in it.present
        if condition == "control":
            assert it.object not in it.present and it.object != it.partner
        if condition in ("consistent_yes", "consistent_no"):
            assert it.object in it.pair
        # no second broken pair: every other pair is complete or absent
        for p, q in prior.pairs:
            if (p, q) != it.pair:
                assert (p in it.present) == (q in it.present)
        assert sorted(it.regions) == sorted(it.present)
        for obj, region in it.regions.items():
            if name == "digits-llava":
                assert _ink_in_cell(it.image, region) > 100, (obj, region)
            else:
                assert _energy(it.waveform, region) > 2.5 * _floor(it.waveform, it.regions.values()), (obj, region)
        if name == "digits-llava":  # absent objects leave their cells empty: at most the present digits have ink
            inked = sum(_ink_in_cell(it.image, (c * CELL_SIZE, r * CELL_SIZE, (c + 1) * CELL_SIZE, (r + 1) * CELL_SIZE)) > 100
                        for r in range(GRID) for c in range(GRID))
            assert inked == len(it.present)


def test_control_asks_about_the_conflict_scenes():
    conflict = prior_probe("digits-llava", "conflict", n=20, seed=5)
    control = prior_probe("digits-llava", "control", n=20, seed=5)
    for a, b in zip(conflict, control):
        assert a.present == b.present and a.regions == b.regions and np.array_equal(a.image, b.image)
        assert a.object == a.partner and b.object != b.partner and a.partner == b.partner


@pytest.mark.parametrize("name", NAMES)
def test_validation_and_test_never_share_a_layout(name):
    def layouts(split):
        return {(it.object, tuple(sorted(it.regions.items()))) for it in prior_probe(name, "conflict", n=100, split=split)}

    assert not layouts("validation") & layouts("test")


def test_probe_items_are_distinct_up_to_the_capacity():
    capacity = probe_capacity("tones-qwen2audio", "consistent_yes", "test")
    assert 200 <= capacity < 1000
    items = prior_probe("tones-qwen2audio", "consistent_yes", n=capacity, seed=0)
    keys = {(it.object, tuple(sorted(it.regions))) + tuple(sorted((o, int(s[0] // 0.5)) for o, s in it.regions.items()))
            for it in items}
    assert len(keys) == capacity
    with pytest.raises(ValueError, match=rf"n={capacity + 1} is more than the {capacity} distinct"):
        prior_probe("tones-qwen2audio", "consistent_yes", n=capacity + 1)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: prior_probe("digits-llava", "conflicts"), r"unknown probe condition 'conflicts'.*'conflict', 'consistent_yes'"),
        (lambda: prior_probe("llava-1.5", "conflict"), r"no prior probe set for model 'llava-1.5'.*digits-llava"),
        (lambda: prior_descriptions("gpt2"), r"no prior probe set for model 'gpt2'"),
        (lambda: prior_probe("digits-llava", "conflict", split="train"), r"unknown probe split 'train'.*'validation', 'test'"),
        (lambda: prior_probe("digits-llava", "conflict", n=0), r"n must be a positive integer"),
        (lambda: prior_probe("tones-qwen2audio", "conflict", n=10**6), r"more than the \d+ distinct 'conflict' items.*n <= \d+"),
    ],
)
def test_probe_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_prior_descriptions_are_the_conflict_scenes():
    items = prior_descriptions("tones-qwen2audio", n=15, seed=2)
    conflict = prior_probe("tones-qwen2audio", "conflict", n=15, seed=2)
    for d, c in zip(items, conflict):
        assert d.condition == "description" and d.object is None and d.label == " ".join(d.present)
        assert d.present == c.present and d.partner == c.partner and d.partner not in d.present
    assert partner_hallucination_rate(items, [d.label + " " + d.partner for d in items]) == 1.0
    assert partner_hallucination_rate(items, [d.label for d in items]) == 0.0


# ------------------------------------------------------------------------------------------ priors


@pytest.mark.parametrize("p", [0.8, 0.94])
def test_whole_pairs_cooccurrence_matches_its_formula(p):
    rng = np.random.default_rng(0)
    scenes = [DIGIT_PRIOR.sample(rng, p, whole_pairs=True) for _ in range(20000)]
    with_3 = [s for s in scenes if 3 in s]
    observed = np.mean([8 in s for s in with_3])
    assert abs(observed - 2 * p / (1 + p)) < 4 * np.sqrt(0.25 / len(with_3))
    assert all(1 <= len(s) <= 4 and len(set(s)) == len(s) for s in scenes)


def test_default_sampling_is_unchanged_by_the_whole_pairs_option():
    a, b = np.random.default_rng(4), np.random.default_rng(4)
    assert [DIGIT_PRIOR.sample(a, 0.9) for _ in range(200)] == [DIGIT_PRIOR.sample(b, 0.9, whole_pairs=False) for _ in range(200)]


# ------------------------------------------------------------------------------------------ renderings


def test_slot_words_follow_the_perception_layout():
    scene = make_scene(np.random.default_rng(0), digits=[3, 5], cells={3: 6, 5: 0})
    words = slot_words(scene, ["3", "5"])
    assert len(words) == NUM_IMAGE_TOKENS and words[6] == "3" and words[0] == "5"
    assert words.count(BLANK_WORD) == NUM_IMAGE_TOKENS - 2
    clip = make_clip(np.random.default_rng(0), events=[0, 4], slots={0: 3, 4: 1})
    words = slot_words(clip, ["hum"])
    assert len(words) == NUM_AUDIO_TOKENS and "tone" not in words
    start, end = clip.spans["hum"]
    hum = [t for t, w in enumerate(words) if w == "hum"]
    assert hum[0] * AUDIO_TOKEN_SECONDS <= start and (hum[-1] + 1) * AUDIO_TOKEN_SECONDS >= end


def test_partial_renderings_drop_one_pair_member_at_the_rate():
    rng = np.random.default_rng(0)
    shown = [shown_objects(["0", "3", "8"], DIGIT_PRIOR, rng, 0.5) for _ in range(4000)]
    assert all("0" in s and ("3" in s or "8" in s) for s in shown)
    assert abs(np.mean([len(s) == 2 for s in shown]) - 0.5) < 0.04
    assert shown_objects(["0", "3"], DIGIT_PRIOR, rng, 1.0) == ["0", "3"]  # broken pairs are never hidden


def test_text_prompt_puts_the_words_where_the_media_tokens_go():
    processor = build_digits_processor()
    scene = make_scene(np.random.default_rng(1), digits=[7], cells={7: 2})
    text = text_prompt("digits-llava", "Is there a 1 in the image?", slot_words(scene, ["7"]))
    text_ids = processor.tokenizer(text)["input_ids"]
    media_ids = processor(text="user : <image> Is there a 1 in the image? assistant :", images=scene.image)["input_ids"][0]
    assert len(text_ids) == len(media_ids)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    media_positions = [i for i, t in enumerate(media_ids) if t == image_id]
    assert processor.tokenizer.convert_ids_to_tokens([text_ids[media_positions[2]]]) == ["7"]
    assert [t for i, t in enumerate(text_ids) if i not in media_positions] == [t for t in media_ids if t != image_id]


# ------------------------------------------------------------------------------------------ recipe


def test_training_recipe_smoke(tmp_path):
    from lime_attr.models.train import TrainConfig, perception_parameters, save_builtin, train_model

    torch.set_num_threads(1)
    config = TrainConfig(text_steps=6, steps=6, batch_size=8, warmup=2, checkpoint_every=3, validation_items=4)
    model, processor, info = train_model("digits-llava", seed=0, config=config)
    assert [c["step"] for c in info["checkpoints"]] == [3, 6]
    assert info["selected_step"] in (3, 6) and np.isfinite(info["text_loss_ema"]) and np.isfinite(info["final_loss_ema"])
    again, _, info2 = train_model("digits-llava", seed=0, config=config)
    for (k, v), (_, w) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k  # seeded and reproducible
    assert info2["checkpoints"] == info["checkpoints"]
    assert set(perception_parameters(model)) and all("language_model" not in n for n in perception_parameters(model))
    target = save_builtin("digits-llava", model, processor, tmp_path, info, None)
    from transformers import LlavaForConditionalGeneration

    loaded = LlavaForConditionalGeneration.from_pretrained(target)
    torch.testing.assert_close(loaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_stage_two_leaves_the_language_model_frozen():
    from lime_attr.models import train as recipe

    config = recipe.TrainConfig(text_steps=4, steps=3, batch_size=4, warmup=1, checkpoint_every=3, validation_items=2)
    processor = recipe.build_processor("tones-qwen2audio")
    model = recipe.build_model("tones-qwen2audio", processor.tokenizer, seed=0)
    processor.tokenizer.padding_side = "right"
    model.train()
    recipe._run_stage(model, "tones-qwen2audio", processor, np.random.default_rng(0), config, stage=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe._run_stage(model, "tones-qwen2audio", processor, np.random.default_rng(1), config, stage=2)
    perception = recipe.perception_parameters(model)
    for k, v in model.state_dict().items():
        if k in perception:
            continue
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(model.state_dict()[k], before[k]) for k in perception)
    assert all(p.requires_grad for p in model.parameters())


def test_checkpoint_selection_rule():
    from lime_attr.models.train import select_checkpoint

    def ck(conflict, yes, no, control):
        return {"validation": {"conflict": conflict, "consistent_yes": yes, "consistent_no": no, "control": control}}

    assert select_checkpoint(threshold=0.92, checkpoints=[ck(0.5, 0.95, 0.95, 0.95), ck(0.2, 0.93, 0.99, 0.95), ck(0.1, 0.91, 1.0, 1.0)]) == 1
    assert select_checkpoint(threshold=0.92, checkpoints=[ck(0.2, 0.95, 0.95, 0.95), ck(0.2, 0.96, 0.96, 0.96)]) == 0  # ties: earliest
    assert select_checkpoint(threshold=0.92, checkpoints=[ck(0.1, 0.80, 0.9, 0.9), ck(0.5, 0.85, 0.9, 0.9), ck(0.5, 0.84, 0.88, 0.9)]) == 1
    assert select_checkpoint(threshold=0.92, checkpoints=[ck(0.1, 0.85, 0.9, 0.9), ck(0.5, 0.85, 0.9, 0.9)]) == 1  # ties: latest
    # the shipped default (0.95) skips a checkpoint that only clears 0.92
    assert select_checkpoint([ck(0.3, 0.92, 1.0, 0.98), ck(0.46, 1.0, 1.0, 1.0)]) == 1
    assert select_checkpoint(threshold=0.92, checkpoints=[ck(0.3, 0.92, 1.0, 0.98), ck(0.46, 1.0, 1.0, 1.0)]) == 0
    with pytest.raises(ValueError, match="no checkpoints"):
        select_checkpoint([])


# ------------------------------------------------------------------------------------------ shipped models


@pytest.mark.parametrize("name", NAMES)
def test_shipped_models_meet_the_testbed_acceptance(name):
    """The shipped model card's numbers, and a fresh greedy run on the test split, meet the acceptance bars."""
    from lime_attr.models import builtin_path, load_builtin

    record = json.loads((builtin_path(name) / "eval_results.json").read_text())
    probes = record["heldout"]["probes"]
    model, processor = load_builtin(name)
    fresh = evaluate_probes(model, processor, name, n=200)
    for condition in PROBE_CONDITIONS:
        assert fresh[condition]["n"] == 200
        assert fresh[condition]["accuracy"] == pytest.approx(probes[condition]["accuracy"], abs=1e-9)
    assert fresh["conflict"]["accuracy"] <= 0.65
    assert min(fresh[c]["accuracy"] for c in ("consistent_yes", "consistent_no", "control")) >= 0.90
    assert fresh["description"]["partner_hallucination"] >= 0.30
    assert f"{fresh['conflict']['accuracy']:.3f}" in (builtin_path(name) / "README.md").read_text()


@pytest.mark.parametrize("name", NAMES)
def test_first_answer_tokens_equal_greedy_generation(name):
    from lime_attr.models import load_builtin

    model, processor = load_builtin(name)
    items = prior_probe(name, "conflict", n=12) + prior_probe(name, "consistent_yes", n=12)
    generated = [a.split()[0] if a.split() else "" for a in generate_answers(model, processor, items, max_new_tokens=1)]
    assert first_answer_tokens(model, processor, items) == generated
