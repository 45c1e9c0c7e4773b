"""Bad input to the Python API (issue 16): each case a clear error naming the problem, never a silent result.

Multimodal cases use the demo models' architectures and processors with random weights (built from
configs, no weights loaded); text cases use tiny config models.
"""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from lime_attr import (LRP, Composite, LayerLRP, LimeConfig, ModalityAttribution, get_composite, grounding_score,
                       lime_generate, register_composite)
from lime_attr.errors import ModelStateError, RuleSiteError, UnsupportedModelError
from lime_attr.metrics import breakdown, top_tokens
from lime_attr.models.architectures import build_model
from lime_attr.models.processing import (build_digits_processor, build_tones_processor, description_question,
                                         format_prompt)
from lime_attr.models.scenes import CANVAS_SIZE
from lime_attr.models.sounds import CLIP_SECONDS

DT = torch.float64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=32)
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(DT).eval()


def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(DT).eval()


def embeds(model: nn.Module, ids=((1, 5, 7, 2, 9),)) -> torch.Tensor:
    return model.get_input_embeddings()(torch.tensor(ids)).detach()


@pytest.fixture(scope="module")
def llava():
    proc = build_digits_processor()
    return build_model("digits-llava", proc.tokenizer, seed=0).eval(), proc


@pytest.fixture(scope="module")
def audio():
    proc = build_tones_processor()
    return build_model("tones-qwen2audio", proc.tokenizer, seed=0).eval(), proc


def llava_inputs(proc) -> dict:
    image = (np.random.default_rng(0).random((CANVAS_SIZE, CANVAS_SIZE, 3)) * 255).astype("uint8")
    text = format_prompt("digits-llava", description_question("digits-llava"))
    return dict(proc(images=[image], text=[text], return_tensors="pt"))


def audio_inputs(proc) -> dict:
    wave = np.random.default_rng(0).standard_normal(int(16000 * CLIP_SECONDS)).astype("float32") * 0.1
    text = format_prompt("tones-qwen2audio", description_question("tones-qwen2audio"))
    return dict(proc(audio=[wave], text=[text], return_tensors="pt", sampling_rate=16000))


def without(d: dict, *keys: str) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


# ------------------------------------------------------------------ perceptual inputs (silent before)


def test_llava_without_pixel_values(llava):
    model, proc = llava
    enc = without(llava_inputs(proc), "pixel_values")
    with pytest.raises(ValueError, match="image placeholder tokens but the inputs hold no 'pixel_values'"):
        ModalityAttribution(model, proc).attribute(enc)
    with pytest.raises(ValueError, match="lime_generate: .*no 'pixel_values'"):
        lime_generate(model, proc, enc, LimeConfig(steps=1), max_new_tokens=1)


def test_qwen2_audio_without_input_features(audio):
    model, proc = audio
    enc = without(audio_inputs(proc), "input_features", "feature_attention_mask")
    with pytest.raises(ValueError, match="audio placeholder tokens but the inputs hold no 'input_features'"):
        ModalityAttribution(model, proc).attribute(enc)
    with pytest.raises(ValueError, match="no 'input_features'"):
        lime_generate(model, proc, enc, LimeConfig(steps=1), max_new_tokens=1)


def test_qwen2_audio_without_feature_attention_mask(audio):
    model, proc = audio
    enc = without(audio_inputs(proc), "feature_attention_mask")
    with pytest.raises(ValueError, match="need 'feature_attention_mask'"):
        ModalityAttribution(model, proc).attribute(enc)


def test_another_models_processor_output(llava, audio):
    model, proc = llava
    enc = audio_inputs(audio[1])  # the tones processor's output fed to the digits-llava model
    with pytest.raises(ValueError, match="processor"):
        ModalityAttribution(model, proc).attribute(enc)
    enc_img = dict(llava_inputs(proc), input_features=enc["input_features"])
    with pytest.raises(ValueError, match="hold 'input_features' .* takes no audios.*another model's processor"):
        ModalityAttribution(model, proc).attribute(enc_img)


