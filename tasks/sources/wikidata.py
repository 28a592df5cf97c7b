"""Characters from a Wikidata JSON dump (the official entity format: a JSON array, one entity per
line, each line but the last ending with a comma; .json, .json.gz or .json.bz2), streamed.

Selection: P31 (instance of, non-deprecated) in {Q5 human -> real, Q15632617 fictional human,
Q95074 fictional character -> fictional}; Q5 wins if both appear. One candidate per configured
language that has a label in it (zh falls back to zh-hans, zh-cn, zh-hant, zh-tw, zh-hk, ...).
A selected person with a label in none of the configured languages is a `no_label` rejection naming
the entity and the language codes tried, if its popularity would have put it in a language's pool
(at most `top_n * pool_factor` such rejections: below the cut nothing is recorded).
popularity = number of sitelinks. While streaming, the `top_n * pool_factor` most popular
candidates per language are kept (bounded memory on the full dump); articles are then joined
through the `<lang>wiki` sitelink titles and `select` walks the ranking.

Passes: (1) persons and property labels; (2) only when claims reference items/units whose labels
are unknown, a second stream collecting just those labels; then the Wikipedia files.
Only lines that can matter are parsed (a byte prefilter on the class ids, then on the entity id).

Claims are "property: value; value" lines (property and item labels in the character's language,
else English, else the id); datavalue types rendered: wikibase-entityid, time (by precision,
BCE for negative years), quantity (with its unit), string and monolingualtext. External ids,
media and urls are skipped; at most `max_claims` lines.

Bad inputs: a malformed JSON line or a line that is not UTF-8 -> rejection (`malformed` /
`encoding`) naming the file, line (and byte offset) and the read goes on; if no entity at all
could be read and lines were bad -> InputFormatError. A compressed stream that ends early ->
TruncatedInputError naming the file, the last line read and the entities read so far; with
`allow_truncated` those are kept and a `truncated` rejection is recorded. A plain .json without
its closing "]" gets the same `truncated` rejection (its cut last line is a `malformed` one).
"""

from __future__ import annotations

import bz2
import gzip
import heapq
import json
import logging
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.sources import InputFormatError, TruncatedInputError, reject, require_file, select
from tasks.sources.wikipedia import load_articles, normalize_title

log = logging.getLogger(__name__)

CLASSES = {"Q5": "real", "Q15632617": "fictional", "Q95074": "fictional"}
_CLASS_MARKERS = tuple(f'"{q}"'.encode() for q in CLASSES) + (b'"property"',)
LANGUAGE_FALLBACKS = {"zh": ["zh", "zh-hans", "zh-cn", "zh-hant", "zh-tw", "zh-hk", "zh-sg", "zh-mo", "zh-my"]}
SKIP_DATATYPES = {"external-id", "commonsMedia", "url", "geo-shape", "tabular-data", "math",
                  "musical-notation", "wikibase-lexeme", "wikibase-form", "wikibase-sense", "entity-schema"}
_ENTITY_ID = re.compile(rb'"id"\s*:\s*"([QP]\d+)"')
_UNIT = re.compile(r"/entity/(Q\d+)$")
ENTITY_URL = "https://www.wikidata.org/wiki/"
LICENSE = "Wikidata: CC0 1.0; Wikipedia text: CC BY-SA 4.0"


def _open(path: Path):
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    return path.open("rb")


def stream_entities(path: Path, want: Callable[[bytes], bool], rejects: list[Rejection], *,
                    allow_truncated: bool = False) -> Iterator[dict]:
    """Entities of the dump whose raw line passes `want`, with per-line rejections for bad lines."""
    lineno = offset = parsed = bad = 0
    first_problem = ""
    opened = closed = False
    compressed = path.name.lower().endswith((".gz", ".bz2"))
    try:
        with _open(path) as fh:
            for raw in fh:
                lineno += 1
                start, offset = offset, offset + len(raw)
                line = raw.strip()
                if line.endswith(b","):
                    line = line[:-1].rstrip()
                if line == b"[":
                    opened = True
                    continue
                if line == b"]":
                    closed = True
                    continue
                if not line or not want(line):
                    continue
                where = f"{path.name}:{lineno}"
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as exc:
                    bad += 1
                    problem = f"{path}: line {lineno}: not UTF-8 at byte offset {start + exc.start} ({exc.reason})"
                    first_problem = first_problem or problem
                    rejects.append(reject(where, "encoding", problem, text=line[:200].decode("utf-8", "replace")))
                    continue
                try:
                    entity = json.loads(text)
                    if not isinstance(entity, dict) or "id" not in entity:
                        raise ValueError("not an entity object (no 'id')")
                except ValueError as exc:  # JSONDecodeError is a ValueError
                    bad += 1
                    problem = f"{path}: line {lineno}: malformed entity: {exc}"
                    first_problem = first_problem or problem
                    rejects.append(reject(where, "malformed", problem, text=text[:200]))
                    continue
                parsed += 1
                yield entity
    except (EOFError, zlib.error, OSError) as exc:
        if not compressed or isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        problem = (f"compressed stream ends early or is corrupt after line {lineno} ({parsed} entities read): "
                   f"{type(exc).__name__}: {exc}")
        if not allow_truncated:
            raise TruncatedInputError(path, problem) from exc
        rejects.append(reject(f"{path.name}:{lineno}", "truncated", f"{path}: {problem}; kept what was read"))
        return
    if parsed == 0 and bad:
        raise InputFormatError(path, f"no entity could be read; first problem: {first_problem}")
    if opened and not closed:
        kind = "compressed stream" if compressed else "file"
        rejects.append(reject(f"{path.name}:{lineno}", "truncated",
                              f"{path}: {kind} ends at line {lineno} without the closing ']' of the dump "
                              f"({parsed} entities read); kept what was read"))


