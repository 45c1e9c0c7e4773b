"""Hallucination mitigation at inference time: LIME (Allouche and Keshet, 2026) and the VCD baseline, and
the decoding-method registry (greedy, sample, VCD and LIME are registered, one module each)."""
from .config import PRESETS, LimeConfig
from .generate import LimeOutput, lime_generate, modality_positions
from .session import LimeSession
from .objectives import (
    Objective,
    available_objectives,
    get_objective,
    register_objective,
    unregister_objective,
)
from .optimizer import LimeOptimizer
from .incremental import IncrementalOptimizer
from .records import StepRecord, TokenRecord
from .vcd import VCDLogitsProcessor, vcd_noise
from .decoding import (
    DecodingMethod,
    DecodingMethodConfig,
    GenerationResult,
    UnknownDecodingMethodError,
    available_decoding_methods,
    config_to_dict,
    decode,
    decoding_session,
    get_decoding_method,
    register_decoding_method,
    unregister_decoding_method,
)
from .greedy import GreedyConfig
from .sampling import SampleConfig, SamplingParams
from .vcd_method import VCDConfig
from .lime_method import LimeMethodConfig

__all__ = ["LimeConfig", "PRESETS", "LimeOptimizer", "IncrementalOptimizer", "TokenRecord", "StepRecord", "LimeOutput", "lime_generate", "LimeSession",
           "modality_positions", "VCDLogitsProcessor", "vcd_noise",
           "DecodingMethod", "DecodingMethodConfig", "GenerationResult", "UnknownDecodingMethodError",
           "register_decoding_method", "unregister_decoding_method", "get_decoding_method",
           "available_decoding_methods", "decode", "decoding_session", "config_to_dict",
           "GreedyConfig", "SamplingParams", "SampleConfig", "VCDConfig", "LimeMethodConfig",
           "Objective", "register_objective", "unregister_objective", "get_objective", "available_objectives"]
