r"""LIME's objectives as data: what is explained, which relevance loss is minimised, how large a step is.

An :class:`Objective` answers three questions of LIME's inner loop
(:class:`~lime_attr.mitigation.optimizer.LimeOptimizer`), one method each:

* :meth:`Objective.explained` -- the scalar per row whose relevance is taken (the relevance engine
  differentiates it through the rule-modified backward, and, with ``second_order="exact"``, exactly);
* :meth:`Objective.relevance_loss` -- the loss of that relevance (lower = more relevance on the
  perceptual positions :math:`M`); the KL term is added by the optimiser;
* :meth:`Objective.lr_scale` -- a multiplier of the inner learning rate for :math:`\Delta_K` and
  :math:`\Delta_V` of one layer, from that layer's unperturbed keys and values.

The base class is the released objective (Allouche and Keshet, 2026); a subclass overrides only what it
changes. Objectives live in a registry, like rules: :func:`register_objective` (a call or a class
decorator), :func:`get_objective`, :func:`unregister_objective`, :func:`available_objectives`.
``LimeConfig(objective=...)`` takes a registered name or an :class:`Objective` instance.

* ``"paper"`` (the default): explain :math:`z_t`, the raw logit of the emitted token; loss
  :math:`-\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i` (:class:`PaperObjective`);
* ``"decision"``: explain :math:`z_t - z_r`, :math:`r` the runner-up (:class:`DecisionObjective`);
* ``"logprob"``: explain :math:`\log p_t = z_t - \operatorname{logsumexp}(z)` (:class:`LogProbObjective`);
* ``"evidence"``: loss :math:`-\log` of the positive-relevance share of :math:`M` (:class:`EvidenceObjective`);
* ``"scaled"``: the paper's loss with :math:`\tau` relative to the mean :math:`|R|`, and the lr relative to
  the RMS of each layer's keys / values (:class:`ScaledObjective`).

A custom objective:

.. code-block:: python

    from lime_attr.mitigation import LimeConfig, Objective, register_objective

    @register_objective("centred_logit")
    class CentredLogit(Objective):
        '''Explain z_t minus the mean logit.'''
        def explained(self, logits, target):
            return logits.gather(1, target[:, None])[:, 0] - logits.mean(-1)

    config = LimeConfig(objective="centred_logit")
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UnknownNameError

__all__ = [
    "Objective",
    "PaperObjective",
    "DecisionObjective",
    "LogProbObjective",
    "EvidenceObjective",
    "ScaledObjective",
    "UnknownObjectiveError",
    "register_objective",
    "unregister_objective",
    "get_objective",
    "available_objectives",
    "objective_name",
    "checked_explained",
    "checked_relevance_loss",
    "checked_lr_scale",
    "target_logit",
    "stable_logsumexp",
    "softmax_focus_loss",
    "DEFAULT_OBJECTIVE",
]

#: The objective of ``LimeConfig()`` (the released one).
DEFAULT_OBJECTIVE = "paper"


# ---------------------------------------------------------------------------------------------- formulas
def target_logit(logits: Tensor, target: Tensor) -> Tensor:
    """:math:`z_t`: the logit of ``target`` per row (``[B, V]``, ``[B]`` -> ``[B]``)."""
    return logits.gather(1, target[:, None].to(logits.device))[:, 0]


def softmax_focus_loss(relevance: Tensor, modality: Tensor, valid: Tensor, temperature: Union[float, Tensor]) -> Tensor:
    r"""The released relevance loss :math:`-\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i`.

    The softmax runs over the valid (non-padding) positions; ``temperature`` is a number or a ``[B, 1]``
    tensor (one :math:`\tau` per row).

    Parameters
    ----------
    relevance : Tensor
        ``[B, S]`` signed relevance (graph attached).
    modality, valid : Tensor
        ``[B, S]`` bool: perceptual positions :math:`M`; non-padding positions.
    temperature : float or Tensor

    Returns
    -------
    Tensor
        ``[B]``.
    """
    r = relevance / temperature
    r = r.masked_fill(~valid, float("-inf"))
    logp = F.log_softmax(r, dim=-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    counts = (modality & valid).sum(-1)
    return -(logp * modality.to(logp.dtype)).sum(-1) / counts.to(logp.dtype)


def stable_logsumexp(logits: Tensor) -> Tensor:
    r""":math:`\log\sum_j e^{z_j}` over the last dimension, written out (shifted by the detached maximum).

    The same value as ``torch.logsumexp``; written with out-of-place ops because the exact second order
    differentiates it in reverse over forward mode, which ``torch.logsumexp``'s forward-mode formula does
    not support (it modifies a saved tensor in place).
    """
    shift = logits.detach().amax(-1, keepdim=True)
    return (logits - shift).exp().sum(-1).log() + shift[..., 0]


def _rms(t: Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------- objectives
class Objective:
    r"""Base class of LIME's objectives; its methods are the released objective.

    Subclasses override the methods they change (and are best frozen dataclasses: objectives are data,
    picklable, their parameters typed). ``name`` is set by :func:`register_objective`; an unregistered
    instance given to ``LimeConfig(objective=...)`` serialises as its ``name``, or its class name.
    """

    #: registered name (set by :func:`register_objective` where the class does not define one)
    name: str = ""

    def explained(self, logits: Tensor, target: Tensor) -> Tensor:
        """The scalar per row whose relevance is taken: :math:`z_t` (the released objective).

        Parameters
        ----------
        logits : Tensor
            ``[B, V]`` last-position logits, in LIME's working dtype, graph attached (differentiate
            through them; do not detach what should carry relevance).
        target : Tensor
            ``[B]`` token ids: the token the decoder would emit (or the fixed target, ``target="fixed"``).

        Returns
        -------
        Tensor
            ``[B]``.
        """
        return target_logit(logits, target)

    def relevance_loss(self, relevance: Tensor, modality: Tensor, valid: Tensor, temperature: float) -> Tensor:
        r"""The relevance loss per row (lower = more relevance on :math:`M`).

        The released loss: :func:`softmax_focus_loss`,
        :math:`-\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i` over the valid positions.

        Parameters
        ----------
        relevance : Tensor
            ``[B, S]`` relevance of each input position (graph attached).
        modality, valid : Tensor
            ``[B, S]`` bool: perceptual positions :math:`M` (never empty on a valid row); non-padding.
        temperature : float
            ``LimeConfig.temperature``.

        Returns
        -------
        Tensor
            ``[B]``.
        """
        return softmax_focus_loss(relevance, modality, valid, temperature)

    def lr_scale(self, keys: Tensor, values: Tensor) -> tuple[float, float]:
        """Multipliers of the inner learning rate for one layer's :math:`\\Delta_K`, :math:`\\Delta_V`.

        Parameters
        ----------
        keys, values : Tensor
            The layer's unperturbed keys / values ``[B, H, S, D]`` (detached; in :math:`\\Delta`'s layout).

        Returns
        -------
        tuple of float
            ``(scale_k, scale_v)``, finite and >= 0; default ``(1.0, 1.0)``.
        """
        return 1.0, 1.0

    def scales_lr(self) -> bool:
        """Whether :meth:`lr_scale` is overridden (otherwise the optimiser never calls it)."""
        return type(self).lr_scale is not Objective.lr_scale

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={objective_name(self)!r})"


@dataclass(frozen=True, repr=False)
class PaperObjective(Objective):
    r"""The released objective (Allouche and Keshet, 2026): explain the raw logit :math:`z_t` of the token
    about to be emitted and minimise :math:`-\frac{1}{|M|}\sum_{i\in M}\log\operatorname{softmax}(R/\tau)_i`.

    Exactly the reference code's arithmetic (the default; the written-out reference loop checks it).
    """

    name: ClassVar[str] = "paper"


@dataclass(frozen=True, repr=False)
class DecisionObjective(Objective):
    r"""Decision relevance: explain :math:`z_t - z_r`, :math:`r = \arg\max_{j\neq t} z_j` (the runner-up
    of the same forward).

    Rationale: the raw logit :math:`z_t` carries what every candidate token shares (most of the
    relevance of "yes" and of "no" is the same); the decision between the emitted token and its strongest
    competitor is their difference. Its relevance says which positions make the model prefer :math:`t`
    over :math:`r`, and raising the perceptual share of *that* cannot be met by making both answers more
    image-relevant. The runner-up is chosen on the detached logits (an index, locally constant), so
    the explained function is linear in the logits: under a conservative composite and a bias-free
    output head the relevance sums to :math:`z_t - z_r`.
    """

    name: ClassVar[str] = "decision"

    def explained(self, logits: Tensor, target: Tensor) -> Tensor:
        target = target.to(logits.device)
        others = logits.detach().scatter(1, target[:, None], float("-inf"))
        runner_up = others.argmax(-1)
        return target_logit(logits, target) - target_logit(logits, runner_up)


@dataclass(frozen=True, repr=False)
class LogProbObjective(Objective):
    r"""Distribution-level relevance: explain :math:`\log p_t = z_t - \operatorname{logsumexp}_j z_j`.

    Rationale: the log-probability is what decoding acts on; it is invariant to a shift common to all
    logits, which the raw logit is not. In gradient form the rule-modified backward is seeded at the
    logits with :math:`\partial\log p_t/\partial z = e_t - p`, so with a conservative composite the
    relevance sums to :math:`z_t - \sum_j p_j z_j` (the emitted logit against the expected logit: the
    first-order, Taylor-at-the-logits treatment of the log-softmax), not to :math:`\log p_t` itself.
    """

    name: ClassVar[str] = "logprob"

    def explained(self, logits: Tensor, target: Tensor) -> Tensor:
        return target_logit(logits, target) - stable_logsumexp(logits)


@dataclass(frozen=True, repr=False)
class EvidenceObjective(Objective):
    r"""Evidence share: the loss is :math:`-\log` of the positive-relevance share of the perceptual positions,

    .. math:: L = -\log\frac{\epsilon + \sum_{i\in M} R_i^+}{\epsilon + \sum_{i\ \mathrm{valid}} R_i^+},
              \qquad R^+ = \max(R, 0),

    instead of the signed :math:`\operatorname{softmax}(R/\tau)`.

    Rationale: :math:`\operatorname{softmax}(R/\tau)` with a small :math:`\tau` puts its mass on the one
    largest position, and rewards making other positions *negative* as much as making :math:`M` positive;
    the positive-evidence share counts only evidence *for* the explained output and has no temperature
    (``LimeConfig.temperature`` is unused). :math:`\epsilon` keeps the ratio defined when no position has
    positive relevance. A position with negative relevance contributes no gradient through :math:`R^+`;
    the share then rises by lowering positive relevance outside :math:`M`.

    Parameters
    ----------
    eps : float
        :math:`\epsilon > 0` (default ``1e-6``, small against relevance of order one logit).
    """

    name: ClassVar[str] = "evidence"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not math.isfinite(self.eps) \
                or self.eps <= 0:
            raise ValueError(f"EvidenceObjective.eps must be a finite number > 0, got {self.eps!r}")

    def relevance_loss(self, relevance: Tensor, modality: Tensor, valid: Tensor, temperature: float) -> Tensor:
        pos = relevance.clamp_min(0) * valid.to(relevance.dtype)
        on_m = (pos * modality.to(pos.dtype)).sum(-1)
        return -(torch.log(on_m + self.eps) - torch.log(pos.sum(-1) + self.eps))


@dataclass(frozen=True, repr=False)
class ScaledObjective(Objective):
    r"""Scaled step: the released loss with a relative temperature, and a learning rate relative to the
    magnitude of each layer's keys and values.

    * :math:`\tau_\mathrm{eff} = \tau\cdot\frac{1}{|V|}\sum_{i\ \mathrm{valid}}|R_i|` per row (detached),
      so that :math:`R/\tau_\mathrm{eff}` has mean absolute value :math:`1/\tau` whatever the scale of
      the relevance (with ``temperature=1`` the softmax sees relevance in units of its mean magnitude,
      instead of a fixed :math:`\tau = 0.1` that makes it one-hot when :math:`|R|` is of order one);
    * the inner lr of :math:`\Delta_K` (:math:`\Delta_V`) of a layer is ``lr`` times the RMS of that
      layer's unperturbed keys (values), over the whole batch, every head and position (padding
      included), so that ``lr`` reads as a *relative* step: Adam's first updates move each entry by about
      ``lr * RMS``. (In a batch the RMS pools the rows: a row's step depends on its batch; run batch 1 for
      row-independent results.)

    Rationale: the released lr (3e-4) and :math:`\tau` (0.1) are absolute numbers chosen for 7B models;
    on a model whose keys and values have another magnitude, or whose relevance has another scale, the
    same numbers give an inert step or a one-hot softmax.

    Parameters
    ----------
    floor : float
        Lower bound of :math:`\overline{|R|}` (a row of zero relevance keeps a finite :math:`\tau_\mathrm{eff}`).
    """

    name: ClassVar[str] = "scaled"
    floor: float = 1e-12

    def __post_init__(self) -> None:
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not math.isfinite(self.floor) \
                or self.floor <= 0:
            raise ValueError(f"ScaledObjective.floor must be a finite number > 0, got {self.floor!r}")

    def relevance_loss(self, relevance: Tensor, modality: Tensor, valid: Tensor, temperature: float) -> Tensor:
        vf = valid.to(relevance.dtype)
        mean_abs = (relevance.detach().abs() * vf).sum(-1) / vf.sum(-1).clamp_min(1)
        tau = temperature * mean_abs.clamp_min(self.floor)[:, None]
        return softmax_focus_loss(relevance, modality, valid, tau)

    def lr_scale(self, keys: Tensor, values: Tensor) -> tuple[float, float]:
        return _rms(keys), _rms(values)


# ---------------------------------------------------------------------------------------------- registry
class UnknownObjectiveError(UnknownNameError, ValueError):
    """An objective name that is not registered; the message lists the registered ones (also a ``ValueError``)."""


_OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str, objective: Any = None, *, overwrite: bool = False) -> Any:
    """Register an objective under ``name``: a call, or a class decorator.

    Parameters
    ----------
    name : str
        The name for ``LimeConfig(objective=name)`` and :func:`get_objective`.
    objective : Objective, type or None
        An instance, or a subclass of :class:`Objective` (instantiated without arguments). ``None``:
        return a decorator.
    overwrite : bool
        Replace an objective already registered under ``name`` (otherwise ``ValueError``).

    Returns
    -------
    Objective or callable
        The registered instance (call form), or a decorator that registers the class / instance it
        decorates and returns it unchanged.

    Examples
    --------
    >>> from lime_attr.mitigation.objectives import EvidenceObjective, register_objective, get_objective
    >>> _ = register_objective("evidence_coarse", EvidenceObjective(eps=1e-3), overwrite=True)
    >>> get_objective("evidence_coarse").eps
    0.001
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"an objective name must be a non-empty string, got {name!r}")
    if objective is None:
        def decorator(obj: Any) -> Any:
            _register(name, obj, overwrite)
            return obj
        return decorator
    return _register(name, objective, overwrite)


