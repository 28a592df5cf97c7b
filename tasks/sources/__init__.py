"""Character sources and what they share: errors, rejections, the profile checks and the top-N walk.

Every source turns its input into `Character` candidates plus rejections; `select` then applies the
same rules to all of them:

0. checks: a non-finite popularity (NaN, inf: it cannot be ranked) is rejected (`schema`); a label
   longer than `max_label_chars` is rejected (`too_long`), the description is cut to
   `max_description_chars` and the aliases are capped (`cap_fields`: every source passes here, so
   a 1 MB label never becomes a 1 MB system prompt);
1. scope: a row whose language or category is not configured is rejected (`scope`);
2. ranking: by popularity, highest first; ties keep the input order;
3. dedupe: the first row of an (id, language) pair in that order is kept, later ones are rejected
   (`duplicate`, naming the kept row's popularity);
4. walk down the ranking per language (per language and category with `per_category`) until
   `top_n` rows are kept; on the way a row without a usable profile is rejected (`no_profile`:
   empty, or summary+article shorter than `min_profile_chars`) and a row whose text tries to
   instruct the model is rejected (`injection`, naming the field and the phrase; the text is read
   normalised: NFKC, invisible characters dropped, Cyrillic/Greek look-alikes folded, see
   `screening_forms`). Rows below the cut are not considered, so they are neither kept nor rejected.

Bad inputs, decided per case (each source's docstring lists its own):
- missing file: `MissingInputError` naming the config key and the path; a directory (or another
  non-file) there: `NotAFileError` ("is a directory, expected a file") naming the key and the path;
- a file that cannot be read at all (bad compression, not UTF-8 where a whole-file decode is done,
  not JSON where a dataset loader reads it): `InputFormatError` naming the file, line and problem;
- a compressed file is told by its magic bytes, not its name (`open_compressed`);
- a truncated compressed stream: `TruncatedInputError` naming the file, the last line read and how
  many entities were read (wikidata's `allow_truncated` keeps them and records a rejection instead);
- one bad line of a line-oriented file (Wikidata dump, user JSONL/CSV): a rejection naming the file
  and line; the rest is read.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import logging
import lzma
import math
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:  # not imported at run time: a dump reader's worker imports this package, not the models
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
    from models.records import Rejection

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


MAX_ID_CHARS = 512  # an id is a key (file names, URLs, the dashboard): longer ones are `too_long` rejections


def cap_fields(ch: Character, cfg: CharactersConfig) -> Rejection | None:
    """Cap the short fields like the profile: an empty id is a `schema` rejection, an id longer than
    MAX_ID_CHARS or a label longer than `max_label_chars` a `too_long` one (a label is a name, not a text,
    and it becomes the system prompt); the description is cut to
    `max_description_chars`; aliases longer than a label may be, empty or repeated are dropped and at most
    `max_aliases` are kept. Changes `ch` in place; None when it is kept."""
    if not ch.id.strip():
        return reject(ch.row_id, "schema", "field 'id': empty id", character_id=ch.id, text=ch.label[:200])
    label = ch.label.strip()
    if len(label) > cfg.max_label_chars:  # first: a source that derives the id from the title says why
        return reject(ch.row_id[:200], "too_long", f"label is {len(label):,} characters > "
                      f"characters.max_label_chars {cfg.max_label_chars}", character_id=ch.id[:200],
                      text=label[:200])
    if len(ch.id) > MAX_ID_CHARS:
        return reject(ch.row_id[:200], "too_long", f"id is {len(ch.id):,} characters > {MAX_ID_CHARS}",
                      character_id=ch.id[:200], text=ch.label[:200])
    ch.label = label
    description = ch.description.strip()
    if len(description) > cfg.max_description_chars:
        description = clip(description, cfg.max_description_chars)
    ch.description = description
    aliases = []
    for alias in ch.aliases:
        alias = alias.strip()
        if alias and len(alias) <= cfg.max_label_chars and alias != label and alias not in aliases:
            aliases.append(alias)
    ch.aliases = aliases[: cfg.max_aliases]
    return None


def popularity_problem(ch: Character) -> str | None:
    if not math.isfinite(ch.popularity):
        return f"field 'popularity': not a finite number (got {ch.popularity!r}); it ranks the top-N"
    return None


# magic bytes of the compressed formats a dump may come in; the file's name is not trusted
_MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bz2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))


def detect_compression(path: str | Path) -> str | None:
    """'gzip' | 'bz2' | 'xz' | 'zstd' by the file's first bytes, None for an uncompressed file."""
    with Path(path).open("rb") as fh:
        head = fh.read(6)
    kind = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if kind == "bz2" and not head[3:4].isdigit():  # "BZh" then the block size 1-9
        return None
    return kind


