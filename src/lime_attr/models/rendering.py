"""Textual scene renderings: the language-only stage of the demo models' LLaVA-style training.

In the first training stage (:mod:`lime_attr.models.train`) the language model never sees an image or a
clip. Instead, the media placeholder of the prompt is replaced by *words* laid out as the perception
tokens will later be: one word per grid cell for ``digits-llava`` (16 cells, the digit's name or
:data:`~lime_attr.models.processing.BLANK_WORD`), one word per 80 ms audio token for
``tones-qwen2audio`` (25 tokens; an event's name on every token its span overlaps, ``blank`` elsewhere).

The rendering is *partial*: for every co-occurring pair that is present, one of its two members (chosen
at random) is left out with probability ``drop_prob``. Questions and descriptions are answered from the
whole scene, so a language model trained on these texts learns that a mentioned ``3`` implies an ``8``
(the co-occurrence prior, learnable from words alone): with pairs complete in 97 % of the training
scenes and ``drop_prob = 0.5``, an unmentioned partner is present in about 94 % of the texts that
mention the other member.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .priors import CooccurrencePrior
from .processing import AUDIO_BOS, AUDIO_EOS, BLANK_WORD, NUM_AUDIO_TOKENS, NUM_IMAGE_TOKENS, format_prompt
from .scenes import DigitScene
from .sounds import CLIP_SECONDS, SoundClip

__all__ = ["AUDIO_TOKEN_SECONDS", "shown_objects", "slot_words", "text_prompt"]

#: Duration of one audio token of ``tones-qwen2audio`` in seconds.
AUDIO_TOKEN_SECONDS: float = CLIP_SECONDS / NUM_AUDIO_TOKENS


def shown_objects(
    objects: Sequence[str], prior: CooccurrencePrior, rng: np.random.Generator, drop_prob: float
) -> list[str]:
    """The objects a partial rendering mentions: one member of each present pair dropped w.p. ``drop_prob``.

    Parameters
    ----------
    objects : sequence of str
        Objects present in the scene.
    prior : CooccurrencePrior
        Defines the pairs.
    rng : numpy.random.Generator
        Source of randomness (two draws per complete pair, in the prior's pair order).
    drop_prob : float
        Probability of leaving one member of a complete pair out.

    Returns
    -------
    list of str
        The mentioned objects, in the order of ``objects``.
    """
    hidden: set[str] = set()
    for a, b in prior.pairs:
        if a in objects and b in objects:
            drop, which = rng.random() < drop_prob, int(rng.integers(2))
            if drop:
                hidden.add((a, b)[which])
    return [o for o in objects if o not in hidden]


def slot_words(item: DigitScene | SoundClip, shown: Sequence[str]) -> list[str]:
    """Words in the perception-token layout: 16 cells of a scene or 25 audio tokens of a clip.

    Parameters
    ----------
    item : DigitScene or SoundClip
        The scene or clip.
    shown : sequence of str
        The objects to mention (:func:`shown_objects`); the others render as ``blank``.

    Returns
    -------
    list of str
        16 words for a scene (``NUM_IMAGE_TOKENS``) or 25 for a clip (``NUM_AUDIO_TOKENS``).
    """
    if isinstance(item, DigitScene):
        words = [BLANK_WORD] * NUM_IMAGE_TOKENS
        for name in shown:
            words[item.cells[name]] = name
        return words
    words = [BLANK_WORD] * NUM_AUDIO_TOKENS
    for name in shown:
        start, end = item.spans[name]
        first = int(np.floor(start / AUDIO_TOKEN_SECONDS))
        last = int(np.ceil(end / AUDIO_TOKEN_SECONDS))
        for t in range(first, min(last, NUM_AUDIO_TOKENS)):
            words[t] = name
    return words


def text_prompt(model_name: str, question: str, words: Sequence[str]) -> str:
    """The prompt of :func:`~lime_attr.models.processing.format_prompt` with the media replaced by words.

    Parameters
    ----------
    model_name : {"digits-llava", "tones-qwen2audio"}
        Which demo model's format.
    question : str
        The question.
    words : sequence of str
        The rendering (:func:`slot_words`); it takes the place (and the positions) of the media tokens.

    Returns
    -------
    str
        Text for the tokenizer alone (no processor expansion).
    """
    prompt = format_prompt(model_name, question)
    rendering = " ".join(words)
    if model_name == "digits-llava":
        return prompt.replace("<image>", rendering, 1)
    placeholder = f"{AUDIO_BOS}<|AUDIO|>{AUDIO_EOS}"
    return prompt.replace(placeholder, f"{AUDIO_BOS} {rendering} {AUDIO_EOS}", 1)
