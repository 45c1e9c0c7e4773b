"""Canonizers of the vision, audio and multimodal families (issue 3): ViT, CLIP, SigLIP, Whisper, LLaVA,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio.

Every model is tiny and random, built from its config class (no downloads). Properties tested:
conservation under CP-LRP (biases and added constants zeroed, float64), agreement of AttnLRP with an
explicit written-out rule computation on ViT, eager == sdpa, exact restoration after a scope, bf16 / fp32,
batching, isolation of two scoped models in one process, and per-submodule composites by name pattern.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch
import transformers as T
from torch import nn

from lime_attr import LRP, Composite, LRPScope, get_composite
from lime_attr.attribution._forward import model_output_tensor
from lime_attr.canonizers import available_canonizers
from lime_attr.errors import UncoveredOpError
from lime_attr.rules.builtin import Bilinear, CPAttention

pytestmark = pytest.mark.filterwarnings("ignore")

# constants added to the residual stream (like biases): zeroed for the conservation test
_CONSTANTS = ("cls_token", "position_embeddings", "class_embedding", "position_embedding", "embed_positions",
              "image_newline", "decoder.embed_tokens")


def _zero_constants(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(k in name for k in _CONSTANTS):
                p.zero_()
    return model


class _Pooled(nn.Module):
    """Explains a tower's pooled / projected output (``pooler_output``, ``image_embeds``)."""

    def __init__(self, model: nn.Module, field_name: str) -> None:
        super().__init__()
        self.model = model
        self.field_name = field_name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(pixel_values=pixel_values), self.field_name)


@dataclass
class Case:
    """A tiny model and how LRP is called on it.

    ``x`` is the explained input; for multimodal models ``other`` is ``(input_name, tensor)`` of the
    second modality, explained in a second call (its relevance and the text's add up to the logit).
    """

    model: nn.Module
    x: torch.Tensor
    kwargs: dict
    other: Optional[tuple[str, torch.Tensor]] = None
    canonizer: Any = "auto"
    embeds_name: str = "inputs_embeds"  # how the explained text input is passed when explaining `other`
    rtol: float = 1e-8  # conservation bound (see _lm_rtol)
    target: Any = None
    extra: dict = field(default_factory=dict)

    def lrp(self, composite: Any = "cp-lrp") -> LRP:
        return LRP(self.model, composite=composite, canonizer=self.canonizer)

    def output(self) -> torch.Tensor:
        """The explained output per example (the target), computed without any scope."""
        with torch.no_grad():
            if self.canonizer != "auto":  # a wrapper module
                return self.model(self.x)
            kw = dict(self.kwargs)
            if self.other is not None:
                kw[self.other[0]] = self.other[1]
            out = model_output_tensor(self.model(**self.plain_inputs(), **kw))
            return out[:, -1] if out.dim() == 3 else out

    def plain_inputs(self) -> dict:
        return {} if self.extra.get("ids_only") else {_input_name(self.model): self.x}


def _input_name(model: nn.Module) -> str:
    return "inputs_embeds" if model.main_input_name == "input_ids" else model.main_input_name


# HF's Llama / Qwen2 RMSNorm computes x / rms(x) in float32 even for float64 inputs; the forward value then
# carries float32 rounding that the (float64) relevance does not, which bounds conservation at ~1e-7
_LM_RTOL = 1e-6

_LLAMA = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_CLIP_V = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=8, num_channels=3)
_MROPE = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1])


def _vit() -> Case:
    m = T.ViTForImageClassification(T.ViTConfig(**_CLIP_V, num_labels=3))
    return Case(m, torch.randn(1, 3, 16, 16), {})


def _clip_vision() -> Case:
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg = T.CLIPConfig(vision_config=_CLIP_V, text_config=text, num_labels=3)
    return Case(T.CLIPForImageClassification(cfg), torch.randn(1, 3, 16, 16), {})


def _clip_image_embeds() -> Case:
    m = T.CLIPVisionModelWithProjection(T.CLIPVisionConfig(**_CLIP_V, projection_dim=8))
    return Case(_Pooled(m, "image_embeds"), torch.randn(1, 3, 16, 16), {}, canonizer="clip")


