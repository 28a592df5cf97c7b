"""Character sources and what they share: errors, rejections, the profile checks and the top-N walk.

Every source turns its input into `Character` candidates plus rejections; `select` then applies the
same rules to all of them:

1. scope: a row whose language or category is not configured is rejected (`scope`);
2. ranking: by popularity, highest first; ties keep the input order;
3. dedupe: the first row of an (id, language) pair in that order is kept, later ones are rejected
   (`duplicate`, naming the kept row's popularity);
4. walk down the ranking per language (per language and category with `per_category`) until
   `top_n` rows are kept; on the way a row without a usable profile is rejected (`no_profile`:
   empty, or summary+article shorter than `min_profile_chars`) and a row whose text tries to
   instruct the model is rejected (`injection`, naming the field and the phrase). Rows below the
   cut are not considered, so they are neither kept nor rejected.

Bad inputs, decided per case (each source's docstring lists its own):
- missing file: `MissingInputError` naming the config key and the path; a directory (or another
  non-file) there: `NotAFileError` ("is a directory, expected a file") naming the key and the path;
- a file that cannot be read at all (bad compression, not UTF-8 where a whole-file decode is done,
  not JSON where a dataset loader reads it): `InputFormatError` naming the file, line and problem;
- a truncated compressed stream: `TruncatedInputError` naming the file, the last line read and how
  many entities were read (wikidata's `allow_truncated` keeps them and records a rejection instead);
- one bad line of a line-oriented file (Wikidata dump, user JSONL/CSV): a rejection naming the file
  and line; the rest is read.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from models.config.characters import CharactersConfig
from models.records import Character, Rejection

log = logging.getLogger(__name__)

STAGE = "characters"


class CharacterSourceError(ValueError):
    """An input problem that stops the characters stage; the message names the file and the problem."""


class MissingInputError(CharacterSourceError, FileNotFoundError):
    pass


class NotAFileError(CharacterSourceError, IsADirectoryError):
    """The configured path exists but is a directory (or another non-file)."""


class InputFormatError(CharacterSourceError):
    def __init__(self, path: str | Path, problem: str, line: int | None = None):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}: line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


class TruncatedInputError(InputFormatError):
    pass


def reject(row_id: str, filter: str, reason: str, *, character_id: str = "", text: str = "") -> Rejection:
    # shard -1: the flow assigns shards after collect(), and fixes it
    return Rejection(row_id=row_id, stage=STAGE, shard=-1, filter=filter, reason=reason,
                     character_id=character_id, text=text[:4000])


def require_file(path: str | None, key: str, source: str) -> Path:
    if not path:
        raise MissingInputError(f"characters.{key} is not set; source '{source}' needs it")
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise NotAFileError(f"characters.{key}: {p} is a directory, expected a file")
    if p.exists():
        raise NotAFileError(f"characters.{key}: {p} is not a regular file, expected a file")
    raise MissingInputError(f"characters.{key}: file not found: {p}")


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Size, mtime and a hash of the first 1 MiB: cheap, and changes when the file is replaced."""
    p = Path(path).expanduser()
    try:
        st = p.stat()
        with p.open("rb") as fh:
            head = hashlib.sha256(fh.read(1 << 20)).hexdigest()[:16]
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "head": head}


