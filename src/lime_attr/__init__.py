"""lime_attr: Layer-wise Relevance Propagation for transformers and multimodal LLMs, and LIME.

LRP is patented (see the README's licensing note); lime_attr is free software, but the patent holder's
terms for LRP apply to its use.
"""
from .attribution import LRP, LayerLRP, ModalityAttribution, ModalityResult
from .metrics import grounding_score, modality_reliance, top_tokens
from .mitigation import LimeConfig, LimeOptimizer, VCDLogitsProcessor, lime_generate
from .composites import Composite, available_composites, get_composite, register_composite
from .rules import available_rules, get_rule, register_rule
from .scope import LRPScope, lrp_scope

__version__ = "0.1.0"

__all__ = [
    "LRP", "LayerLRP", "ModalityAttribution", "ModalityResult", "modality_reliance", "grounding_score",
    "top_tokens", "LimeConfig", "LimeOptimizer", "lime_generate", "VCDLogitsProcessor", "Composite", "available_composites", "get_composite", "register_composite",
    "available_rules", "get_rule", "register_rule", "LRPScope", "lrp_scope", "__version__",
]