def _register(name: str, objective: Any, overwrite: bool) -> Objective:
    if isinstance(objective, type) and issubclass(objective, Objective):
        objective = objective()
    if not isinstance(objective, Objective):
        raise TypeError(f"register_objective({name!r}, ...) expects an Objective instance or subclass "
                        f"(lime_attr.mitigation.Objective), got {type(objective).__name__}")
    held = [n for n, o in _OBJECTIVES.items() if o is objective and n != name]
    if held:
        raise ValueError(f"this objective instance is already registered as {held[0]!r}; register a separate "
                         f"instance under {name!r}")
    if name in _OBJECTIVES and _OBJECTIVES[name] is not objective and not overwrite:
        raise ValueError(f"an objective named {name!r} is already registered ({_OBJECTIVES[name]!r}); pass "
                         "overwrite=True to replace it")
    if objective.name != name:
        object.__setattr__(objective, "name", name)  # (frozen dataclasses too: an instance attribute)
    _OBJECTIVES[name] = objective
    return objective


def unregister_objective(name: str) -> None:
    """Remove the objective registered as ``name`` (not the default ``"paper"``)."""
    if name == DEFAULT_OBJECTIVE:
        raise ValueError(f"the default objective {DEFAULT_OBJECTIVE!r} cannot be unregistered (LimeConfig uses it)")
    if name not in _OBJECTIVES:
        raise UnknownObjectiveError(_unknown(name))
    del _OBJECTIVES[name]


