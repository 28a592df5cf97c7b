"""What the workers run on each chunk of a Wikidata dump (tasks/sources/wikidata.py reads the dump and
ranks what this returns; tasks/sources/dump.py splits it): `parse_chunk` turns dump lines into
compact candidates, label rows and bad lines. A small module on purpose: each worker process
imports it (and msgspec), not the flow's models, pyarrow or pydantic (~0.8 s per worker).

Per chunk, one search for the person classes (as ids, and as numeric ids for older dumps whose values
have no "id"). An item line in the official compact layout that mentions none of them can only be a
label source: its labels are decoded from the bytes between "labels": and ,"descriptions": and the
rest of the line is not read. Any other line's head (id, type, the labels in the configured
languages + en, the P31 claims) is decoded by msgspec in place, everything else skipped; a person of
a configured category is then decoded into what its candidate needs (its claims' main snaks, not
their qualifiers and references). A line whose head has other shapes, or is broken, goes the
line-by-line way (`parse_lines`, the reference the fast path is tested against)."""

from __future__ import annotations

import functools
import itertools
import json
import re
from array import array
from collections.abc import Callable
from typing import Any

import msgspec

from tasks.sources.wikipedia import normalize_title

CLASSES = {"Q5": "real", "Q15632617": "fictional", "Q95074": "fictional"}
LANGUAGE_FALLBACKS = {"zh": ["zh", "zh-hans", "zh-cn", "zh-hant", "zh-tw", "zh-hk", "zh-sg", "zh-mo", "zh-my"]}
SKIP_DATATYPES = {"external-id", "commonsMedia", "url", "geo-shape", "tabular-data", "math",
                  "musical-notation", "wikibase-lexeme", "wikibase-form", "wikibase-sense", "entity-schema"}
_UNIT = re.compile(r"/entity/(Q\d+)$")


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




_PERSON_MARKERS = tuple(f'"{q}"'.encode() for q in CLASSES)
_PROPERTY_MARKER = b'"type":"property"'
_HEAD_ID = re.compile(rb'"id"\s*:\s*"([QPL]\d+)"')
_LABELS_KEY = b'"labels":'
_AFTER_LABELS = b'},"descriptions":'
_DECODER = json.JSONDecoder()


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
# wanted language codes, the P31 claims and the number of sitelinks. Every other field (claims of other
# properties, descriptions of all languages...) is skipped by the decoder without creating objects. It
# reads the lines the class search below cannot rule out (people, other layouts); a line whose head
# does not have these shapes (labels as [], a missing id, not an object...) is read by the
# line-by-line path below.
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


class _Skip(msgspec.Struct):
    """Any object, its content skipped (a sitelink, counted for the popularity)."""


class _Claims(msgspec.Struct):
    P31: list[_Claim] = []


@functools.lru_cache(maxsize=8)
def _labels_struct(codes: tuple[str, ...]) -> type:
    fields = [(f"l{k}", _Label | None, None) for k in range(len(codes))]
    return msgspec.defstruct("_Labels", fields, rename={f"l{k}": code for k, code in enumerate(codes)})


@functools.lru_cache(maxsize=8)
def _labels_decoder(codes: tuple[str, ...]) -> msgspec.json.Decoder:
    return msgspec.json.Decoder(_labels_struct(codes))


@functools.lru_cache(maxsize=8)
def _head_decoder(codes: tuple[str, ...]) -> msgspec.json.Decoder:
    labels = _labels_struct(codes)
    head = msgspec.defstruct("_Head", [("id", str), ("type", Any, None),
                                       ("labels", labels | list[Any], msgspec.field(default_factory=labels)),
                                       ("claims", _Claims | list[Any], msgspec.field(default_factory=_Claims)),
                                       ("sitelinks", dict[str, _Skip] | list[Any] | None, None)])
    return msgspec.json.Decoder(head)


