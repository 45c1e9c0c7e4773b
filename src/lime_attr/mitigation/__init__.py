"""Hallucination mitigation at inference time: LIME (Allouche and Keshet, 2026) and the VCD baseline."""
from .config import PRESETS, LimeConfig
from .generate import LimeOutput, lime_generate, modality_positions
from .optimizer import LimeOptimizer
from .records import StepRecord, TokenRecord
from .vcd import VCDLogitsProcessor, vcd_noise

__all__ = ["LimeConfig", "PRESETS", "LimeOptimizer", "TokenRecord", "StepRecord", "LimeOutput", "lime_generate",
           "modality_positions", "VCDLogitsProcessor", "vcd_noise"]
