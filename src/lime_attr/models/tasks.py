"""The names of the embedded demo tasks: ``"vision"`` / ``"image"`` / ``"audio"`` or a builtin model name.

A bottom module of :mod:`lime_attr.models`: the held-out sets (:mod:`~lime_attr.models.heldout`), the
corruptions (:mod:`~lime_attr.models.corruption`) and the probes all resolve task names here, so that
none of them imports another for it.
"""
from __future__ import annotations

__all__ = ["TASK_ALIASES", "resolve_task"]

#: Every accepted task name and the builtin demo model it stands for.
TASK_ALIASES: dict[str, str] = {
    "vision": "digits-llava",
    "image": "digits-llava",
    "digits-llava": "digits-llava",
    "audio": "tones-qwen2audio",
    "tones-qwen2audio": "tones-qwen2audio",
}


def resolve_task(task: str) -> str:
    """Map ``"vision"``/``"image"``/``"audio"`` or a builtin name to the builtin model name.

    Raises
    ------
    ValueError
        For an unknown task; the message lists the accepted names.
    """
    try:
        return TASK_ALIASES[task]
    except KeyError:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_ALIASES)}") from None
