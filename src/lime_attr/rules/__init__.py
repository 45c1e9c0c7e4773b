"""LRP rules: the registry and the built-in rules.

See :mod:`lime_attr.rules.registry` for the rule protocol and :mod:`lime_attr.rules.builtin` for the
formulas.
"""
from ._grad import replace_grad, scale_grad, stabilize
from ._tangent import tangent_mode
from .builtin import (AlphaBeta, Bilinear, CPAttention, Epsilon, Flat, Gamma, Gradient, Identity, Norm,
                      NormSpec, Pass, Softmax, Uniform, WSquare, ZBox, ZPlus)
from .kernels import Branch, LayerFormula, evaluate, use_fast_kernels
from .registry import SITES, Rule, available_rules, get_rule, register_rule

__all__ = [
    "Rule", "register_rule", "get_rule", "available_rules", "SITES", "NormSpec",
    "replace_grad", "scale_grad", "stabilize", "tangent_mode",
    "Epsilon", "Gradient", "Gamma", "ZPlus", "AlphaBeta", "Flat", "WSquare", "ZBox", "Identity", "Pass",
    "Uniform", "Softmax", "Bilinear", "Norm", "CPAttention",
    "LayerFormula", "Branch", "evaluate", "use_fast_kernels",
]
