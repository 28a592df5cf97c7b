"""Wikipedia articles in the `wikimedia/wikipedia` layout (columns id, url, title, text), read through
`datasets` streaming from local Parquet/JSONL files, or from the Hub when `wikipedia_hub` is set
(needs internet; never used by tests).

An article's language comes from its url host (en.wikipedia.org -> en). Articles are joined to
entities by (language, sitelink title), titles compared with underscores as spaces, NFC-normalised.
summary = the lead section (the paragraphs before the first heading-like line), article = the full
text; both are cut (`max_summary_chars`, `max_article_chars`), so a 10 MB article is kept, cut.

Bad inputs: a missing file -> MissingInputError naming `characters.wikipedia`; a file the loader
cannot read -> InputFormatError; for JSONL the file is then scanned to name the first bad line and
its problem (invalid JSON, not UTF-8 with the byte offset). Articles are an upstream dataset, so a
broken file is an error rather than a per-line rejection. Missing columns -> InputFormatError.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from tasks.sources import InputFormatError, clip, require_file

COLUMNS = ("url", "title", "text")
_WIKITEXT_HEADING = re.compile(r"^=+\s*[^=]+?\s*=+$")
_SENTENCE_END = (".", "!", "?", "。", "！", "？", ":", "：", ";", "；", '"', "”", "」", ")", "）", "»")


def article_language(url: str) -> str:
    host = urlparse(url or "").hostname or ""
    return host.split(".")[0] if host.endswith("wikipedia.org") and host.count(".") >= 2 else ""


def normalize_title(title: str) -> str:
    return unicodedata.normalize("NFC", (title or "").replace("_", " ")).strip()


def _is_heading(line: str) -> bool:
    if _WIKITEXT_HEADING.match(line):
        return True
    return len(line) <= 80 and not line.endswith(_SENTENCE_END) and len(line.split()) <= 10


def lead_section(text: str, limit: int) -> str:
    """The paragraphs before the first heading-like line (short, no sentence-ending punctuation)."""
    lead: list[str] = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line:
            continue
        if lead and _is_heading(line):
            break
        lead.append(line)
        if sum(len(x) for x in lead) >= limit:
            break
    return clip("\n".join(lead), limit)


def _scan_jsonl(path: Path) -> None:
    """Find and raise the first unreadable line of a JSONL file (called after the loader failed)."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputFormatError(path, f"not UTF-8 at byte offset {offset + exc.start} "
                                             f"({exc.reason})", lineno) from None
            if text.strip():
                try:
                    json.loads(text)
                except json.JSONDecodeError as exc:
                    raise InputFormatError(path, f"invalid JSON: {exc.msg} (column {exc.colno})", lineno) from None
            offset += len(raw)


def _load(path: Path):
    from datasets import load_dataset

    fmt = "parquet" if path.suffix == ".parquet" else "json"
    return load_dataset(fmt, data_files=[str(path)], split="train", streaming=True)


def iter_articles(files: list[str], hub: str | None = None) -> Iterator[dict]:
    """Rows {language, title, text, url} of every article, file by file."""
    sources: list[tuple[str, object]] = []
    paths = [require_file(f, "wikipedia", "wikidata") for f in files]  # all checked before reading any
    for p in paths:
        sources.append((str(p), p))
    if hub:
        sources.append((f"wikimedia/wikipedia:{hub}", hub))
    for name, src in sources:
        if isinstance(src, Path):
            if src.suffix not in (".parquet", ".jsonl", ".json"):
                raise InputFormatError(src, "unknown article file type (expected .parquet, .jsonl or .json)")
            dataset = _load(src)
        else:
            from datasets import load_dataset

            dataset = load_dataset("wikimedia/wikipedia", src, split="train", streaming=True)
        try:
            for i, row in enumerate(dataset):
                if i == 0:
                    missing = [c for c in COLUMNS if c not in row]
                    if missing:
                        raise InputFormatError(name, f"missing columns {missing}; expected the wikimedia/wikipedia "
                                                     f"layout (id, url, title, text)")
                yield {"language": article_language(row["url"]), "title": normalize_title(row["title"]),
                       "text": row["text"] or "", "url": row["url"]}
        except InputFormatError:
            raise
        except Exception as exc:  # the loaders raise ArrowInvalid, DatasetGenerationError, ValueError ...
            if isinstance(src, Path) and src.suffix != ".parquet":
                _scan_jsonl(src)
            raise InputFormatError(name, f"cannot read articles: {type(exc).__name__}: {exc}") from exc


def load_articles(files: list[str], hub: str | None, wanted: set[tuple[str, str]], *, max_summary: int,
                  max_article: int) -> dict[tuple[str, str], dict]:
    """(language, title) -> {summary, article, url} for the wanted pairs; the first article of a pair wins."""
    found: dict[tuple[str, str], dict] = {}
    for row in iter_articles(files, hub):
        key = (row["language"], row["title"])
        if key in wanted and key not in found:
            text = row["text"]
            found[key] = {"summary": lead_section(text, max_summary), "article": clip(text, max_article),
                          "url": row["url"], "chars": len(text)}
    return found