def _pick(values: dict, lang: str) -> Any:
    for code in LANGUAGE_FALLBACKS.get(lang, [lang]):
        if code in values:
            return values[code]
    return None


def person_category(entity: dict) -> str | None:
    found = set()
    for claim in (entity.get("claims") or {}).get("P31", []):
        if claim.get("rank") == "deprecated":
            continue
        qid = _item_id((claim.get("mainsnak") or {}).get("datavalue"))
        if qid in CLASSES:
            found.add(CLASSES[qid])
    if "real" in found:
        return "real"
    return "fictional" if found else None


def _item_id(datavalue: dict | None) -> str | None:
    if not datavalue or datavalue.get("type") != "wikibase-entityid":
        return None
    value = datavalue.get("value") or {}
    if value.get("id"):
        return value["id"]
    if "numeric-id" in value:
        return ("P" if value.get("entity-type") == "property" else "Q") + str(value["numeric-id"])
    return None


def render_time(value: dict) -> str:
    m = re.match(r"([+-])(\d+)-(\d\d)-(\d\d)", value.get("time", ""))
    if not m:
        return value.get("time", "")
    sign, year, month, day = m.group(1), int(m.group(2)), m.group(3), m.group(4)
    precision = value.get("precision", 11)
    era = " BCE" if sign == "-" else ""
    if precision >= 11 and day != "00":
        return f"{year:04d}-{month}-{day}{era}"
    if precision == 10 and month != "00":
        return f"{year:04d}-{month}{era}"
    if precision == 8:
        return f"{year // 10 * 10}s{era}"
    if precision == 7:
        return f"{(year - 1) // 100 + 1}th century{era}"
    return f"{year}{era}"


def compact_claims(entity: dict) -> list[tuple[str, list]]:
    """[(property, [value tokens])]: ("item", qid) | ("text", str) | ("quantity", amount, unit_qid|None)."""
    out = []
    for pid, claims in (entity.get("claims") or {}).items():
        values: list = []
        for claim in claims:
            snak = claim.get("mainsnak") or {}
            if claim.get("rank") == "deprecated" or snak.get("datatype") in SKIP_DATATYPES:
                continue
            if snak.get("snaktype") == "somevalue":
                values.append(("text", "unknown"))
                continue
            dv = snak.get("datavalue") or {}
            kind, value = dv.get("type"), dv.get("value")
            if kind == "wikibase-entityid":
                qid = _item_id(dv)
                if qid:
                    values.append(("item", qid))
            elif kind == "time" and isinstance(value, dict):
                values.append(("text", render_time(value)))
            elif kind == "quantity" and isinstance(value, dict):
                unit = _UNIT.search(value.get("unit", ""))
                values.append(("quantity", value.get("amount", "").lstrip("+"), unit.group(1) if unit else None))
            elif kind == "string" and isinstance(value, str):
                values.append(("text", value))
            elif kind == "monolingualtext" and isinstance(value, dict):
                values.append(("text", value.get("text", "")))
        if values:
            out.append((pid, values))
    return out


def referenced_ids(claims: list[tuple[str, list]]) -> set[str]:
    ids = set()
    for pid, values in claims:
        ids.add(pid)
        for v in values:
            if v[0] == "item":
                ids.add(v[1])
            elif v[0] == "quantity" and v[2]:
                ids.add(v[2])
    return ids


def render_claims(claims: list[tuple[str, list]], labels: dict[str, dict[str, str]], lang: str,
                  limit: int) -> str:
    def name(eid: str) -> str:
        known = labels.get(eid) or {}
        return _pick(known, lang) or known.get("en") or eid

    lines = []
    for pid, values in claims[:limit]:
        rendered = []
        for v in values:
            if v[0] == "item":
                rendered.append(name(v[1]))
            elif v[0] == "quantity":
                rendered.append(f"{v[1]} {name(v[2])}" if v[2] else v[1])
            else:
                rendered.append(v[1])
        lines.append(f"{name(pid)}: {'; '.join(dict.fromkeys(rendered))}")
    return "\n".join(lines)


def _labels(entity: dict, languages: list[str]) -> dict[str, str]:
    out = {}
    for lang in set(languages) | {"en"}:
        label = _pick(entity.get("labels") or {}, lang)
        if label and label.get("value"):
            out[lang] = label["value"]
    return out


