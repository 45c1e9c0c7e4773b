"""The bottom of the core: the installer, the running-scope context, attention transforms, rule methods."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from lime_attr import LRP, Composite, LRPScope, get_rule, lrp_scope
from lime_attr.context import add_carrier, current_scope, mark_dependent, running
from lime_attr.installer import Installer
from lime_attr.specs import ProductSpec


def test_installer_undoes_newest_first_and_keeps_going_after_a_failure():
    done: list[str] = []
    inst = Installer()
    inst.on_exit(lambda: done.append("a"))

    def broken() -> None:
        done.append("b")
        raise RuntimeError("undo b failed")

    inst.on_exit(broken)
    inst.on_exit(lambda: done.append("c"))
    with pytest.raises(RuntimeError, match="undo b failed"):
        inst.restore()
    assert done == ["c", "b", "a"]
    inst.restore()  # nothing left: a second restore does nothing
    assert done == ["c", "b", "a"]


def test_installer_refuses_what_it_cannot_undo():
    inst = Installer()
    with pytest.raises(TypeError, match="removable handle"):
        inst.add_hook(object())
    with pytest.raises(TypeError, match="function of no arguments"):
        inst.on_exit(42)


def test_installer_normalizing_declarations_are_per_installer():
    a, b, m = Installer(), Installer(), nn.Linear(2, 2)
    a.declare_normalizing([m])
    assert a.is_normalizing(m) and a.has_normalizing and not b.is_normalizing(m)
    a.restore()
    assert not a.is_normalizing(m)


def test_running_context_nests_and_is_per_thread():
    outer, inner = object(), object()
    assert current_scope() is None
    with running(outer):  # type: ignore[arg-type]
        assert current_scope() is outer
        with running(inner):  # type: ignore[arg-type]
            assert current_scope() is inner
        assert current_scope() is outer
        seen = []
        t = threading.Thread(target=lambda: seen.append(current_scope()))
        t.start()
        t.join()
        assert seen == [None]  # another thread runs no scope
    assert current_scope() is None
    x = torch.ones(2)
    mark_dependent(x)  # outside any scope: nothing to tell, no error
    assert add_carrier(x, x) is False


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_scope_is_the_current_state_only_while_its_model_runs():
    model, seen = _mlp(), []
    model[1].register_forward_hook(lambda m, a, o: seen.append(current_scope()))
    scope = LRPScope(model, "epsilon-plus")
    with scope:
        assert current_scope() is None  # entered, but the model is not running
        model(torch.randn(1, 4, requires_grad=True))
    assert seen == [scope]


def test_attention_transform_handle_removes_its_transform():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    emb = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach()
    lrp, calls = LRP(model, "attnlrp"), []

    def transform(module, q, k, v, kwargs):
        calls.append(type(module).__name__)
        return q, k, v * 0  # values zeroed: the relevance must change

    plain = lrp.attribute(emb, target=4)
    handle = lrp.scope().add_attention_transform(transform)
    changed = lrp.attribute(emb, target=4)
    assert calls == ["LlamaAttention"] and not torch.allclose(plain, changed)
    handle.remove()
    handle.remove()  # idempotent
    torch.testing.assert_close(lrp.attribute(emb, target=4), plain, rtol=0, atol=0)
    assert calls == ["LlamaAttention"]
    with pytest.raises(TypeError, match="attention transform must be callable"):
        lrp.scope().add_attention_transform("not a function")


def test_rules_decide_how_the_scope_treats_them():
    assert get_rule("gradient").is_plain_jacobian("layer")
    assert get_rule("epsilon", epsilon=0.0).is_plain_jacobian("affine")
    assert not get_rule("epsilon", epsilon=0.1).is_plain_jacobian("layer")
    assert get_rule("softmax").is_plain_jacobian("softmax") and not get_rule("identity").is_plain_jacobian("activation")
    assert get_rule("uniform").product_weights(2) == [0.5, 0.5]
    assert get_rule("cp_attention").product_weights(2) == [0.0, 1.0]
    with pytest.raises(TypeError, match="gated-MLP product"):
        get_rule("epsilon").product_weights(2)
    assert get_rule("epsilon", epsilon=0.1).fusable_epsilon() == 0.1 and get_rule("epsilon", epsilon=0.0).fusable_epsilon() is None
    assert get_rule("identity").is_relu_jacobian() and get_rule("pass").is_relu_jacobian()
    assert not get_rule("gamma").is_relu_jacobian()
    assert get_rule("norm").holds_normalizer_constant() and not get_rule("identity").holds_normalizer_constant()


def test_a_custom_rule_overriding_is_plain_jacobian_gets_no_hook():
    from dataclasses import dataclass

    from lime_attr.rules import Rule

    @dataclass(frozen=True)
    class PlainLayer(Rule):
        def apply_layer(self, module, x, y):  # pragma: no cover - never called: plain Jacobian
            raise AssertionError("a plain-Jacobian rule must not be applied")

        def is_plain_jacobian(self, kind: str) -> bool:
            return True

    model, x = _mlp(), torch.randn(2, 4)
    comp = Composite([("site:layer", PlainLayer()), ("site:activation", "identity")])
    with lrp_scope(model, comp):
        assert all(not m._forward_hooks for m in model if isinstance(m, nn.Linear))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(xg)[:, 0].sum(), xg)
    torch.testing.assert_close(LRP(model, comp).attribute(x, target=0), x * g)


def test_product_spec_is_typed():
    spec = ProductSpec(consumer=nn.Linear(2, 2))
    assert spec.gate is None and spec.up is None
    with pytest.raises(Exception):
        spec.gate = nn.ReLU()  # frozen


def _gqa_llama(impl: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, attn_implementation=impl)
    model = LlamaForCausalLM(cfg).to(torch.float64).eval()
    return model, model.get_input_embeddings()(torch.tensor([[1, 5, 7, 2, 9]])).detach()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_transform_may_return_keys_and_values_per_query_head(impl):
    """A transform that does the grouped-query repeat itself (one head per query head) leaves logits and
    relevance unchanged: the kernel is then called without grouping."""
    model, emb = _gqa_llama(impl)
    lrp = LRP(model, "attnlrp")
    plain = lrp.attribute(emb, target=3)

    def per_query_head(module, q, k, v, kwargs):
        groups = q.shape[1] // k.shape[1]
        return q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)

    for stage in ("before_rule", "after_rule"):
        with lrp.scope().add_attention_transform(per_query_head, stage=stage):
            torch.testing.assert_close(lrp.attribute(emb, target=3), plain, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown attention-transform stage"):
        lrp.scope().add_attention_transform(per_query_head, stage="inside")

    def wrong_heads(module, q, k, v, kwargs):
        return q, torch.cat([k, k, k], dim=1), v

    with lrp.scope().add_attention_transform(wrong_heads), pytest.raises(ValueError, match="one per query head"):
        lrp.attribute(emb, target=3)


def test_a_perturbation_after_the_rule_gets_the_undivided_gradient():
    """AttnLRP divides the gradients of q, k by 4 and of v by 2 at the kernel's inputs: a perturbation added
    before the rule receives 1/4 (keys) and 1/2 (values) of the gradient one added after it receives."""
    model, emb = _gqa_llama("sdpa")
    lrp = LRP(model, "attnlrp")
    grads = {}
    for stage in ("before_rule", "after_rule"):
        delta = torch.zeros(2, 1, 2, 5, 8, dtype=torch.float64, requires_grad=True)  # (k/v, batch, kv heads, seq, dim)
        layer0 = model.model.layers[0].self_attn

        def add(module, q, k, v, kwargs, delta=delta):
            if module is not layer0:
                return q, k, v
            return q, k + delta[0], v + delta[1]

        with lrp.scope().add_attention_transform(add, stage=stage), lrp.scope():
            logit = model(inputs_embeds=emb.clone().requires_grad_(True)).logits[0, -1, 3]
            (grads[stage],) = torch.autograd.grad(logit, delta)
    before, after = grads["before_rule"], grads["after_rule"]
    assert after.abs().max() > 0
    torch.testing.assert_close(before[0], after[0] / 4, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(before[1], after[1] / 2, rtol=1e-10, atol=1e-14)