def _clip_text() -> Case:
    cfg = T.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           vocab_size=50, max_position_embeddings=10, bos_token_id=48, eos_token_id=49, pad_token_id=0)
    m = T.CLIPTextModel(cfg)
    ids = torch.tensor([[48, 5, 6, 7, 49]])
    # outside a scope CLIP's text tower takes input_ids only (inside, the embeddings are routed)
    return Case(m, m.get_input_embeddings()(ids).detach(), {"input_ids": ids}, extra={"ids_only": True})


def _siglip_text() -> Case:
    cfg = T.SiglipTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                             vocab_size=50, max_position_embeddings=10, projection_size=8)
    m = T.SiglipTextModel(cfg)
    ids = torch.tensor([[3, 5, 6, 7, 2]])
    return Case(m, m.get_input_embeddings()(ids).detach(), {"input_ids": ids}, extra={"ids_only": True})


def _siglip_pooled() -> Case:
    m = T.SiglipVisionModel(T.SiglipVisionConfig(**_CLIP_V))  # with the attention-pooling head
    return Case(_Pooled(m, "pooler_output"), torch.randn(1, 3, 16, 16), {}, canonizer="siglip")


def _siglip_cls() -> Case:
    cfg = T.SiglipConfig(vision_config=_CLIP_V, text_config=dict(hidden_size=16, intermediate_size=32, vocab_size=50,
                                                                  num_hidden_layers=1, num_attention_heads=2),
                         num_labels=3)
    return Case(T.SiglipForImageClassification(cfg), torch.randn(1, 3, 16, 16), {})


def _whisper_cfg() -> T.WhisperConfig:
    return T.WhisperConfig(d_model=16, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8,
                           max_source_positions=6, max_target_positions=8, vocab_size=40, num_labels=3,
                           classifier_proj_size=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)


def _whisper() -> Case:
    return Case(T.WhisperForAudioClassification(_whisper_cfg()), torch.randn(1, 8, 12), {})


def _whisper_gen() -> Case:
    return Case(T.WhisperForConditionalGeneration(_whisper_cfg()), torch.randn(1, 8, 12),
                {"decoder_input_ids": torch.tensor([[1, 5, 6]])})


def _llava() -> Case:
    cfg = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**_CLIP_V), text_config=T.LlamaConfig(**_LLAMA),
                        image_token_id=59, vision_feature_layer=-1)
    m = T.LlavaForConditionalGeneration(cfg)
    ids = torch.tensor([[1, 5, 59, 59, 59, 59, 7, 8]])  # 4 patches (CLS dropped by the default strategy)
    return Case(m, m.get_input_embeddings()(ids).detach(), {}, other=("pixel_values", torch.randn(1, 3, 16, 16)),
                rtol=_LM_RTOL)


def _llava_siglip_qwen2() -> Case:
    """LLaVA composed from a SigLIP vision tower and a Qwen2 language model (the registered canonizers)."""
    vc = T.SiglipVisionConfig(**_CLIP_V, vision_use_head=False)
    cfg = T.LlavaConfig(vision_config=vc, text_config=dict(_LLAMA, model_type="qwen2"), image_token_id=59,
                        vision_feature_layer=-1, vision_feature_select_strategy="full")
    m = T.LlavaForConditionalGeneration(cfg)
    ids = torch.tensor([[1, 5, 59, 59, 59, 59, 7, 8]])
    return Case(m, m.get_input_embeddings()(ids).detach(), {}, other=("pixel_values", torch.randn(1, 3, 16, 16)),
                rtol=_LM_RTOL)


def _llava_next() -> Case:
    vc = T.CLIPVisionConfig(**{**_CLIP_V, "num_hidden_layers": 1})
    cfg = T.LlavaNextConfig(vision_config=vc, text_config=T.LlamaConfig(**_LLAMA), image_token_id=59,
                            vision_feature_layer=-1, image_grid_pinpoints=[[16, 16], [16, 32]])
    m = T.LlavaNextForConditionalGeneration(cfg)
    ids = torch.tensor([[1, 5] + [59] * 14 + [7, 8]])  # base 4 + 2 crops unpadded to 2x4 + 2 newlines
    return Case(m, m.get_input_embeddings()(ids).detach(), {"image_sizes": torch.tensor([[16, 32]])},
                other=("pixel_values", torch.randn(1, 3, 3, 16, 16)), rtol=_LM_RTOL)


