"""Bad input to ``lime-attr`` (issue 16): exit status 2 and a one-line message naming the problem; strict JSON."""
from __future__ import annotations

import json
import math
import wave

import numpy as np
import pytest

from lime_attr import __version__
from lime_attr.cli import generation_figure, main

pytest.importorskip("lime_attr.models")
from lime_attr.models import available_builtins, pope_questions  # noqa: E402

pytestmark = pytest.mark.skipif("digits-llava" not in available_builtins(), reason="demo weights not installed")

IMG = "builtin:digits-llava"
AUD = "builtin:tones-qwen2audio"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    q = pope_questions("digits-llava", "random")[0]
    Image.fromarray(q.image).save(root / "scene.png")
    (root / "notes.txt").write_text("not an image\n")
    with wave.open(str(root / "clip.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.random.default_rng(0).standard_normal(16000) * 3000).astype("<i2").tobytes())
    return root


def strict_loads(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def run(argv, capsys):
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"lime-attr {__version__}"


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "x", "--top-p", "2"],
     "top_p must be in (0, 1]"),
    (["generate", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "x", "--top-k", "-1"],
     "top_k must be an int >= 1"),
    (["eval", "pope", "--model", IMG, "--limit", "-1"], "limit must be a positive number"),
    (["eval", "pope", "--model", IMG, "--questions", "{media}/notes.txt", "--limit", "2"],
     "--questions would be ignored"),
    (["explain", "--model", IMG, "--image", "{media}/notes.txt", "--prompt", "x", "--output-dir", "{tmp}"],
     "not an image file that can be read"),
    (["explain", "--model", IMG, "--audio", "{media}/clip.wav", "--prompt", "x", "--output-dir", "{tmp}"],
     "--audio given, but the model (llava) takes image input: use --image PATH"),
    (["explain", "--model", AUD, "--image", "{media}/scene.png", "--prompt", "x", "--output-dir", "{tmp}"],
     "--image given, but the model (qwen2_audio) takes audio input: use --audio PATH"),
    (["explain", "--model", AUD, "--audio", "{media}/notes.txt", "--prompt", "x", "--output-dir", "{tmp}"],
     "not a PCM WAV file"),
    (["explain", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "x", "--composite", "nope",
      "--output-dir", "{tmp}"], "unknown composite 'nope'"),
    (["explain", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "x", "--top", "-3",
      "--output-dir", "{tmp}"], "--top must be a positive integer, got -3"),
    (["explain", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "what is this?", "--raw-prompt",
      "--output-dir", "{tmp}"], "--raw-prompt: the prompt must contain the model's image placeholder"),
    (["demo", "--output-dir", "/proc/x"], "--output-dir /proc/x: cannot write there"),
    (["explain", "--model", IMG, "--image", "{media}/scene.png", "--prompt", "x", "--output-dir", "/proc/x"],
     "--output-dir /proc/x: cannot write there"),
], ids=["top-p", "top-k", "limit", "questions-builtin", "text-as-image", "audio-on-image-model",
        "image-on-audio-model", "text-as-audio", "composite", "top", "raw-prompt", "demo-output-dir",
        "explain-output-dir"])
def test_bad_input_exits_2_with_one_line(argv, message, media, tmp_path, capsys):
    argv = [a.format(media=media, tmp=tmp_path) for a in argv]
    rc, err = run(argv, capsys)
    assert rc == 2, err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and lines[0].startswith(f"lime-attr {argv[0]}: error: "), err  # progress bars aside
    assert message in lines[0]


def test_generate_lime_json_is_strict(media, tmp_path, capsys):
    out = tmp_path / "answer.json"
    rc = main(["generate", "--model", IMG, "--image", str(media / "scene.png"), "--prompt", "List the digits.",
               "--method", "lime", "--max-new-tokens", "4", "--output", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    rec = strict_loads(text)
    assert len(rec["token_shares"]["before"]) == len(rec["tokens"])


def test_explain_json_is_strict_and_names_signed_and_absolute_shares(media, tmp_path, capsys):
    rc = main(["explain", "--model", IMG, "--image", str(media / "scene.png"), "--prompt", "Is there a 7?",
               "--output-dir", str(tmp_path)])
    assert rc == 0
    data = strict_loads((tmp_path / "explain.json").read_text())
    assert set(data["shares"]) == set(data["shares_abs"])
    assert abs(sum(data["shares"].values()) - 1.0) < 1e-6 and abs(sum(data["shares_abs"].values()) - 1.0) < 1e-6
    assert all(0.0 <= v <= 1.0 for v in data["shares_abs"].values())
    assert abs(data["shares_abs"]["image"] - data["modality_reliance"]) < 1e-9


def testgeneration_figure_has_a_legend_entry_for_gated_tokens():
    import matplotlib.pyplot as plt

    fig = generation_figure(["a", "b", "c"], [0.3, float("nan"), None], [0.5, float("nan"), None], "t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert any(label.startswith("gated") for label in labels), labels
    fig = generation_figure(["a"], [0.3], None, "t")
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    plt.close(fig)
    assert not any(label.startswith("gated") for label in labels)
    assert not math.isnan(0.3)
