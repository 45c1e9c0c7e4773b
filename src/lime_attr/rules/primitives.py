"""The public gradient-form primitives a custom rule is written with.

Each returns a tensor whose forward *value* is exactly the original computation's while its *gradient*
is the rule-modified one (see :mod:`lime_attr.rules.registry` for the rule protocol):

* :func:`replace_grad` -- the value of one tensor, the gradient of another (a surrogate);
* :func:`scale_grad` -- identity forward, gradient times a constant (AttnLRP's uniform and bilinear rules);
* :func:`modified_grad` -- value forward, an explicit vector-Jacobian product backward (layer rules);
* :func:`epsilon_grad_hook` / :func:`mul_grad_hook` -- a factor on the gradient arriving at a tensor;
* :func:`grad_to_relevance` / :func:`relevance_to_grad` -- boundaries to code that passes relevance
  backwards instead of gradients (zennit's hooks);
* :func:`stabilize`, :func:`safe_divide` -- denominators with a sign-preserving stabiliser / 0 for 0/0.
"""
from ._grad import (epsilon_grad_hook, grad_to_relevance, modified_grad, mul_grad_hook,
                    relevance_to_grad, replace_grad, safe_divide, scale_grad, stabilize)

__all__ = ["replace_grad", "scale_grad", "modified_grad", "epsilon_grad_hook", "mul_grad_hook",
           "grad_to_relevance", "relevance_to_grad", "stabilize", "safe_divide"]