def _qwen_vl(kind: str) -> Case:
    tc = dict(_LLAMA, rope_parameters=_MROPE)
    if kind == "qwen2_vl":
        vc = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
        m = T.Qwen2VLForConditionalGeneration(T.Qwen2VLConfig(vision_config=vc, text_config=tc, image_token_id=59,
                                                              video_token_id=58, vision_start_token_id=57))
    else:
        vc = dict(depth=2, hidden_size=16, out_hidden_size=32, intermediate_size=24, num_heads=2, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=8,
                  fullatt_block_indexes=[1])
        m = T.Qwen2_5_VLForConditionalGeneration(T.Qwen2_5_VLConfig(vision_config=vc, text_config=tc,
                                                                     image_token_id=59, video_token_id=58,
                                                                     vision_start_token_id=57))
    ids = torch.tensor([[1, 57, 59, 59, 59, 59, 7, 8]])  # a 16x16 image: 4x4 patches merged 2x2 -> 4 tokens
    kw = {"input_ids": ids, "mm_token_type_ids": (ids == 59).int(), "image_grid_thw": torch.tensor([[1, 4, 4]])}
    pixels = torch.randn(16, 3 * 2 * 4 * 4)
    return Case(m, m.get_input_embeddings()(ids).detach(), kw, other=("pixel_values", pixels), rtol=_LM_RTOL)


def _qwen2_audio() -> Case:
    tc = dict(_LLAMA, model_type="qwen2")
    ac = dict(d_model=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, num_mel_bins=8,
              max_source_positions=8)
    m = T.Qwen2AudioForConditionalGeneration(T.Qwen2AudioConfig(audio_config=ac, text_config=tc, audio_token_id=59))
    ids = torch.tensor([[1, 5, 59, 59, 59, 59, 7, 8]])  # 16 frames -> conv stride 2 -> avg pool 2 -> 4 tokens
    kw = {"input_ids": ids, "feature_attention_mask": torch.ones(1, 16, dtype=torch.long)}
    # outside a scope Qwen2-Audio drops the audio when given inputs_embeds: the plain reference uses input_ids
    return Case(m, m.get_input_embeddings()(ids).detach(), kw, other=("input_features", torch.randn(1, 8, 16)),
                rtol=_LM_RTOL, extra={"ids_only": True})


BUILDERS: dict[str, Callable[[], Case]] = {
    "vit": _vit,
    "clip_vision": _clip_vision,
    "clip_image_embeds": _clip_image_embeds,
    "clip_text": _clip_text,
    "siglip_cls": _siglip_cls,
    "siglip_pooled": _siglip_pooled,
    "siglip_text": _siglip_text,
    "whisper": _whisper,
    "whisper_gen": _whisper_gen,
    "llava": _llava,
    "llava_siglip_qwen2": _llava_siglip_qwen2,
    "llava_next": _llava_next,
    "qwen2_vl": functools.partial(_qwen_vl, "qwen2_vl"),
    "qwen2_5_vl": functools.partial(_qwen_vl, "qwen2_5_vl"),
    "qwen2_audio": _qwen2_audio,
}
FAMILIES = list(BUILDERS)


def _hf_model(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, _Pooled) else model


def _set_attn(case: Case, impl: str) -> None:
    _hf_model(case.model).set_attn_implementation(impl)


@functools.lru_cache(maxsize=None)
def _case64(family: str) -> Case:
    """float64 case with biases and added constants zeroed (built once per session; do not mutate)."""
    torch.manual_seed(0)
    case = BUILDERS[family]()
    case.model = _zero_constants(case.model.double().eval())
    case.x = case.x.double()
    if case.other is not None:
        case.other = (case.other[0], case.other[1].double())
    out = case.output()
    # the logit with the largest magnitude (no cancellation in the relative error); a component for towers
    case.target = int(out[0].abs().argmax())
    return case


def _attribute(case: Case, composite: Any = "cp-lrp", x: Optional[torch.Tensor] = None, **kw: Any):
    """(relevance of the explained input, relevance of the other modality or None)."""
    lrp = case.lrp(composite)
    x = case.x if x is None else x
    kwargs = dict(case.kwargs, **kw)
    if case.other is None:
        return lrp.attribute(x, target=case.target, **kwargs), None
    name, other = case.other
    other = kwargs.pop(name, other)
    r_text = lrp.attribute(x, target=case.target, **{name: other}, **kwargs)
    r_other = case.lrp(composite).attribute(other, target=case.target, input_name=name, inputs_embeds=x, **kwargs)
    return r_text, r_other


