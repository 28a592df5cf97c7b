"""A user's own characters, JSONL (one object a line) or CSV (a header row of Character field names),
validated against `Character`.

Fields: id, label, category (real | fictional) and language are required; description, aliases,
claims, popularity, summary, article, license, url are optional; source defaults to the file type.
CSV cells are text: empty cells count as missing, `aliases` is a JSON list or "|"-separated,
`popularity` must parse as a number. Unknown fields are errors (as everywhere in the project).

Bad inputs: missing file -> MissingInputError naming `characters.path`; a file that is not UTF-8 ->
InputFormatError naming the line and byte offset (the whole file is decoded first: a user file in
another encoding needs re-saving, not per-line guesses); a malformed JSON line, a row with a missing
required field, a wrong type or an empty label -> rejection `malformed` / `schema` naming the file,
line and field, and the rest is read; so is a popularity that is not a finite number (`NaN`, `inf`:
JSON and CSV both spell them) and a label longer than `max_label_chars` (`too_long`). Summary, article,
description and aliases are cut (`max_summary_chars`, `max_article_chars`, `max_description_chars`,
`max_aliases`) like the other sources' text.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from pydantic import ValidationError

from models.config.characters import CharactersConfig
from models.records import Character, Rejection, character_row_id
from tasks.sources import InputFormatError, cap_fields, clip, popularity_problem, reject, require_file, select


def read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InputFormatError(path, f"not UTF-8 at byte offset {exc.start} ({exc.reason}); "
                                     f"save the file as UTF-8", line) from None


def _describe(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<row>"
        if e["type"] == "missing":
            parts.append(f"missing required field '{field}'")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{field}'")
        else:
            parts.append(f"field '{field}': {e['msg']} (got {e.get('input')!r})")
    return "; ".join(parts)


def _csv_row(row: dict) -> dict:
    out = {}
    for key, value in row.items():
        if key is None:  # more cells than header names
            out["<extra cells>"] = value
            continue
        value = (value or "").strip()
        if value == "":
            continue
        if key == "aliases":
            if value.startswith("["):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            else:
                value = [a.strip() for a in value.split("|") if a.strip()]
        out[key] = value
    return out


def _rows(path: Path, kind: str, rejects: list[Rejection]):
    text = read_text(path)
    if kind == "csv":
        # a cell may be a whole article (it is cut later, like every source's text); the csv module's default
        # limit (128 KiB) would stop the read with a bare csv.Error
        csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield reader.line_num, _csv_row(row)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejects.append(reject(f"{path.name}:{lineno}", "malformed",
                                  f"{path}: line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})",
                                  text=line[:200]))
            continue
        if not isinstance(row, dict):
            rejects.append(reject(f"{path.name}:{lineno}", "malformed",
                                  f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}",
                                  text=line[:200]))
            continue
        yield lineno, row


def collect(cfg: CharactersConfig) -> tuple[list[Character], list[Rejection]]:
    path = require_file(cfg.path, "path", cfg.source)
    rejects: list[Rejection] = []
    characters = []
    for lineno, row in _rows(path, cfg.source, rejects):
        row.setdefault("source", cfg.source)
        try:
            ch = Character.model_validate(row)
        except ValidationError as exc:
            rid = character_row_id(row) if isinstance(row.get("id"), str) and isinstance(
                row.get("language"), str) else f"{path.name}:{lineno}"
            rejects.append(reject(rid, "schema", f"{path}: line {lineno}: {_describe(exc)}",
                                  character_id=str(row.get("id", "")), text=json.dumps(row, ensure_ascii=False)))
            continue
        if not ch.label.strip():
            rejects.append(reject(ch.row_id, "schema", f"{path}: line {lineno}: field 'label': empty label",
                                  character_id=ch.id, text=json.dumps(row, ensure_ascii=False)[:4000]))
            continue
        problem = popularity_problem(ch)
        if problem:
            rejects.append(reject(ch.row_id, "schema", f"{path}: line {lineno}: {problem}", character_id=ch.id,
                                  text=ch.label[:200]))
            continue
        capped = cap_fields(ch, cfg)
        if capped:
            capped.reason = f"{path}: line {lineno}: {capped.reason}"
            rejects.append(capped)
            continue
        ch.summary = clip(ch.summary, cfg.max_summary_chars)
        ch.article = clip(ch.article, cfg.max_article_chars)
        characters.append(ch)
    kept, more = select(characters, cfg)
    return kept, rejects + more
