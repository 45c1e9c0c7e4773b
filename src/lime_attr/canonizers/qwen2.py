"""Qwen2: Llama-shaped with q/k/v biases (biases absorb relevance under the epsilon rule)."""
from .base import GatedMLP, HFCanonizer, register_canonizer


@register_canonizer("qwen2")
class Qwen2Canonizer(HFCanonizer):
    """``Qwen2ForCausalLM`` / ``Qwen2Model`` / ``Qwen2ForSequenceClassification``."""

    attention = ("Qwen2Attention",)
    gated_mlps = {"Qwen2MLP": GatedMLP()}
    passthrough = ("Qwen2RotaryEmbedding",)
