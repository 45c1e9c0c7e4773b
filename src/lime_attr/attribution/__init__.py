"""Captum-compatible attribution classes."""
from .lrp import LRP

__all__ = ["LRP"]
