"""The decoding-method registry: the built-in methods, clear errors, strict JSON, and a custom toy method
through ``generation.generate``, the registry's ``decode``, the evaluation harness, the CLI and the report."""
from __future__ import annotations

import json
import pickle
from dataclasses import dataclass

import pytest
import torch
from transformers import LogitsProcessor

from lime_attr.errors import UnknownNameError
from lime_attr.generation import DecodingConfig, GenerationResult, generate, prepare_inputs
from lime_attr.mitigation import (
    DecodingMethod,
    DecodingMethodConfig,
    GreedyConfig,
    LimeMethodConfig,
    SampleConfig,
    UnknownDecodingMethodError,
    VCDConfig,
    available_decoding_methods,
    decode,
    get_decoding_method,
    register_decoding_method,
    unregister_decoding_method,
)
from lime_attr.mitigation.greedy import transformers_generate

models = pytest.importorskip("lime_attr.models")
needs_weights = pytest.mark.skipif("digits-llava" not in models.available_builtins(),
                                   reason="demo weights not installed")


def test_builtin_methods_are_registered_one_module_each():
    assert available_decoding_methods()[:4] == ["greedy", "sample", "vcd", "lime"]
    types = {n: get_decoding_method(n).config_type for n in ("greedy", "sample", "vcd", "lime")}
    assert types == {"greedy": GreedyConfig, "sample": SampleConfig, "vcd": VCDConfig, "lime": LimeMethodConfig}
    modules = {get_decoding_method(n).generate.__module__ for n in types}
    assert modules == {"lime_attr.mitigation.greedy", "lime_attr.mitigation.sampling",
                       "lime_attr.mitigation.vcd_method", "lime_attr.mitigation.lime_method"}


def test_unknown_method_lists_the_registered_ones():
    with pytest.raises(UnknownNameError, match="unknown decoding method 'nope'; choose one of greedy, sample, "
                                               "vcd, lime") as exc:
        get_decoding_method("nope")
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, UnknownDecodingMethodError)
    with pytest.raises(ValueError, match="unknown decoding method 'nope'"):
        DecodingConfig("nope")