# ----------------------------------------------------------------------------------------------- tests


def test_families_registered():
    for mt in ("vit", "clip", "clip_vision_model", "clip_text_model", "siglip", "siglip_vision_model", "whisper",
               "llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen2_audio", "qwen2_audio_encoder"):
        assert mt in available_canonizers()


@pytest.mark.parametrize("family", FAMILIES)
def test_conservation_cp_lrp(family):
    """CP-LRP with biases and added constants zeroed: the relevance of all inputs sums to the logit."""
    case = _case64(family)
    _set_attn(case, "sdpa")
    logit = case.output()[0, case.target]
    r, r_other = _attribute(case)
    total = r.sum() + (r_other.sum() if r_other is not None else 0.0)
    assert torch.isfinite(r).all()
    if r_other is not None:  # both modalities carry relevance; the image / audio placeholders carry none
        assert r_other.abs().sum() > 0 and r.abs().sum() > 0
    assert abs(float(total - logit)) <= case.rtol * abs(float(logit)), (float(total), float(logit))


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa(family):
    """AttnLRP acts on the kernel's inputs: eager and SDPA attention give the same relevance.

    Eager attention in ViT-style towers takes the softmax in float32 even for float64 inputs, so the
    agreement is at float32 precision (rtol 1e-5) there; SDPA keeps float64.
    """
    case = _case64(family)
    rels = {}
    for impl in ("eager", "sdpa"):
        _set_attn(case, impl)
        rels[impl] = _attribute(case, "attnlrp")
    _set_attn(case, "sdpa")
    for a, b in zip(rels["eager"], rels["sdpa"]):
        if a is None:
            continue
        scale = b.abs().max()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(scale)), float((a - b).abs().max() / scale)


