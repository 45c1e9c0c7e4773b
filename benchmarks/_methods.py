"""The attribution methods compared, each behind one ``attribute(inputs, targets)`` callable.

Every method is used with its library's documented defaults; only what a method cannot run without
is set, and the same for all models:

* lime_attr ``LRP`` with the named composites (``attnlrp``, ``cp-lrp``, ``epsilon-gamma``,
  ``epsilon-plus``), ``canonizer="auto"``; for the pixel models the z-box of ``epsilon-gamma`` is the
  valid pixel range [0, 1] (as for zennit); on the CNN also ``epsilon-gamma`` / ``epsilon-plus``
  with zennit's ``SequentialMergeBatchNorm`` added to the composite (``+merge-bn``), to separate
  the effect of BatchNorm handling from the rules;
* Captum ``Saliency`` (``abs=True``), ``InputXGradient``, ``IntegratedGradients`` (``n_steps=50``,
  Gauss-Legendre, zero baseline), ``GradientShap`` (``n_samples=5``, ``stdevs=0``; baselines:
  16 training inputs), ``LRP`` (its default epsilon rule, eps = 1e-9, on every layer);
* zennit ``EpsilonGammaBox`` (low=0, high=1) and ``EpsilonPlus``, both with
  ``SequentialMergeBatchNorm``, relevance read from the input gradient inside
  ``composite.context(model)`` with a one-hot output seed;
* attention rollout (own implementation, :mod:`benchmarks._rollout`);
* random scores (fixed seed) and, on the retrieval task, the ground-truth evidence as a reference.

A method that does not apply to a model by design is recorded as *not applicable*, one that raises
as *skipped*, each with the reason; nothing falls back to another method.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ._tasks import BenchInstance

AttributeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LIME_COMPOSITES = ("attnlrp", "cp-lrp", "epsilon-gamma", "epsilon-plus")


class MethodUnavailable(RuntimeError):
    """A method does not apply to a model by design (the message says why)."""


@dataclass(frozen=True)
class Method:
    """An attribution method of the benchmark.

    Attributes
    ----------
    name : str
        ``library:method`` key used in the json and the tables.
    family : str
        ``lime_attr``, ``captum``, ``zennit``, ``attention`` or ``reference``.
    settings : str
        The configuration used, for the docs.
    build : callable
        ``BenchInstance -> AttributeFn``; raises :class:`MethodUnavailable` (or any error from the
        library) when the method cannot run on that model.
    feature_level : bool
        The callable returns ``[N, F]`` feature scores rather than input-shaped attributions.
    timed : bool
        Whether the cost benchmark measures it. Untimed methods (the random / evidence references)
        are called once on the whole example set rather than in chunks.
    """

    name: str
    family: str
    settings: str
    build: Callable[[BenchInstance], AttributeFn]
    feature_level: bool = False
    timed: bool = True


# --------------------------------------------------------------------------------------------------
# plain gradient (the cost reference)
# --------------------------------------------------------------------------------------------------
def plain_gradient(inst: BenchInstance) -> AttributeFn:
    """One ``torch.autograd.grad`` of the target logits w.r.t. the input (the cost unit)."""

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = x.detach().requires_grad_(True)
        logit = inst.forward(x).gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(logit, x)
        return grad

    return attribute


# --------------------------------------------------------------------------------------------------
# lime_attr
# --------------------------------------------------------------------------------------------------
def _lime(composite_name: str, merge_batchnorm: bool = False) -> Callable[[BenchInstance], AttributeFn]:
    def build(inst: BenchInstance) -> AttributeFn:
        from lime_attr import LRP, get_composite

        params = {}
        if composite_name == "epsilon-gamma" and inst.box is not None:
            params = {"low": inst.box[0], "high": inst.box[1]}
        composite = get_composite(composite_name, **params)
        if merge_batchnorm:
            from zennit.canonizers import SequentialMergeBatchNorm

            composite = dataclasses.replace(composite, canonizers=[SequentialMergeBatchNorm()])
        lrp = LRP(inst.model, composite=composite, canonizer="auto")

        def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return lrp.attribute(x, target=target).detach()

        return attribute

    return build


# --------------------------------------------------------------------------------------------------
# Captum
# --------------------------------------------------------------------------------------------------
def _captum(cls_name: str, **attribute_kwargs: object) -> Callable[[BenchInstance], AttributeFn]:
    def build(inst: BenchInstance) -> AttributeFn:
        import captum.attr

        method = getattr(captum.attr, cls_name)(inst.forward)
        needs_baselines = cls_name == "GradientShap"

        def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            kwargs = dict(attribute_kwargs)
            if needs_baselines:
                kwargs["baselines"] = inst.background
                # GradientShap draws baselines (numpy) and interpolation points (torch): seed both
                torch.manual_seed(0)
                np.random.seed(0)
            return method.attribute(x.detach().requires_grad_(True), target=target, **kwargs).detach()

        return attribute

    return build


def _captum_lrp(inst: BenchInstance) -> AttributeFn:
    if inst.kind != "torch":
        raise MethodUnavailable(
            "Captum's LRP has rules only for Linear/Conv2d/pooling/BatchNorm2d/ReLU/Dropout/Tanh "
            "(exact types); it raises TypeError on LayerNorm/RMSNorm and has no attention rules"
        )
    import captum.attr

    lrp = captum.attr.LRP(inst.model)

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return lrp.attribute(x.detach().requires_grad_(True), target=target).detach()

    return attribute


# --------------------------------------------------------------------------------------------------
# zennit
# --------------------------------------------------------------------------------------------------
def _zennit(composite_name: str) -> Callable[[BenchInstance], AttributeFn]:
    def build(inst: BenchInstance) -> AttributeFn:
        if inst.kind != "torch":
            raise MethodUnavailable(
                "zennit has no rules for attention, softmax, matmul or LayerNorm/RMSNorm (a transformer "
                "would silently get wrong relevance)"
            )
        from zennit.canonizers import SequentialMergeBatchNorm
        from zennit.composites import EpsilonGammaBox, EpsilonPlus

        if composite_name == "EpsilonGammaBox":
            low, high = inst.box
            composite = EpsilonGammaBox(low=low, high=high, canonizers=[SequentialMergeBatchNorm()])
        else:
            composite = EpsilonPlus(canonizers=[SequentialMergeBatchNorm()])

        def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            x = x.detach().requires_grad_(True)
            with composite.context(inst.model) as model:
                out = model(x)
                seed = torch.nn.functional.one_hot(target, out.shape[1]).to(out.dtype)
                (relevance,) = torch.autograd.grad(out, x, grad_outputs=seed)
            return relevance.detach()

        return attribute

    return build


# --------------------------------------------------------------------------------------------------
# attention rollout, references
# --------------------------------------------------------------------------------------------------
def _rollout(inst: BenchInstance) -> AttributeFn:
    if inst.rollout is None:
        raise MethodUnavailable("attention rollout needs attention weights (transformers only)")
    rollout = inst.rollout
    return lambda x, target: rollout(x)


def _random(inst: BenchInstance) -> AttributeFn:
    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1234)
        return torch.rand(len(x), inst.n_features, generator=gen, dtype=torch.float64)

    return attribute


def _oracle(inst: BenchInstance) -> AttributeFn:
    if inst.evidence is None:
        raise MethodUnavailable("no ground-truth evidence for this task")
    evidence = inst.evidence.to(torch.float64)

    def attribute(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if len(x) != len(evidence):
            raise ValueError("the evidence reference scores the whole example set at once")
        return evidence

    return attribute


def all_methods() -> list[Method]:
    """Every method of the benchmark, in table order."""
    lime_settings = {
        "attnlrp": "AttnLRP rules (softmax/bilinear/norm/identity; eps=0 on linear layers)",
        "cp-lrp": "CP-LRP (attention weights constant; eps=0 on linear layers)",
        "epsilon-gamma": "z-box first layer (box = valid input range where known), gamma=0.25 on "
        "convolutions, eps=1e-6 on dense layers; AttnLRP rules on transformer parts",
        "epsilon-plus": "z+ on convolutions, eps=1e-6 on dense layers",
    }
    methods = [Method(f"lime_attr:{c}", "lime_attr", lime_settings[c], _lime(c)) for c in LIME_COMPOSITES]
    methods += [
        Method(f"lime_attr:{c}+merge-bn", "lime_attr",
               f"as lime_attr:{c}, plus zennit's SequentialMergeBatchNorm canonizer in the composite "
               "(the canonizer zennit's composites get here; CNN only)", _lime(c, merge_batchnorm=True))
        for c in ("epsilon-gamma", "epsilon-plus")
    ]
    methods += [
        Method("captum:Saliency", "captum", "abs=True (default)", _captum("Saliency")),
        Method("captum:InputXGradient", "captum", "defaults", _captum("InputXGradient")),
        Method("captum:IntegratedGradients", "captum",
               "n_steps=50, gausslegendre, zero baseline (defaults)",
               _captum("IntegratedGradients", n_steps=50)),
        Method("captum:GradientShap", "captum",
               "n_samples=5, stdevs=0 (defaults); baselines = 16 training inputs",
               _captum("GradientShap")),
        Method("captum:LRP", "captum", "default rules (epsilon=1e-9 on every layer)", _captum_lrp),
        Method("zennit:EpsilonGammaBox", "zennit",
               "low=0, high=1, gamma=0.25, eps=1e-6 (defaults) + SequentialMergeBatchNorm",
               _zennit("EpsilonGammaBox")),
        Method("zennit:EpsilonPlus", "zennit", "eps=1e-6 (default) + SequentialMergeBatchNorm",
               _zennit("EpsilonPlus")),
        Method("attention-rollout", "attention", "head mean, residual weight 0.5 (Abnar & Zuidema 2020)",
               _rollout, feature_level=True),
        Method("random", "reference", "uniform random scores, fixed seed", _random,
               feature_level=True, timed=False),
        Method("oracle:evidence", "reference", "ground-truth evidence tokens first (retrieval task only)",
               _oracle, feature_level=True, timed=False),
    ]
    return methods


AGREEMENT_PAIRS = (
    ("lime_attr:epsilon-plus+merge-bn", "zennit:EpsilonPlus"),
    ("lime_attr:epsilon-gamma+merge-bn", "zennit:EpsilonGammaBox"),
    ("lime_attr:attnlrp", "captum:LRP"),
    ("lime_attr:attnlrp", "captum:InputXGradient"),
    ("lime_attr:cp-lrp", "lime_attr:attnlrp"),
)
"""Method pairs whose feature scores are compared where both ran: the same rules in two libraries
(lime_attr with BatchNorm merged vs zennit; LRP-0 vs Captum's LRP and Input x Gradient, equal on a
ReLU network), and CP-LRP vs AttnLRP (equal without attention)."""


def applicable(method: Method, inst: BenchInstance) -> Optional[str]:
    """A reason to leave ``method`` out on ``inst`` by design (not a failure), or None."""
    if method.name.startswith("lime_attr:epsilon-plus") and inst.name != "cnn":
        return "epsilon-plus is a CNN composite; run on the CNN only"
    if method.name.endswith("+merge-bn") and inst.name != "cnn":
        return "BatchNorm merging: the CNN only"
    return None