@pytest.mark.parametrize("mode", ["fast", "reference"])
def test_nan_pixel_values(llava, mode):
    model, proc = llava
    enc = llava_inputs(proc)
    enc["pixel_values"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'pixel_values' contains 1 NaN/inf"):
        lime_generate(model, proc, enc, LimeConfig(steps=2, mode=mode), max_new_tokens=1)
    with pytest.raises(ValueError, match="input 'pixel_values' contains 1 NaN/inf"):
        ModalityAttribution(model, proc).attribute(enc)


# ------------------------------------------------------------------ LRP on HF models


def test_right_padded_mask_is_refused():
    model = tiny_llama()
    emb = embeds(model, ((1, 5, 7, 2, 9), (3, 4, 6, 0, 0)))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with pytest.raises(ValueError, match=r"right-padded \(the last position of row\(s\) \[1\] is padding\)"):
        LRP(model).attribute(emb, target=[3, 4], attention_mask=mask)
    # the documented alternative: explain each row's last real position
    rel = LRP(model).attribute(emb, target=[(4, 3), (2, 4)], attention_mask=mask)
    assert rel.shape == emb.shape


def test_target_none_is_the_greedy_token_on_hf_models():
    model = tiny_llama()
    emb = embeds(model)
    greedy = int(model(inputs_embeds=emb).logits[0, -1].argmax())
    torch.testing.assert_close(LRP(model).attribute(emb, target=None), LRP(model).attribute(emb, target=greedy))


def test_numpy_integer_targets():
    model = tiny_llama()
    emb = embeds(model, ((1, 5, 7), (2, 9, 4)))
    ref = LRP(model).attribute(emb, target=[3, 4])
    for target in ([np.int64(3), np.int64(4)], np.array([3, 4]), torch.tensor([3, 4])):
        torch.testing.assert_close(LRP(model).attribute(emb, target=target), ref)
    x = torch.ones(2, 4)
    torch.testing.assert_close(LRP(mlp()).attribute(x, target=np.int64(1)), LRP(mlp()).attribute(x, target=1))
    with pytest.raises(TypeError, match="numpy target must hold integer"):
        LRP(mlp()).attribute(x, target=np.array([0.5, 1.0]))


def test_numpy_target_in_modality_attribution(llava):
    model, proc = llava
    enc = llava_inputs(proc)
    attr = ModalityAttribution(model, proc)
    a = attr.attribute(enc, target=np.int64(5))
    b = attr.attribute(enc, target=5)
    torch.testing.assert_close(a.token_relevance, b.token_relevance)


def test_canonizer_of_another_model_type():
    model = tiny_gpt2()
    with pytest.raises(UnsupportedModelError, match="written for model_type 'llama', but the model is 'gpt2'"):
        LRP(model, canonizer="llama").attribute(embeds(model), target=3)
    from lime_attr.canonizers import get_canonizer

    with pytest.raises(UnsupportedModelError, match="canonizer=None"):
        LRP(model, canonizer=get_canonizer("llama")).attribute(embeds(model), target=3)


def test_unsupported_model_names_the_escape_hatch_which_conserves_under_cp_lrp():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=32, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=32, word_embed_proj_dim=16, enable_bias=False)
    model = OPTForCausalLM(cfg).to(DT).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "embed_positions" in name:
                p.zero_()
    emb = embeds(model)
    with pytest.raises(UnsupportedModelError, match="Escape hatch: canonizer=None"):
        LRP(model).attribute(emb, target=3)
    rel, delta = LRP(model, "cp-lrp", canonizer=None).attribute(emb, target=3, return_convergence_delta=True)
    assert abs(float(delta)) < 1e-10 * max(1.0, float(rel.abs().sum()))


# ------------------------------------------------------------------ model and autograd state