def _explicit_vit_attnlrp(model: T.ViTForImageClassification, px: torch.Tensor, target: int) -> torch.Tensor:
    """AttnLRP on a ViT written out rule by rule (one example), in relevance form.

    epsilon (eps = 0) on every linear map ``z = x W^T + b``: ``R_x[i] = sum_j x_i W_ji R_j / z_j``; the same
    on residual sums; LayerNorm with 1/sigma constant (the linear map ``x -> (x - mean) w / sigma + b``);
    identity on GELU; per head ``R_A[j,i] = sum_p A_ji V_ip R_O[j,p] / (2 O_jp)``, ``R_V[i,p] = sum_j (same)``,
    softmax ``R_S = S (R_A - A sum_i R_A)``, and the bilinear rule again for ``S = scale q k^T``.
    """
    vit = model.vit
    H = model.config.num_attention_heads
    P = model.config.patch_size

    def linear_rule(x, W, z, R):
        return torch.einsum("...i,ji,...j->...i", x, W, R / z)

    def layernorm(ln, x):
        mu = x.mean(-1, keepdim=True)
        sigma = torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + ln.eps)
        return (x - mu) / sigma * ln.weight + ln.bias, sigma

    def layernorm_rule(ln, x, y, sigma, R):
        n = x.shape[-1]
        M = (torch.eye(n, dtype=x.dtype) - 1.0 / n)  # d(x - mean)_j / dx_i
        # R_x[t, i] = sum_j x_ti M_ij w_j / sigma_t R_tj / y_tj
        return torch.einsum("ti,ij,j,tj->ti", x, M, ln.weight, R / y / sigma)

    def add_rule(a, b, R):
        s = a + b
        return a / s * R, b / s * R

    with torch.no_grad():
        # embeddings
        conv = vit.embeddings.patch_embeddings.projection
        C = px.shape[1]
        patches = px[0].unfold(1, P, P).unfold(2, P, P)  # [C, gh, gw, P, P]
        gh, gw = patches.shape[1], patches.shape[2]
        X = patches.permute(1, 2, 0, 3, 4).reshape(gh * gw, C * P * P)
        Wc = conv.weight.reshape(conv.out_channels, -1)
        pe = X @ Wc.T + conv.bias
        tokens = torch.cat([vit.embeddings.cls_token[0], pe], 0)
        h = tokens + vit.embeddings.position_embeddings[0]
        saved = []
        for layer in vit.layers:
            att = layer.attention
            ln1, s1 = layernorm(layer.layernorm_before, h)
            q, k, v = (ln1 @ lin.weight.T + lin.bias for lin in (att.q_proj, att.k_proj, att.v_proj))
            n, d = q.shape[0], q.shape[1] // H
            qh, kh, vh = (t.reshape(n, H, d) for t in (q, k, v))
            S = torch.einsum("jhd,ihd->hji", qh, kh) * att.scaling
            A = torch.softmax(S, -1)
            O = torch.einsum("hji,ihp->jhp", A, vh)
            o = O.reshape(n, H * d) @ att.o_proj.weight.T + att.o_proj.bias
            h1 = h + o
            ln2, s2 = layernorm(layer.layernorm_after, h1)
            f1 = ln2 @ layer.mlp.fc1.weight.T + layer.mlp.fc1.bias
            g = torch.nn.functional.gelu(f1)
            f2 = g @ layer.mlp.fc2.weight.T + layer.mlp.fc2.bias
            h2 = h1 + f2
            saved.append((h, ln1, s1, q, k, v, qh, kh, vh, S, A, O, o, h1, ln2, s2, f1, g, f2))
            h = h2
        lnf, sf = layernorm(vit.layernorm, h)
        logit = lnf[0] @ model.classifier.weight[target] + model.classifier.bias[target]

        # relevance, backwards
        R_lnf = torch.zeros_like(lnf)
        R_lnf[0] = linear_rule(lnf[0], model.classifier.weight[target : target + 1], logit[None], logit[None])
        R = layernorm_rule(vit.layernorm, h, lnf, sf, R_lnf)
        for layer, (h0, ln1, s1, q, k, v, qh, kh, vh, S, A, O, o, h1, ln2, s2, f1, g, f2) in zip(
                reversed(vit.layers), reversed(saved)):
            att = layer.attention
            R_h1, R_f2 = add_rule(h1, f2, R)
            R_g = linear_rule(g, layer.mlp.fc2.weight, f2, R_f2)
            R_f1 = R_g  # identity rule on GELU
            R_ln2 = linear_rule(ln2, layer.mlp.fc1.weight, f1, R_f1)
            R_h1 = R_h1 + layernorm_rule(layer.layernorm_after, h1, ln2, s2, R_ln2)
            R_h0, R_o = add_rule(h0, o, R_h1)
            n, d = qh.shape[0], qh.shape[2]
            R_O = linear_rule(O.reshape(n, H * d), att.o_proj.weight, o, R_o).reshape(n, H, d)
            contrib = torch.einsum("hji,ihp,jhp->hjip", A, vh, R_O / (2 * O))
            R_A, R_v = contrib.sum(-1), contrib.sum(1).permute(1, 0, 2)  # [h,j,i], [i,h,p]
            R_S = S * (R_A - A * R_A.sum(-1, keepdim=True))
            qk = torch.einsum("jhd,ihd,hji->hjid", qh, kh, att.scaling * R_S / (2 * S))
            R_q, R_k = qk.sum(2).permute(1, 0, 2), qk.sum(1).permute(1, 0, 2)  # [j,h,d], [i,h,d]
            R_ln1 = sum(linear_rule(ln1, lin.weight, z, Rz.reshape(n, H * d))
                        for lin, z, Rz in ((att.q_proj, q, R_q), (att.k_proj, k, R_k), (att.v_proj, v, R_v)))
            R = R_h0 + layernorm_rule(layer.layernorm_before, h0, ln1, s1, R_ln1)
        tok = tokens + vit.embeddings.position_embeddings[0]
        R_pe = (pe / tok[1:]) * R[1:]
        R_X = linear_rule(X, Wc, pe, R_pe)  # [patches, C*P*P]
        R_px = R_X.reshape(gh, gw, C, P, P).permute(2, 0, 3, 1, 4).reshape(1, C, gh * P, gw * P)
    return R_px


def test_attnlrp_matches_explicit_rules_vit():
    """AttnLRP in gradient form (one backward pass) == the rules written out, on a ViT with biases."""
    torch.manual_seed(1)
    model = T.ViTForImageClassification(T.ViTConfig(**_CLIP_V, num_labels=3)).double().eval()
    with torch.no_grad():  # non-trivial biases and constants
        for name, p in model.named_parameters():
            if name.endswith("bias") or "token" in name or "position" in name:
                p.normal_(0, 0.1)
    model.set_attn_implementation("sdpa")
    px = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    expected = _explicit_vit_attnlrp(model, px, target=2)
    got = LRP(model, composite="attnlrp").attribute(px, target=2)
    err = float((got - expected).norm() / expected.norm())
    assert err <= 1e-6, err
    # AttnLRP is not CP-LRP: the softmax/bilinear path changes the result
    cp = LRP(model, composite="cp-lrp").attribute(px, target=2)
    assert float((cp - expected).norm() / expected.norm()) > 1e-3


