"""Per-architecture canonizers, keyed by Hugging Face ``config.model_type``."""
from .base import Canonizer, available_canonizers, canonizer_for, get_canonizer, register_canonizer

__all__ = ["Canonizer", "register_canonizer", "canonizer_for", "get_canonizer", "available_canonizers"]
