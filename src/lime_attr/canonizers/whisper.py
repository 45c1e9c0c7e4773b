"""Whisper: encoder (conv stem + GELU, added sinusoidal positions), decoder, self- and cross-attention.

What is explained: the log-mel ``input_features`` (Whisper's ``main_input_name``). The natural target of
"the Whisper encoder" is ``WhisperForAudioClassification`` (encoder -> projector -> mean over frames ->
classifier): ``LRP(model).attribute(input_features, target=class)``. ``WhisperForConditionalGeneration``
is covered too (pass ``decoder_input_ids=...``; an int target is the next-token logit at the last decoder
position). The positional embeddings are constants (passthrough); the conv stem's GELUs are functional
calls and get the activation rule in the op mode.
"""
from .base import HFCanonizer, register_canonizer


@register_canonizer("whisper")
class WhisperCanonizer(HFCanonizer):
    """``WhisperForAudioClassification`` / ``WhisperModel`` / ``WhisperForConditionalGeneration``."""

    attention = ("WhisperAttention",)
    passthrough = ("WhisperPositionalEmbedding",)
