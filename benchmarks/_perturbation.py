"""Perturbation curves (MoRF / LeRF), their areas, and evidence metrics.

Features are groups of input elements (a pixel, a 2x2 patch, a token position with its whole
embedding vector): ``groups`` gives, for every element of one input, the index of its feature.
Attributions are summed (signed) within a feature; features are then removed in order of that score
by replacing all their elements with a fixed baseline value.

* MoRF (most relevant first): descending score; a faithful attribution makes the target logit fall
  fast, so a *small* area under the curve is good.
* LeRF (least relevant first): ascending score; the logit should stay high, a *large* area is good.
* ABPC (area between perturbation curves, as in AttnLRP, Achtibat et al. 2024):
  ``AUC(LeRF) - AUC(MoRF)``; larger is better.

Areas are trapezoids over the removed fraction in [0, 1] (step k removes ``round(k * F / K)``
features), computed per example and then averaged. Ties in a score are broken by one fixed random
permutation of the features per example, the same for every method, so that e.g. the many exact
zeros of Input x Gradient on background pixels are not ordered by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

ForwardFn = Callable[[torch.Tensor], torch.Tensor]


def feature_scores(attribution: torch.Tensor, groups: torch.Tensor, n_features: int) -> torch.Tensor:
    """Sum an input-shaped attribution into per-feature scores.

    Parameters
    ----------
    attribution : torch.Tensor
        ``[N, *input_shape]``.
    groups : torch.Tensor
        ``input_shape`` long tensor of feature indices in ``[0, n_features)``.
    n_features : int
        Number of features F.

    Returns
    -------
    torch.Tensor
        ``[N, F]`` float64 scores.
    """
    flat = attribution.detach().reshape(attribution.shape[0], -1).to(torch.float64)
    index = groups.reshape(1, -1).expand_as(flat)
    out = torch.zeros(flat.shape[0], n_features, dtype=torch.float64)
    return out.scatter_add_(1, index, flat)


def tie_break_permutations(n: int, n_features: int, seed: int = 0) -> torch.Tensor:
    """One fixed random permutation of the features per example, ``[N, F]``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n_features, generator=gen) for _ in range(n)])


def removal_order(scores: torch.Tensor, descending: bool, tie_break: torch.Tensor) -> torch.Tensor:
    """Feature indices in removal order, ties broken by ``tie_break``.

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]``.
    descending : bool
        True for MoRF, False for LeRF.
    tie_break : torch.Tensor
        ``[N, F]`` permutations (see :func:`tie_break_permutations`).

    Returns
    -------
    torch.Tensor
        ``[N, F]`` long.
    """
    permuted = torch.gather(scores, 1, tie_break)
    order = torch.argsort(permuted, dim=1, descending=descending, stable=True)
    return torch.gather(tie_break, 1, order)


def perturbation_curve(
    forward: ForwardFn,
    inputs: torch.Tensor,
    baseline: torch.Tensor,
    groups: torch.Tensor,
    order: torch.Tensor,
    targets: torch.Tensor,
    steps: int | None = None,
    batch_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Target logit and probability as features are removed in ``order``.

    Parameters
    ----------
    forward : callable
        Maps a batch of inputs to logits ``[N, C]``.
    inputs : torch.Tensor
        ``[N, *input_shape]``.
    baseline : torch.Tensor
        Removal value, broadcastable to ``input_shape``.
    groups : torch.Tensor
        ``input_shape`` feature index of each element.
    order : torch.Tensor
        ``[N, F]`` removal order.
    targets : torch.Tensor
        ``[N]`` explained class / token.
    steps : int, optional
        Number of removal steps K (default: F, one feature per step).
    batch_size : int
        Forward-pass chunk size.

    Returns
    -------
    logits, probs : numpy.ndarray
        ``[N, K + 1]``; column k after removing ``round(k * F / K)`` features.
    """
    n, n_features = order.shape
    steps = steps or n_features
    counts = np.rint(np.linspace(0, n_features, steps + 1)).astype(int)
    # rank[i, f] = position of feature f in example i's removal order
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_features, device=order.device).expand(n, -1).contiguous())
    element_rank = rank[:, groups.reshape(-1)].reshape(inputs.shape)  # [N, *input_shape]
    baseline = baseline.to(inputs.dtype).expand_as(inputs[0])
    logits = np.empty((n, steps + 1))
    probs = np.empty((n, steps + 1))
    with torch.no_grad():
        for k, count in enumerate(counts):
            for start in range(0, n, batch_size):
                sl = slice(start, start + batch_size)
                x = torch.where(element_rank[sl] < int(count), baseline, inputs[sl])
                out = forward(x).to(torch.float64)
                tgt = targets[sl].unsqueeze(1)
                logits[sl, k] = out.gather(1, tgt).squeeze(1).cpu().numpy()
                probs[sl, k] = out.softmax(-1).gather(1, tgt).squeeze(1).cpu().numpy()
    return logits, probs


def area_under_curve(curves: np.ndarray) -> np.ndarray:
    """Per-example trapezoidal area over the removed fraction in [0, 1]; ``[N, K+1] -> [N]``."""
    k = curves.shape[1] - 1
    return (curves[:, 1:] + curves[:, :-1]).sum(axis=1) / (2.0 * k)


@dataclass
class CurveResult:
    """MoRF / LeRF curves of one method on one model, for one recorded quantity."""

    morf: np.ndarray
    lerf: np.ndarray

    def summary(self) -> dict[str, object]:
        """Mean curves, mean areas, ABPC with its standard error."""
        auc_morf = area_under_curve(self.morf)
        auc_lerf = area_under_curve(self.lerf)
        abpc = auc_lerf - auc_morf
        n = len(abpc)
        return {
            "auc_morf": float(auc_morf.mean()),
            "auc_lerf": float(auc_lerf.mean()),
            "abpc": float(abpc.mean()),
            "abpc_sem": float(abpc.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
            "morf_curve": [float(v) for v in self.morf.mean(axis=0)],
            "lerf_curve": [float(v) for v in self.lerf.mean(axis=0)],
        }


def evidence_metrics(scores: torch.Tensor, evidence: torch.Tensor) -> dict[str, float]:
    """Relevance mass and pointing accuracy on known evidence features.

    Parameters
    ----------
    scores : torch.Tensor
        ``[N, F]`` signed per-feature relevance.
    evidence : torch.Tensor
        ``[N, F]`` bool ground truth.

    Returns
    -------
    dict
        ``evidence_mass``: mean over examples of ``sum_{evidence} |R_f| / sum_f |R_f|`` (absolute
        relevance; 0 where all relevance is 0); ``pointing_accuracy``: share of examples whose
        top signed-relevance feature is an evidence feature; ``chance_mass``: the mean evidence share
        of features, what a uniform attribution would get.
    """
    absolute = scores.abs()
    total = absolute.sum(dim=1)
    mass = torch.where(total > 0, (absolute * evidence).sum(dim=1) / total.clamp_min(1e-300), 0.0)
    top = scores.argmax(dim=1)
    hit = evidence.gather(1, top.unsqueeze(1)).squeeze(1)
    return {
        "evidence_mass": float(mass.mean()),
        "pointing_accuracy": float(hit.double().mean()),
        "chance_mass": float(evidence.double().mean()),
    }