# Before the head decoder: one search of the chunk for the person classes. A dump writes an item value
# as {"entity-type":"item","numeric-id":5,"id":"Q5"} (dumps before 2015 without "id"), so in a chunk
# that has numeric ids their search finds every value of a class; a chunk without any is searched for
# the ids ("Q5"). (A chunk mixing values with and without numeric ids is not written by Wikidata; there
# a value with only an id would be missed.) An item line in the official compact layout
# ({"type":"item","id":"Q..","labels":{..},"descriptions":..) where no class is mentioned cannot be a
# person: only its labels are read, from the bytes between "labels": and ,"descriptions":, and the rest
# of the line (claims, sitelinks: ~90% of it) is not looked at. The search costs ~0.6 ms per MB of
# JSON; the head decoder spends ~1.5 ms/MB skipping what it does not build.
_CLASS_IDS = re.compile(b"Q(?:" + b"|".join(q[1:].encode() for q in CLASSES) + b')"')
_CLASS_NUMBERS = re.compile(b'numeric-id":(?:' + b"|".join(q[1:].encode() for q in CLASSES) + rb")\D")
_NUMERIC_ID = b'"numeric-id":'
_ITEM_HEAD = b'{"type":"item","id":"'
_HEAD_LABELS = b'","labels":{'


def _class_mentions(data: bytes) -> list[int]:
    """Sorted offsets in `data` where a value of a person class may be."""
    pattern = _CLASS_NUMBERS if _NUMERIC_ID in data else _CLASS_IDS
    return [m.start() for m in pattern.finditer(data)]


def _item_labels(data: bytes, view: memoryview, pos: int, stop: int, decode: Callable[[Any], Any]) -> tuple | None:
    """(id, decoded labels) of the item line data[pos:stop] in the official compact layout, reading only
    its labels; None for any other layout (the caller decodes the line's head instead). Scalar fields
    may come first (pageid, ns, title, lastrevid, modified: the layout of Special:EntityData)."""
    if data.startswith(_ITEM_HEAD, pos):
        at = pos + 1
    else:
        at = data.find(_ITEM_HEAD[1:], pos, min(stop, pos + 256))
        if at < 0 or data[pos] != 123 or data.find(b"{", pos + 1, at) >= 0 or data.find(b"[", pos + 1, at) >= 0:
            return None  # 123: "{"; the fields before "type" hold no object or array
    start = at + len(_ITEM_HEAD) - 1
    quote = data.find(b'"', start, start + 48)
    if quote < 0 or not data.startswith(_HEAD_LABELS, quote):
        return None
    eid = data[start:quote]
    if b"\\" in eid:
        return None
    lab = quote + len(_HEAD_LABELS) - 1
    cut = data.find(_AFTER_LABELS, lab, stop)
    if cut < 0:
        return None
    try:
        return eid.decode(), decode(view[lab:cut + 1])
    except (msgspec.DecodeError, ValueError):  # ValidationError, UnicodeDecodeError
        return None


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


def _may_enter(head: Any, floors: dict[str, Any], fields: list[tuple[str, list[str]]], n_languages: int) -> bool:
    """Whether the person of this head could still enter a pool. floors (from scan_dump, as it was when
    the chunk was handed out; a pool's floor only rises): {"langs": {language: the popularity a person
    must exceed to enter that language's full pool}, "unlabeled": the same for the pool of persons with
    no label in any configured language, or None}. A person at or below every floor it faces would be
    dropped by the pools anyway, so it is not decoded: on the full dump that is most of the ~12M people.
    fields: the configured languages and their label fields in fallback order."""
    sitelinks = head.sitelinks
    popularity = len(sitelinks) if sitelinks else 0
    langs = floors["langs"]
    labels = head.labels
    labeled = False
    for lang, names in fields if not isinstance(labels, list) else ():
        for name in names:
            label = getattr(labels, name)
            if label is not None:
                if label.value:
                    labeled = True
                    floor = langs.get(lang)
                    if floor is None or popularity > floor:
                        return True
                break
    if labeled:
        return False
    floor = floors["unlabeled"]
    if floor is not None and popularity <= floor:
        return False
    return len(langs) < n_languages or popularity > min(langs.values())


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
        """One line the slow way: a line that mentions a person class or is a property (told by its first
        bytes) is parsed in full (so a broken one is reported), any other only for its labels."""
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
        if not (any(m in line for m in _PERSON_MARKERS) or _PROPERTY_MARKER in line[:96]):
            try:
                got = _cheap_labels(line)
            except (ValueError, UnicodeDecodeError, TypeError, KeyError):
                out["unreadable"] += 1  # not a person: only its labels were wanted
                return
            if got:
                out["parsed"] += 1
                self.add_labels(i, got[0], _scrub(got[1]) if _SURROGATE_ESCAPE.search(line) else got[1])
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
        self.entity(_scrub(entity) if _SURROGATE_ESCAPE.search(line) else entity, i)

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