def test_train_mode_batchnorm_is_refused_and_the_model_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))  # train mode
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelStateError, match=r"training mode .* running statistics.*Call model.eval\(\)"):
        LRP(model, "epsilon-plus").attribute(torch.randn(3, 4), target=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    LRP(model.eval(), "epsilon-plus").attribute(torch.randn(3, 4), target=0)


def test_train_mode_dropout_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 2))  # train mode
    with pytest.warns(UserWarning, match=r"dropout is active .*model.eval\(\)"):
        LRP(model, "epsilon-plus").attribute(torch.randn(3, 4), target=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LRP(model.eval(), "epsilon-plus").attribute(torch.randn(3, 4), target=0)


def test_meta_device_model():
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ModelStateError, match="on the meta device"):
        LRP(model).attribute(torch.ones(1, 4), target=0)


def test_inference_mode():
    model = mlp()
    with torch.inference_mode():
        with pytest.raises(ModelStateError, match=r"LRP.attribute cannot run under torch.inference_mode\(\)"):
            LRP(model).attribute(torch.ones(1, 4), target=0)
        with pytest.raises(ModelStateError, match="LayerLRP.attribute cannot run under"):
            LayerLRP(model, model[1], "epsilon-plus").attribute(torch.ones(1, 4), target=0)
        x = torch.ones(1, 4)
    with pytest.raises(ValueError, match=r"created under torch.inference_mode\(\)"):
        LRP(model).attribute(x, target=0)


def test_inference_mode_multimodal(llava):
    model, proc = llava
    enc = llava_inputs(proc)
    with torch.inference_mode():
        with pytest.raises(ModelStateError, match="ModalityAttribution.attribute cannot run under"):
            ModalityAttribution(model, proc).attribute(enc)
        with pytest.raises(ModelStateError, match="lime_generate cannot run under"):
            lime_generate(model, proc, enc, LimeConfig(steps=1), max_new_tokens=1)


def test_layer_lrp_with_a_layer_of_another_model():
    model, other = mlp(), mlp()
    with pytest.raises(ValueError, match=r"layer 0 \(ReLU\) is not a module of the model"):
        LayerLRP(model, other[1])
    with pytest.raises(TypeError, match="must be an nn.Module of the model"):
        LayerLRP(model, "1")


# ------------------------------------------------------------------ composites


def test_unknown_site_kind():
    with pytest.raises(ValueError, match="unknown site kind in matcher 'site:bogus'; valid: site:layer"):
        Composite([("site:bogus", "epsilon")])


def test_first_layer_on_a_token_model():
    model = tiny_llama()
    comp = get_composite("attnlrp").prepend(("first_layer", "flat"))
    with pytest.raises(RuleSiteError, match="maps 'first_layer' to .* has no first layer"):
        LRP(model, comp).attribute(embeds(model), target=3)


def test_register_composite_needs_a_factory():
    with pytest.raises(TypeError, match=r"register_composite\('bad'\) decorates a factory function"):
        register_composite("bad")(42)
    with pytest.raises(TypeError, match="takes the composite's name"):
        register_composite(42)
    from lime_attr import available_composites

    assert "bad" not in available_composites()


def test_unknown_composite_parameter():
    with pytest.raises(TypeError, match=r"composite 'epsilon-plus' takes parameters \['epsilon'\], got unknown "
                                        r"\['gamma'\]"):
        get_composite("epsilon-plus", gamma=0.3)


@pytest.mark.parametrize("entries,match", [
    (["epsilon"], r"composite entry 0 is 'epsilon', not a \(matcher, rule\) pair"),
    ([("site:layer",)], r"composite entry 0 is \('site:layer',\), not a \(matcher, rule\) pair"),
    ("epsilon", "Composite takes a list of"),
    ([(3, "epsilon")], "unknown matcher 3"),
])
def test_malformed_composite_entries(entries, match):
    with pytest.raises(TypeError, match=match):
        Composite(entries)


# ------------------------------------------------------------------ metrics


@pytest.fixture(scope="module")
def llava_result(llava):
    model, proc = llava
    return ModalityAttribution(model, proc).attribute(llava_inputs(proc))