def available_objectives() -> tuple[str, ...]:
    """Names of the registered objectives, in registration order (the built-in ones first)."""
    return tuple(_OBJECTIVES)


def get_objective(objective: Union[str, Objective]) -> Objective:
    """The objective registered as ``objective``, or ``objective`` itself if it is an :class:`Objective`.

    Raises
    ------
    UnknownObjectiveError
        (a ``ValueError`` and a ``KeyError``) for an unregistered name; the message lists the registered ones.
    TypeError
        For anything that is neither a name nor an :class:`Objective`.
    """
    if isinstance(objective, Objective):
        return objective
    if not isinstance(objective, str):
        raise TypeError(f"an objective is a registered name ({', '.join(available_objectives())}) or an "
                        f"Objective instance, got {type(objective).__name__}")
    try:
        return _OBJECTIVES[objective]
    except KeyError:
        raise UnknownObjectiveError(_unknown(objective)) from None


def objective_name(objective: Union[str, Objective]) -> str:
    """The name an objective serialises as: a name unchanged; an instance's ``name``, or its class name."""
    if isinstance(objective, str):
        return objective
    return getattr(objective, "name", "") or type(objective).__name__


def _unknown(name: Any) -> str:
    return (f"unknown LIME objective {name!r}; available objectives: {', '.join(available_objectives())}. "
            "Register your own with lime_attr.mitigation.register_objective(name, objective).")


