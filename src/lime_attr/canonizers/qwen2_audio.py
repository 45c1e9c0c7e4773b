"""Qwen2-Audio: a Whisper-like audio encoder (conv stem + GELU, added positions, LayerNorm blocks,
average pooling), a linear projector and a language model (Qwen2, from ``text_config``).

Explained: ``LRP(model).attribute(inputs_embeds, target=token, input_ids=ids, input_features=mel,
feature_attention_mask=mask)`` gives the relevance of the text embeddings, and the same call with
``mel`` as the explained input and ``input_name="input_features", inputs_embeds=emb`` gives the audio's.

Qwen2-Audio's forward runs the audio tower only when it builds the embeddings itself from
``input_ids``; given ``inputs_embeds`` it would silently drop the audio. Inside a scope this canonizer
therefore routes a call with ``inputs_embeds``, ``input_ids`` and ``input_features`` through the audio
path, the embedding lookup of ``input_ids`` answered by the given ``inputs_embeds``
(:func:`~lime_attr.canonizers.base.route_inputs_embeds`); ``input_ids`` then only locate the audio tokens.
"""


from .base import HFCanonizer, register_canonizer
from .facts import FamilyFacts


@register_canonizer("qwen2_audio_encoder")
class Qwen2AudioEncoderCanonizer(HFCanonizer):
    """``Qwen2AudioEncoder``: explained w.r.t. ``input_features`` (log-mel)."""

    attention = ("Qwen2AudioAttention",)


@register_canonizer("qwen2_audio")
class Qwen2AudioCanonizer(HFCanonizer):
    """``Qwen2AudioForConditionalGeneration`` / ``Qwen2AudioModel``: audio encoder + projector + LM."""

    components = ("audio_config", "text_config")
    route_embeds = {"Qwen2AudioModel": ("input_features",)}
    #: audio spans run from ``<|audio_bos|>`` to ``<|audio_eos|>`` (tokenizer tokens, not in the config); the
    #: mel features need their ``feature_attention_mask``
    facts = FamilyFacts(audio_marker_tokens=("<|audio_bos|>", "<|audio_eos|>"), audio_markers_required=True,
                        audio_feature_mask=True, language_model=("model.language_model", "language_model"),
                        decoder=("model.language_model", "language_model"), rope="1d")
