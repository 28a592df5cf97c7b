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


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("chunk", [997, 8191])
def test_parallel_reading_equals_serial(tmp_path, suffix, chunk):
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


@pytest.mark.parametrize("suffix", [".json.gz", ".json.bz2"])
def test_truncated_stream_in_parallel_keeps_what_a_serial_read_keeps(tmp_path, suffix):
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
