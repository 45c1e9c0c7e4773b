"""Exceptions raised by lime_attr.

Every error names the problem and the fix. They subclass the built-in exception a user would expect
(``ValueError``, ``TypeError``, ``KeyError``) so that generic handlers keep working.
"""
from __future__ import annotations

__all__ = [
    "LimeAttrError",
    "UnknownNameError",
    "RuleParameterError",
    "UncoveredModuleError",
    "UncoveredOpError",
    "UnsupportedModelError",
    "RuleSiteError",
    "ModelStateError",
]


class LimeAttrError(Exception):
    """Base class of every lime_attr error."""


class UnknownNameError(LimeAttrError, KeyError):
    """A rule, composite or canonizer name that is not registered.

    The message lists the registered names.
    """

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RuleParameterError(LimeAttrError, ValueError):
    """A rule parameter outside its valid range."""


class RuleSiteError(LimeAttrError, TypeError):
    """A rule was mapped to a place (module or op) it cannot be applied to."""


class UncoveredModuleError(LimeAttrError, TypeError):
    """A parametric, normalisation or unknown module that no rule of the composite covers."""


class UncoveredOpError(LimeAttrError, RuntimeError):
    """A nonlinear or bilinear op on an input-dependent path that no rule covers.

    A ``RuntimeError`` (raised while the model runs), deliberately not a ``TypeError``: torch turns a
    ``TypeError`` raised inside a binary operator (``x / h``, ``a * b``) into ``NotImplemented``, which
    would replace this message by Python's "unsupported operand type(s)".
    """


class UnsupportedModelError(LimeAttrError, ValueError):
    """A model (``config.model_type``) for which no canonizer is registered, or a canonizer written for
    another ``model_type``."""


class ModelStateError(LimeAttrError, RuntimeError):
    """The model or torch's autograd state does not allow an attribution that leaves the model unchanged.

    Raised for a model on the meta device, for calls under ``torch.inference_mode()`` and for modules
    whose training-mode forward changes the model (BatchNorm updating its running statistics).
    """
