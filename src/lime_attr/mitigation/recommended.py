"""The LIME configurations the docs recommend, and the evidence for them (data for
:meth:`LimeConfig.recommended <lime_attr.mitigation.config.LimeConfig.recommended>`).

The recommendations come from the pre-registered evaluation on the prior testbed
(``docs/lime_evaluation.rst``: settings selected on the validation split, judged on the test split).
Only the project's demo models were evaluated; every other model gets the paper's settings
(:meth:`LimeConfig.for_model`, or ``LimeConfig()`` without a preset) with that caveat.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

__all__ = ["Recommendation", "RECOMMENDATIONS", "NOT_EVALUATED", "model_key"]

#: demo model name -> (model_type, LimeConfig.for_model overrides, evidence); from the evaluation's test split
RECOMMENDATIONS: dict[str, tuple[str, dict[str, Any], str]] = {}

NOT_EVALUATED = ("not evaluated on this model: these are the paper's settings (Allouche and Keshet, 2026, Table 5), "
                 "which the project's evaluation on its demo models (docs/lime_evaluation.rst) did not test on this "
                 "one; check them on your own validation data before relying on them")


@dataclass(frozen=True)
class Recommendation:
    """A recommended configuration and why.

    Attributes
    ----------
    config : LimeConfig
    evidence : str
        What the recommendation rests on (numbers, split, page), or the caveat that it rests on none.
    evaluated : bool
        Whether this model was part of the evaluation.
    """

    config: Any
    evidence: str
    evaluated: bool


def model_key(model: Any) -> str:
    """The demo-model name of ``model`` (a model, its config or a name): the last part of its
    ``name_or_path``."""
    if isinstance(model, str):
        return PurePath(model).name
    cfg = getattr(model, "config", model)
    return PurePath(str(getattr(cfg, "name_or_path", "") or "")).name
