"""Per-architecture canonizers, keyed by Hugging Face ``config.model_type``.

Importing this package registers every built-in family (one module per family).
"""
from .base import (Canonizer, GatedMLP, HFCanonizer, available_canonizers, canonizer_for, get_canonizer,
                   register_canonizer, unregister_canonizer)
from .facts import FamilyFacts, facts_for
from . import llama  # noqa: F401  (registers)
from . import (bert, gemma, gemma2, gemma3_text, gpt2, mistral, phi3, qwen2, qwen3,  # noqa: F401,E402
               mixtral, qwen3_moe)  # (text families)
from . import (clip, llava, llava_next, qwen2_5_vl, qwen2_audio, qwen2_vl, siglip, vit,  # noqa: F401,E402
               whisper)  # (vision / audio / multimodal families)

__all__ = ["Canonizer", "HFCanonizer", "GatedMLP", "register_canonizer", "canonizer_for", "get_canonizer",
           "available_canonizers", "unregister_canonizer", "FamilyFacts", "facts_for"]
