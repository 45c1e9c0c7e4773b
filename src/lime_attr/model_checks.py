"""Checks, before a scope is entered, that an attribution can run on a model and leave it as it was.

One place for the model- and autograd-state conditions every entry point (``LRP``, ``LayerLRP``,
``ModalityAttribution``, LIME) needs: :class:`~lime_attr.LRPScope` runs them on entry.

* ``torch.inference_mode()``: no autograd graph is recorded, so no relevance can be computed;
* the meta device: parameters without data;
* BatchNorm in training mode: its forward updates ``running_mean`` / ``running_var``, so the model
  would leave the scope changed (refused: call ``model.eval()``);
* active dropout in training mode: two calls give different relevance (a warning naming
  ``model.eval()``).
"""
from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from .errors import LimeAttrError, ModelStateError

__all__ = ["check_autograd_mode", "check_model_state", "forward_error"]

log = logging.getLogger(__name__)

_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout_p", "dropout_p")


def check_autograd_mode(caller: str) -> None:
    """Refuse to run under ``torch.inference_mode()``, where no relevance can be computed.

    Raises
    ------
    ModelStateError
        Naming ``caller`` and the fix (run it outside the ``inference_mode`` block).
    """
    if torch.is_inference_mode_enabled():
        raise ModelStateError(f"{caller} cannot run under torch.inference_mode(): relevance is a (rule-modified) "
                              "gradient and inference mode records no autograd graph. Call it outside the "
                              "inference_mode block (torch.no_grad() around it is fine: lime_attr enables grad "
                              "where it needs it)")


def check_model_state(model: nn.Module, caller: str = "the LRP scope") -> None:
    """Refuse a model the attribution cannot run on unchanged; warn when its output is random.

    Parameters
    ----------
    model : nn.Module
    caller : str
        Named in the messages.

    Raises
    ------
    ModelStateError
        For inference mode, a model on the meta device, or a BatchNorm in training mode.

    Warns
    -----
    UserWarning
        When dropout is active (training mode, p > 0): relevance is then random.
    """
    check_autograd_mode(caller)
    meta = next((n for n, p in _tensors(model) if p.is_meta), None)
    if meta is not None:
        raise ModelStateError(f"{caller}: the model is on the meta device ({meta!r} has no data), so there is "
                              "nothing to compute with. Load its weights first (from_pretrained without "
                              "device_map='meta' / init_empty_weights, or model.to_empty(device=...) followed by "
                              "load_state_dict)")
    bn = [n or "<root>" for n, m in model.named_modules()
          if m.training and getattr(m, "track_running_stats", False) is True and getattr(m, "running_mean", None)
          is not None]
    if bn:
        raise ModelStateError(f"{caller}: {type(model).__name__} is in training mode and its normalisation "
                              f"layer(s) {bn[:3]} would update their running statistics during the attribution, "
                              "changing the model. Call model.eval() first")
    drop = [n or "<root>" for n, m in model.named_modules() if m.training and _active_dropout(m)]
    if drop:
        warnings.warn(f"{caller}: dropout is active in {drop[:3]} ({len(drop)} module(s); the model is in training "
                      "mode), so the relevance is random and two calls differ. Call model.eval() for a "
                      "deterministic attribution", UserWarning, stacklevel=3)


def forward_error(exc: Exception, context: str) -> Exception:
    """The error to raise when the model's own forward fails on the given inputs.

    lime_attr's errors pass unchanged; a ``ValueError`` / ``TypeError`` / ``RuntimeError`` from torch or
    transformers is re-raised as the same built-in type with ``context`` (what was passed, what to check)
    in front of the original message, so that it names the problem at the call the user made.

    Parameters
    ----------
    exc : Exception
        What the forward raised.
    context : str
        E.g. ``"ModalityAttribution.attribute: the model's forward failed on these inputs"``.
    """
    if isinstance(exc, LimeAttrError) or not isinstance(exc, (ValueError, TypeError, RuntimeError)):
        return exc
    kind = next(t for t in (ValueError, TypeError, RuntimeError) if isinstance(exc, t))
    return kind(f"{context}: {exc}")


def _tensors(model: nn.Module):
    yield from model.named_parameters()
    yield from model.named_buffers()


def _active_dropout(module: nn.Module) -> bool:
    if isinstance(module, _DROPOUT_TYPES):
        return module.p > 0
    return any(isinstance(getattr(module, a, None), float) and getattr(module, a) > 0 for a in _DROPOUT_ATTRS)
