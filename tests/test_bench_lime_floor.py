"""The cost-floor benchmark computes real answers: its floor passes emit greedy's token."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_lime_floor import floor_update, floor_decoders
from benchmarks.bench_lime_session import _items, time_rounds


@pytest.fixture(scope="module")
def digits():
    from lime_attr.models import load_builtin

    model, processor = load_builtin("digits-llava", attn_implementation="eager")
    return model.eval(), processor


@pytest.mark.parametrize("second_order", [False, True])
def test_floor_emits_greedys_token(digits, second_order):
    """The emission over the cache of the gradient forward is greedy's answer (the floor is an answer, not a
    partial computation)."""
    model, processor = digits
    for enc in _items(model, processor, "digits-llava", 2):
        with torch.no_grad():
            greedy = model(**enc).logits[:, -1].argmax(-1)
        assert torch.equal(floor_update(model, enc, second_order), greedy)


def test_time_rounds_reports_ratios_to_greedy(digits):
    model, processor = digits
    items = _items(model, processor, "digits-llava", 1)

    def greedy() -> None:
        with torch.no_grad():
            model(**items[0])

    runs = {"greedy": greedy, **floor_decoders(model, items)}
    out = time_rounds(runs, len(items), rounds=2)
    assert set(out["ms_per_answer"]) == {"greedy", "floor/first-order", "floor/second-order"}
    assert all(len(v) == 2 for v in out["all_ms"].values())
    assert out["x_greedy"]["floor/first-order"] == pytest.approx(
        out["ms_per_answer"]["floor/first-order"] / out["ms_per_answer"]["greedy"])


def test_width_sweep_builds_growing_models_and_times_every_variant():
    """bench_lime_scale: the language model grows with the width, the prompt has the 64 image tokens, and one
    round of every decoder runs (the LIME variants inside a session)."""
    from benchmarks import bench_lime_scale as scale

    small, inputs = scale.build(64, prompts=1)
    larger, _ = scale.build(128, prompts=1)
    count = lambda m: sum(p.numel() for p in m.model.language_model.parameters())  # noqa: E731
    assert count(larger) > 3 * count(small)
    assert int((inputs[0]["input_ids"] == scale.IMAGE_TOKEN).sum()) == 64
    out = scale.run_width(64, prompts=1, rounds=1)
    assert set(out["x_greedy"]) == {"greedy", *scale.VARIANTS}