def clip(text: str, limit: int) -> str:
    """Cut to `limit` characters, at a sentence or line end when one is in the last half."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind(".\n"), cut.rfind("。"), cut.rfind("\n"))
    if end >= limit // 2:
        cut = cut[: end + 1]
    return cut.rstrip()


# Phrases that address the model instead of describing a character. Kept narrow on purpose: an
# article that merely mentions "instructions" must pass.
_INJECTION = re.compile(
    r"(ignore|disregard|forget|override)\s+(all\s+|any\s+|the\s+|your\s+|of\s+)*(previous|prior|above|earlier|"
    r"preceding|system)\s+(instructions?|prompts?|messages?|directions?|rules)"
    r"|\byou\s+are\s+now\s+(in\s+)?(dan|developer\s+mode|an?\s+(ai|assistant|language\s+model)|chatgpt)\b"
    r"|\bnew\s+(system\s+)?instructions\s*:"
    r"|\b(reveal|print|repeat)\s+(your|the)\s+system\s+prompt"
    r"|<\|im_(start|end)\|>|<\|(system|user|assistant|endoftext|eot_id)\|>|\[/?INST\]|<</?SYS>>"
    r"|(忽略|无视|忽视|忘记|忘掉)(掉)?(之前|以上|上面|先前|前面|所有)(的)?(所有)?(指令|指示|提示|规则|要求)"
    r"|你现在是(一个)?(AI|人工智能|助手|语言模型)",
    re.IGNORECASE,
)


def find_injection(ch: Character) -> tuple[str, str] | None:
    """(field, matched text) of the first instruction-like phrase in a character's text."""
    for field in ("label", "description", "summary", "article", "claims"):
        value = getattr(ch, field)
        m = _INJECTION.search(value)
        if m:
            start = max(0, m.start() - 60)
            return field, value[start: m.end() + 60]
    for alias in ch.aliases:
        m = _INJECTION.search(alias)
        if m:
            return "aliases", alias
    return None


def profile_problem(ch: Character, min_chars: int) -> str | None:
    size = len(ch.summary.strip()) + len(ch.article.strip())
    if size == 0:
        return "empty profile: no summary and no article"
    if size < min_chars:
        return f"profile too short: summary+article {size} chars < min_profile_chars {min_chars}"
    return None


def select(candidates: Iterable[Character], cfg: CharactersConfig) -> tuple[list[Character], list[Rejection]]:
    rejects: list[Rejection] = []
    in_scope: list[Character] = []
    for ch in candidates:
        if ch.language not in cfg.languages or ch.category not in cfg.categories:
            rejects.append(reject(ch.row_id, "scope", f"language {ch.language!r} / category {ch.category!r} not in "
                                  f"characters.languages {cfg.languages} / categories {cfg.categories}",
                                  character_id=ch.id, text=ch.label))
            continue
        if ch.id in cfg.exclude or ch.label in cfg.exclude or (
                cfg.exclude_pattern and re.search(cfg.exclude_pattern, ch.description or "")):
            rejects.append(reject(ch.row_id, "excluded", "listed in characters.exclude or matching "
                                  "characters.exclude_pattern", character_id=ch.id, text=ch.label))
            continue
        in_scope.append(ch)
    ranked = sorted(in_scope, key=lambda c: -c.popularity)  # stable: ties keep input order

    seen: dict[tuple[str, str], Character] = {}
    unique: list[Character] = []
    for ch in ranked:
        key = (ch.id, ch.language)
        if key in seen:
            rejects.append(reject(ch.row_id, "duplicate", f"duplicate of {ch.row_id} already kept "
                                  f"(popularity {seen[key].popularity:g}; this one {ch.popularity:g})",
                                  character_id=ch.id, text=ch.label))
            continue
        seen[key] = ch
        unique.append(ch)

    kept: list[Character] = []
    counts: dict[tuple[str, ...], int] = {}
    below_cut = 0
    for ch in unique:
        group = (ch.language, ch.category) if cfg.per_category else (ch.language,)
        if counts.get(group, 0) >= cfg.top_n:
            below_cut += 1
            continue
        problem = profile_problem(ch, cfg.min_profile_chars)
        if problem:
            rejects.append(reject(ch.row_id, "no_profile", problem, character_id=ch.id, text=ch.label))
            continue
        hit = find_injection(ch)
        if hit:
            rejects.append(reject(ch.row_id, "injection", f"{hit[0]} contains text addressed to the model",
                                  character_id=ch.id, text=hit[1]))
            continue
        counts[group] = counts.get(group, 0) + 1
        kept.append(ch)
    log.info("characters: kept %d, rejected %d, %d below the top-%d cut", len(kept), len(rejects), below_cut,
             cfg.top_n)
    order = {lang: i for i, lang in enumerate(cfg.languages)}
    kept.sort(key=lambda c: (order.get(c.language, len(order)), -c.popularity))
    return kept, rejects