def _any_label(entity: dict) -> str:
    """A label in some language, to show what the rejected entity is; '' when it has none."""
    for value in (entity.get("labels") or {}).values():
        if isinstance(value, dict) and value.get("value"):
            return f"{value.get('language', '')}: {value['value']}"
    return ""


def collect(cfg: CharactersConfig) -> tuple[list[Character], list[Rejection]]:
    dump = require_file(cfg.wikidata_dump, "wikidata_dump", "wikidata")
    for f in cfg.wikipedia:
        require_file(f, "wikipedia", "wikidata")
    rejects: list[Rejection] = []
    labels: dict[str, dict[str, str]] = {}
    pool = cfg.top_n * cfg.pool_factor
    heaps: dict[str, list] = {lang: [] for lang in cfg.languages}
    unlabeled: list = []  # the `pool` most popular persons with no label in any configured language
    seq = 0

    def want_pass1(line: bytes) -> bool:
        return any(m in line for m in _CLASS_MARKERS)

    for entity in stream_entities(dump, want_pass1, rejects, allow_truncated=cfg.allow_truncated):
        if entity.get("type") == "property":
            labels[entity["id"]] = _labels(entity, cfg.languages)
            continue
        category = person_category(entity)
        if category is None or category not in cfg.categories:
            continue
        sitelinks = entity.get("sitelinks") or {}
        cand = None
        for lang in cfg.languages:
            label = _pick(entity.get("labels") or {}, lang)
            if not label or not label.get("value"):
                continue
            if cand is None:
                cand = {"id": entity["id"], "category": category, "popularity": len(sitelinks),
                        "claims": compact_claims(entity), "langs": {}}
            desc = _pick(entity.get("descriptions") or {}, lang) or {}
            aliases = _pick(entity.get("aliases") or {}, lang) or []
            site = sitelinks.get(lang.replace("-", "_") + "wiki") or {}
            cand["langs"][lang] = {"label": label["value"], "description": desc.get("value", ""),
                                   "aliases": [a.get("value", "") for a in aliases if a.get("value")],
                                   "title": normalize_title(site.get("title", ""))}
            seq += 1
            item = (cand["popularity"], -seq, cand)
            heap = heaps[lang]
            if len(heap) < pool:
                heapq.heappush(heap, item)
            else:
                heapq.heappushpop(heap, item)
        if cand is None:
            seq += 1
            item = (len(sitelinks), -seq, entity["id"], _any_label(entity))
            if len(unlabeled) < pool:
                heapq.heappush(unlabeled, item)
            else:
                heapq.heappushpop(unlabeled, item)

    # an unlabeled person is recorded only if its popularity would have put it in some language's pool:
    # rows below the cut are neither kept nor rejected (as in `select`), which also bounds the memory
    tried = [code for lang in cfg.languages for code in LANGUAGE_FALLBACKS.get(lang, [lang])]
    for popularity, _, qid, other in sorted(unlabeled, key=lambda e: (-e[0], -e[1])):
        if any(len(h) < pool or popularity > h[0][0] for h in heaps.values()):
            rejects.append(reject(qid, "no_label", f"entity {qid} has no label in the configured languages "
                                  f"(tried: {', '.join(tried)})", character_id=qid, text=other))

    # heap order is arbitrary; rank like the dump: popularity, then first seen
    ranked = sorted(((-neg_seq, lang, cand) for lang, heap in heaps.items() for _, neg_seq, cand in heap),
                    key=lambda e: (-e[2]["popularity"], e[0]))
    entries = [(lang, cand) for _, lang, cand in ranked]
    missing = set().union(*(referenced_ids(c["claims"]) for _, c in entries)) - labels.keys() if entries else set()
    if missing:
        def want_pass2(line: bytes) -> bool:
            m = _ENTITY_ID.search(line)
            return m is None or m.group(1).decode() in missing

        for entity in stream_entities(dump, want_pass2, [], allow_truncated=True):
            if entity.get("id") in missing:
                labels[entity["id"]] = _labels(entity, cfg.languages)

    wanted = {(lang, c["langs"][lang]["title"]) for lang, c in entries if c["langs"][lang]["title"]}
    articles = load_articles(cfg.wikipedia, cfg.wikipedia_hub, wanted, max_summary=cfg.max_summary_chars,
                             max_article=cfg.max_article_chars) if wanted and (cfg.wikipedia or cfg.wikipedia_hub) else {}

    characters = []
    for lang, c in entries:
        info = c["langs"][lang]
        art = articles.get((lang, info["title"])) or {}
        url = art.get("url") or (f"https://{lang}.wikipedia.org/wiki/{info['title'].replace(' ', '_')}"
                                 if info["title"] else ENTITY_URL + c["id"])
        characters.append(Character(
            id=c["id"], label=info["label"], description=info["description"], aliases=info["aliases"],
            claims=render_claims(c["claims"], labels, lang, cfg.max_claims), category=c["category"],
            language=lang, popularity=float(c["popularity"]), summary=art.get("summary", ""),
            article=art.get("article", ""), source="wikidata", license=LICENSE, url=url))
    kept, more = select(characters, cfg)
    return kept, rejects + more