# JSON may escape a lone UTF-16 surrogate ("\ud800"), which is no character: msgspec refuses such a line
# (it goes the line-by-line way), json accepts it, and UTF-8 (Parquet, Arrow) cannot hold it. Such
# strings get U+FFFD in its place.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")  # after json.loads only lone ones are left (pairs are joined)


def _scrub(obj: Any) -> Any:
    """obj with every lone surrogate in its strings replaced by U+FFFD."""
    if isinstance(obj, str):
        return obj if obj.isascii() else _SURROGATE.sub("\ufffd", obj)
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v) for v in obj]
    return obj


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
    decode_labels = _labels_decoder(codes).decode
    decode_person = _person_decoder(codes).decode
    decode_any = msgspec.json.decode
    to_builtins = msgspec.to_builtins
    categories = p.categories
    at, ids, langs, vals = out["lab_lines"], out["lab_ids"], out["lab_langs"], out["lab_vals"]
    floors = params.get("floors")  # see _may_enter; absent: every person of a configured category is read
    configured = [(lang, names) for lang, names in plan if lang in p.languages]
    n_languages = len(p.languages)

    def add_labels(i: int, eid: str, labels: Any) -> None:
        out["parsed"] += 1
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

    view = memoryview(data)
    size = len(data)
    mentions = _class_mentions(data)
    nm = len(mentions)
    pos = i = k = 0
    while pos < size:
        end = data.find(b"\n", pos)
        if end < 0:
            end = size
        stop = end - 1 if end > pos and data[end - 1] == 44 else end  # 44: the "," after each entity
        while k < nm and mentions[k] < pos:
            k += 1
        if k == nm or mentions[k] >= stop:  # no person class mentioned: only the labels are wanted
            got = _item_labels(data, view, pos, stop, decode_labels)
            if got is not None:
                add_labels(i, *got)
                pos = end + 1
                i += 1
                continue
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
                    if category in categories and (floors is None or _may_enter(head, floors, configured,
                                                                                n_languages)):
                        entity = to_builtins(decode_person(line))
                except (msgspec.DecodeError, ValueError):
                    slow = True
            if slow:
                p.line(data[pos:end], i, pos)
            elif entity is not None:
                p.entity(entity, i, lambda line=line, entity=entity: _decode_or(decode_any, line, entity))
            else:
                add_labels(i, head.id, head.labels)
        pos = end + 1
        i += 1
    out["lines"] = i
    return out


def _strings(values: list[str]) -> tuple[bytes, bytes]:
    """(UTF-8 data, int32 offsets): the buffers of an Arrow string array of `values`."""
    parts = [v.encode("utf-8", "replace") for v in values]
    return b"".join(parts), array("i", itertools.accumulate(map(len, parts), initial=0)).tobytes()


def scan_chunk(data: bytes, params: dict[str, Any]) -> dict[str, Any]:
    """parse_chunk with its label rows handed back as the buffers of Arrow arrays ("labels": rows, then
    (data, offsets) of the ids, languages and labels, then the int64 line indexes): the reading process
    turns them into a table without touching each row, and the result pickles as a few byte strings
    (its four lists of rows cost the reading process ~8 ms a chunk to unpickle)."""
    out = parse_chunk(data, params)
    ids, langs, vals, at = out.pop("lab_ids"), out.pop("lab_langs"), out.pop("lab_vals"), out.pop("lab_lines")
    out["labels"] = (len(ids), *_strings(ids), *_strings(langs), *_strings(vals), array("q", at).tobytes())
    return out
