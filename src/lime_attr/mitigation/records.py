"""What LIME did, per generated token and per inner step: the records a researcher studies.

:class:`TokenRecord` is kept for every generated position (shares, losses, whether a gate skipped it);
with ``LimeConfig(record="steps")`` it also holds one :class:`StepRecord` per inner step -- the token the
step explained, the relevance of every position, the loss terms, the top-k logits, the norms of
:math:`\\Delta_K` / :math:`\\Delta_V` per layer, the modality share and focus. Both serialise to strict
JSON (:meth:`TokenRecord.to_dict`: NaN and infinities become null).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
from torch import Tensor

from ..strict_json import jsonable

__all__ = ["TokenRecord", "StepRecord"]


@dataclass
class StepRecord:
    r"""One inner step of one generated token (lists hold one entry per batch row).

    Attributes
    ----------
    step : int
        Inner step (0: the forward with :math:`\Delta = 0`).
    explained : list of int
        The token whose logit the step's relevance explains (the one the decoder would emit now).
    explained_value : list of float
        The scalar the relevance explains, per row: the objective's
        :meth:`~lime_attr.mitigation.objectives.Objective.explained` (``"paper"``: that token's logit;
        ``"decision"``: its margin over the runner-up).
    relevance : list of list of float
        :math:`R_i` of every position.
    loss, rel_loss, kl : list of float
        Total loss, relevance term and KL term (before the KL weight).
    top_tokens, top_logits : list of list
        The ``top_k_logits`` largest logits of the step's forward and their token ids.
    delta_k_norm, delta_v_norm : list of list of float
        Per row, per perturbed layer: the Frobenius norm of the :math:`\Delta` this forward ran with
        (empty where the config does not perturb keys / values).
    share, focus : list of float
        Perceptual share :math:`\sum_M |R| / \sum |R|` and the objective's focus (mass of
        :math:`\operatorname{softmax}(R/\tau)` on M).
    """

    step: int
    explained: list = field(default_factory=list)
    explained_value: list = field(default_factory=list)
    relevance: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    rel_loss: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    top_tokens: list = field(default_factory=list)
    top_logits: list = field(default_factory=list)
    delta_k_norm: list = field(default_factory=list)
    delta_v_norm: list = field(default_factory=list)
    share: list = field(default_factory=list)
    focus: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Strict-JSON form."""
        return {f.name: jsonable(getattr(self, f.name)) for f in fields(self)}


@dataclass
class TokenRecord:
    r"""What the inner loop did for one generated position (one entry per batch row where relevant).

    Attributes
    ----------
    index : int
        Position in the answer (0 = first generated token).
    tokens : list of int
        Emitted token per row.
    unperturbed_tokens : list of int
        The token the unperturbed model would have emitted (same sampling noise).
    changed : list of bool
        Whether LIME changed the token.
    share_before, share_after : list of float
        Perceptual share of relevance :math:`\sum_M |R| / \sum |R|` (the paper's "modality reliance")
        without the perturbation and under the last perturbation whose relevance was computed (``nan``
        where not computed).
    focus_before, focus_after : list of float
        The quantity the objective raises: the mass of :math:`\operatorname{softmax}(R/\tau)` on M.
    losses, rel_losses, kl : list of list of float
        Per inner step (outer list) and row (inner list): total loss, relevance loss, KL term.
    steps : int
        Optimiser updates applied.
    skipped : str or None
        Why the optimisation was skipped or stopped early (``"confidence"``, ``"share"``,
        ``"early_stop"``, ``"steps=0"``), else None.
    skip_reason : str or None
        The gate's numbers in words (e.g. ``"top probability 0.996 >= confidence_gate 0.99"``).
    relevance_before, relevance_after : Tensor or None
        ``[batch, seq]`` relevance vectors (only with ``record_relevance``).
    step_records : list of StepRecord
        One per inner step (only with ``record="steps"``).
    """

    index: int
    tokens: list = field(default_factory=list)
    unperturbed_tokens: list = field(default_factory=list)
    changed: list = field(default_factory=list)
    share_before: list = field(default_factory=list)
    share_after: list = field(default_factory=list)
    focus_before: list = field(default_factory=list)
    focus_after: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    rel_losses: list = field(default_factory=list)
    kl: list = field(default_factory=list)
    steps: int = 0
    skipped: Optional[str] = None
    skip_reason: Optional[str] = None
    relevance_before: Optional[Tensor] = None
    relevance_after: Optional[Tensor] = None
    step_records: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """Strict-JSON form (tensors as lists, NaN as null), step records included."""
        out = {f.name: jsonable(getattr(self, f.name)) for f in fields(self) if f.name != "step_records"}
        out["step_records"] = [s.to_dict() for s in self.step_records]
        return out


def step_record(step: int, out: Any, losses: tuple, deltas: dict, share: Tensor, focus: Tensor, k: int) -> StepRecord:
    """The :class:`StepRecord` of one inner step (``out``: the step's logits, relevance and target;
    ``losses``: ``(total, relevance, kl)`` per row; ``deltas``: ``{layer: (Delta_K, Delta_V)}``)."""
    total, rel, kl = (t.detach() for t in losses)
    top = out.logits.detach().float().topk(min(k, out.logits.shape[-1]), dim=-1)
    layers = sorted(deltas)

    def norms(which: int) -> list:
        if not layers or deltas[layers[0]][which] is None:
            return [[] for _ in range(out.logits.shape[0])]
        per = torch.stack([deltas[i][which].detach().float().flatten(1).norm(dim=1) for i in layers], 1)
        return per.tolist()

    value = getattr(out, "explained", None)
    return StepRecord(step=step, explained=out.target.tolist(),
                      explained_value=[] if value is None else value.detach().tolist(),
                      relevance=out.relevance.detach().float().tolist(),
                      loss=total.tolist(), rel_loss=rel.tolist(), kl=kl.tolist(), top_tokens=top.indices.tolist(),
                      top_logits=top.values.tolist(), delta_k_norm=norms(0), delta_v_norm=norms(1),
                      share=share.tolist(), focus=focus.tolist())
