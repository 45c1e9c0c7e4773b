"""Tests of the held-out corruptions (lime_attr.models.corruption) and their plumbing into harness and CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lime_attr.cli import main
from lime_attr.evaluation.harness import run_benchmark
from lime_attr.generation import DecodingConfig
from lime_attr.models import (
    AUDIO_CORRUPTIONS,
    DEFAULT_CORRUPTION,
    IMAGE_CORRUPTIONS,
    Corruption,
    available_builtins,
    corrupt_audio,
    corrupt_image,
    description_items,
    heldout_items,
    parse_corruption,
    pope_questions,
    pope_splits,
)

GREY = np.full((64, 64, 3), 128, dtype=np.uint8)


def _tone(n: int = 32000) -> np.ndarray:
    t = np.arange(n) / 16000
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


# ------------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "spec, steps, seed",
    [
        ("noise:0.3", (("noise", 0.3),), 0),
        ("noise:0.3+contrast:0.5", (("noise", 0.3), ("contrast", 0.5)), 0),
        (" SNR:-5 + seed:2 ", (("snr", -5.0),), 2),
        ({"blur": 1, "seed": 3}, (("blur", 1.0),), 3),
        (Corruption((("dropout", 0.25),)), (("dropout", 0.25),), 0),
    ],
)
def test_parse_forms(spec, steps, seed):
    c = parse_corruption(spec)
    assert (c.steps, c.seed) == (steps, seed)
    assert parse_corruption(str(c)) == c  # the canonical string round-trips


@pytest.mark.parametrize("spec", [None, "clean", "none", ""])
def test_clean_specs(spec):
    assert parse_corruption(spec) is None


def test_default_corruption_is_one_valid_spec_per_builtin():
    assert sorted(DEFAULT_CORRUPTION) == sorted(available_builtins())
    for task, spec in DEFAULT_CORRUPTION.items():
        assert parse_corruption("degraded", task) == parse_corruption(spec, task)
    assert parse_corruption("degraded", "vision").modality == "image"
    assert parse_corruption("degraded", "audio").modality == "audio"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("fog:1", "unknown corruption 'fog'; valid corruptions are image: noise"),
        ("noise", "malformed corruption step 'noise'"),
        ("noise:abc", "malformed"),
        ("noise:-0.1", ">= 0"),
        ("contrast:1.5", r"in \[0, 1\]"),
        ("occlude:2", r"in \[0, 1\]"),
        ("noise:0.1+snr:3", "mixes image and audio"),
        ("noise:0.1+seed:1.5", "non-negative integer"),
        ("seed:1", "has no steps"),
        ("degraded", "needs the task"),
    ],
)
def test_bad_specs_are_explained(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_corruption(spec)


def test_bad_spec_message_lists_every_kind():
    with pytest.raises(ValueError) as err:
        parse_corruption("fog:1")
    assert all(kind in str(err.value) for kind in [*IMAGE_CORRUPTIONS, *AUDIO_CORRUPTIONS])
    with pytest.raises(TypeError):
        parse_corruption(0.3)


def test_modality_mismatch():
    with pytest.raises(ValueError, match="is for image, but the data is audio"):
        pope_questions("audio", corruption="noise:0.2", n_items=2)
    with pytest.raises(ValueError, match="is for audio, but the data is image"):
        description_items("vision", corruption="snr:10", n_items=2)
    with pytest.raises(ValueError, match="for audio"):
        corrupt_image(GREY, "snr:10")


# ------------------------------------------------------------------------------------ what each does


def test_noise_std_and_grey_stays_grey():
    out = corrupt_image(GREY, "noise:0.05", key=(1,))
    diff = out.astype(np.float64) - GREY
    assert abs(diff.std() / 255 - 0.05) < 0.003 and abs(diff.mean()) < 0.5
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    assert out.dtype == np.uint8 and out.shape == GREY.shape


def test_contrast_blur_occlude():
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[8:16, 8:16] = 200
    low = corrupt_image(img, "contrast:0.5").astype(np.float64)
    m = img.mean()
    assert np.abs(low - (m + 0.5 * (img - m))).max() <= 0.5
    blurred = corrupt_image(img, "blur:1").astype(np.float64)
    assert abs(blurred.mean() - img.mean()) < 1.0 and blurred.std() < img.std()
    assert np.array_equal(corrupt_image(img, "blur:0"), img)
    assert np.array_equal(corrupt_image(img, "occlude:0"), img)
    assert not corrupt_image(img, "occlude:1").any()
    occluded = corrupt_image(np.full((64, 64, 3), 255, np.uint8), "occlude:0.5", key=(3,))
    blocks = occluded[::4, ::4, 0] == 0  # 4x4 blocks are all-or-nothing
    assert np.array_equal(np.repeat(np.repeat(blocks, 4, 0), 4, 1), occluded[..., 0] == 0)
    assert 0.3 < blocks.mean() < 0.7


@pytest.mark.parametrize("snr", [-5.0, 0.0, 12.5, 30.0])
def test_snr_is_exact(snr):
    clean = _tone()
    noisy = corrupt_audio(clean, f"snr:{snr}", key=(0, 1))
    noise = noisy.astype(np.float64) - clean
    measured = 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(noise**2))
    assert abs(measured - snr) < 0.01
    assert noisy.dtype == np.float32 and abs(noise.mean()) < 0.05 * noise.std()


def test_attenuate_and_dropout():
    clean = _tone()
    assert np.allclose(corrupt_audio(clean, "attenuate:20"), clean * 0.1, atol=1e-7)
    dropped = corrupt_audio(clean, "dropout:0.5", key=(4,))
    frames = dropped.reshape(-1, 320)
    muted = ~frames.any(axis=1)
    assert 0.3 < muted.mean() < 0.7
    assert np.array_equal(frames[~muted], clean.reshape(-1, 320)[~muted])


# --------------------------------------------------------------------------- determinism and clean data


def test_clean_is_bit_identical():
    for task in ("vision", "audio"):
        a = pope_questions(task, "adversarial", n_items=6)
        b = pope_questions(task, "adversarial", n_items=6, corruption=None)
        c = pope_questions(task, "adversarial", n_items=6, corruption="clean")
        for x, y, z in zip(a, b, c):
            field = "image" if task == "vision" else "audio"
            assert np.array_equal(getattr(x, field), getattr(y, field))
            assert np.array_equal(getattr(x, field), getattr(z, field))
        d1, d2 = description_items(task, n_items=4), description_items(task, n_items=4, corruption=None)
        assert all(np.array_equal(x.image if x.image is not None else x.audio,
                                  y.image if y.image is not None else y.audio) for x, y in zip(d1, d2))


def test_corrupted_sets_are_deterministic_and_keep_labels():
    clean = heldout_items("vision", 5)
    a = heldout_items("vision", 5, corruption="noise:0.3")
    b = heldout_items("vision", 5, corruption="noise:0.3")
    other = heldout_items("vision", 5, corruption="noise:0.3+seed:1")
    for c, x, y, z in zip(clean, a, b, other):
        assert np.array_equal(x.image, y.image) and not np.array_equal(x.image, c.image)
        assert not np.array_equal(x.image, z.image)
        assert (x.digits, x.boxes) == (c.digits, c.boxes)
    # one item, one corrupted image, whatever the split
    splits = pope_splits("vision", n_items=4, corruption="noise:0.3")
    first = {q.item_id: q.image for q in splits["random"]}
    for qs in splits.values():
        assert all(np.array_equal(q.image, first[q.item_id]) for q in qs)
    clean_adversarial = pope_questions("vision", "adversarial", n_items=4)
    assert [(q.label, q.object) for q in splits["adversarial"]] == [(q.label, q.object) for q in clean_adversarial]
    clips = heldout_items("audio", 3, corruption="snr:10")
    again = heldout_items("audio", 3, corruption="snr:10")
    assert all(np.array_equal(x.audio, y.audio) for x, y in zip(clips, again))


# ------------------------------------------------------------------------------------ harness and CLI


def test_run_benchmark_records_corruption():
    decoding = DecodingConfig("greedy", max_new_tokens=2)
    (res,) = run_benchmark("pope", "builtin:digits-llava", decoding, split="adversarial", limit=4, progress=False,
                           corruption="degraded")
    cfg = res.to_dict()["config"]
    assert cfg["corruption"] == str(parse_corruption(DEFAULT_CORRUPTION["digits-llava"])) and cfg["n"] == 4
    (clean,) = run_benchmark("chair", "builtin:tones-qwen2audio", decoding, limit=2, progress=False)
    assert clean.to_dict()["config"]["corruption"] is None
    with pytest.raises(ValueError, match="only to the embedded held-out sets"):
        run_benchmark("pope", "/no/such/checkpoint", decoding, corruption="noise:0.1")
    with pytest.raises(ValueError, match="valid corruptions"):
        run_benchmark("pope", "builtin:digits-llava", decoding, corruption="fog:1")


def test_cli_eval_corruption(tmp_path, capsys):
    out = tmp_path / "pope.json"
    rc = main(["eval", "audio-qa", "--model", "builtin:tones-qwen2audio", "--split", "random", "--limit", "4",
               "--max-new-tokens", "2", "--corruption", "snr:18+seed:1", "--no-progress", "--output", str(out)])
    assert rc == 0
    assert json.loads(out.read_text())["config"]["corruption"] == "snr:18+seed:1"
    rc = main(["eval", "pope", "--model", "builtin:digits-llava", "--limit", "2", "--corruption", "snr:3",
               "--no-progress"])
    assert rc == 2 and "image corruptions are" in capsys.readouterr().err


def test_evaluate_heldout_on_degraded_inputs_is_below_clean():
    """The model-card accuracy helper takes the same corruption; the default degraded condition costs the
    digits model accuracy (measured on a small set: clean is perfect there, degraded is not)."""
    from lime_attr.models import DEFAULT_CORRUPTION, load_builtin
    from lime_attr.models.accuracy import evaluate_heldout

    model, processor = load_builtin("digits-llava")
    clean = evaluate_heldout(model, processor, "digits-llava", n_pope_items=30, n_description_items=4)
    bad = evaluate_heldout(model, processor, "digits-llava", n_pope_items=30, n_description_items=4,
                           corruption=DEFAULT_CORRUPTION["digits-llava"])
    assert bad["pope_random"]["accuracy"] < clean["pope_random"]["accuracy"]
