"""Captum-compatible attribution classes, all computed by one relevance engine (:mod:`.engine`)."""
from .engine import Relevance, relevance
from .layer import LayerLRP
from .lrp import LRP
from .modality import ModalityAttribution, ModalityResult

__all__ = ["LRP", "LayerLRP", "ModalityAttribution", "ModalityResult", "relevance", "Relevance"]