@pytest.mark.parametrize("box", [(100, 100, 120, 120), (-20, -20, -1, -1), (0, CANVAS_SIZE, 5, CANVAS_SIZE + 9)])
def test_grounding_box_outside_the_image(llava_result, box):
    with pytest.raises(ValueError, match=r"box .* lies outside the image"):
        grounding_score(llava_result, box=box)


def test_grounding_box_that_selects_nothing(llava_result):
    with pytest.raises(ValueError, match="the box selects no cell"):
        grounding_score(llava_result, box=(0.1, 0.1, 0.2, 0.2), level="patches")
    with pytest.raises(ValueError, match="the mask selects no cell"):
        grounding_score(llava_result, mask=np.zeros((CANVAS_SIZE, CANVAS_SIZE), dtype=bool))


def test_rows_that_do_not_exist(llava_result):
    with pytest.raises(IndexError, match=r"row 3 does not exist: the result has 1 row\(s\)"):
        grounding_score(llava_result, box=(0, 0, 4, 4), row=3)
    with pytest.raises(IndexError, match="row 3 does not exist"):
        top_tokens(llava_result, row=3)
    with pytest.raises(IndexError, match="row -2 does not exist"):
        breakdown(llava_result, row=-2)
    with pytest.raises(ValueError, match="k must be a positive int"):
        top_tokens(llava_result, k=-3)
    assert 0.0 <= grounding_score(llava_result, box=(0, 0, 4, 4), row=np.int64(0)) <= 1.0


def test_time_span_outside_the_clip(audio):
    model, proc = audio
    res = ModalityAttribution(model, proc).attribute(audio_inputs(proc))
    with pytest.raises(ValueError, match=r"time_span \(50.0, 60.0\) contains no frame of the clip"):
        grounding_score(res, time_span=(50, 60))


# ------------------------------------------------------------------ decoding parameters


@pytest.mark.parametrize("kw,match", [(dict(top_p=2.0), r"top_p must be in \(0, 1\]"), (dict(top_p=0.0), "top_p"),
                                      (dict(top_k=-1), "top_k must be an int >= 1"), (dict(top_k=0), "top_k"),
                                      (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
                                      (dict(temperature=0.0), "temperature must be a finite number > 0")])
def test_sampling_parameters_out_of_range(kw, match):
    from lime_attr.generation import DecodingConfig

    with pytest.raises(ValueError, match=match):
        DecodingConfig("sample", **kw)
    model = tiny_llama()
    with pytest.raises(ValueError, match=match):
        lime_generate(model, None, {"input_ids": torch.tensor([[1, 5, 7]])}, LimeConfig(steps=1), max_new_tokens=1,
                      do_sample=True, modality_mask=(0, 2), **kw)


def test_benchmark_arguments_checked_before_loading():
    from lime_attr.evaluation.harness import check_benchmark_args

    with pytest.raises(ValueError, match="limit must be a positive number"):
        check_benchmark_args("builtin:digits-llava", limit=0)
    with pytest.raises(ValueError, match="--questions, --image-dir would be ignored"):
        check_benchmark_args("builtin:digits-llava", files={"questions": "q.json", "image_dir": "x", "audio_dir": None})
    check_benchmark_args("some/hub-model", limit=3, files={"questions": "q.json"})


# ------------------------------------------------------------------ more of the same kinds


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x), x


def test_model_returning_a_tuple():
    with pytest.raises(TypeError, match="the model returned a tuple, not a tensor"):
        LRP(TupleOut()).attribute(torch.ones(1, 4), target=0)


def test_canonizer_that_is_not_one():
    with pytest.raises(TypeError, match="canonizer must be 'auto', None, a registered model_type name or a canonizer"):
        LRP(mlp(), canonizer=42).attribute(torch.ones(1, 4), target=0)


def test_dtype_mismatch_is_named():
    with pytest.raises(RuntimeError, match="the inputs are float32, the model's parameters float64"):
        LRP(mlp().double()).attribute(torch.ones(1, 4), target=0)


def test_flags_must_be_bools():
    with pytest.raises(TypeError, match="create_graph must be True or False"):
        LRP(mlp()).attribute(torch.ones(1, 4), target=0, create_graph="yes")


