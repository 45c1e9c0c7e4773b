"""Yes/no answer parsers for POPE-style benchmarks.

Published POPE numbers for the same model differ by several points depending on how a free-form
answer is turned into "yes" or "no", so every scorer records which parser it used (its ``name`` and a
one-paragraph ``description``) in its result.

Three parsers are registered:

``llava_pope`` (alias ``pope``)
    The convention of LLaVA's ``eval_pope.py``, identical to the POPE repository's ``evaluate.py``:
    keep the text before the first ``"."``, delete commas, split on single spaces, and answer "no" if
    one of the words is exactly ``"No"``, ``"not"`` or ``"no"``; otherwise "yes". It never fails:
    an empty answer, or "NO", or "Not really" is "yes".
``strict``
    The first word of the answer, after leading whitespace, quotes, asterisks and similar markup are
    removed and case is folded, must be ``yes`` or ``no``; anything else is *unparsed* (``None``).
``kuan2024``
    The rule of the evaluation script released with Kuan, Huang and Lee (Interspeech 2024) for the
    audio hallucination QA: substring tests applied in a fixed order (see :func:`parse_kuan2024`);
    answers that match none of them are unparsed.

A parser maps a string to ``"yes"``, ``"no"`` or ``None`` (unparsed). How unparsed answers are counted
is decided by the scorer (its ``unparsed`` argument), not by the parser.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional, Union

from lime_attr.errors import UnknownNameError

__all__ = [
    "YES",
    "NO",
    "AnswerParser",
    "parse_llava_pope",
    "parse_strict",
    "parse_kuan2024",
    "LLAVA_POPE_PARSER",
    "STRICT_PARSER",
    "KUAN2024_PARSER",
    "register_parser",
    "get_parser",
    "available_parsers",
    "parse_yes_no",
]

YES = "yes"
NO = "no"

ParseFn = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class AnswerParser:
    """A named yes/no parser.

    Parameters
    ----------
    name
        Registry name, recorded in every result.
    description
        What the parser does, precisely enough to re-implement it; recorded in every result.
    func
        ``str -> "yes" | "no" | None``. Must be a module-level function so that the parser pickles.
    """

    name: str
    description: str
    func: ParseFn

    def __call__(self, text: str) -> Optional[str]:
        """Parse one answer. Raises ``TypeError`` if ``text`` is not a string."""
        if not isinstance(text, str):
            raise TypeError(
                f"parser {self.name!r} expects the model's answer as a str, got {type(text).__name__}"
            )
        out = self.func(text)
        if out not in (YES, NO, None):
            raise ValueError(f"parser {self.name!r} returned {out!r}; a parser must return 'yes', 'no' or None")
        return out

    def info(self) -> dict[str, str]:
        """``{"name": ..., "description": ...}``, the form stored in results."""
        return {"name": self.name, "description": self.description}


def parse_llava_pope(text: str) -> str:
    """LLaVA's / POPE's answer rule.

    The text before the first ``"."`` is kept (the whole text when there is no period), commas are
    removed, and the result is split on single spaces. If any resulting word equals ``"No"``,
    ``"not"`` or ``"no"`` exactly, the answer is ``"no"``, otherwise ``"yes"``.

    Reproduced exactly, including its quirks: the match is case sensitive (``"NO"`` and ``"Not"`` are
    "yes"), punctuation other than commas and periods stays attached to words (``"no!"`` is "yes"),
    newlines are not separators, and an empty or off-topic answer counts as "yes".
    """
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    if "No" in words or "not" in words or "no" in words:
        return NO
    return YES


_LEADING_MARKUP = re.compile(r"^[\s\"'`*_#>\-\u2018\u2019\u201c\u201d(\[]+")
_FIRST_WORD = re.compile(r"[a-z]+")


def parse_strict(text: str) -> Optional[str]:
    """First-word parser: ``"yes"`` / ``"no"`` only when the answer starts with that word.

    Leading whitespace and markup characters (quotes, backticks, ``*``, ``_``, ``#``, ``>``, ``-``,
    opening brackets) are removed, the text is lower-cased, and its first run of letters is taken. It
    must be ``yes`` or ``no``; otherwise the answer is unparsed (``None``), e.g. "There is no dog",
    "Yeah", "Nope", or an empty answer.
    """
    rest = _LEADING_MARKUP.sub("", text).lower()
    m = _FIRST_WORD.match(rest)
    if m is None:
        return None
    word = m.group(0)
    if word == YES:
        return YES
    if word == NO:
        return NO
    return None


def parse_kuan2024(text: str) -> Optional[str]:
    """The rule of Kuan et al.'s released ``evaluation.py`` (audio hallucination QA).

    Case-sensitive substring tests, first match wins:

    1. ``"Yes"`` or ``"yes"`` occurs anywhere -> "yes" (so does "eyes");
    2. ``"No"`` occurs -> "no";
    3. ``"there is no"`` occurs -> "no";
    4. ``"does not contain"`` or ``"doesn't contain"`` occurs -> "no";
    5. ``"contain"`` occurs -> "yes";
    6. ``"not"``, ``"unable"`` or ``"can't"`` occurs -> "no";
    7. otherwise unparsed (``None``; the released script stores an empty string, counts it among the
       "no" answers when computing precision, and never counts it as correct).
    """
    if "Yes" in text or "yes" in text:
        return YES
    if "No" in text:
        return NO
    if "there is no" in text:
        return NO
    if "does not contain" in text or "doesn't contain" in text:
        return NO
    if "contain" in text:
        return YES
    if "not" in text or "unable" in text or "can't" in text:
        return NO
    return None


LLAVA_POPE_PARSER = AnswerParser(
    name="llava_pope",
    description=(
        "LLaVA eval_pope.py / POPE evaluate.py rule: keep the text before the first '.', delete commas, "
        "split on single spaces; 'no' if a word is exactly 'No', 'not' or 'no', else 'yes' "
        "(case sensitive; never unparsed)."
    ),
    func=parse_llava_pope,
)

STRICT_PARSER = AnswerParser(
    name="strict",
    description=(
        "First word after stripping leading whitespace/quotes/markup, lower-cased, must be 'yes' or "
        "'no'; anything else is unparsed."
    ),
    func=parse_strict,
)

KUAN2024_PARSER = AnswerParser(
    name="kuan2024",
    description=(
        "Kuan et al. (Interspeech 2024) evaluation.py rule, case-sensitive substrings in order: "
        "'Yes'/'yes' -> yes; 'No' -> no; 'there is no' -> no; 'does not contain'/'doesn't contain' -> no; "
        "'contain' -> yes; 'not'/'unable'/'can't' -> no; else unparsed."
    ),
    func=parse_kuan2024,
)

_REGISTRY: dict[str, AnswerParser] = {}
_ALIASES: dict[str, str] = {"pope": "llava_pope", "llava": "llava_pope", "kuan": "kuan2024"}


def register_parser(parser: AnswerParser, *, overwrite: bool = False) -> AnswerParser:
    """Add a parser to the registry so that scorers accept its name.

    Parameters
    ----------
    parser
        The parser to register.
    overwrite
        Replace an existing parser of the same name instead of raising ``ValueError``.
    """
    if not isinstance(parser, AnswerParser):
        raise TypeError(f"register_parser expects an AnswerParser, got {type(parser).__name__}")
    if parser.name in _REGISTRY and not overwrite and _REGISTRY[parser.name] is not parser:
        raise ValueError(f"a parser named {parser.name!r} is already registered; pass overwrite=True")
    _REGISTRY[parser.name] = parser
    return parser


for _p in (LLAVA_POPE_PARSER, STRICT_PARSER, KUAN2024_PARSER):
    register_parser(_p)


def available_parsers() -> list[str]:
    """Names of the registered parsers (aliases not included)."""
    return sorted(_REGISTRY)


def get_parser(parser: Union[str, AnswerParser]) -> AnswerParser:
    """Resolve a parser name (or alias) to an :class:`AnswerParser`; parsers pass through.

    Raises
    ------
    UnknownNameError
        For an unregistered name; the message lists the registered ones.
    """
    if isinstance(parser, AnswerParser):
        return parser
    if not isinstance(parser, str):
        raise TypeError(f"parser must be a name or an AnswerParser, got {type(parser).__name__}")
    name = _ALIASES.get(parser, parser)
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown answer parser {parser!r}; registered: {', '.join(available_parsers())} "
            f"(aliases: {', '.join(sorted(_ALIASES))}). Register your own with register_parser()."
        ) from None


def parse_yes_no(text: str, parser: Union[str, AnswerParser] = "llava_pope") -> Optional[str]:
    """Parse one answer with the named parser; returns ``"yes"``, ``"no"`` or ``None`` (unparsed)."""
    return get_parser(parser)(text)