def _configs(model: nn.Module) -> dict:
    out = {}
    for name, m in model.named_modules():
        cfg = getattr(m, "config", None)
        if cfg is not None:
            out[name] = cfg._attn_implementation_internal
            for key in getattr(cfg, "sub_configs", {}) or {}:
                sub = getattr(cfg, key, None)
                if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                    out[f"{name}:{key}"] = sub._attn_implementation_internal
    return out


def _hooks(model: nn.Module) -> list:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), "forward" in m.__dict__)
            for n, m in model.named_modules()]


def _train_step(case: Case, model: nn.Module) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    kw = dict(case.kwargs)
    if case.other is not None:
        kw[case.other[0]] = case.other[1]
    if case.canonizer != "auto":
        out = model(case.x)
    else:
        out = model_output_tensor(model(**case.plain_inputs(), **kw))
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["vit", "clip_text", "siglip_pooled", "whisper_gen", "llava", "qwen2_vl",
                                    "qwen2_audio"])
def test_exact_restoration(family):
    """After a scope: logits and training-step gradients bit-identical to an untouched copy; attention
    implementations of every (sub-)config, hooks and forwards restored."""
    torch.manual_seed(0)
    case = copy.copy(_case64(family))
    case.model = copy.deepcopy(case.model)
    _set_attn(case, "sdpa")
    untouched = copy.deepcopy(case.model)
    before_cfg, before_hooks = _configs(case.model), _hooks(case.model)
    r, _ = _attribute(case, "attnlrp")
    assert torch.isfinite(r).all()
    with LRPScope(case.model, "attnlrp", canonizer=case.canonizer):  # a scope exited with nothing run
        assert _configs(case.model) != before_cfg  # the wrapper was selected for this instance
    assert _configs(case.model) == before_cfg == _configs(untouched)
    assert _hooks(case.model) == before_hooks
    out_a, grads_a = _train_step(case, case.model)
    out_b, grads_b = _train_step(case, untouched)
    assert torch.equal(out_a, out_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_dtypes(family, dtype):
    case = copy.copy(_case64(family))
    case.model = copy.deepcopy(case.model).to(dtype)
    case.x = case.x.to(dtype)
    if case.other is not None:
        case.other = (case.other[0], case.other[1].to(dtype))
    r, r_other = _attribute(case, "attnlrp")
    assert r.dtype == dtype and torch.isfinite(r).all()
    assert r_other is None or torch.isfinite(r_other).all()


@pytest.mark.parametrize("family", ["llava", "qwen2_audio"])
def test_batch_matches_single(family):
    """A batch of two examples gives the per-example relevance of two single runs."""
    torch.manual_seed(3)
    case = _case64(family)
    name, other = case.other
    x2 = torch.cat([case.x, case.x.flip(1) if family == "llava" else case.x * 0.5])
    other2 = torch.cat([other, torch.randn_like(other)])
    kw2 = {k: torch.cat([v, v]) for k, v in case.kwargs.items()}
    batched = _attribute(case, "attnlrp", x=x2, **{name: other2}, **kw2)
    for i in range(2):
        kw1 = {k: v[i : i + 1] for k, v in kw2.items()}
        single = _attribute(case, "attnlrp", x=x2[i : i + 1], **{name: other2[i : i + 1]}, **kw1)
        for b, s in zip(batched, single):
            assert torch.allclose(b[i : i + 1], s, rtol=1e-9, atol=1e-12)


def test_isolation_vision_and_text_models():
    """A ViT under CP-LRP and a Llama under AttnLRP, both scoped at once, each get exactly their own rules;
    an unscoped copy keeps its plain gradient."""
    vit = _case64("vit")
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(**_LLAMA)).double().eval()
    emb = torch.randn(1, 5, 32, dtype=torch.float64)
    ref_vit = LRP(vit.model, "cp-lrp").attribute(vit.x, target=1)
    ref_llama = LRP(llama, "attnlrp").attribute(emb, target=3)
    plain_vit = copy.deepcopy(vit.model)
    px = vit.x.clone().requires_grad_(True)
    e = emb.clone().requires_grad_(True)
    with LRPScope(vit.model, "cp-lrp"), LRPScope(llama, "attnlrp"):
        (g_vit,) = torch.autograd.grad(vit.model(pixel_values=px).logits[0, 1], px)
        (g_llama,) = torch.autograd.grad(llama(inputs_embeds=e).logits[0, -1, 3], e)
        p2 = vit.x.clone().requires_grad_(True)
        (g_plain,) = torch.autograd.grad(plain_vit(pixel_values=p2).logits[0, 1], p2)
    assert torch.allclose(px * g_vit, ref_vit, rtol=1e-12, atol=1e-15)
    assert torch.allclose(e * g_llama, ref_llama, rtol=1e-12, atol=1e-15)
    p3 = vit.x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(copy.deepcopy(plain_vit)(pixel_values=p3).logits[0, 1], p3)
    assert torch.equal(g_plain, g_ref)  # an unscoped model is untouched by the other scopes
    assert not torch.allclose(g_plain, g_vit)