def open_compressed(path: str | Path) -> BinaryIO:
    """The file's decompressed bytes as a binary stream, the format told by its magic bytes (a gzip file named
    .bz2 is read as gzip, not reported as truncated). A name that promises a compression the bytes do not
    have is logged. zstd needs the `zstandard` package (an InputFormatError with the hint otherwise)."""
    p = Path(path)
    kind = detect_compression(p)
    named = next((k for k, ends in (("gzip", (".gz", ".gzip")), ("bz2", (".bz2",)), ("xz", (".xz",)),
                                    ("zstd", (".zst", ".zstd"))) if p.name.lower().endswith(ends)), None)
    if named != kind:
        log.warning("%s: named as %s but its bytes are %s; reading it as %s", p, named or "uncompressed",
                    kind or "uncompressed", kind or "uncompressed")
    if kind == "gzip":
        return gzip.open(p, "rb")
    if kind == "bz2":
        return bz2.open(p, "rb")
    if kind == "xz":
        return lzma.open(p, "rb")
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise InputFormatError(p, "zstd-compressed: pip install zstandard to read it, or decompress it") from None
        return zstandard.ZstdDecompressor().stream_reader(p.open("rb"), closefd=True)
    return p.open("rb")


# Screening reads a normalised copy of the text (the text itself is kept as it is): NFKC folds fullwidth
# and other compatibility forms (ｉｇｎｏｒｅ, 𝐢𝐠𝐧𝐨𝐫𝐞, ＞), invisible format characters are dropped (a second
# pass reads them as spaces, for words separated by them), and Latin look-alikes from Cyrillic, Greek and
# small capitals are folded to Latin. The patterns are English and Chinese, so folding a Russian or Greek
# text never makes it match where it would not.
_INVISIBLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u2064"
    "\u2066-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0000-\U000e0fff]")
_CONFUSABLES = str.maketrans({
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "і": "i", "ї": "i", "ј": "j", "к": "k",
    "ӏ": "l", "м": "m", "н": "h", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t", "у": "y", "ү": "y",
    "х": "x", "ԝ": "w", "ѵ": "v", "ь": "b", "ɡ": "g",
    "А": "A", "В": "B", "С": "C", "Е": "E", "Н": "H", "І": "I", "Ӏ": "I", "Ј": "J", "К": "K", "М": "M", "О": "O",
    "Р": "P", "Ԛ": "Q", "Ѕ": "S", "Т": "T", "Х": "X", "У": "Y", "Ү": "Y", "Ԝ": "W",
    # Greek
    "α": "a", "β": "b", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t", "υ": "u",
    "χ": "x", "γ": "y", "ω": "w", "ϲ": "c", "ϳ": "j",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O", "Ρ": "P",
    "Τ": "T", "Υ": "Y", "Χ": "X", "Ϲ": "C",
    # Latin small capitals and other look-alikes NFKC leaves alone
    "ᴀ": "a", "ʙ": "b", "ᴄ": "c", "ᴅ": "d", "ᴇ": "e", "ғ": "f", "ɢ": "g", "ʜ": "h", "ɪ": "i", "ᴊ": "j", "ᴋ": "k",
    "ʟ": "l", "ᴍ": "m", "ɴ": "n", "ᴏ": "o", "ᴘ": "p", "ʀ": "r", "ꜱ": "s", "ᴛ": "t", "ᴜ": "u", "ᴠ": "v", "ᴡ": "w",
    "ʏ": "y", "ᴢ": "z", "ı": "i", "ȷ": "j", "օ": "o", "ս": "u", "հ": "h", "ց": "g",
    # angle brackets that read as < and > (fence markers)
    "‹": "<", "›": ">", "〈": "<", "〉": ">", "⟨": "<", "⟩": ">", "❮": "<", "❯": ">",
})


def screening_forms(text: str) -> tuple[str, ...]:
    """The normalised forms of `text` that the injection patterns read."""
    folded = unicodedata.normalize("NFKC", text).translate(_CONFUSABLES)
    if not _INVISIBLE.search(folded):
        return (folded,)
    return _INVISIBLE.sub("", folded), _INVISIBLE.sub(" ", folded)


_VERB = r"(?:ignore|disregard|forget|override|bypass|neglect)"
_DET = r"(?:(?:all|any|the|your|my|our|of|these|those|every|each|such)\s+)*"
_QUAL = r"(?:previous|prior|above|earlier|preceding|foregoing|system|initial|original|existing)"
_NOUN = (r"(?:instructions?|prompts?|messages?|directions?|directives?|rules|guidelines|context|constraints|"
         r"restrictions)")
