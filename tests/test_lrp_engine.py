"""The relevance engine (issue 13, item 4): one forward + one rule-modified backward + x * g that every
adapter calls; LRP.attribute's Captum conventions; the one modality share; family facts in the canonizer
files; the import graph of attribution/ (no lrp <-> exact cycle) and no family names outside canonizers/."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lime_attr import LRP, LayerLRP, LRPScope
from lime_attr.attribution.engine import FirstLayerRuleError, Relevance, relevance
from lime_attr.canonizers import available_canonizers, facts_for
from lime_attr.canonizers.facts import DEFAULT_FACTS, FamilyFacts, find_decoder, find_language_model, uses_mrope
from lime_attr.composites import Composite
from lime_attr.modality import modality_share
from lime_attr.rules import Epsilon

SRC = Path(__file__).resolve().parents[1] / "src" / "lime_attr"


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()


def test_engine_equals_lrp_and_conserves():
    """The engine's relevance is LRP.attribute's; with LRP-0 and no biases it sums to the output."""
    net = _net()
    for m in net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.bias)
    x = torch.randn(3, 4, dtype=torch.float64)
    lrp0 = Composite([("site:layer", Epsilon(0.0)), ("site:activation", "identity")], name="lrp-0")
    res = relevance(LRPScope(net, lrp0, None), lambda x: net(x)[:, 1], [x])
    assert isinstance(res, Relevance)
    attr, delta = LRP(net, lrp0, None).attribute(x, target=1, return_convergence_delta=True)
    torch.testing.assert_close(res.inputs[0], attr, rtol=0, atol=0)
    torch.testing.assert_close(res.delta().detach(), delta, rtol=0, atol=0)
    torch.testing.assert_close(res.inputs[0].sum(1), net(x)[:, 1].detach(), rtol=1e-12, atol=1e-12)


def test_lrp_return_conventions():
    """Tensor in -> tensor out, tuple in -> tuple out; the delta and the latent dict are appended."""
    net = _net()
    x = torch.randn(2, 4, dtype=torch.float64)
    lrp = LRP(net, "epsilon-plus", None)
    assert isinstance(lrp.attribute(x, target=0), torch.Tensor)
    out = lrp.attribute((x,), target=0)
    assert isinstance(out, tuple) and len(out) == 1
    rel, delta = lrp.attribute(x, target=0, return_convergence_delta=True)
    assert rel.shape == x.shape and delta.shape == (2,)
    rel, delta, lat = lrp.attribute(x, target=0, return_convergence_delta=True, latent=["1"])
    assert set(lat) == {"1"} and lat["1"].shape == (2, 8)


def test_per_output_parts_sum_to_the_joint_relevance():
    """One backward per column (per_output) sums to the one backward of all columns (linearity)."""
    net = _net()
    x = torch.randn(2, 4, dtype=torch.float64)
    scope = LRPScope(net, "epsilon-plus", None)
    joint = relevance(scope, lambda x: net(x)[:, :2], [x])
    parts = relevance(scope, lambda x: net(x)[:, :2], [x], per_output=True)
    assert len(parts.parts) == 2
    torch.testing.assert_close(parts.inputs[0], joint.inputs[0], rtol=1e-12, atol=1e-12)
    single = relevance(scope, lambda x: net(x)[:, 1], [x])
    torch.testing.assert_close(parts.parts[1].inputs[0], single.inputs[0], rtol=0, atol=0)


def test_latent_and_layer_lrp_read_the_same_backward():
    """LayerLRP (a layer as the engine's latent tensor) equals LRP's latent relevance of that module."""
    net = _net()
    x = torch.randn(2, 4, dtype=torch.float64)
    _, lat = LRP(net, "epsilon-plus", None).attribute(x, target=2, latent=["1"])
    layer = LayerLRP(net, net[1], "epsilon-plus", None).attribute(x, target=2)
    torch.testing.assert_close(layer, lat["1"], rtol=0, atol=0)


def test_refused_first_layer_rules_raise_both_error_types():
    net = _net()
    comp = Composite([("first_layer", "flat"), ("site:layer", Epsilon(0.0)), ("site:activation", "identity")],
                     name="flat-first")
    x = torch.randn(2, 4, dtype=torch.float64)
    for error in (ValueError, TypeError, FirstLayerRuleError):
        with pytest.raises(error, match="first-layer"):
            relevance(LRPScope(net, comp, None), lambda x: net(x)[:, 0], [x], carriers="refuse")
    # "add": the carriers' relevance goes to the input (what LRP does)
    rel = relevance(LRPScope(net, comp, None), lambda x: net(x)[:, 0], [x]).inputs[0]
    torch.testing.assert_close(rel, LRP(net, comp, None).attribute(x, target=0), rtol=0, atol=0)


def test_engine_option_errors():
    net = _net()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="second_order"):
        relevance(LRPScope(net, "epsilon-plus", None), lambda x: net(x)[:, 0], [x], second_order="double")
    with pytest.raises(ValueError, match="latent"):
        relevance(LRPScope(net, "epsilon-plus", None), lambda x: net(x)[:, 0], [x], second_order="exact",
                  latent=["1"])


def test_modality_share_is_the_written_formula():
    torch.manual_seed(1)
    r = torch.randn(3, 7, dtype=torch.float64)
    m = torch.rand(3, 7) > 0.5
    valid = torch.rand(3, 7) > 0.2
    a = r.abs() * valid
    torch.testing.assert_close(modality_share(r, m, valid), (a * m).sum(-1) / a.sum(-1))
    s = r * valid
    torch.testing.assert_close(modality_share(r, m, valid, signed=True), (s * m).sum(-1) / s.sum(-1))
    assert float(modality_share(torch.zeros(1, 3), torch.ones(1, 3))) == 0.0  # no relevance: 0, not nan
    from lime_attr.mitigation.optimizer import modality_share as compat

    assert compat is modality_share


def test_family_facts_live_in_the_canonizer_files():
    """Every multimodal family declares its facts on its canonizer; text and unknown types get the defaults."""
    assert facts_for("qwen2_vl").pixel_layout == "flattened_patches" and facts_for("qwen2_vl").rope == "mrope"
    assert facts_for("qwen2_5_vl").rope == "mrope"
    assert facts_for("llava").pixel_layout == "images" and facts_for("llava_next").pixel_layout == "tiles"
    audio = facts_for("qwen2_audio")
    assert audio.audio_markers_required and audio.audio_feature_mask
    assert facts_for("llama") is DEFAULT_FACTS and facts_for("no-such-family") is DEFAULT_FACTS
    assert facts_for(torch.nn.Linear(2, 2)) is DEFAULT_FACTS
    with pytest.raises(ValueError, match="pixel_layout"):
        FamilyFacts(pixel_layout="diagonal")


def test_decoder_and_language_model_discovery():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    assert find_decoder(model) is model.model
    assert not uses_mrope(model)
    with pytest.raises(TypeError, match="cannot find the language model"):
        find_language_model(model)
    with pytest.raises(TypeError, match="decoder layers"):
        find_decoder(torch.nn.Linear(2, 2))


def _imports(path: Path) -> list[str]:
    """Every module a file imports, function-local imports included (relative ones resolved)."""
    package = ".".join(("lime_attr",) + path.relative_to(SRC).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out += [mod] + [f"{mod}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_exact_and_engine_do_not_import_the_adapters():
    """The lrp <-> exact cycle is gone: the engine, exact and checks import no adapter module."""
    adapters = {"lime_attr.attribution.lrp", "lime_attr.attribution.layer", "lime_attr.attribution.modality"}
    for name in ("engine", "exact", "checks", "latent"):
        imported = set(_imports(SRC / "attribution" / f"{name}.py"))
        assert not imported & adapters, (name, imported & adapters)


def test_no_family_name_is_tested_outside_canonizers():
    """No comparison against a registered model_type outside canonizers/ (the facts say it instead)."""
    families = set(available_canonizers())
    files = [SRC / "modality.py", SRC / "generation.py", *(SRC / "attribution").glob("*.py"),
             *(SRC / "mitigation").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                assert not any(isinstance(c, str) and c in families for c in consts), (path.name, node.lineno)