@pytest.mark.parametrize("family,tower", [("llava", "model.vision_tower"), ("qwen2_vl", "model.visual"),
                                          ("qwen2_audio", "model.audio_tower")])
def test_composite_per_submodule_name_pattern_selects_attention_sites(family, tower):
    """CP-LRP inside the vision / audio tower, AttnLRP in the language model, chosen by module-name pattern."""
    case = _case64(family)
    comp = get_composite("attnlrp").prepend((tower + "*", "cp_attention"))
    scope = LRPScope(case.model, comp)
    with scope:
        rules = {site.name: scope.attention_rule(site.module) for site in scope.sites if site.kind == "attention"}
    inside = {n: r for n, r in rules.items() if n.startswith(tower + ".")}
    outside = {n: r for n, r in rules.items() if not n.startswith(tower + ".")}
    assert inside and outside
    assert all(isinstance(r, CPAttention) for r in inside.values())
    assert all(isinstance(r, Bilinear) for r in outside.values())


def test_composite_per_submodule_relevance():
    case = _case64("llava")
    comp = get_composite("attnlrp").prepend(("model.vision_tower*", "cp_attention"))
    mixed = _attribute(case, comp)
    full_attn = _attribute(case, "attnlrp")
    assert torch.isfinite(mixed[0]).all() and torch.isfinite(mixed[1]).all()
    assert not torch.allclose(mixed[1], full_attn[1])  # the tower's rules changed the image relevance
    # a Composite spelled out with the same entries gives the same relevance
    comp2 = Composite([("model.vision_tower*", "cp_attention"), *get_composite("attnlrp").entries])
    again = _attribute(case, comp2)
    assert all(torch.equal(a, b) for a, b in zip(mixed, again))


def test_clip_joint_similarity_fails_loudly():
    """CLIPModel's cosine similarity normalises with pow/sum/pow: not covered, and said so (never silent)."""
    torch.manual_seed(0)
    cfg = T.CLIPConfig(vision_config=_CLIP_V, text_config=dict(hidden_size=16, intermediate_size=32, vocab_size=50,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                bos_token_id=48, eos_token_id=49, pad_token_id=0))
    model = T.CLIPModel(cfg).eval()
    px = torch.randn(1, 3, 16, 16, requires_grad=True)
    with pytest.raises(UncoveredOpError, match="pow"):
        with LRPScope(model, "attnlrp"):
            model(input_ids=torch.tensor([[48, 5, 49]]), pixel_values=px).logits_per_image.sum()


def test_multihead_attention_pooling_is_ruled():
    """SigLIP's attention-pooling head (torch.nn.MultiheadAttention) gets the attention rule in the op mode."""
    case = _case64("siglip_pooled")
    lrp = case.lrp("attnlrp")
    r_attn = lrp.attribute(case.x, target=0)
    assert "attention:multi_head_attention_forward" in lrp.scope().ruled_ops
    # the op site is matched by the name of the module it runs in
    comp = get_composite("attnlrp").prepend(("model.head.attention", "cp_attention"))
    r_mixed = LRP(case.model, comp, canonizer="siglip").attribute(case.x, target=0)
    assert not torch.allclose(r_attn, r_mixed)
