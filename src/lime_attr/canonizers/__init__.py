"""Per-architecture canonizers, keyed by Hugging Face ``config.model_type``.

Importing this package registers every built-in family (one module per family).
"""
from .base import (Canonizer, GatedMLP, HFCanonizer, available_canonizers, canonizer_for, get_canonizer,
                   register_canonizer)
from . import llama  # noqa: F401  (registers)

__all__ = ["Canonizer", "HFCanonizer", "GatedMLP", "register_canonizer", "canonizer_for", "get_canonizer",
           "available_canonizers"]
