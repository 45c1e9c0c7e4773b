"""LayerLRP: Captum's LayerGradientXActivation run inside an LRP scope (LLMGradientAttribution-compatible)."""
from __future__ import annotations

import pytest
import torch
from captum.attr import LayerGradientXActivation, LLMGradientAttribution, TextTokenInput
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lime_attr import LRP, LRPScope
from lime_attr.attribution.layer import LayerLRP

WORDS = ["<unk>", "<pad>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "to", "park",
         "red", "blue", "big", "small", "and", "is"]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=1, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=torch.float64).eval()
    return m


def _lrp_logprob(model, ids, target):
    """LRP of log p(target | ids) at inputs_embeds, written out through linearity of the modified backward:
    R(log p_t) = R(z_t) - sum_j p_j R(z_j), each R(z_j) from the public LRP class."""
    emb = model.get_input_embeddings()(ids).detach()
    lrp = LRP(model)
    with torch.no_grad():
        p = torch.softmax(model(inputs_embeds=emb).logits[0, -1], -1)
    v = p.numel()  # one batched call: row j explains logit j
    r_all = lrp.attribute(emb.expand(v, -1, -1), target=list(range(v))).sum(-1)  # [V, seq]
    return r_all[target] - (p[:, None] * r_all).sum(0)


def test_llm_gradient_attribution_accepts_layer_lrp_and_matches_lrp(model, tok):
    prompt = "the cat sat on the"
    inp = TextTokenInput(prompt, tok)
    llm = LLMGradientAttribution(LayerLRP(model, model.get_input_embeddings()), tok)
    res = llm.attribute(inp, target="mat")
    ids = inp.to_model_input()  # the token ids (to_tensor() is the interpretable-feature mask)
    assert ids.shape == (1, 5) and int(ids.min()) > 3
    assert res.token_attr.shape == (1, ids.shape[1])
    expected = _lrp_logprob(model, ids, tok.convert_tokens_to_ids("mat"))
    torch.testing.assert_close(res.token_attr[0], expected, rtol=1e-9, atol=1e-10)
    # and it is not the plain gradient x activation
    plain = LLMGradientAttribution(LayerGradientXActivation(model, model.get_input_embeddings()), tok)
    res_plain = plain.attribute(inp, target="mat")
    assert not torch.allclose(res_plain.token_attr, res.token_attr, atol=1e-6)


def test_multi_token_target_appends_previous_tokens(model, tok):
    inp = TextTokenInput("the dog ran to the", tok)
    llm = LLMGradientAttribution(LayerLRP(model, model.get_input_embeddings()), tok)
    res = llm.attribute(inp, target="park and")
    assert res.token_attr.shape == (2, inp.to_model_input().shape[1])
    ids2 = torch.cat([inp.to_model_input(), torch.tensor([[tok.convert_tokens_to_ids("park")]])], 1)
    expected = _lrp_logprob(model, ids2, tok.convert_tokens_to_ids("and"))[:-1]
    torch.testing.assert_close(res.token_attr[1], expected, rtol=1e-9, atol=1e-10)


def test_scope_is_left_after_attribute(model, tok):
    ids = tok("the cat sat", return_tensors="pt").input_ids
    before = model(ids).logits
    fwd = lambda x: model(x).logits  # noqa: E731
    LayerLRP(model, model.get_input_embeddings(), forward_func=fwd).attribute(ids, target=(ids.shape[1] - 1, 5))
    assert "forward" not in model.__dict__
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["model.layers.0", "model.layers.1.self_attn.o_proj", "model.layers.0.mlp"])
def test_any_named_module(model, tok, name):
    """Layer relevance of a hidden state / attention output / MLP output = output x modified gradient,
    computed here by hand inside an LRPScope."""
    ids = tok("the cat sat on a", return_tensors="pt").input_ids
    layer = model.get_submodule(name)
    target = 8

    def fwd(x):
        return model(x).logits[:, -1]

    got = LayerLRP(model, layer, forward_func=fwd).attribute(ids, target=target)
    got = got[0] if isinstance(got, tuple) else got
    store = {}

    def hook(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        store["a"] = o
    h = layer.register_forward_hook(hook)
    try:
        with LRPScope(model):
            z = model(ids).logits[0, -1, target]
            (g,) = torch.autograd.grad(z, store["a"])
    finally:
        h.remove()
    torch.testing.assert_close(got, store["a"].detach() * g, rtol=1e-10, atol=1e-12)
    plain = LayerGradientXActivation(fwd, layer).attribute(ids, target=target)
    plain = plain[0] if isinstance(plain, tuple) else plain
    assert not torch.allclose(plain, got, atol=1e-8)


def test_layer_relevance_of_embeddings_is_lrp(model, tok):
    ids = tok("the big red dog", return_tensors="pt").input_ids
    fwd = lambda x: model(x).logits[:, -1]  # noqa: E731
    got = LayerLRP(model, model.get_input_embeddings(), forward_func=fwd).attribute(ids, target=4)
    emb = model.get_input_embeddings()(ids).detach()
    torch.testing.assert_close(got, LRP(model).attribute(emb, target=4), rtol=1e-10, atol=1e-12)


def test_plain_torch_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    rel = LayerLRP(net, net[0], composite="epsilon-plus").attribute(x, target=1)
    assert rel.shape == (3, 8)
    with pytest.raises(TypeError):
        LayerLRP(lambda x: x, net[0])
