"""Sourcing at dump scale: the parallel reader equals a serial read, source snapshots are reused for an
unchanged input and re-read for a changed one, and a rerun uses the rows its run pinned."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import random
from pathlib import Path

import pytest

from flows.build import RunFailed, rerun, run_build
from models.base import table_rows
from models.config import load_config
from models.config.characters import CharactersConfig
from storage.catalog import Catalog
from storage.reader import CatalogReader
from storage.shards import read_table
from tasks import characters as characters_mod
from tasks.characters import CharactersStage
from tasks.sources import TruncatedInputError
from tasks.sources.dump import detect_format, read_chunks, read_range
from tasks.sources.dump_snapshot import SnapshotGoneError, SnapshotStore, input_identity
from tasks.sources.wikidata import scan_dump
from tests.plugins.characters import dump_lines, entity, item_claim, time_claim
from tests.plugins.core import make_characters

SUFFIXES = [".json", ".json.gz", ".json.bz2"]


def many_entities(n_people: int = 60, n_items: int = 240, seed: int = 0) -> list[dict]:
    """People (real and fictional) whose claims reference items elsewhere in the dump, before and after
    them; properties; a duplicated person; ties in popularity."""
    rnd = random.Random(seed)
    out = [entity("P19", {"en": "place of birth", "zh": "出生地"}, type="property"),
           entity("P569", {"en": "date of birth"}, type="property")]
    people = []
    for i in range(n_people):
        refs = [item_claim("P19", f"Q{5000 + rnd.randrange(n_items)}") for _ in range(rnd.randint(1, 3))]
        labels = {"en": f"Person {i}"} if i % 7 else {"de": f"Person {i}"}  # every 7th: no configured label
        if i % 3 == 0:
            labels["zh"] = f"人物{i}"
        people.append(entity(f"Q{100 + i}", labels, p31="Q5" if i % 4 else "Q95074",
                             sitelinks={f"w{k}wiki": "x" for k in range(rnd.randint(0, 6))},
                             claims=[*refs, time_claim("P569", f"+{1800 + i}-01-01T00:00:00Z")]))
    items = [entity(f"Q{5000 + j}", {"en": f"Town {j}", "zh": f"镇{j}"}, p31="Q515",
                    claims=[item_claim("P17", "Q42")]) for j in range(n_items)]
    mixed = items[: n_items // 2] + people + items[n_items // 2:] + [people[5]]
    return out + mixed


def write(path: Path, lines: list[bytes]) -> Path:
    data = b"\n".join(lines) + b"\n"
    if path.name.endswith(".bz2"):
        data = bz2.compress(data, 1)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def bad_lines(entities: list[dict]) -> list[bytes]:
    lines = dump_lines(entities)
    lines.insert(9, b'{"type":"item","id":"Q99","claims":{"P31":[ broken "Q5"},')
    lines.insert(40, b'{"type":"item","id":"Q98","labels":{"en":{"language":"en","value":"Caf\xe9"}},"Q5":1},')
    return lines


def cfg_for(dump: Path, **kw) -> CharactersConfig:
    return CharactersConfig(source="wikidata", wikidata_dump=str(dump), languages=["en", "zh"], top_n=5,
                            pool_factor=2, min_profile_chars=0, **kw)


def as_plain(scan) -> tuple:
    return (json.loads(json.dumps(scan.entries)), scan.labels, [r.model_dump() for r in scan.rejects])


@pytest.fixture(params=["isal", "rapidgzip"])
def gzip_decoder(request, monkeypatch):
    """gzip read in parallel by one isal thread (few cores) or by rapidgzip (many cores)."""
    from tasks.sources import dump as dump_mod

    monkeypatch.setattr(dump_mod, "GZIP_PARALLEL_THREADS", 2 if request.param == "rapidgzip" else 5)
    assert dump_mod.decompressor("gzip", 2).startswith(request.param)
    return request.param


WITH_DECODERS = [(".json", "isal"), (".json.bz2", "isal"), (".json.gz", "isal"), (".json.gz", "rapidgzip")]


@pytest.mark.parametrize("suffix, gzip_decoder", WITH_DECODERS, indirect=["gzip_decoder"])
@pytest.mark.parametrize("chunk", [997, 8191])
def test_parallel_reading_equals_serial(tmp_path, suffix, chunk, gzip_decoder):
    dump = write(tmp_path / f"d{suffix}", bad_lines(many_entities()))
    cfg = cfg_for(dump)
    serial = scan_dump(dump, cfg, workers=1, chunk_bytes=1 << 30)
    parallel = scan_dump(dump, cfg, workers=2, chunk_bytes=chunk)
    assert as_plain(parallel) == as_plain(serial)
    assert {r.filter for r in serial.rejects} >= {"malformed", "encoding", "no_label"}
    assert serial.entries and any(k.startswith("Q50") for k in serial.labels)  # item labels gathered in the pass
    # line numbers are the dump's, whatever the chunking
    assert {r.row_id for r in parallel.rejects if r.filter in ("malformed", "encoding")} == {
        f"{dump.name}:10", f"{dump.name}:41"}


def _lines(data: bytes, params) -> list[bytes]:
    if not data:
        return []
    return data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n")


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_byte_ranges_own_each_line_once(tmp_path, chunk):
    lines = [b"x" * (i % 13) + str(i).encode() for i in range(200)]
    path = tmp_path / "lines.json"
    path.write_bytes(b"\n".join(lines))  # no final newline, and the size does not divide
    got = []
    for start in range(0, path.stat().st_size, chunk):
        first, data = read_range(str(path), start, start + chunk)
        got += _lines(data, None)
    assert got == lines
    out = [(line, r) for line, _, r in read_chunks(path, _lines, None, workers=1, chunk_bytes=chunk)]
    assert [x for _, r in out for x in r] == lines
    assert [n for n, _ in out] == [1 + sum(len(r) for _, r in out[:i]) for i in range(len(out))]


@pytest.mark.parametrize("real, name", [("gzip", "looks.json.bz2"), ("bz2", "looks.json"), ("plain", "looks.gz")])
def test_format_is_told_by_magic_bytes(tmp_path, real, name):
    entities = many_entities(20, 20)
    data = b"\n".join(dump_lines(entities)) + b"\n"
    blob = {"gzip": gzip.compress, "bz2": bz2.compress, "plain": lambda d: d}[real](data)
    path = tmp_path / name
    path.write_bytes(blob)
    assert detect_format(path) == real
    reference = write(tmp_path / "ref.json", dump_lines(entities))
    got = scan_dump(path, cfg_for(path), workers=1)
    want = scan_dump(reference, cfg_for(reference), workers=1)
    assert got.entries == want.entries and got.labels == want.labels


def test_gzip_of_several_members_reads_whole(tmp_path, gzip_decoder):
    """`cat a.gz b.gz` is a valid gzip file (what some mirrors serve): every member is read, in order."""
    lines = dump_lines(many_entities(40, 200))
    half = len(lines) // 2
    path = tmp_path / "members.json.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines[:half]) + b"\n") + gzip.compress(b"\n".join(lines[half:]) + b"\n"))
    reference = write(tmp_path / "ref.json", lines)
    got = scan_dump(path, cfg_for(path), workers=2, chunk_bytes=4096)
    want = scan_dump(reference, cfg_for(reference), workers=1)
    assert as_plain(got) == as_plain(want) and want.entries


@pytest.mark.parametrize("suffix, gzip_decoder", WITH_DECODERS[1:], indirect=["gzip_decoder"])
def test_truncated_stream_in_parallel_keeps_what_a_serial_read_keeps(tmp_path, suffix, gzip_decoder):
    full = write(tmp_path / f"full{suffix}", dump_lines(many_entities(80, 600))).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full[: len(full) * 3 // 4])
    with pytest.raises(TruncatedInputError, match=r"cut\.json.*entities read"):
        scan_dump(cut, cfg_for(cut), workers=2, chunk_bytes=4096)
    cfg = cfg_for(cut, allow_truncated=True)
    serial = scan_dump(cut, cfg, workers=1, chunk_bytes=1 << 30)
    parallel = scan_dump(cut, cfg, workers=2, chunk_bytes=4096)
    assert as_plain(parallel) == as_plain(serial)
    assert [r.filter for r in parallel.rejects].count("truncated") == 1 and parallel.entries


# -- snapshots --------------------------------------------------------------------------------------
def test_snapshot_reused_for_unchanged_input_and_rebuilt_for_changed(tmp_path):
    dump = write(tmp_path / "d.json.gz", dump_lines(many_entities()))
    home = tmp_path / "home"
    cfg = cfg_for(dump)
    calls = []
    real_scan = scan_dump

    def counting(*a, **kw):
        calls.append(1)
        return real_scan(*a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr("tasks.sources.wikidata.scan_dump", counting)
    try:
        store = SnapshotStore(home)
        first = characters_mod.collect_snapshot(cfg, store)
        used = store.used_list()
        assert {m["kind"] for m in used} == {"characters", "wikidata-dump"} and all(m["new"] for m in used)
        again = SnapshotStore(home, known=used)
        assert characters_mod.collect_snapshot(cfg, again) == first and len(calls) == 1  # nothing read
        assert not any(m["new"] for m in again.used_list())
        # a rendering setting: the dump's snapshot serves, only the stage's is rebuilt
        other = SnapshotStore(home, known=used)
        characters_mod.collect_snapshot(cfg.model_copy(update={"max_claims": 1}), other)
        assert len(calls) == 1 and {m["kind"]: m["new"] for m in other.used_list()} == {
            "wikidata-dump": False, "characters": True}
        # the dump changes (one more person): read again
        write(dump, dump_lines(many_entities() + [entity("Q9999", {"en": "New Person"}, p31="Q5",
                                                         sitelinks={f"s{k}wiki": "x" for k in range(50)})]))
        changed = SnapshotStore(home, known=used)
        _, rejects = characters_mod.collect_snapshot(cfg, changed)  # no articles: every profile is empty
        assert len(calls) == 2 and "Q9999" in {r.character_id for r in rejects}
        # same bytes, new mtime: the identity changed, read again
        os.utime(dump, ns=(1, 1))
        characters_mod.collect_snapshot(cfg, SnapshotStore(home, known=used + changed.used_list()))
        assert len(calls) == 3
    finally:
        mp.undo()
    assert input_identity(dump)["mtime_ns"] == 1


def test_damaged_snapshot_file_is_not_used(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in make_characters(4)) + "\n")
    cfg = CharactersConfig(source="jsonl", path=str(path))
    store = SnapshotStore(tmp_path / "home")
    rows, _ = characters_mod.collect_snapshot(cfg, store)
    (meta,) = store.used_list()
    (tmp_path / "home" / meta["path"]).write_bytes(b"not parquet")
    again = SnapshotStore(tmp_path / "home", known=[meta])
    assert characters_mod.collect_snapshot(cfg, again)[0] == rows and again.used_list()[0]["new"]


# -- the flow: pinned rows on rerun ----------------------------------------------------------------
def _rows(home, run_id):
    with CatalogReader(home) as rd:
        shards = rd.shards(run_id, "characters")
    return sorted(f"{r['id']}@{r['language']}" for s in shards for r in table_rows(read_table(s["path"]))) if shards else []


def _pins(home, run_id):
    with Catalog(home) as cat:
        return {r["kind"]: r["snapshot_id"] for r in cat.query("SELECT * FROM source_pins WHERE run_id=?", [run_id])}


def _edit(chars_file: Path, n: int) -> None:
    chars_file.write_text("\n".join(json.dumps(c) for c in make_characters(n)) + "\n")


def test_new_run_over_unchanged_input_reads_nothing(tmp_path, fake_overrides, monkeypatch):
    home = tmp_path / "home"
    calls = []
    real = characters_mod.SOURCES["jsonl"]
    monkeypatch.setitem(characters_mod.SOURCES, "jsonl", lambda cfg: calls.append(1) or real(cfg))
    a = run_build(overrides=fake_overrides, home=home, until="characters")["run_id"]
    b = run_build(overrides=fake_overrides, home=home, until="characters")["run_id"]
    assert len(calls) == 1 and _pins(home, a) == _pins(home, b) and _rows(home, a) == _rows(home, b)


def test_rerun_uses_pinned_rows_after_the_input_was_edited(tmp_path, fake_overrides, chars_file):
    home = tmp_path / "home"
    _edit(chars_file, 12)
    run_build(overrides=fake_overrides, home=home, until="characters", run_id="r1")
    before = _rows(home, "r1")
    assert len(before) == 12
    with CatalogReader(home) as rd:
        victim = next(s for s in rd.shards("r1", "characters") if s["rows"])
    Path(victim["path"]).unlink()
    _edit(chars_file, 13)  # the input changes under the run
    rerun("r1", home=home)
    assert _rows(home, "r1") == before  # the pinned rows, not the edited file's 13


def test_rerun_refuses_naming_the_file_when_the_snapshot_is_gone(tmp_path, fake_overrides, chars_file):
    home = tmp_path / "home"
    run_build(overrides=fake_overrides, home=home, until="characters", run_id="r2")
    with CatalogReader(home) as rd:
        victim = next(s for s in rd.shards("r2", "characters") if s["rows"])
    Path(victim["path"]).unlink()
    for f in (home / "sources").rglob("*.parquet"):
        f.unlink()
    _edit(chars_file, 9)
    with pytest.raises(RunFailed, match=r"(?s)SnapshotGoneError.*chars\.jsonl changed since it was read"):
        rerun("r2", home=home)


def test_gone_snapshot_of_an_unchanged_input_is_read_again(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(c) for c in make_characters(5)) + "\n")
    run = load_config(data={"characters": {"source": "jsonl", "path": str(path)}})
    stage = CharactersStage()
    rows, _, used = stage.collect_pinned(run, tmp_path / "home", {}, "r")
    pinned = {m["kind"]: m for m in used}
    (tmp_path / "home" / pinned["characters"]["path"]).unlink()
    again, _, _ = stage.collect_pinned(run, tmp_path / "home", {"pinned": pinned}, "r")
    assert again == rows
    (tmp_path / "home" / pinned["characters"]["path"]).unlink()
    path.write_text(path.read_text() + "\n")
    with pytest.raises(SnapshotGoneError, match=r"c\.jsonl changed since it was read \(size"):
        stage.collect_pinned(run, tmp_path / "home", {"pinned": pinned}, "r")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_progress_reports_bytes_rate_and_eta(tmp_path, suffix):
    dump = write(tmp_path / f"d{suffix}", dump_lines(many_entities()))
    uncompressed = len(b"\n".join(dump_lines(many_entities())) + b"\n")
    seen: list[dict] = []
    list(read_chunks(dump, _lines, None, workers=1, chunk_bytes=4096, progress=seen.append, progress_interval=0))
    assert len(seen) > (3 if suffix == ".json" else 1)  # a tiny compressed file is read in one go
    assert [s["bytes_read"] for s in seen] == sorted(s["bytes_read"] for s in seen)
    last = seen[-1]
    assert last["bytes_read"] == last["bytes_total"] == dump.stat().st_size and last["fraction"] == 1.0
    assert last["json_bytes"] == uncompressed and last["mb_s"] > 0 and last["eta_s"] == 0.0
    assert all(s["eta_s"] is not None for s in seen)


def test_flow_progress_hooks_get_the_source_progress(tmp_path, monkeypatch):
    from flows import build

    events: list[tuple[str, dict]] = []
    monkeypatch.setattr(build, "PROGRESS_HOOKS", [lambda e, d: events.append((e, d))])
    dump = write(tmp_path / "d.json.bz2", dump_lines(many_entities()))
    from tasks.sources.wikidata import collect

    collect(cfg_for(dump))
    reports = [d for e, d in events if e == "source_progress"]
    final = reports[-1]
    assert final["stage"] == "characters" and final["bytes_read"] == dump.stat().st_size
    assert final["eta_s"] == 0.0 and final["fraction"] == 1.0 and final["mb_s"] > 0


def _scan_in_worker(path: str, chunk: int):
    return as_plain(scan_dump(Path(path), cfg_for(Path(path)), workers=2, chunk_bytes=chunk))


def test_inside_a_dask_worker_chunks_go_to_the_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    dump = write(tmp_path / "d.json.gz", bad_lines(many_entities()))
    serial = as_plain(scan_dump(dump, cfg_for(dump), workers=1))
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as lc, \
            distributed.Client(lc) as client:
        got = client.submit(_scan_in_worker, str(dump), 2048).result()
        tasks = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.task_prefixes))
    assert got == serial
    assert tasks > 1  # the chunk tasks ran on the cluster, not only the outer task


def awkward_lines() -> list[bytes]:
    """Entities in the shapes the real dump and its copies take, and broken ones: the fast head decoder
    must read each exactly as the line-by-line path does (or hand it to that path)."""
    def dumps(e) -> bytes:
        return json.dumps(e, ensure_ascii=False, separators=(",", ":")).encode()

    people = many_entities(20, 30, seed=3)
    zh_fallback = entity("Q700", {"zh-hant": "繁體", "zh-cn": "简体", "en": ""}, p31="Q5", sitelinks={"enwiki": "A"})
    deprecated = entity("Q701", {"en": "Not a person"}, p31="Q5")
    deprecated["claims"]["P31"][0]["rank"] = "deprecated"
    both = entity("Q702", {"en": "Both"}, p31="Q95074", claims=[item_claim("P31", "Q5")])
    numeric_only = entity("Q703", {"en": "Old layout"})
    numeric_only["claims"]["P31"] = [{"mainsnak": {"snaktype": "value", "property": "P31", "datatype": "wikibase-item",
                                                   "datavalue": {"value": {"entity-type": "item", "numeric-id": 15632617},
                                                                 "type": "wikibase-entityid"}}, "rank": "normal"}]
    empty_maps = {"type": "item", "id": "Q704", "labels": [], "descriptions": [], "aliases": [], "claims": [],
                  "sitelinks": []}
    odd_label = entity("Q705", {"en": "x"}, p31="Q515")
    odd_label["labels"]["zh"] = "a bare string"
    escaped = entity("Q706", {"en": 'Quote " and \\ back\u2028slash', "zh": "引号\""}, p31="Q5",
                     descriptions={"en": "d"}, aliases={"en": ["a", ""]}, sitelinks={"enwiki": "Q"})
    no_id = {"type": "item", "labels": {"en": {"language": "en", "value": "No id"}}}
    lines = dump_lines(people + [zh_fallback, deprecated, both, numeric_only, empty_maps, odd_label, escaped])
    spaced = json.dumps(entity("Q707", {"en": "Spaced"}, p31="Q5", sitelinks={"enwiki": "S"})).encode()
    lines[5:5] = [
        spaced + b" ,  ",  # whitespace around the comma
        dumps(no_id) + b",",
        b'{"type":"item","id":"Q99","claims":{"P31":[ broken "Q5"},',
        b'{"type":"item","id":"Q98","labels":{"en":{"language":"en","value":"Caf\xe9"}},"Q5":1},',
        b'{"type":"item","id":"Q97","labels":{"en":{"language":"en","value":"ok"}},"claims":{"P1":"\xff"}},',
        b'{"type":"item","id":"Q96","labels":{"en":{"language":"en","value":"T"}},"claims":{"P31":[{"mainsnak":'
        b'{"datavalue":{"value":{"id":"Q5"},"type":"wikibase-entityid"}},"rank":"normal"}]},"x":"\xff"},',
        b"", b"   ", b"42,", b'"a string",', b"[1,2],",
        dumps(entity("Q708", {"en": "CRLF"}, p31="Q5")) + b",\r",
        # the official layout, no person class mentioned, broken after its labels: a label source
        b'{"type":"item","id":"Q95","labels":{"en":{"language":"en","value":"Cut"}},"descriptions":{"en":{',
        # scalar fields before "type" (the Special:EntityData layout), an item and a person
        b'{"pageid":9,"ns":0,"title":"Q94","lastrevid":7,"modified":"2024-01-01T00:00:00Z",' + dumps(
            entity("Q94", {"en": "Prefixed", "zh": "前缀"}, p31="Q515"))[1:] + b",",
        b'{"pageid":10,"ns":0,"title":"Q93","lastrevid":8,' + dumps(
            entity("Q93", {"en": "Prefixed person"}, p31="Q5", sitelinks={"enwiki": "P"}))[1:] + b",",
    ]
    return lines


@pytest.mark.parametrize("languages", [["en", "zh"], ["zh"], ["de", "en"]])
@pytest.mark.parametrize("categories", [["real", "fictional"], ["fictional"]])
def test_fast_chunk_parse_equals_the_line_by_line_parse(languages, categories):
    from tasks.sources.wikidata_parse import parse_chunk, parse_lines

    data = b"\n".join(awkward_lines()) + b"\n"
    params = {"languages": languages, "categories": categories}
    fast, slow = parse_chunk(data, params), parse_lines(data, params)

    def labels(out):
        return sorted(zip(out["lab_lines"], out["lab_ids"], out["lab_langs"], out["lab_vals"], strict=True))

    # a non-person line with bad bytes outside its head: its labels are read (the line-by-line path
    # decodes the rest of a line without "descriptions" and counts it unreadable)
    assert set(labels(fast)) - set(labels(slow)) == {(9, "Q97", "en", "ok")}
    assert set(labels(slow)) < set(labels(fast)) and slow["unreadable"] == fast["unreadable"] + 1
    assert fast["parsed"] == slow["parsed"] + 1
    for key in ("bad", "opened", "closed", "lines"):
        assert fast[key] == slow[key], key
    # the other difference: a person whose P31 value has only a numeric id (older dumps) never mentions
    # "Q...", so the line-by-line prefilter misses it; the head decoder reads the claim
    assert [c for c in fast["cands"] if c[1]["id"] != "Q703"] == slow["cands"]
    assert [u for u in fast["unlabeled"] if u[2] != "Q703"] == slow["unlabeled"]
    q703 = {c[1]["id"] for c in fast["cands"]} | {u[2] for u in fast["unlabeled"]}
    assert ("Q703" in q703) == ("fictional" in categories)
    assert {b[1] for b in fast["bad"]} == {"malformed", "encoding"}
    ids = {c[1]["id"] for c in fast["cands"]}
    assert "Q701" not in ids and ("Q707" in ids) == ("real" in categories and "en" in languages)
    if "zh" in languages and "real" in categories:
        zh = {c[1]["id"]: c[1]["langs"].get("zh") for c in fast["cands"]}
        assert zh["Q700"]["label"] == "简体"  # zh-cn comes before zh-hant in the fallbacks
        assert zh["Q706"]["label"] == "引号\""


def test_chunk_whose_values_have_no_numeric_ids_is_searched_for_the_class_ids():
    """Values written as {"entity-type": "item", "id": "Q5"} only: the people are found all the same."""
    from tasks.sources.wikidata_parse import parse_chunk, parse_lines

    people = many_entities(30, 40, seed=5)
    for e in people:
        for claims in e["claims"].values():
            for c in claims:
                c["mainsnak"]["datavalue"]["value"].pop("numeric-id", None)
    data = b"\n".join(dump_lines(people)) + b"\n"
    assert b"numeric-id" not in data
    params = {"languages": ["en", "zh"], "categories": ["real", "fictional"]}
    fast, slow = parse_chunk(data, params), parse_lines(data, params)
    assert fast["cands"] == slow["cands"] and len(fast["cands"]) > 15
    assert fast["unlabeled"] == slow["unlabeled"] and fast["lab_vals"] == slow["lab_vals"]


def test_lone_surrogate_escapes_become_replacement_characters(tmp_path):
    """JSON may escape a lone UTF-16 surrogate, which UTF-8 cannot hold: the scan keeps the person and the
    labels, with U+FFFD in its place, instead of failing on the label table."""
    people = many_entities(6, 4, seed=2)
    lines = dump_lines(people)
    lines.insert(2, b'{"type":"item","id":"Q9001","labels":{"en":{"language":"en","value":"Lone \\ud800 item"}},'
                    b'"descriptions":{},"claims":{}},')
    lines.insert(3, b'{"type":"item","id":"Q9002","labels":{"en":{"language":"en","value":"Lone \\udfff person"}},'
                    b'"descriptions":{},"claims":{"P31":[{"mainsnak":{"snaktype":"value","property":"P31",'
                    b'"datatype":"wikibase-item","datavalue":{"value":{"entity-type":"item","numeric-id":5,'
                    b'"id":"Q5"},"type":"wikibase-entityid"}},"type":"statement","rank":"normal"}]},'
                    b'"sitelinks":{"enwiki":{"site":"enwiki","title":"Lone","badges":[]},'
                    b'"dewiki":{"site":"dewiki","title":"L","badges":[]}}},')
    dump = write(tmp_path / "d.json", lines)
    scan = scan_dump(dump, cfg_for(dump), workers=1)
    person = [c for _, c in scan.entries if c["id"] == "Q9002"]
    assert person and person[0]["langs"]["en"]["label"] == "Lone \ufffd person"
    assert scan.stats["entities_parsed"] == len(people) + 2
    assert not [r for r in scan.rejects if "Q900" in r.row_id]
    from tasks.sources.wikidata import _label_rows
    from tasks.sources.wikidata_parse import scan_chunk

    rows = _label_rows(scan_chunk(dump.read_bytes(), {"languages": ["en"], "categories": ["real"]})["labels"], 10)
    assert {"id": "Q9001", "lang": "en", "label": "Lone \ufffd item", "line": 12} in rows.to_pylist()


def test_dump_workers_import_neither_the_models_nor_pyarrow():
    """What a worker process imports to parse chunks stays small (pydantic and pyarrow cost ~0.7 s a worker)."""
    import subprocess
    import sys

    code = ("import sys, tasks.sources.dump, tasks.sources.wikidata_parse; "
            "print(sorted(m for m in ('pydantic', 'pyarrow', 'models', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"


def test_fast_chunk_parse_reads_the_benchmark_dump_like_the_line_by_line_parse(tmp_path):
    """The benchmark's generator (official layout, references and hashes) through both paths."""
    import importlib.util

    from tasks.sources.wikidata_parse import parse_chunk, parse_lines

    spec = importlib.util.spec_from_file_location("source_scale", Path(__file__).parents[1] / "benchmarks/source_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    path = tmp_path / "d.json"
    mod.write_dump(path, 1.5, person_share=0.3)
    data = path.read_bytes()
    params = {"languages": ["en", "zh"], "categories": ["real", "fictional"]}
    fast, slow = parse_chunk(data, params), parse_lines(data, params)
    assert fast["cands"] == slow["cands"] and len(fast["cands"]) > 20
    assert sorted(fast["lab_vals"]) == sorted(slow["lab_vals"])


def test_chunks_reach_workers_through_shared_memory_and_the_ring_is_removed(tmp_path, monkeypatch):
    """Decompressed chunks go to the local workers through a /dev/shm ring (not pipes); its file is gone
    when the read ends, one left by a killed reader is removed, and a chunk bigger than a slot (one huge
    line) still arrives, through the pipe."""
    from tasks.sources import dump as dump_mod

    if not dump_mod._ChunkRing.DIR.is_dir():
        pytest.skip("no /dev/shm on this machine")
    stale = dump_mod._ChunkRing.DIR / f"{dump_mod._ChunkRing.PREFIX}999999999-dead"
    stale.write_bytes(b"x")
    made, sent = [], []
    create, ref, read = dump_mod._ChunkRing.create, dump_mod._ChunkRing.ref, dump_mod._ChunkRing.read

    def spy_create(slots, slot_bytes):
        ring = create(slots, slot_bytes)
        made.append(ring)
        return ring

    def spy_ref(self, slot, size):
        sent.append("ChunkRef")
        return ref(self, slot, size)

    def spy_read(self, slot, start, end):
        if start == 0:
            sent.append("overflow")  # a chunk bigger than a slot leaves the ring and goes as bytes
        return read(self, slot, start, end)

    monkeypatch.setattr(dump_mod._ChunkRing, "create", staticmethod(spy_create))
    monkeypatch.setattr(dump_mod._ChunkRing, "ref", spy_ref)
    monkeypatch.setattr(dump_mod._ChunkRing, "read", spy_read)
    lines = dump_lines(many_entities(40, 200))
    lines.insert(30, json.dumps(entity("Q4242", {"en": "Long " + "x" * 700_000}, p31="Q5",
                                       sitelinks={f"w{k}wiki": "L" for k in range(50)})).encode() + b",")
    path = write(tmp_path / "d.json.gz", lines)
    got = scan_dump(path, cfg_for(path), workers=2, chunk_bytes=4096)
    want = scan_dump(write(tmp_path / "ref.json", lines), cfg_for(tmp_path / "ref.json"), workers=1)
    assert as_plain(got) == as_plain(want) and any(c["id"] == "Q4242" for _, c in got.entries)
    assert made and not stale.exists()
    if made[0] is None:
        pytest.skip("/dev/shm has no room or is read-only here: the chunks went through pipes (checked above)")
    assert "ChunkRef" in sent and "overflow" in sent
    assert not made[0].path.exists()


def test_gzip_decoder_is_picked_by_cores():
    """One isal thread on few cores (it decodes faster per core than rapidgzip), rapidgzip on many;
    `parallel` asks for the block-parallel library whatever the cores (the benchmark's baseline)."""
    from tasks.sources.dump import GZIP_PARALLEL_THREADS, decompressor

    assert decompressor("gzip", 1) == decompressor("gzip", GZIP_PARALLEL_THREADS - 1) == "isal.igzip"
    assert decompressor("gzip", GZIP_PARALLEL_THREADS) == f"rapidgzip(parallelization={GZIP_PARALLEL_THREADS})"
    assert decompressor("gzip", 2, parallel=True) == "rapidgzip(parallelization=2)"
    assert decompressor("gzip", 1, parallel=True) == "isal.igzip"  # one thread: nothing to parallelize
    assert decompressor("bz2", 2) == "indexed_bzip2(parallelization=2)"


@pytest.mark.parametrize("data", [b"", b"a", b"a\n", b"\n\n", b"ab\n" * 1023 + b"c", b"ab\n" * 1024, b"ab\n" * 5000 + b"z",
                                  (b"q" * 2000 + b"\n") * 1500, (b"q" * 2000 + b"\n") * 1100 + b"ab\n" * 3000])
def test_chunk_line_count(data):
    from tasks.sources.dump import _count_lines

    assert _count_lines(data) == len(data.splitlines())


@pytest.mark.parametrize("workers", [1, 2])
def test_persons_below_the_pools_floors_are_skipped_without_changing_the_scan(tmp_path, monkeypatch, workers):
    """Once a pool is full, a worker does not decode a person who could no longer enter it (ties
    included: a later person of equal popularity never displaces an earlier one); the scan is the same
    as one that decodes every person."""
    from tasks.sources import wikidata_parse

    late = [entity(f"Q{9000 + j}", {"de": f"Ohne {j}"} if j % 2 else {"en": f"Late {j}"}, p31="Q5",
                   sitelinks={f"w{k}wiki": "x" for k in range(5 + j)}) for j in range(6)]
    dump = write(tmp_path / "d.json", dump_lines(many_entities(400, 60, seed=9) + late))
    cfg = cfg_for(dump)  # pools of top_n * pool_factor = 10
    with_floors = scan_dump(dump, cfg, workers=workers, chunk_bytes=4096)
    calls = {"skipped": 0}
    real = wikidata_parse._may_enter

    def counted(*args):
        ok = real(*args)
        calls["skipped"] += not ok
        return ok

    monkeypatch.setattr(wikidata_parse, "_may_enter", counted)
    scan_dump(dump, cfg, workers=1, chunk_bytes=4096)
    assert calls["skipped"] > 100
    monkeypatch.setattr(wikidata_parse, "_may_enter", lambda *args: True)
    every = scan_dump(dump, cfg, workers=1, chunk_bytes=4096)
    assert as_plain(with_floors) == as_plain(every)
    assert len(every.entries) == 20 and {r.row_id for r in every.rejects if r.filter == "no_label"} == {"Q9003", "Q9005"}
    assert {"Q9002", "Q9004"} <= {c["id"] for _, c in every.entries}
