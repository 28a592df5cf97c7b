"""Text helpers shared by the filters: one tokenizer for length estimates and shingles (words for
alphabetic scripts, one token per CJK character), normalisation for exact-duplicate hashes, sentences."""

from __future__ import annotations

import hashlib
import re
import unicodedata

CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
KANA = r"\u3040-\u30ff"
HANGUL = r"\uac00-\ud7af"
_TOKEN = re.compile(rf"[{CJK}{KANA}{HANGUL}]|[^\W_{CJK}{KANA}{HANGUL}]+", re.UNICODE)
_CJK_CHAR = re.compile(rf"[{CJK}]")
_LETTER = re.compile(rf"[{CJK}{KANA}{HANGUL}]|[^\W\d_]", re.UNICODE)
_SENTENCE_END = re.compile(r"[.!?。！？…](?:[\"'”’」』)）]*)(?=\s|$)|[。！？](?:[”’」』）]*)")
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")
_PUNCT_SPACE = re.compile(r"[\W_]+", re.UNICODE)


def tokens(text: str) -> list[str]:
    """Lower-cased words; each CJK/kana/hangul character is one token."""
    return _TOKEN.findall(text.lower())


def token_estimate(text: str) -> int:
    """A cheap length estimate: whitespace-free word runs count one each, every CJK character counts one.
    For English about 0.75 model tokens per word; for Chinese about 1-1.5 model tokens per character."""
    if text.isascii():  # fast path: whitespace words (punctuation-only runs are rare in answers)
        return len(text.split())
    return len(_TOKEN.findall(text))


def cjk_ratio(text: str) -> float:
    """Share of CJK ideographs among letters (0 when there are no letters)."""
    if text.isascii():
        return 0.0
    letters = len(_LETTER.findall(text))
    return len(_CJK_CHAR.findall(text)) / letters if letters else 0.0


def normalise(text: str) -> str:
    """NFKC, lower case, punctuation and whitespace removed: the exact-duplicate key."""
    return _PUNCT_SPACE.sub("", unicodedata.normalize("NFKC", text).lower())


def exact_hash(text: str) -> int:
    """A signed 64-bit hash of the normalised text (fits an Arrow int64 column)."""
    return int.from_bytes(hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest(), "big",
                          signed=True)


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in _SENTENCE_SPLIT.split(text.strip())) if s]


def trim_to_sentence(text: str) -> str:
    """Cut text after its last complete sentence ('' if there is none)."""
    last = None
    for m in _SENTENCE_END.finditer(text):
        last = m
    return text[:last.end()].rstrip() if last else ""
