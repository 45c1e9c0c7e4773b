"""The ``lime-attr`` command on the embedded demo models: outputs, files and clear errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lime_attr.cli import build_parser, main

pytest.importorskip("lime_attr.models")
from lime_attr.models import available_builtins, pope_questions  # noqa: E402

pytestmark = pytest.mark.skipif("digits-llava" not in available_builtins(), reason="demo weights not installed")


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    from PIL import Image

    q = pope_questions("digits-llava", "random")[0]
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(q.image).save(path)
    return path, q


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "explain", "generate", "eval"):
        assert cmd in out
    for cmd in ("demo", "explain", "generate", "eval"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([cmd, "--help"])


def test_explain_writes_json_html_and_heatmap(scene, tmp_path, capsys):
    path, q = scene
    rc = main(["explain", "--model", "builtin:digits-llava", "--image", str(path), "--prompt", q.question,
               "--output-dir", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "relevance by modality" in out and "image" in out
    data = json.loads((tmp_path / "explain.json").read_text())
    assert 0.0 <= data["modality_reliance"] <= 1.0
    assert abs(sum(data["shares"][k] for k in data["shares"] if k != "all") - 1.0) < 1e-6 or "all" in data["shares"]
    png = tmp_path / "heatmap_0.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "tokens.html").read_text().count("<span") >= 5


@pytest.mark.parametrize("method", ["greedy", "vcd", "lime"])
def test_generate_records_answer_and_config(scene, tmp_path, method, capsys):
    path, q = scene
    out_file = tmp_path / "answer.json"
    rc = main(["generate", "--model", "builtin:digits-llava", "--image", str(path), "--prompt", "List the digits.",
               "--method", method, "--max-new-tokens", "4", "--output", str(out_file)])
    assert rc == 0
    rec = json.loads(out_file.read_text())
    assert rec["decoding"]["method"] == method and rec["text"] == capsys.readouterr().out.strip()
    assert len(rec["tokens"]) >= 1
    shares = rec["token_shares"]
    assert len(shares["tokens"]) == len(shares["before"]) == len(rec["tokens"])
    # LIME measures only the tokens it optimised (gated ones are null); the others explain every token
    measured = [v for v in shares["before"] if v is not None]
    assert all(0.0 <= v <= 1.0 for v in measured) and (method == "lime" or len(measured) == len(rec["tokens"]))
    assert (shares["after"] is not None) == (method == "lime")
    png = out_file.with_suffix(".png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_eval_pope_json_has_standard_names(tmp_path):
    out_file = tmp_path / "pope.json"
    rc = main(["eval", "pope", "--model", "builtin:digits-llava", "--split", "adversarial", "--limit", "8",
               "--output", str(out_file), "--no-progress"])
    assert rc == 0
    data = json.loads(out_file.read_text())
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        assert key in data["metrics"]
    assert data["config"]["decoding"]["method"] == "greedy" and data["config"]["n"] == 8
    assert data["config"]["split"] == "adversarial"
    assert out_file.with_suffix(".csv").read_text().count("\n") >= 2
    assert out_file.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_eval_audio_qa_builtin_parses_every_answer(tmp_path):
    """The audio demo model answers a bare lower-case "no"; the builtin default parser (strict) parses it, where
    the case-sensitive kuan2024 rule would leave it unparsed (and count it wrong)."""
    out_file = tmp_path / "aqa.json"
    rc = main(["eval", "audio-qa", "--model", "builtin:tones-qwen2audio", "--split", "random", "--limit", "8",
               "--output", str(out_file), "--no-progress"])
    assert rc == 0
    data = json.loads(out_file.read_text())
    assert data["parser"]["name"] == "strict"
    assert data["counts"]["unparsed"] == 0 and data["metrics"]["accuracy"] > 0.7
    rc = main(["eval", "audio-qa", "--model", "builtin:tones-qwen2audio", "--split", "random", "--limit", "8",
               "--parser", "kuan2024", "--output", str(out_file), "--no-progress"])
    assert rc == 0 and json.loads(out_file.read_text())["counts"]["unparsed"] > 0


@pytest.mark.parametrize("argv, message", [
    (["eval", "pope", "--model", "builtin:digits-llava", "--parser", "nope", "--limit", "2"], "nope"),
    (["generate", "--model", "builtin:digits-llava", "--image", "missing.png", "--prompt", "x"], "no such file"),
    (["explain", "--model", "builtin:digits-llava", "--prompt", "x"], "--image PATH or --audio PATH"),
    (["eval", "pope", "--model", "builtin:digits-llava", "--split", "weird"], "unknown split"),
    (["eval", "pope", "--model", "builtin:tones-qwen2audio", "--limit", "2"], "vision demo model"),
    (["eval", "pope", "--model", "builtin:no-such-model"], "unknown builtin model"),
])
def test_bad_input_exits_2_with_message(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_generate_rejects_bad_decoding(scene, capsys):
    path, _ = scene
    rc = main(["generate", "--model", "builtin:digits-llava", "--image", str(path), "--prompt", "x",
               "--temperature", "0"])
    assert rc == 2 and "temperature" in capsys.readouterr().err


def test_device_map_auto_loads_a_checkpoint_folder_through_accelerate(tmp_path, monkeypatch):
    """``--device-map auto`` reaches ``from_pretrained(device_map="auto")`` (accelerate) for a checkpoint folder
    (here the shipped demo weights: the same path a hub checkpoint takes); the model answers like the builtin."""
    from importlib.resources import files

    import lime_attr.cli as cli
    import lime_attr.models as models
    from lime_attr.models import pope_questions

    folder = str(files("lime_attr.models") / "weights" / "digits-llava")
    seen = []
    real = models.load_model

    def spy(spec, *a, **kw):
        seen.append(kw)
        return real(spec, *a, **kw)

    monkeypatch.setattr(models, "load_model", spy)
    args = cli.build_parser().parse_args(["generate", "--model", folder, "--device-map", "auto", "--prompt", "x"])
    model, processor = cli._load_args(args)
    builtin, _ = cli._load("builtin:digits-llava", device_map="auto")
    assert seen[0].get("device_map") == "auto" and "device_map" not in seen[1]
    q = pope_questions("vision", "random")[0]
    enc = processor(text=q.prompt, images=q.image, return_tensors="pt")
    assert torch.equal(model.generate(**enc, max_new_tokens=2, do_sample=False),
                       builtin.generate(**enc, max_new_tokens=2, do_sample=False))
    with pytest.raises(cli.CLIError, match="applies only to the embedded"):
        cli.cmd_eval(cli.build_parser().parse_args(
            ["eval", "pope", "--model", str(tmp_path / "none"), "--corruption", "noise:0.3"]))


def test_demo_quick_writes_its_outputs_and_measures_lime_shares(tmp_path):
    """The README's main job (quick variant): every output file, and LIME's shares measured for every question
    (reference mode optimises each answer token), on prior-breaking (conflict) questions about clean images."""
    import math

    from lime_attr.models import task_prior

    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    for name in ("heatmap.png", "tokens.html", "lime_vs_greedy.json", "mini_pope.json", "mini_pope.csv",
                 "heatmap_before.png", "heatmap_after.png", "prior_probes.json"):
        assert (tmp_path / name).stat().st_size > 0
    probes = json.loads((tmp_path / "prior_probes.json").read_text())
    assert probes["n"] == 50 and set(probes["accuracy"]) == {"conflict", "consistent_yes", "consistent_no", "control"}
    rows = json.loads((tmp_path / "lime_vs_greedy.json").read_text())
    prior = task_prior("digits-llava")
    assert len(rows) == 3
    for r in rows:
        assert r["label"] == "no" and any(prior.partner_of(o) == r["object"] for o in r["present"])
        assert math.isfinite(r["share_before"]) and math.isfinite(r["share_after"])


def test_generate_takes_the_lime_objective_recommended_and_fields(scene, tmp_path, capsys):
    path, q = scene
    out_file = tmp_path / "answer.json"
    rc = main(["generate", "--model", "builtin:digits-llava", "--image", str(path), "--prompt", q.question,
               "--method", "lime", "--lime-recommended", "--lime-objective", "decision", "--lime-set", "lr=0.003",
               "--lime-set", "confidence_gate=null", "--max-new-tokens", "1", "--output", str(out_file)])
    assert rc == 0
    decoding = json.loads(out_file.read_text())["decoding"]
    assert decoding["lime_overrides"] == {"lr": 0.003, "confidence_gate": None, "objective": "decision"}
    assert decoding["method_options"] == {"recommended": True}
    from lime_attr.generation import DecodingConfig
    from lime_attr.models import load_builtin

    cfg = DecodingConfig(method="lime", lime_overrides=decoding["lime_overrides"],
                         method_options={"recommended": True}).method_config()
    lime = cfg.lime_config(load_builtin("digits-llava")[0])
    assert (lime.objective, lime.lr, lime.confidence_gate, lime.mode) == ("decision", 0.003, None, "fast")


@pytest.mark.parametrize("extra, message", [
    (["--lime-set", "lr"], "expected FIELD=VALUE"),
    (["--lime-set", "no_such_field=1"], "no_such_field"),
    (["--lime-set", "second_order=cubic"], "second_order"),
    (["--method", "greedy", "--lime-objective", "decision"], "apply to --method lime only"),
])
def test_generate_rejects_bad_lime_flags_before_loading(scene, extra, message, capsys):
    path, q = scene
    argv = ["generate", "--model", "builtin:digits-llava", "--image", str(path), "--prompt", q.question]
    rc = main(argv + (["--method", "lime"] if "--method" not in extra else []) + extra)
    assert rc == 2 and message in capsys.readouterr().err