for _cls in (PaperObjective, DecisionObjective, LogProbObjective, EvidenceObjective, ScaledObjective):
    register_objective(_cls.name, _cls)
del _cls


def checked_explained(objective: Objective, logits: Tensor, target: Tensor) -> Tensor:
    """``objective.explained(logits, target)``, checked to be one floating-point scalar per row."""
    z = objective.explained(logits, target)
    if not isinstance(z, Tensor) or z.shape != target.shape or not z.is_floating_point():
        got = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"objective {objective!r}: explained(logits, target) must return a floating tensor of shape "
                         f"{tuple(target.shape)} (one scalar per row), got {got}")
    return z


def checked_relevance_loss(objective: Objective, relevance: Tensor, modality: Tensor, valid: Tensor,
                           temperature: float) -> Tensor:
    """``objective.relevance_loss(...)``, checked to be one loss per row."""
    loss = objective.relevance_loss(relevance, modality, valid, temperature)
    if not isinstance(loss, Tensor) or loss.shape != relevance.shape[:1]:
        got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"objective {objective!r}: relevance_loss must return a tensor of shape "
                         f"{tuple(relevance.shape[:1])} (one loss per row), got {got}")
    return loss


def checked_lr_scale(objective: Objective, keys: Tensor, values: Tensor) -> tuple[float, float]:
    """``objective.lr_scale(keys, values)`` as two finite floats >= 0, or a ``ValueError`` naming the objective."""
    scales = objective.lr_scale(keys, values)
    try:
        sk, sv = (float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"objective {objective!r}: lr_scale must return two numbers (scale_k, scale_v), got "
                         f"{scales!r}") from None
    if not (math.isfinite(sk) and math.isfinite(sv) and sk >= 0 and sv >= 0):
        raise ValueError(f"objective {objective!r}: lr_scale returned {scales!r}; the scales must be finite and >= 0")
    return sk, sv
