"""Captum-compatible attribution classes."""
from .layer import LayerLRP
from .lrp import LRP
from .modality import ModalityAttribution, ModalityResult

__all__ = ["LRP", "LayerLRP", "ModalityAttribution", "ModalityResult"]
