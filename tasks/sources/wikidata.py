"""Characters from a Wikidata JSON dump (the official entity format: a JSON array, one entity per
line, each line but the last ending with a comma; plain, gzip or bzip2), read in parallel.

Selection: P31 (instance of, non-deprecated) in {Q5 human -> real, Q15632617 fictional human,
Q95074 fictional character -> fictional}; Q5 wins if both appear. One candidate per configured
language that has a label in it (zh falls back to zh-hans, zh-cn, zh-hant, zh-tw, zh-hk, ...).
A selected person with a label in none of the configured languages is a `no_label` rejection naming
the entity and the language codes tried, if its popularity would have put it in a language's pool
(at most `top_n * pool_factor` such rejections: below the cut nothing is recorded).
popularity = number of sitelinks. While streaming, the `top_n * pool_factor` most popular
candidates per language are kept (bounded memory on the full dump); articles are then joined
through the `<lang>wiki` sitelink titles and `select` walks the ranking.

One pass, on every core (tasks/sources/dump.py splits the dump; `parse_chunk` runs in the workers):
msgspec decodes each line's head in place (id, type, the labels in the configured languages + en and
the P31 claims; everything else is skipped without building objects); the labels go to an on-disk
label table; a person of a configured category is then decoded into what its candidate needs (its
claims' main snaks, not their qualifiers and references). A line whose head has other shapes, or is
broken, goes the line-by-line way (`parse_lines`: a line that mentions Q5/Q15632617/Q95074 or is a
property is parsed in full, so a broken one is reported; any other only for its labels). After the
pass the labels the pools' claims reference are read back from the table. Then the Wikipedia files.
The format is told by the magic bytes (a gzip file named .bz2 is read as gzip). Memory at full scale
(~110M entities, ~12M people): (workers + 3) x 16.5 MiB chunks in flight in a /dev/shm ring, the
per-language pools (top_n * pool_factor compact candidates each) and the decoder's buffers in the
reading process; each worker one chunk and its result: ~0.4 GB on 2 cores, ~8 GB on 64. The label
table (~165M rows for en+zh, ~3-4 GB of zstd Parquet) lives under <home>/sources/tmp during the pass. With a snapshot store (the flow) the pass's result is kept as
the dump's snapshot (tasks/sources/dump_snapshot.py) and an unchanged dump is not read again.

Claims are "property: value; value" lines (property and item labels in the character's language,
else English, else the id); datavalue types rendered: wikibase-entityid, time (by precision,
BCE for negative years), quantity (with its unit), string and monolingualtext. External ids,
media and urls are skipped; at most `max_claims` lines.

Bad inputs: a malformed JSON line or a line that is not UTF-8, among the lines parsed in full ->
rejection (`malformed` / `encoding`) naming the file, line (and byte offset) and the read goes on
(any other unreadable line can only have been a label source: counted as `unreadable_lines`); if no entity at all
could be read and lines were bad -> InputFormatError. A compressed stream that ends early ->
TruncatedInputError naming the file, the last line read and the entities read so far; with
`allow_truncated` those are kept and a `truncated` rejection is recorded. A plain .json without
its closing "]" gets the same `truncated` rejection (its cut last line is a `malformed` one).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.sources import InputFormatError, TruncatedInputError, reject, require_file, select
from tasks.sources.dump import (
    CHUNK_BYTES,
    StreamError,
    available_cores,
    decompressor,
    detect_format,
    no_gc,
    read_chunks,
)
from tasks.sources.wikipedia import load_articles, normalize_title

log = logging.getLogger(__name__)

CLASSES = {"Q5": "real", "Q15632617": "fictional", "Q95074": "fictional"}
LANGUAGE_FALLBACKS = {"zh": ["zh", "zh-hans", "zh-cn", "zh-hant", "zh-tw", "zh-hk", "zh-sg", "zh-mo", "zh-my"]}
SKIP_DATATYPES = {"external-id", "commonsMedia", "url", "geo-shape", "tabular-data", "math",
                  "musical-notation", "wikibase-lexeme", "wikibase-form", "wikibase-sense", "entity-schema"}
_ENTITY_ID = re.compile(rb'"id"\s*:\s*"([QP]\d+)"')
_UNIT = re.compile(r"/entity/(Q\d+)$")
ENTITY_URL = "https://www.wikidata.org/wiki/"
LICENSE = "Wikidata: CC0 1.0; Wikipedia text: CC BY-SA 4.0"


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
                  limit: int, names: dict[str, str] | None = None) -> str:
    """names: a cache of rendered names for `lang` shared across calls (the pool's claims reference the
    same properties and items again and again)."""
    names = {} if names is None else names

    def name(eid: str) -> str:
        got = names.get(eid)
        if got is None:
            known = labels.get(eid) or {}
            got = names[eid] = _pick(known, lang) or known.get("en") or eid
        return got

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
    labels = entity.get("labels")
    if not isinstance(labels, dict):
        return out
    for lang in dict.fromkeys([*languages, "en"]):
        label = _pick(labels, lang)
        if isinstance(label, dict) and isinstance(label.get("value"), str) and label["value"]:
            out[lang] = label["value"]
    return out


def _any_label(entity: dict) -> str:
    """A label in some language, to show what the rejected entity is; '' when it has none."""
    for value in (entity.get("labels") or {}).values():
        if isinstance(value, dict) and value.get("value"):
            return f"{value.get('language', '')}: {value['value']}"
    return ""




# -- one pass over the dump, in parallel (tasks/sources/dump.py splits it; parse_chunk runs in workers) --
_PERSON_MARKERS = tuple(f'"{q}"'.encode() for q in CLASSES)
_PROPERTY_MARKER = b'"type":"property"'
_HEAD_ID = re.compile(rb'"id"\s*:\s*"([QPL]\d+)"')
_LABELS_KEY = b'"labels":'
_AFTER_LABELS = b'},"descriptions":'
_DECODER = json.JSONDecoder()
LABEL_SCHEMA = pa.schema([("id", pa.string()), ("lang", pa.string()), ("label", pa.string()), ("line", pa.int64())])


KIND_DATA = pa.schema([("kind", pa.string()), ("data", pa.string())])


def _columns(schema: pa.Schema, *columns: list) -> pa.Table:
    # pa.table / from_pydict import pandas to check for DataFrames (seconds at start-up): build from arrays
    return pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema, strict=True)], schema=schema)


def _cheap_labels(line: bytes) -> tuple[str, dict] | None:
    """(entity id, labels object) without parsing the claims: the official layout puts "id" in the first
    bytes and "labels" before "descriptions"; anything else falls back to a full parse."""
    m = _HEAD_ID.search(line, 0, 96)
    pos = line.find(_LABELS_KEY)
    if m is None or pos < 0:
        entity = json.loads(line)
        return (entity["id"], entity.get("labels") or {}) if isinstance(entity, dict) and "id" in entity else None
    pos += len(_LABELS_KEY)
    cut = line.find(_AFTER_LABELS, pos)
    text = line[pos: cut + 1 if cut >= 0 else len(line)].decode("utf-8")
    obj, _ = _DECODER.raw_decode(text.lstrip())
    return m.group(1).decode(), obj if isinstance(obj, dict) else {}


# The head of an entity, decoded by msgspec without building the rest: id, type, the labels in the
# wanted language codes and the P31 claims. Every other field (claims of other properties, sitelinks,
# descriptions of all languages...) is skipped by the decoder without creating objects, which is what
# makes the label pass over all ~110M entities cheap. A line whose head does not have these shapes
# (labels as [], a missing id, not an object...) is read by the line-by-line path below.
class _Label(msgspec.Struct):
    value: str | None = None


class _EntityValue(msgspec.Struct, rename={"numeric_id": "numeric-id", "entity_type": "entity-type"}):
    id: Any = None
    numeric_id: Any = msgspec.UNSET
    entity_type: Any = None


class _DataValue(msgspec.Struct):
    type: Any = None
    value: _EntityValue | None = None


class _Snak(msgspec.Struct):
    datavalue: _DataValue | None = None


class _Claim(msgspec.Struct):
    mainsnak: _Snak | None = None
    rank: Any = None


class _Claims(msgspec.Struct):
    P31: list[_Claim] = []


@functools.lru_cache(maxsize=8)
def _head_decoder(codes: tuple[str, ...]) -> msgspec.json.Decoder:
    fields = [(f"l{k}", _Label | None, None) for k in range(len(codes))]
    labels = msgspec.defstruct("_Labels", fields, rename={f"l{k}": code for k, code in enumerate(codes)})
    head = msgspec.defstruct("_Head", [("id", str), ("type", Any, None),
                                       ("labels", labels | list[Any], msgspec.field(default_factory=labels)),
                                       ("claims", _Claims | list[Any], msgspec.field(default_factory=_Claims))])
    return msgspec.json.Decoder(head)


# A person of a configured category, decoded by msgspec into only what the candidate needs (the wanted
# languages' labels, descriptions and aliases, every claim's main snak and rank, the sitelinks' titles),
# skipping qualifiers, references and the other languages, then turned into plain dicts of the dump's
# shape for `_ChunkParse.entity`. omit_defaults: a field absent from the dump is absent from the dict.
class _PLabel(msgspec.Struct, omit_defaults=True):
    value: str | None = None


class _PDataValue(msgspec.Struct, omit_defaults=True):
    type: Any = None
    value: Any = None


class _PSnak(msgspec.Struct, omit_defaults=True):
    snaktype: Any = None
    datatype: Any = None
    datavalue: _PDataValue | None = None


class _PClaim(msgspec.Struct, omit_defaults=True):
    mainsnak: _PSnak | None = None
    rank: Any = None


class _PSitelink(msgspec.Struct, omit_defaults=True):
    title: Any = None


@functools.lru_cache(maxsize=8)
def _person_decoder(codes: tuple[str, ...]) -> msgspec.json.Decoder:
    rename = {f"l{k}": code for k, code in enumerate(codes)}
    labels = msgspec.defstruct("_PLabels", [(f, _PLabel | None, None) for f in rename], rename=rename,
                               omit_defaults=True)
    aliases = msgspec.defstruct("_PAliases", [(f, list[_PLabel] | None, None) for f in rename], rename=rename,
                                omit_defaults=True)
    person = msgspec.defstruct("_Person", [
        ("id", str), ("type", Any, None),
        ("labels", labels | list[Any] | None, None), ("descriptions", labels | list[Any] | None, None),
        ("aliases", aliases | list[Any] | None, None),
        ("claims", dict[str, list[_PClaim]] | list[Any] | None, None),
        ("sitelinks", dict[str, _PSitelink] | list[Any] | None, None)], omit_defaults=True)
    return msgspec.json.Decoder(person)


def _label_plan(languages: list[str]) -> tuple[tuple[str, ...], list[tuple[str, list[str]]]]:
    """(every language code looked up, [(language, its fields in fallback order)]) for the configured
    languages and en, in a fixed order."""
    wanted = list(dict.fromkeys([*languages, "en"]))
    codes = list(dict.fromkeys(code for lang in wanted for code in LANGUAGE_FALLBACKS.get(lang, [lang])))
    index = {code: f"l{k}" for k, code in enumerate(codes)}
    return tuple(codes), [(lang, [index[c] for c in LANGUAGE_FALLBACKS.get(lang, [lang])]) for lang in wanted]


def _head_category(claims: list[_Claim]) -> str | None:
    """person_category on the decoded P31 claims."""
    found = set()
    for claim in claims:
        dv = claim.mainsnak.datavalue if claim.mainsnak is not None else None
        if claim.rank == "deprecated" or dv is None or dv.type != "wikibase-entityid" or dv.value is None:
            continue
        value = dv.value
        if value.id:
            qid = value.id
        elif value.numeric_id is not msgspec.UNSET:
            qid = ("P" if value.entity_type == "property" else "Q") + str(value.numeric_id)
        else:
            continue
        if qid in CLASSES:
            found.add(CLASSES[qid])
    if "real" in found:
        return "real"
    return "fictional" if found else None


class _ChunkParse:
    """The result of one chunk (see parse_chunk) and the per-line steps that fill it."""

    def __init__(self, params: dict[str, Any]):
        self.languages: list[str] = params["languages"]
        self.categories = set(params["categories"])
        self.out: dict[str, Any] = {"cands": [], "unlabeled": [], "lab_lines": [], "lab_ids": [], "lab_langs": [],
                                    "lab_vals": [], "bad": [], "opened": False, "closed": False, "parsed": 0,
                                    "unreadable": 0, "lines": 0}

    def add_labels(self, i: int, eid: str, labels: dict) -> None:
        out = self.out
        for lang, value in _labels({"labels": labels}, self.languages).items():
            out["lab_lines"].append(i)
            out["lab_ids"].append(eid)
            out["lab_langs"].append(lang)
            out["lab_vals"].append(value)

    def line(self, raw: bytes, i: int, start: int) -> None:
        """One line the slow way: a line that mentions a person class or is a property is parsed in full
        (so a broken one is reported), any other only for its labels."""
        out = self.out
        line = raw.strip()
        if line.endswith(b","):
            line = line[:-1].rstrip()
        if line == b"[":
            out["opened"] = True
            return
        if line == b"]":
            out["closed"] = True
            return
        if not line:
            return
        if not (any(m in line for m in _PERSON_MARKERS) or _PROPERTY_MARKER in line):
            try:
                got = _cheap_labels(line)
            except (ValueError, UnicodeDecodeError, TypeError, KeyError):
                out["unreadable"] += 1  # not a person: only its labels were wanted
                return
            if got:
                out["parsed"] += 1
                self.add_labels(i, *got)
            return
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            out["bad"].append((i, "encoding", start + exc.start, exc.reason, line[:200].decode("utf-8", "replace")))
            return
        try:
            entity = json.loads(text)
            if not isinstance(entity, dict) or "id" not in entity:
                raise ValueError("not an entity object (no 'id')")
        except ValueError as exc:  # JSONDecodeError is a ValueError
            out["bad"].append((i, "malformed", start, str(exc), text[:200]))
            return
        self.entity(entity, i)

    def entity(self, entity: dict, i: int, whole: Callable[[], dict] | None = None) -> None:
        """A decoded entity: its labels, and a candidate (or an unlabeled person) when it is a person of a
        configured category. `whole`: the entity with all its languages, when `entity` holds only the
        wanted ones (an unlabeled person is shown by a label in any language)."""
        out = self.out
        out["parsed"] += 1
        self.add_labels(i, entity["id"], entity.get("labels") or {})
        if entity.get("type") == "property":
            return
        category = person_category(entity)
        if category is None or category not in self.categories:
            return
        sitelinks = entity.get("sitelinks") or {}
        cand = None
        labels = entity.get("labels")
        labels = labels if isinstance(labels, dict) else {}
        for lang in self.languages:
            label = _pick(labels, lang)
            if not isinstance(label, dict) or not isinstance(label.get("value"), str) or not label["value"]:
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
        if cand is None:
            other = _any_label(whole() if whole is not None else entity)
            out["unlabeled"].append((i, len(sitelinks), entity["id"], other))
        else:
            out["cands"].append((i, cand))


def _decode_or(decode: Callable[[Any], Any], line: Any, default: Any) -> Any:
    try:
        return decode(line)
    except (msgspec.DecodeError, ValueError):
        return default


def parse_lines(data: bytes, params: dict[str, Any]) -> dict[str, Any]:
    """parse_chunk without the head decoder: every line the line-by-line way (the reference the fast
    path is tested against, and what a line the head decoder cannot read goes through)."""
    p = _ChunkParse(params)
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    start = 0
    for i, raw in enumerate(lines):
        p.line(raw, i, start)
        start += len(raw) + 1
    p.out["lines"] = len(lines)
    return p.out


def parse_chunk(data: bytes, params: dict[str, Any]) -> dict[str, Any]:
    """One chunk of dump lines -> compact candidates, label rows and bad lines (line indexes are 0-based
    within the chunk; the reader turns them into dump line numbers).

    Each line's head (id, type, wanted labels, P31) is decoded by msgspec in place (no copy of the line);
    only a person of a configured category is then decoded whole. A line the head decoder refuses (not
    the usual shapes, broken JSON, bad UTF-8 in what it reads) goes the line-by-line way, which reports it
    as a rejection when it mentions a person class, or counts it as unreadable."""
    p = _ChunkParse(params)
    out = p.out
    codes, plan = _label_plan(p.languages)
    decode = _head_decoder(codes).decode
    decode_person = _person_decoder(codes).decode
    decode_any = msgspec.json.decode
    to_builtins = msgspec.to_builtins
    categories = p.categories
    at, ids, langs, vals = out["lab_lines"], out["lab_ids"], out["lab_langs"], out["lab_vals"]
    view = memoryview(data)
    size = len(data)
    pos = i = 0
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            end = size
        stop = end - 1 if end > pos and data[end - 1] == 44 else end  # 44: the "," after each entity
        head = None
        if stop - pos > 8:
            try:
                head = decode(view[pos:stop])
            except (msgspec.DecodeError, ValueError):  # ValidationError, UnicodeDecodeError
                head = None
        if head is None:
            p.line(data[pos:end], i, pos)
        else:
            claims = head.claims
            category = (_head_category(claims.P31) if head.type != "property" and not isinstance(claims, list)
                        else None)
            entity = None
            slow = False
            if category is not None:  # a person's line is checked whole: the head decoder skips the rest
                line = view[pos:stop]
                try:
                    str(line, "utf-8")
                    if category in categories:
                        entity = to_builtins(decode_person(line))
                except (msgspec.DecodeError, ValueError):
                    slow = True
            if slow:
                p.line(data[pos:end], i, pos)
            elif entity is not None:
                p.entity(entity, i, lambda line=line, entity=entity: _decode_or(decode_any, line, entity))
            else:
                out["parsed"] += 1
                labels = head.labels
                eid = head.id
                for lang, fields in plan if not isinstance(labels, list) else ():
                    for name in fields:
                        label = getattr(labels, name)
                        if label is not None:
                            if label.value:
                                at.append(i)
                                ids.append(eid)
                                langs.append(lang)
                                vals.append(label.value)
                            break
        pos = end + 1
        i += 1
    out["lines"] = i
    return out


@dataclass
class DumpScan:
    """What one pass over a dump yields for a configuration: the ranked (language, candidate) pool, the
    labels its claims reference, the rejections, and read statistics."""

    entries: list[tuple[str, dict]]
    labels: dict[str, dict[str, str]]
    rejects: list[Rejection]
    stats: dict[str, Any] = field(default_factory=dict)

    def to_table(self) -> pa.Table:
        """Rows of (kind, JSON): the entries and the labels one document each (one decode call for the
        whole pool: a row per entry cost ~1 s per 60k rows), a row per rejection, the stats."""
        encode = msgspec.json.Encoder().encode  # as json.dumps(ensure_ascii=False)
        rows = [("entries", encode([[lang, c] for lang, c in self.entries]).decode()),
                ("labels", encode(dict(sorted(self.labels.items()))).decode())]
        rows += [("reject", r.model_dump_json()) for r in self.rejects]
        rows.append(("stats", json.dumps(self.stats)))
        return _columns(KIND_DATA, [k for k, _ in rows], [d for _, d in rows])

    @classmethod
    def from_table(cls, table: pa.Table) -> DumpScan:
        scan = cls([], {}, [], {})
        decode = msgspec.json.decode
        for kind, data in zip(table.column("kind").to_pylist(), table.column("data").to_pylist(), strict=True):
            if kind == "entries":
                with no_gc():  # ~1M small objects at once: 4x faster without the collector's passes
                    scan.entries = [(lang, cand) for lang, cand in decode(data)]
            elif kind == "labels":
                with no_gc():
                    scan.labels = decode(data)
            elif kind == "reject":
                scan.rejects.append(Rejection.model_validate_json(data))
            elif kind == "stats":
                scan.stats = json.loads(data)
        return scan


def scan_params(cfg: CharactersConfig) -> dict[str, Any]:
    """The configuration a scan depends on (its snapshot key, with the dump's identity)."""
    return {"languages": list(cfg.languages), "categories": list(cfg.categories),
            "pool": cfg.top_n * cfg.pool_factor, "allow_truncated": cfg.allow_truncated}


def _lookup_labels(table_path: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """Labels of the wanted ids from the on-disk label table; the last occurrence in the dump wins."""
    found: dict[str, dict[str, str]] = {}
    if not wanted or not table_path.exists():
        return found
    value_set = pa.array(sorted(wanted), pa.string())
    seen: dict[str, int] = {}
    for batch in pq.ParquetFile(table_path).iter_batches(batch_size=1 << 16, use_threads=False):
        hit = batch.filter(pc.is_in(batch.column("id"), value_set=value_set))
        for eid, lang, label, line in zip(hit.column("id").to_pylist(), hit.column("lang").to_pylist(),
                                          hit.column("label").to_pylist(), hit.column("line").to_pylist(),
                                          strict=True):
            if seen.get(eid) != line:  # a later occurrence of the entity replaces the earlier one whole
                seen[eid] = line
                found[eid] = {}
            found[eid][lang] = label
    return found


def scan_dump(path: Path, cfg: CharactersConfig, *, workers: int | None = None, chunk_bytes: int = CHUNK_BYTES,
              workdir: Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None) -> DumpScan:
    """One pass: persons ranked into bounded per-language pools, every entity's labels (configured
    languages + en) into an on-disk table, then the labels the pools' claims reference read back."""
    t0 = time.perf_counter()
    params = scan_params(cfg)
    pool = params["pool"]
    nl = len(cfg.languages)
    heaps: dict[str, list] = {lang: [] for lang in cfg.languages}
    unlabeled: list = []  # the `pool` most popular persons with no label in any configured language
    rejects: list[Rejection] = []
    fmt = detect_format(path)
    compressed = fmt != "plain"
    workers = workers if workers is not None else (cfg.read_workers or available_cores())
    lineno = parsed = bad = unreadable = 0
    first_problem = ""
    opened = closed = False
    tmp = Path(tempfile.mkdtemp(prefix="labels-", dir=workdir))
    table_path = tmp / "labels.parquet"
    writer = pq.ParquetWriter(table_path, LABEL_SCHEMA, compression="zstd")
    try:
        try:
            for base, offset, res in read_chunks(path, parse_chunk, params, workers=workers,
                                                 chunk_bytes=chunk_bytes, fmt=fmt, progress=progress,
                                                 exact_salvage=cfg.allow_truncated):
                for i, kind, at, detail, text in res["bad"]:
                    bad += 1
                    n = base + i
                    if kind == "encoding":
                        problem = f"{path}: line {n}: not UTF-8 at byte offset {offset + at} ({detail})"
                    else:
                        problem = f"{path}: line {n}: malformed entity: {detail}"
                    first_problem = first_problem or problem
                    rejects.append(reject(f"{path.name}:{n}", kind, problem, text=text))
                for i, cand in res["cands"]:
                    seq = (base + i) * nl
                    for k, lang in enumerate(cfg.languages):
                        if lang not in cand["langs"]:
                            continue
                        item = (cand["popularity"], -(seq + k), cand)
                        heap = heaps[lang]
                        if len(heap) < pool:
                            heapq.heappush(heap, item)
                        else:
                            heapq.heappushpop(heap, item)
                for i, popularity, qid, other in res["unlabeled"]:
                    item = (popularity, -(base + i) * nl, qid, other)
                    if len(unlabeled) < pool:
                        heapq.heappush(unlabeled, item)
                    else:
                        heapq.heappushpop(unlabeled, item)
                if res["lab_ids"]:
                    # line = the entity's dump line: a later copy of an entity replaces its labels whole
                    writer.write_table(_columns(LABEL_SCHEMA, res["lab_ids"], res["lab_langs"], res["lab_vals"],
                                                [base + j for j in res["lab_lines"]]))
                parsed += res["parsed"]
                unreadable += res["unreadable"]
                opened = opened or res["opened"]
                closed = closed or res["closed"]
                lineno = base + res["lines"] - 1 if res["lines"] else lineno
        except StreamError as exc:
            lineno = exc.lines
            problem = (f"compressed stream ends early or is corrupt after line {lineno} ({parsed} entities read): "
                       f"{type(exc.cause).__name__}: {exc.cause}")
            if not cfg.allow_truncated:
                raise TruncatedInputError(path, problem) from exc.cause
            rejects.append(reject(f"{path.name}:{lineno}", "truncated", f"{path}: {problem}; kept what was read"))
            closed = True  # reported as truncated already
        finally:
            writer.close()
        if parsed == 0 and bad:
            raise InputFormatError(path, f"no entity could be read; first problem: {first_problem}")
        if opened and not closed:
            kind = "compressed stream" if compressed else "file"
            rejects.append(reject(f"{path.name}:{lineno}", "truncated",
                                  f"{path}: {kind} ends at line {lineno} without the closing ']' of the dump "
                                  f"({parsed} entities read); kept what was read"))

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
        wanted = set().union(*(referenced_ids(c["claims"]) for _, c in entries)) if entries else set()
        labels = _lookup_labels(table_path, wanted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stats = {"format": fmt, "decompressor": decompressor(fmt, workers), "workers": workers,
             "compressed_bytes": path.stat().st_size, "lines": lineno, "entities_parsed": parsed,
             "unreadable_lines": unreadable, "seconds": round(time.perf_counter() - t0, 3)}
    log.info("wikidata %s: %d lines, %d entities read, %d candidates in %.1f s (%s, %d workers)",
             path.name, lineno, parsed, len(entries), stats["seconds"], stats["decompressor"], workers)
    return DumpScan(entries, labels, rejects, stats)



def _progress_reporter(info: dict[str, Any]) -> None:
    """Source progress to the flow's progress hooks (the CLI's bars) when the flow runs in this process."""
    import sys

    build = sys.modules.get("flows.build")
    emit = getattr(build, "_emit", None)
    if emit is not None:
        emit("source_progress", stage="characters", **info)


def collect(cfg: CharactersConfig, store: Any = None) -> tuple[list[Character], list[Rejection]]:
    """Characters from the dump (one parallel pass, or the dump's snapshot from `store` when this dump
    and scan configuration were read before) joined with the Wikipedia articles."""
    dump = require_file(cfg.wikidata_dump, "wikidata_dump", "wikidata")
    for f in cfg.wikipedia:
        require_file(f, "wikipedia", "wikidata")

    def build() -> pa.Table:
        return scan_dump(dump, cfg, workdir=store.tmp_dir() if store is not None else None,
                         progress=_progress_reporter).to_table()

    if store is not None:
        scan = DumpScan.from_table(store.load_or_build("wikidata-dump", [dump], {**scan_params(cfg),
                                                                                  "code": code_digest()}, build))
    else:
        scan = DumpScan.from_table(build())
    entries, labels = scan.entries, scan.labels

    wanted = {(lang, c["langs"][lang]["title"]) for lang, c in entries if c["langs"][lang]["title"]}
    articles = load_articles(cfg.wikipedia, cfg.wikipedia_hub, wanted, max_summary=cfg.max_summary_chars,
                             max_article=cfg.max_article_chars) if wanted and (cfg.wikipedia or cfg.wikipedia_hub) else {}

    characters = []
    names: dict[str, dict[str, str]] = {lang: {} for lang in cfg.languages}
    for lang, c in entries:
        info = c["langs"][lang]
        art = articles.get((lang, info["title"])) or {}
        url = art.get("url") or (f"https://{lang}.wikipedia.org/wiki/{info['title'].replace(' ', '_')}"
                                 if info["title"] else ENTITY_URL + c["id"])
        characters.append(Character(
            id=c["id"], label=info["label"], description=info["description"], aliases=info["aliases"],
            claims=render_claims(c["claims"], labels, lang, cfg.max_claims, names.setdefault(lang, {})),
            category=c["category"],
            language=lang, popularity=float(c["popularity"]), summary=art.get("summary", ""),
            article=art.get("article", ""), source="wikidata", license=LICENSE, url=url))
    kept, more = select(characters, cfg)
    return kept, list(scan.rejects) + more


def code_digest() -> str:
    """A hash of the code that decides a scan's output (this module and the reader)."""
    import hashlib

    from tasks.sources import dump

    h = hashlib.sha256()
    for mod_file in (__file__, dump.__file__):
        h.update(Path(mod_file).read_bytes())
    return h.hexdigest()[:16]