_AFTER = (r"(?:above|so\s+far|previously|until\s+now|up\s+to\s+now|you\s+(?:were|have\s+been)\s+(?:given|told)|"
          r"(?:written|said|stated|given)\s+(?:above|before)|before\s+this(?:\s+(?:line|message|point))?)")
# Phrases that address the model instead of describing a character. Kept narrow on purpose: an
# article that merely mentions "instructions" or someone who ignored the rules must pass.
_INJECTION = re.compile(
    rf"\b{_VERB}\s+{_DET}{_QUAL}\s+(?:{_QUAL}\s+)?{_NOUN}\b"            # ignore all previous instructions
    rf"|\b{_VERB}\s+{_DET}{_NOUN}\s+{_AFTER}"                             # ignore the instructions above
    rf"|\b{_VERB}\s+(?:(?:all|any)\s+of\s+)?(?:the\s+(?:above|foregoing)\b|(?:everything|anything|all)\s+{_AFTER})"
    r"|\byou\s+are\s+now\s+(?:in\s+)?(?:an?\s+)?(?:dan|developer\s+mode|ai|assistant|language\s+model|chatgpt|"
    r"unrestricted|unfiltered|uncensored|jailbroken|free\s+(?:of|from)\s+(?:all\s+|any\s+)?(?:rules|restrictions)|"
    r"no\s+longer\s+(?:bound|restricted)|not\s+bound)\b"
    r"|\b(?:system|developer)\s*(?:prompt|message|override)?\s*[:：]\s*(?:you\b|ignore|disregard|forget|from\s+now|"
    r"new\s+(?:instructions|rules|role)|act\s+as|pretend|reveal|do\s+not|don'?t)"
    r"|\bnew\s+(?:system\s+)?instructions\s*:"
    r"|\b(?:reveal|print|repeat|output)\s+(?:your|the)\s+(?:system\s+)?prompt"
    r"|<\s*<\s*<\s*(?:profile|answer)|(?:profile|answer)\s*>\s*>\s*>"      # the prompts' data fences
    r"|<\|im_(?:start|end)\|>|<\|(?:system|user|assistant|endoftext|eot_id)\|>|\[/?INST\]|<</?SYS>>"
    r"|(?:忽略|无视|忽视|忘记|忘掉|不要理会)(?:掉)?(?:之前|以上|上面|上述|先前|前面|所有)(?:的)?(?:所有|一切)?"
    r"(?:指令|指示|提示|规则|要求|内容|设定)"
    r"|(?:忽略|无视|忘记|忘掉)(?:掉)?(?:以上|上面|上述|之前)(?:的)?(?:所有|一切)"
    r"|你现在是(?:一个)?(?:AI|人工智能|助手|语言模型|不受限制)"
    r"|系统\s*[:：]\s*你",
    re.IGNORECASE,
)


# every branch of _INJECTION needs one of these (lower case) in the text: a text with none of them is not
# searched, which keeps screening at C speed for the usual biography
_TRIGGERS = ("ignor", "disregard", "forget", "overrid", "bypass", "neglect", "instructions", "prompt", "inst]",
             "<", ">", "忽略", "无视", "忽视", "忘记", "忘掉", "不要理会", "你现在是", "系统",
             *(f"{c}now" for c in " \t\n\r\f\v\x1c\x1d\x1e\x1f\x85\u1680\u2028\u2029"))


def _may_inject(lowered: str) -> bool:
    if any(t in lowered for t in _TRIGGERS):
        return True
    return ("system" in lowered or "developer" in lowered) and (":" in lowered or "：" in lowered)


def find_injection_in(text: str) -> str | None:
    """The instruction-like phrase of `text` (with some context, from its normalised form), or None."""
    for form in screening_forms(text):
        if not _may_inject(form.lower()):
            continue
        m = _INJECTION.search(form)
        if m:
            return form[max(0, m.start() - 60): m.end() + 60]
    return None


def find_injection(ch: Character) -> tuple[str, str] | None:
    """(field, matched text) of the first instruction-like phrase in a character's text."""
    for field in ("label", "description", "summary", "article", "claims"):
        hit = find_injection_in(getattr(ch, field))
        if hit:
            return field, hit
    for alias in ch.aliases:
        if find_injection_in(alias):
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
        problem = popularity_problem(ch)
        if problem:
            rejects.append(reject(ch.row_id, "schema", problem, character_id=ch.id, text=ch.label[:200]))
            continue
        capped = cap_fields(ch, cfg)
        if capped:
            rejects.append(capped)
            continue
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