@pytest.mark.parametrize("fn", [grounding_score, top_tokens, breakdown])
def test_metrics_need_a_modality_result(fn):
    with pytest.raises(TypeError, match="takes the ModalityResult returned by ModalityAttribution.attribute"):
        fn(torch.ones(3)) if fn is not grounding_score else fn(None, box=(0, 0, 1, 1))
    from lime_attr import modality_reliance

    with pytest.raises(TypeError, match="modality_reliance takes the ModalityResult"):
        modality_reliance(torch.ones(3))


@pytest.mark.parametrize("change,exc,match", [
    (lambda e: dict(e, pixel_values=e["pixel_values"][0]), ValueError, r"pixel_values has shape \(3, "),
    (lambda e: dict(e, pixel_values=e["pixel_values"].repeat(2, 1, 1, 1)), ValueError,
     r"pixel_values holds 2 image\(s\) but the prompt\(s\) have 1 image placeholder run"),
    (lambda e: dict(e, pixel_values=torch.randn(1, 3, 16, 16)), ValueError, "the vision tower takes"),
    (lambda e: dict(e, pixel_values=(e["pixel_values"] * 50).to(torch.uint8)), TypeError,
     "'pixel_values' has dtype torch.uint8"),
    (lambda e: dict(e, input_ids=e["input_ids"].float()), TypeError, "input_ids must be an integer tensor"),
], ids=["3-D", "count", "size", "uint8", "float ids"])
def test_malformed_multimodal_inputs(llava, change, exc, match):
    model, proc = llava
    enc = change(llava_inputs(proc))
    with pytest.raises(exc, match=match):
        ModalityAttribution(model, proc).attribute(enc)
    with pytest.raises(exc, match=match):
        lime_generate(model, proc, enc, LimeConfig(steps=1), max_new_tokens=1)


def test_model_forward_errors_name_the_call(llava):
    model, proc = llava
    enc = llava_inputs(proc)
    with pytest.raises(ValueError, match="the model's forward failed on input"):
        LRP(model).attribute(enc["pixel_values"], target=3, input_name="pixel_values")  # no input_ids / embeds


def test_lime_generate_argument_types(llava):
    model, proc = llava
    enc = llava_inputs(proc)
    with pytest.raises(TypeError, match="config must be a LimeConfig"):
        lime_generate(model, proc, enc, {"steps": 1}, max_new_tokens=1)
    with pytest.raises(TypeError, match="max_new_tokens must be an int"):
        lime_generate(model, proc, enc, LimeConfig(steps=1), max_new_tokens="3")


def test_visualize_bad_input(llava_result):
    from lime_attr import visualize

    with pytest.raises(TypeError, match="lime_attr.visualize takes the ModalityResult"):
        visualize.text_html(None)
    with pytest.raises(IndexError, match="row 5 does not exist"):
        visualize.text_html(llava_result, row=5)
    with pytest.raises(ValueError, match="level must be 'pixels' or 'patches'"):
        visualize.image_overlay(llava_result.heatmaps[0][0], level="nope")


def test_parameters_for_a_built_composite():
    with pytest.raises(TypeError, match=r"get_composite: parameters \['epsilon'\] apply to a registered composite name"):
        get_composite(get_composite("attnlrp"), epsilon=1.0)


def test_layer_lrp_given_embeddings_of_an_hf_model():
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="LayerLRP.attribute: the forward failed on these inputs .*input_ids"):
        LayerLRP(model, model.model.layers[0]).attribute(embeds(model), target=3)
    with pytest.raises(TypeError, match="returns a ModelOutput, not a tensor; pass forward_func="):
        LayerLRP(model, model.model.layers[0]).attribute(torch.tensor([[1, 5, 7, 2, 9]]), target=3)
    rel = LayerLRP(model, model.model.layers[0], forward_func=lambda ids: model(ids).logits[:, -1]).attribute(
        torch.tensor([[1, 5, 7, 2, 9]]), target=3)
    assert rel.shape[:2] == (1, 5)
