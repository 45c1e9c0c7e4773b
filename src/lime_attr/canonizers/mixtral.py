"""Mixtral: Mistral attention; sparse MoE blocks (fused experts, top-k router renormalised by its sum).

Handled as :mod:`.qwen3_moe`: experts and router are op modules (products: product rule; router
softmax: softmax rule), the top-k renormalisation is a declared normalisation (norm rule), and the
experts run transformers' ``eager`` experts implementation inside a scope.
"""
from .base import HFCanonizer, register_canonizer


@register_canonizer("mixtral")
class MixtralCanonizer(HFCanonizer):
    """``MixtralForCausalLM`` / ``MixtralModel``."""

    attention = ("MixtralAttention",)
    op_modules = ("MixtralExperts", "MixtralTopKRouter")
    normalizing_modules = ("MixtralSparseMoeBlock",)
    passthrough = ("MixtralRotaryEmbedding",)
    eager_experts = True
