"""Word-level tokenizers, processors and prompt format of the two demo models (built offline).

Both tokenizers are :class:`tokenizers.Tokenizer` objects with a :class:`tokenizers.models.WordLevel`
model (lower-casing normaliser; split on whitespace, punctuation and single digits) wrapped in
:class:`transformers.PreTrainedTokenizerFast`. The beginning-of-sequence token ``<s>`` is added by the
post-processor, ``</s>`` ends every answer and ``<pad>`` pads. The processors are the stock
transformers classes configured to the tiny models:

* ``digits-llava``: :class:`transformers.LlavaProcessor` with a :class:`transformers.CLIPImageProcessor`
  (32 x 32, no crop, mean = std = 0.5); ``<image>`` expands to ``(32 / 8) ** 2 = 16`` tokens, one per
  grid cell (the CLS feature is dropped, ``vision_feature_select_strategy="default"``).
* ``tones-qwen2audio``: :class:`transformers.Qwen2AudioProcessor` with a
  :class:`transformers.WhisperFeatureExtractor` (32 mel bins, 2 s chunks, hop 320, FFT 640: 100 frames);
  ``<|AUDIO|>`` expands to ``((100 - 1) // 2 + 1 - 2) // 2 + 1 = 25`` tokens (80 ms each).

Prompt format (one turn)::

    <s> user : <image> is there a 7 in the image ? assistant : yes </s>
    <s> user : <|audio_bos|> <|AUDIO|> <|audio_eos|> list the sounds . assistant : chirp click </s>

The chat templates render exactly this format, so ``processor.apply_chat_template`` and
:func:`format_prompt` agree.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import (
    CLIPImageProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2AudioProcessor,
    WhisperFeatureExtractor,
)

from .scenes import CANVAS_SIZE, DIGIT_NAMES
from .sounds import CLIP_SECONDS, SAMPLING_RATE, SOUND_NAMES

__all__ = [
    "PATCH_SIZE",
    "NUM_IMAGE_TOKENS",
    "NUM_MEL_BINS",
    "HOP_LENGTH",
    "NUM_AUDIO_FRAMES",
    "NUM_AUDIO_TOKENS",
    "BOS",
    "EOS",
    "PAD",
    "UNK",
    "IMAGE_TOKEN",
    "BLANK_WORD",
    "AUDIO_TOKEN",
    "AUDIO_BOS",
    "AUDIO_EOS",
    "existence_question",
    "description_question",
    "format_prompt",
    "build_digits_tokenizer",
    "build_tones_tokenizer",
    "build_digits_processor",
    "build_tones_processor",
]

#: Vision-tower patch size in pixels.
PATCH_SIZE: int = 8
#: Image placeholder tokens per image (CLS dropped).
NUM_IMAGE_TOKENS: int = (CANVAS_SIZE // PATCH_SIZE) ** 2
#: Mel bins of the audio features.
NUM_MEL_BINS: int = 32
#: Hop length of the audio features in samples (20 ms).
HOP_LENGTH: int = 320
#: FFT size of the audio features in samples (40 ms).
N_FFT: int = 640
#: Mel frames per clip.
NUM_AUDIO_FRAMES: int = int(CLIP_SECONDS * SAMPLING_RATE) // HOP_LENGTH
#: Audio placeholder tokens per clip (after the stride-2 convolution and the 2x average pool).
NUM_AUDIO_TOKENS: int = (((NUM_AUDIO_FRAMES - 1) // 2 + 1) - 2) // 2 + 1

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IMAGE_TOKEN = "<image>"
AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS = "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"

_COMMON_WORDS = ("user", "assistant", ":", "is", "there", "a", "an", "in", "the", "?", ".", "list", "yes", "no")
#: Word for an empty cell / silent frame in the textual scene renderings of the language-only stage.
BLANK_WORD = "blank"
_DIGITS_WORDS = ("image", "digits", *DIGIT_NAMES)
_TONES_WORDS = ("audio", "sounds", *SOUND_NAMES)

_MODALITY_WORD = {"digits-llava": "image", "tones-qwen2audio": "audio"}
_PLACEHOLDER = {"digits-llava": IMAGE_TOKEN, "tones-qwen2audio": f"{AUDIO_BOS}{AUDIO_TOKEN}{AUDIO_EOS}"}
_LIST_QUESTION = {"digits-llava": "List the digits.", "tones-qwen2audio": "List the sounds."}


def existence_question(model_name: str, obj: str) -> str:
    """Yes/no existence question about ``obj``, e.g. ``"Is there a 7 in the image?"``.

    Parameters
    ----------
    model_name : {"digits-llava", "tones-qwen2audio"}
        Which demo task.
    obj : str
        Digit (``"0"``-``"9"``) or sound class name.

    Returns
    -------
    str
    """
    article = "an" if obj == "8" else "a"
    return f"Is there {article} {obj} in the {_MODALITY_WORD[model_name]}?"


def description_question(model_name: str) -> str:
    """The description request, ``"List the digits."`` or ``"List the sounds."``."""
    return _LIST_QUESTION[model_name]


def format_prompt(model_name: str, question: str) -> str:
    """Single-turn prompt with the modality placeholder, ending where the answer starts.

    Parameters
    ----------
    model_name : {"digits-llava", "tones-qwen2audio"}
        Which demo model.
    question : str
        Question text (case does not matter: the tokenizer lower-cases).

    Returns
    -------
    str
        E.g. ``"user : <image> Is there a 7 in the image? assistant :"``; pass it as ``text`` to the
        processor together with one image / clip. The tokenizer adds ``<s>``.
    """
    return f"user : {_PLACEHOLDER[model_name]} {question} assistant :"


def _chat_template(media_type: str, placeholder: str) -> str:
    # Renders the same token sequence as format_prompt (whitespace is irrelevant to the word-level
    # tokenizer); answers of earlier assistant turns end with </s>.
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}assistant : {% else %}user : {% endif %}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == '{media_type}' %}}{placeholder} "
        "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %} {{ eos_token }} {% else %} {% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )


def _build_tokenizer(
    words: tuple[str, ...], media_tokens: tuple[str, ...], extra: dict[str, str]
) -> PreTrainedTokenizerFast:
    specials = (PAD, BOS, EOS, UNK, *media_tokens)
    vocab = {token: idx for idx, token in enumerate((*specials, *words))}
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=extra,
        padding_side="left",
        model_max_length=128,
    )


def build_digits_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer of ``digits-llava`` (special tokens ``<pad> <s> </s> <unk> <image>``).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    return _build_tokenizer(_COMMON_WORDS + (BLANK_WORD,) + _DIGITS_WORDS, (IMAGE_TOKEN,), {"image_token": IMAGE_TOKEN})


def build_tones_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer of ``tones-qwen2audio`` (adds ``<|audio_bos|> <|AUDIO|> <|audio_eos|>``).

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    return _build_tokenizer(
        _COMMON_WORDS + (BLANK_WORD,) + _TONES_WORDS,
        (AUDIO_BOS, AUDIO_TOKEN, AUDIO_EOS),
        {"audio_token": AUDIO_TOKEN, "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS},
    )


def build_digits_processor() -> LlavaProcessor:
    """``LlavaProcessor`` of ``digits-llava``: CLIP image processor at 32 x 32, patch 8, 16 image tokens.

    Returns
    -------
    transformers.LlavaProcessor
    """
    image_processor = CLIPImageProcessor(
        size={"height": CANVAS_SIZE, "width": CANVAS_SIZE},
        crop_size={"height": CANVAS_SIZE, "width": CANVAS_SIZE},
        do_resize=True,
        do_center_crop=False,
        do_rescale=True,
        do_normalize=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_digits_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_chat_template("image", IMAGE_TOKEN),
        image_token=IMAGE_TOKEN,
    )


def build_tones_processor() -> Qwen2AudioProcessor:
    """``Qwen2AudioProcessor`` of ``tones-qwen2audio``: 32 mel bins, 2 s chunks, 25 audio tokens.

    Returns
    -------
    transformers.Qwen2AudioProcessor
    """
    feature_extractor = WhisperFeatureExtractor(
        feature_size=NUM_MEL_BINS,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        chunk_length=int(CLIP_SECONDS),
        n_fft=N_FFT,
        return_attention_mask=True,
    )
    return Qwen2AudioProcessor(
        feature_extractor=feature_extractor,
        tokenizer=build_tones_tokenizer(),
        chat_template=_chat_template("audio", _PLACEHOLDER["tones-qwen2audio"]),
    )