def test_register_refuses_duplicates_and_bad_methods():
    greedy = get_decoding_method("greedy")
    assert register_decoding_method(greedy) is greedy  # the same object again: a no-op
    with pytest.raises(ValueError, match="already registered"):
        register_decoding_method(DecodingMethod("greedy", GreedyConfig, greedy.generate))
    with pytest.raises(TypeError, match="expects a DecodingMethod"):
        register_decoding_method("greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        DecodingMethod("", GreedyConfig, greedy.generate)

    @dataclass
    class Mutable:
        max_new_tokens: int = 1

    with pytest.raises(TypeError, match="config_type must be a frozen dataclass"):
        DecodingMethod("mutable", Mutable, greedy.generate)
    with pytest.raises(TypeError, match="generate must be callable"):
        DecodingMethod("broken", GreedyConfig, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="takes a GreedyConfig, got SampleConfig"):
        decode(None, None, {}, "greedy", SampleConfig())  # type: ignore[arg-type]


@pytest.mark.parametrize("make,match", [
    (lambda: GreedyConfig(max_new_tokens=0), "max_new_tokens must be an int >= 1"),
    (lambda: SampleConfig(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (lambda: SampleConfig(temperature=float("nan")), "temperature must be a finite number > 0"),
    (lambda: VCDConfig(alpha=-1.0), "VCD alpha must be a number >= 0"),
    (lambda: VCDConfig(beta=2.0), r"VCD beta must be in \[0, 1\]"),
    (lambda: VCDConfig(noise_step=1000), "noise step must be in"),
    (lambda: LimeMethodConfig(mode="slow"), "LIME mode must be 'fast', 'reference' or 'incremental'"),
    (lambda: LimeMethodConfig(overrides={"no_such_field": 1}), r"LIME overrides \['no_such_field'\]"),
    (lambda: DecodingConfig("greedy", do_sample=True), "greedy decoding does not sample"),
])
def test_method_configs_are_validated(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_configs_are_frozen_picklable_and_strict_json():
    cfgs = [DecodingConfig(m, max_new_tokens=3, lime_overrides={"lr": 0.5} if m == "lime" else {}).method_config()
            for m in ("greedy", "sample", "vcd", "lime")]
    assert [type(c) for c in cfgs] == [GreedyConfig, SampleConfig, VCDConfig, LimeMethodConfig]
    assert cfgs[3].mode == "fast" and cfgs[3].overrides == {"lr": 0.5} and cfgs[2].alpha == 1.0
    assert DecodingConfig("vcd", vcd_alpha=2.0, method_options={"beta": 0.2}).method_config() == \
        VCDConfig(alpha=2.0, beta=0.2)
    assert DecodingConfig("lime", method_options={"mode": "reference"}).method_config().mode == "reference"
    assert "method_options" not in DecodingConfig("lime").to_dict()
    for c in cfgs:
        assert pickle.loads(pickle.dumps(c)) == c
        assert json.loads(json.dumps(c.to_dict(), allow_nan=False)) == c.to_dict()
        with pytest.raises(AttributeError):
            c.max_new_tokens = 5  # type: ignore[misc]

    @dataclass(frozen=True)
    class WithFloat(DecodingMethodConfig):
        margin: float = float("nan")
        spread: tuple = (1.0, float("inf"))

    assert WithFloat().to_dict() == {"max_new_tokens": 8, "margin": None, "spread": [1.0, None]}


# ------------------------------------------------------------------------------ a custom toy method


@dataclass(frozen=True)
class AlwaysConfig(DecodingMethodConfig):
    """Greedy with a fixed bias on the first token of ``word``: with a large bias the model says ``word``."""

    word: str = "yes"
    bias: float = 1e4

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.word, str) or not self.word:
            raise ValueError(f"word must be a non-empty str, got {self.word!r}")


class _Bias(LogitsProcessor):
    def __init__(self, token: int, bias: float) -> None:
        self.token, self.bias = token, bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        scores[:, self.token] += self.bias
        return scores


def always_generate(model, processor, inputs, config: AlwaysConfig) -> GenerationResult:
    tok = getattr(processor, "tokenizer", processor)
    token = tok.encode(config.word, add_special_tokens=False)[0]
    return transformers_generate(model, processor, inputs, config.max_new_tokens, do_sample=False,
                                 logits_processor=[_Bias(token, config.bias)])


TOY = DecodingMethod("toy", AlwaysConfig, always_generate, description="greedy, biased towards one word")


@pytest.fixture
def toy():
    register_decoding_method(TOY)
    yield TOY
    unregister_decoding_method(TOY.name)
    assert TOY.name not in available_decoding_methods()
    with pytest.raises(UnknownNameError, match="unknown decoding method 'toy'"):
        DecodingConfig("toy")


@pytest.fixture(scope="module")
def digits():
    if "digits-llava" not in models.available_builtins():
        pytest.skip("demo weights not installed")
    model, processor = models.load_model("builtin:digits-llava")
    item = models.pope_questions("digits-llava", "random", n_items=2)[0]
    enc = prepare_inputs(model, processor, [item.prompt], images=[item.image])
    return model, processor, enc


@needs_weights
def test_generate_dispatches_through_the_registry(digits):
    model, processor, enc = digits
    via_config = generate(model, processor, enc, DecodingConfig("greedy", max_new_tokens=3))
    via_registry = decode(model, processor, enc, "greedy", GreedyConfig(max_new_tokens=3))
    with torch.no_grad():
        plain = model.generate(**enc, max_new_tokens=3, do_sample=False)[:, enc["input_ids"].shape[1]:]
    assert via_config.tokens == via_registry.tokens == [plain[0].tolist()]
    assert via_config.seconds > 0 and via_config.texts == via_registry.texts


@needs_weights
def test_custom_method_runs_through_generate(toy, digits):
    model, processor, enc = digits
    yes = processor.tokenizer.encode("yes", add_special_tokens=False)[0]
    res = generate(model, processor, enc, DecodingConfig("toy", max_new_tokens=2))
    assert res.tokens == [[yes, yes]] and res.seconds > 0
    assert DecodingConfig("toy", max_new_tokens=2).to_dict() == {"method": "toy", "max_new_tokens": 2,
                                                                 "do_sample": False, "seed": 0}
    no = processor.tokenizer.encode("no", add_special_tokens=False)[0]
    cfg = DecodingConfig("toy", max_new_tokens=2, method_options={"word": "no", "bias": float("inf")})
    assert cfg.method_config() == AlwaysConfig(max_new_tokens=2, word="no", bias=float("inf"))
    assert cfg.to_dict()["method_options"] == {"word": "no", "bias": None}  # strict JSON
    cfg = DecodingConfig("toy", max_new_tokens=2, method_options={"word": "no"})
    assert generate(model, processor, enc, cfg).tokens == [[no, no]]
    with pytest.raises(ValueError, match=r"method_options \['wrod'\] are not fields of AlwaysConfig"):
        DecodingConfig("toy", method_options={"wrod": "no"})
    with pytest.raises(ValueError, match="word must be a non-empty str"):
        DecodingConfig("toy", method_options={"word": ""})
    unbiased = decode(model, processor, enc, "toy", AlwaysConfig(max_new_tokens=2, bias=0.0))
    assert unbiased.tokens == generate(model, processor, enc, DecodingConfig("greedy", max_new_tokens=2)).tokens


@needs_weights
def test_custom_method_runs_through_the_harness(toy):
    from lime_attr.evaluation.harness import run_benchmark

    (res,) = run_benchmark("pope", "builtin:digits-llava", DecodingConfig("toy", max_new_tokens=1), split="random",
                           limit=4, progress=False)
    d = res.to_dict()
    assert d["config"]["decoding"] == {"method": "toy", "max_new_tokens": 1, "do_sample": False, "seed": 0}
    assert d["metrics"]["yes_ratio"] == 1.0  # the toy always says yes
    assert d["counts"]["n"] == 4


@needs_weights
def test_custom_method_runs_through_the_cli(toy, tmp_path, capsys):
    from lime_attr.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "toy: greedy, biased towards one word" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "toy.json"
    rc = main(["eval", "pope", "--model", "builtin:digits-llava", "--method", "toy", "--split", "random",
               "--limit", "2", "--max-new-tokens", "1", "--no-progress", "--output", str(out)])
    assert rc == 0
    assert "yes_ratio=1.0000" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["config"]["decoding"]["method"] == "toy"


def test_cli_refuses_an_unregistered_method(capsys):
    from lime_attr.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "pope", "--model", "builtin:digits-llava", "--method", "toy"])
    assert exc.value.code == 2
    assert "invalid choice: 'toy'" in capsys.readouterr().err


def test_report_reads_its_methods_from_the_registry(toy):
    from benchmarks import hallucination_report as hr

    settings = hr.Settings()
    assert hr.decoding_config("toy", settings, 2).to_dict()["method"] == "toy"
    assert hr.method_description("toy") == "greedy, biased towards one word"
    assert hr.decoding_config("lime-reference-lr10x", settings, 2).lime_mode == "reference"
    with pytest.raises(UnknownNameError, match="unknown decoding method 'nope'"):
        hr.decoding_config("nope-fast", settings, 2)
