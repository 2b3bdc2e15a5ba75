"""Language match: is the response in the prompt's language? (a reward component or a filter)

Dependency-free heuristic, in two steps:
1. Script: count letters per Unicode script (Latin, Cyrillic, Greek, Arabic, Hebrew,
   Devanagari, Thai, Hangul, Japanese kana, Han). Kana present -> "ja" (Japanese mixes
   kana and Han); otherwise the script with most letters. Non-Latin scripts are reported
   by script ("cyrillic", "arabic", ...), which is the language family a mismatch check needs.
2. Latin script: count stopword hits for en, fr, de, es, it, pt, nl; the language with
   the most hits wins when it has at least `MIN_HITS` and beats the runner-up by a margin;
   otherwise the language is unknown (None).

Code blocks, inline code, URLs and numbers are removed first so a Python answer to a French
question is judged on its prose. A text with fewer than `MIN_LETTERS` letters is unknown.

`language_matches(prompt_text, response_text)` -> True / False / None (prompt language
unknown). The reward scores 1.0 / 0.0 and abstains (None) when the prompt's language cannot
be determined; a response whose language cannot be determined scores 0.0 (a prompt in a
known language deserves an answer recognisably in it).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

Message = dict[str, Any]

MIN_LETTERS = 12
MIN_HITS = 2

_STOPWORDS: dict[str, frozenset[str]] = {lang: frozenset(words.split()) for lang, words in {
    "en": "the and is are was were of to in that this it with for on not be have has you what which "
          "how why from they but or an at by will would can there their if do does",
    "fr": "le la les des une est et que qui dans pour pas sur avec sont ce cette il elle nous vous ils "
          "au aux du ne mais ou été être fait comme plus je tu",
    "de": "der die das und ist nicht ein eine zu den mit sich des auf für von dem im auch es sind "
          "wie oder aber wird nach ich wir sie werden kann",
    "es": "el los las del que es y en por con una para como pero sus más este esta son está fue muy "
          "ser tiene yo sí también cuando",
    "it": "il lo gli della che è e di per con una sono non come più questo questa anche nel alla "
          "dei delle hanno essere ma io molto",
    "pt": "o os as do da dos das que é e em um uma para com não por mais como se foi são está ao "
          "também muito você eu isso",
    "nl": "de het een en is van dat niet op te zijn met voor er maar ook als bij wordt hij ze dit "
          "wat nog kan naar was",
}.items()}

# (name, ranges of code points); Han last so kana decides Japanese first.
_SCRIPTS: list[tuple[str, tuple[tuple[int, int], ...]]] = [
    ("latin", ((0x41, 0x5A), (0x61, 0x7A), (0xC0, 0x24F))),
    ("cyrillic", ((0x400, 0x52F),)),
    ("greek", ((0x370, 0x3FF),)),
    ("arabic", ((0x600, 0x6FF), (0x750, 0x77F))),
    ("hebrew", ((0x590, 0x5FF),)),
    ("devanagari", ((0x900, 0x97F),)),
    ("thai", ((0xE00, 0xE7F),)),
    ("ko", ((0xAC00, 0xD7AF), (0x1100, 0x11FF))),
    ("ja", ((0x3040, 0x30FF),)),
    ("han", ((0x4E00, 0x9FFF), (0x3400, 0x4DBF))),
]


def _script_of(ch: str) -> str | None:
    cp = ord(ch)
    for name, ranges in _SCRIPTS:
        if any(lo <= cp <= hi for lo, hi in ranges):
            return name
    return None


def _prose(text: str) -> str:
    """Text without code, URLs and numbers: what carries the language."""
    text = re.sub(r"```.*?(```|$)", " ", text, flags=re.DOTALL)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"https?://\S+", " ", text)
    return text


def detect_language(text: str) -> str | None:
    """A language code (en, fr, de, es, it, pt, nl, ja, ko), a script name for other
    non-Latin scripts (cyrillic, greek, arabic, hebrew, devanagari, thai, han), or None."""
    prose = _prose(text)
    counts = Counter(s for s in map(_script_of, prose) if s is not None)
    if sum(counts.values()) < MIN_LETTERS:
        return None
    if counts["ja"]:
        return "ja"
    script, _ = counts.most_common(1)[0]
    if script != "latin":
        return script
    words = re.findall(r"[^\W\d_]+", unicodedata.normalize("NFC", prose.lower()))
    hits = sorted(((sum(w in stops for w in words), lang) for lang, stops in _STOPWORDS.items()), reverse=True)
    (best, lang), (second, _) = hits[0], hits[1]
    # A margin of a third keeps close calls (short texts, shared words like "de", "a") unknown.
    if best >= MIN_HITS and best >= 1.34 * second:
        return lang
    return None


def prompt_text(messages: list[Message]) -> str:
    """The text whose language the answer should follow: the last user message."""
    for m in reversed(messages):
        if m.get("role") == "user":
            return str(m.get("content", ""))
    return ""


def language_matches(prompt_text: str, response_text: str) -> bool | None:
    """True when the response is in the prompt's language; None when the prompt's language
    cannot be determined; False otherwise (including an undeterminable response)."""
    want = detect_language(prompt_text)
    if want is None:
        return None
    return detect_language(response_text) == want


class LanguageMatchReward:
    """1.0 when the response is in the language of the prompt's last user message, 0.0 when
    not, None (abstain) when that language cannot be determined. No kwargs."""

    name = "language_match"

    def score(self, prompts: list[list[Message]], responses: list[str]) -> list[float | None]:
        if len(prompts) != len(responses):
            raise ValueError(f"LanguageMatchReward: {len(prompts)} prompts, {len(responses)} responses")
        out: list[float | None] = []
        for messages, response in zip(prompts, responses):
            match = language_matches(prompt_text(messages), response)
            out.append(None if match is None else float(match))
        return out


__all__ = ["LanguageMatchReward", "detect_language", "language_matches", "prompt_text"]
