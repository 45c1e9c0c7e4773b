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

_CRITERION = ("the pre-registered criterion (significantly more fixed than introduced errors on the control and a "
              "conflict condition, at most 1 point lost on the consistent ones) was not met by any objective, so these "
              "are the paper's settings (docs/lime_evaluation.rst, 2026-12-02). ")

#: demo model name -> (model_type, LimeConfig.for_model overrides, evidence); from the evaluation's test split
RECOMMENDATIONS: dict[str, tuple[str, dict[str, Any], str]] = {
    "digits-llava": ("llava", {}, _CRITERION + (
        "digits-llava: no objective had a setting on the validation grid that fixed more conflict/control errors "
        "than it introduced while keeping the consistent conditions; the published settings changed 1/1 "
        "(fixed/introduced) conflict answers of 200 on the test split; control has 2 errors of 200 to fix")),
    "tones-qwen2audio": ("qwen2_audio", {}, _CRITERION + (
        "tones-qwen2audio: the validation-selected paper objective at 10x lr (fast mode) fixed 48 and introduced 0 "
        "conflict errors of 200 on the test split (Holm p=2.5e-13 over the 35 test cells) but introduced 5 on consistent_yes (-2.5 points), "
        "changed only yes->no answers and did not raise the audio share of the relevance; control has no error "
        "to fix; the published settings fixed 4/0 conflict answers (not significant)")),
}

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
