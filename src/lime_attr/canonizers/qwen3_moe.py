"""Qwen3-MoE: Qwen3 attention; sparse MoE blocks whose experts are one fused module.

* ``Qwen3MoeExperts`` holds all experts' weights as 3-D parameters and runs ``F.linear`` per expert: it is
  an *op module*, its ops go through the op mode -- ``act(gate) * up`` and ``expert_out * routing_weight``
  are products (uniform rule; CP-LRP keeps the gate constant, and the routing weight, which comes from
  the router's constant softmax there, too).
* ``Qwen3MoeTopKRouter`` (linear, softmax, top-k) is an op module too: its softmax gets the softmax rule.
  With ``norm_topk_prob=True`` the top-k weights are divided by their sum: declared a normalisation
  (``normalizing_modules``), it gets the norm rule (the sum held constant).
* The experts run with transformers' ``eager`` experts implementation inside a scope (restored on exit).
"""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("qwen3_moe")
class Qwen3MoeCanonizer(HFCanonizer):
    """``Qwen3MoeForCausalLM`` / ``Qwen3MoeModel``."""

    attention = ("Qwen3MoeAttention",)
    gated_mlps = {"Qwen3MoeMLP": GatedMLP()}
    op_modules = ("Qwen3MoeExperts", "Qwen3MoeTopKRouter")
    normalizing_modules = ("Qwen3MoeSparseMoeBlock",)
    passthrough = ("Qwen3MoeRotaryEmbedding",)
    eager_experts = True
