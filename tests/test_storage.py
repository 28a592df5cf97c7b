import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from models.base import arrow_schema, from_table, to_table
from models.records import Query, Session, SessionTurn, Turn
from models.stats import Stats
from storage import catalog, shards
from storage.catalog import (
    LEGACY_SHARD_PATH,
    SNAPSHOT_DIR,
    Catalog,
    CatalogBusy,
    CatalogError,
    catalog_held,
    stats_columns,
)
from storage.layout import InvalidRunId, RunLayout, validate_run_id
from storage.reader import CatalogReader, NoCatalog, ShardDamaged, SnapshotMissing


def test_write_is_atomic_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "s" / "part-00000.parquet"
    shards.write_table(pa.table({"a": [1]}), path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        shards.write_table(pa.table({"a": [2, 3]}), path)
    # the old complete file is untouched, and no temp file is left to be globbed
    assert shards.read_table(path).column("a").to_pylist() == [1]
    assert [p.name for p in path.parent.iterdir()] == ["part-00000.parquet"]


def test_crash_between_write_and_rename_leaves_no_readable_partial(tmp_path):
    """A process killed mid-write leaves only a .tmp- file, which readers never glob and cleanup removes."""
    out = RunLayout(tmp_path, "r1").shard("queries", "abc", 0).parent
    code = textwrap.dedent(f"""
        import os, pyarrow as pa
        from storage import shards
        os.replace = lambda *a: os._exit(9)   # die right before the rename
        shards.write_table(pa.table({{"a": list(range(1000))}}), {str(out / "part-00000.parquet")!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=os.getcwd())
    assert r.returncode == 9
    assert list(out.glob("part-*.parquet")) == []
    assert len(list(out.glob(".tmp-*"))) == 1
    assert shards.clean_run_temp_files(tmp_path, "r1") == 1
    assert list(out.iterdir()) == []


def test_schema_is_derived_from_the_record_and_round_trips():
    s = arrow_schema(Turn)
    assert s.names == list(Turn.model_fields)
    assert pa.types.is_struct(s.field("gen").type)
    sess = Session(id="s", character_id="Q1@en", label="A", language="en", category="real", system="You are A.",
                   turns=[SessionTurn(turn_id="t", query_id="q", kind="contrastive", question="?", answer="No.",
                                      scores={"judge": 7.0})])
    assert from_table(to_table([sess], Session), Session) == [sess]
    empty = to_table([], Query)
    assert empty.num_rows == 0 and empty.schema == arrow_schema(Query)


def test_bad_row_is_a_clear_validation_error():
    with pytest.raises(Exception, match="kind"):
        to_table([{"id": "x", "character_id": "c", "language": "en", "kind": "bogus", "question": "q",
                   "author_id": "a", "partner_id": "b", "gen": {"prompt": "", "raw_output": ""}}], Query)


def test_catalog_transaction_rolls_back(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        with pytest.raises(duckdb.ConstraintException):
            cat._tx("INSERT INTO runs (run_id) VALUES (?)", ["r1"])  # duplicate key
        assert cat.query("SELECT count(*) AS n FROM runs")[0]["n"] == 1
        cat.mark_running("r1", "queries", 0, "h0")
        cat.mark_failed("r1", "queries", 0, "h0", "Boom: x")
        cat.mark_running("r1", "queries", 0, "h0")
        row = cat.shards("r1", "queries")[0]
        assert row["attempts"] == 2 and row["status"] == "running" and row["error"] is None


def test_reader_works_while_another_process_holds_the_catalog(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {"x": 1}, "h", "v")
        cat.mark_done("r1", "characters", 0, "h0", rows=3, path="/p", bytes_=10, rejects_path=None,
                      rejected_rows=0, stats={"rows_in": 3, "rows_out": 3})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from storage.catalog import Catalog
        c = Catalog({str(tmp_path)!r})
        print("held", flush=True)
        time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CatalogBusy, match="another ditto process"):
            Catalog(tmp_path)
        with CatalogReader(tmp_path) as rd:
            assert rd.run("r1")["status"] == "running"
            assert rd.shards("r1")[0]["rows"] == 3
    finally:
        holder.kill()
        holder.wait()


def test_corrupted_catalog_is_a_clear_error_and_repairable(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
    (tmp_path / "catalog.duckdb").write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match="corrupted"):
        Catalog(tmp_path)
    (tmp_path / "catalog.duckdb").unlink()
    with Catalog(tmp_path) as cat:
        cat.restore_from_snapshot()
        assert cat.get_run("r1")["status"] == "running"


def test_unusable_home_is_a_clear_error(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(CatalogError, match="cannot create home folder"):
        Catalog(blocker / "home")


# -- paths relative to the home, integrity, run ids, temp files, snapshot, creation --------------------


def _register(cat, home, run_id="r1", stage="queries", shard=0, rows=3, rejects=False, h="h0", stats=None):
    path = RunLayout(home, run_id).shard(stage, h, shard)
    size = shards.write_table(pa.table({"id": [f"{run_id}-{i}" for i in range(rows)]}), path)
    rpath = None
    if rejects:
        rpath = RunLayout(home, run_id).shard(stage, h, shard, kind="rejected")
        shards.write_table(pa.table({"row_id": ["x"], "filter": ["f"]}), rpath)
    cat.mark_done(run_id, stage, shard, h, rows=rows, path=str(path), bytes_=size,
                  rejects_path=str(rpath) if rpath else None, rejected_rows=1 if rejects else 0, stats=stats or {"rows_out": rows})
    return path, rpath


def test_paths_are_stored_relative_and_a_moved_home_keeps_working(tmp_path):
    home = tmp_path / "home"
    with Catalog(home) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        path, rpath = _register(cat, home, rejects=True)
        cat.register_model("m1", "r1", str(home / "models" / "m1"), "base", "dh", "done", {}, {})
        stored = cat._con.execute("SELECT path, rejects_path FROM shards").fetchone()
        assert stored == ("runs/r1/queries/h0/part-00000.parquet", "runs/r1/rejected/queries/h0/part-00000.parquet")
        assert cat.shards("r1")[0]["path"] == str(path)  # returned absolute
    moved = tmp_path / "elsewhere" / "home2"
    moved.parent.mkdir()
    home.rename(moved)
    with CatalogReader(moved) as rd:
        row = rd.shards("r1")[0]
        assert row["path"] == str(moved / "runs/r1/queries/h0/part-00000.parquet")
        assert rd.done_paths("r1", "queries") == [row["path"]]
        assert rd.query("SELECT path FROM models")[0]["path"] == str(moved / "models" / "m1")
    with Catalog(moved) as cat:
        found = cat.find_done("queries", "h0")
        assert found is not None and found["path"] == str(moved / "runs/r1/queries/h0/part-00000.parquet")


OLD_SCHEMA = """
CREATE TABLE runs (run_id VARCHAR PRIMARY KEY, status VARCHAR, dataset VARCHAR, config JSON, config_hash VARCHAR,
    package_version VARCHAR, num_shards INTEGER, until VARCHAR, flow_run_id VARCHAR, error VARCHAR,
    started_at TIMESTAMP, finished_at TIMESTAMP);
CREATE TABLE shards (run_id VARCHAR, stage VARCHAR, shard INTEGER, input_hash VARCHAR, status VARCHAR, rows BIGINT,
    path VARCHAR, bytes BIGINT, rejects_path VARCHAR, rejected_rows BIGINT, attempts INTEGER, error VARCHAR,
    reused_from VARCHAR, stats JSON, started_at TIMESTAMP, finished_at TIMESTAMP, PRIMARY KEY (run_id, stage, shard));
CREATE TABLE stage_stats (run_id VARCHAR, stage VARCHAR, shards_total INTEGER, shards_done INTEGER,
    shards_failed INTEGER, shards_reused INTEGER, rows_in BIGINT, rows_out BIGINT, dropped JSON, requests BIGINT,
    prompt_tokens BIGINT, completion_tokens BIGINT, format_failures BIGINT, seconds DOUBLE, updated_at TIMESTAMP,
    PRIMARY KEY (run_id, stage));
CREATE TABLE models (model_id VARCHAR PRIMARY KEY, run_id VARCHAR, path VARCHAR, base_model VARCHAR,
    data_hash VARCHAR, status VARCHAR, metrics JSON, config JSON, created_at TIMESTAMP);
CREATE TABLE evaluations (eval_id VARCHAR, run_id VARCHAR, model VARCHAR, language VARCHAR, metric VARCHAR,
    value DOUBLE, n BIGINT, details JSON, created_at TIMESTAMP);
"""


def _old_layout_home(home):
    """A home as the previous version left it: absolute paths, no sha256/metrics columns, one snapshot
    file per table."""
    path = RunLayout(home, "old").shard("queries", "h0", 0)
    size = shards.write_table(pa.table({"id": ["a", "b"]}), path)
    con = duckdb.connect(str(home / "catalog.duckdb"))
    con.execute(OLD_SCHEMA)
    con.execute("INSERT INTO runs VALUES ('old', 'completed', 'd', '{}', 'h', 'v', 1, NULL, NULL, NULL, now(), now())")
    con.execute("INSERT INTO shards VALUES ('old', 'queries', 0, 'h0', 'done', 2, ?, ?, NULL, 0, 1, NULL, NULL, "
                "'{\"rows_out\": 2}', now(), now())", [str(path), size])
    con.execute("INSERT INTO stage_stats VALUES ('old', 'queries', 1, 1, 0, 0, 2, 2, '{}', 0, 0, 0, 0, 1.0, now())")
    (home / "snapshot").mkdir()
    for t in ("runs", "shards", "stage_stats", "models", "evaluations"):
        con.execute(f"COPY {t} TO '{home / 'snapshot' / (t + '.parquet')}' (FORMAT parquet)")
    con.close()


def test_a_catalog_of_the_previous_layout_opens_and_migrates_in_place(tmp_path):
    old_home = tmp_path / "old_home"
    old_home.mkdir()
    _old_layout_home(old_home)
    home = tmp_path / "moved"
    old_home.rename(home)  # and the home was moved since
    with CatalogReader(home, require=True) as rd:  # the old snapshot reads, paths mapped under the new home
        assert rd.done_paths("old", "queries") == [str(home / "runs/old/queries/h0/part-00000.parquet")]
    with Catalog(home) as cat:
        assert cat._con.execute("SELECT path FROM shards").fetchone()[0] == "runs/old/queries/h0/part-00000.parquet"
        assert shards.shard_is_whole(cat.shards("old")[0])
        assert cat.update_stage_stats("old", "queries", metrics={"cache_hits": 2})["metrics"] == {"cache_hits": 2}
        cat.start_run("new", "d", {}, "h", "v")
        _register(cat, home, "new", h="h1")
    assert not (home / SNAPSHOT_DIR / "shards.parquet").exists()  # the old single files are replaced
    with CatalogReader(home) as rd:
        assert {r["run_id"] for r in rd.runs()} == {"old", "new"}
        assert rd.stage_stats("old")[0]["metrics"] == {"cache_hits": 2}


def test_stage_stats_columns_are_the_stats_fields(tmp_path):
    summed = [f.name for f in dataclasses.fields(Stats) if not f.metadata.get("per_shard")]
    assert list(stats_columns()) == summed and "extra" not in summed
    with Catalog(tmp_path) as cat:
        cols = [r["column_name"] for r in cat.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'stage_stats'")]
        assert set(cols) == {"run_id", "stage", "shards_total", "shards_done", "shards_failed", "shards_reused",
                             "updated_at", "metrics", *summed}
        cat.start_run("r1", "d", {}, "h", "v")
        st = Stats(**{f: 2 for f in summed if f != "dropped"}, dropped=Counter({"judge": 1}))
        for shard in (0, 1):
            _register(cat, tmp_path, shard=shard, stats=st.as_dict())
        got = cat.update_stage_stats("r1", "queries")
    expect = {f: 4 for f in summed if f != "dropped"} | {"dropped": {"judge": 2}}
    assert {f: got[f] for f in summed} == expect
    with CatalogReader(tmp_path) as rd:
        assert {f: rd.stage_stats("r1")[0][f] for f in summed} == expect
        assert {f: rd.stage_summaries("r1")[0][f] for f in summed} == expect


def test_a_new_stats_field_needs_no_sql_and_reaches_old_catalogs(tmp_path, monkeypatch):
    """A field added to Stats (summed, or a Counter merged by key) becomes a stage_stats column of a catalog
    written before it existed, is summed from the shards' stats and read back by the reader."""
    with Catalog(tmp_path) as cat:  # a catalog of the version before the new fields
        cat.start_run("r1", "d", {}, "h", "v")
        _register(cat, tmp_path, shard=0, stats=Stats(rows_out=3).as_dict())
        cat.update_stage_stats("r1", "queries")
    newer = dataclasses.make_dataclass("Stats", [("retries", int, 0), ("by_language", Counter,
                                                                       dataclasses.field(default_factory=Counter))],
                                       bases=(Stats,))
    monkeypatch.setattr(catalog, "STATS_COLUMNS", stats_columns(newer))
    with Catalog(tmp_path) as cat:
        _register(cat, tmp_path, shard=1, stats=newer(rows_out=2, retries=5, by_language=Counter(en=2)).as_dict())
        _register(cat, tmp_path, shard=2, stats=newer(rows_out=1, retries=1, by_language=Counter(en=1, zh=4)).as_dict())
        got = cat.update_stage_stats("r1", "queries")
        assert (got["retries"], got["by_language"], got["rows_out"]) == (6, {"en": 3, "zh": 4}, 6)
    with CatalogReader(tmp_path) as rd:
        row = rd.stage_stats("r1")[0]
        assert (row["retries"], row["by_language"]) == (6, {"en": 3, "zh": 4})
        s = rd.stage_summaries("r1")[0]
        assert (s["retries"], s["by_language"], s["rows_out"]) == (6, {"en": 3, "zh": 4}, 6)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "rejects_flip", "rejects_delete"])
def test_damaged_shard_is_detected_never_reused_and_never_read(tmp_path, damage):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        path, rpath = _register(cat, tmp_path, rejects=True)
        row = cat.shards("r1")[0]
        assert row["sha256"] == shards.file_sha256(path) and row["rejects_sha256"] == shards.file_sha256(rpath)
        assert shards.shard_is_whole(row) and cat.find_done("queries", "h0") is not None
        target = rpath if damage.startswith("rejects") else path
        if damage.endswith("delete"):
            target.unlink()
        elif damage == "truncate":
            target.write_bytes(target.read_bytes()[:-10])
        else:  # same size, one byte changed
            data = bytearray(target.read_bytes())
            data[len(data) // 2] ^= 0xFF
            target.write_bytes(bytes(data))
        assert not shards.shard_is_whole(row)
        assert shards.shard_problem(row)
        assert cat.find_done("queries", "h0") is None  # never reused
    with CatalogReader(tmp_path) as rd:
        with pytest.raises(ShardDamaged, match=r"queries-0: .*ditto rerun r1"):
            rd.done_paths("r1", "queries")
        assert rd.done_paths("r1", "queries", damaged="skip") == []
        assert [d["shard"] for d in rd.damaged("r1")] == [0]


@pytest.mark.parametrize("bad", ["../../victim", "/abs/path", "a/b", "..", ".hidden", "", "x" * 129, "a..b",
                                 "-dash", "sp ace", "new\nline", None])
def test_invalid_run_ids_are_refused(tmp_path, bad):
    with pytest.raises(InvalidRunId, match="invalid run id"):
        validate_run_id(bad)
    if isinstance(bad, str):
        with Catalog(tmp_path) as cat, pytest.raises(InvalidRunId):
            cat.start_run(bad, "d", {}, "h", "v")
        with pytest.raises((InvalidRunId, ValueError)):
            shards.clean_run_temp_files(tmp_path, bad)
        with pytest.raises(InvalidRunId):
            RunLayout(tmp_path, bad)


@pytest.mark.parametrize("good", ["r1", "20260101-020000-aaaaaa", "nightly.2026_01", "A" * 128])
def test_valid_run_ids_pass(good):
    assert validate_run_id(good) == good


@pytest.mark.parametrize("make, rel", [
    (lambda lay: lay.root, "runs/r1"),
    (lambda lay: lay.shard("queries", "h0", 17), "runs/r1/queries/h0/part-00017.parquet"),
    (lambda lay: lay.shard("filter", "h1", 3, kind="rejected"), "runs/r1/rejected/filter/h1/part-00003.parquet"),
    (lambda lay: lay.rejects("filter"), "runs/r1/rejected/filter"),
    (lambda lay: lay.prepared("queries", "d9", 2), "runs/r1/prepare/queries/d9/part-00002.parquet"),
    (lambda lay: lay.dedup_global, "runs/r1/dedup_global"),
    (lambda lay: lay.train("k7"), "runs/r1/train/k7"),
    (lambda lay: lay.eval("e5"), "runs/r1/eval/e5"),
])
def test_run_layout_places_every_kind_of_file_under_the_run(tmp_path, make, rel):
    lay = RunLayout(tmp_path, "r1")
    path = make(lay)
    assert path == tmp_path / rel and path.is_relative_to(lay.root)
    with Catalog(tmp_path) as cat:  # the catalog stores it relative to the home
        assert cat._rel(path) == rel


def test_run_layout_refuses_an_unknown_shard_kind_and_tells_run_folders(tmp_path):
    with pytest.raises(ValueError, match="shard kind"):
        RunLayout(tmp_path, "r1").shard("queries", "h0", 0, kind="bogus")
    assert RunLayout.is_run_root(RunLayout(tmp_path, "r1").root)
    assert not RunLayout.is_run_root(tmp_path / "r1") and not RunLayout.is_run_root(tmp_path / "runs" / "..")
    # the catalog's pattern for shard paths of an earlier layout matches what the layout writes
    legacy = "/old/home/" + RunLayout(Path("/x"), "r1").shard("filter", "h1", 3, kind="rejected").relative_to("/x").as_posix()
    assert re.match(LEGACY_SHARD_PATH, legacy).group(1) == "runs/r1/rejected/filter/h1/part-00003.parquet"


def test_no_module_assembles_run_paths_by_hand():
    """Every <home>/runs/<run>/... path comes from storage.layout.RunLayout (the tests' own assertions aside)."""
    root = Path(__file__).resolve().parents[1]
    by_hand = re.compile(r"""/\s*["']runs["']\s*/|\}/runs/\{""")
    files = [f for pkg in ("storage", "engines", "models", "tasks", "flows", "dashboard", "benchmarks", "tests/plugins")
             for f in sorted((root / pkg).rglob("*.py")) if f != root / "storage" / "layout.py"]
    found = [f"{f.relative_to(root)}:{i}: {line.strip()}" for f in files
             for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if by_hand.search(line)]
    assert len(files) > 50 and found == []


def test_temp_cleanup_deletes_only_this_projects_temp_files(tmp_path):
    home = tmp_path / "home"
    ours = [RunLayout(home, "r1").shard("queries", "h0", 0).parent / ".tmp-part-00000.parquet.ab12cd_z",
            RunLayout(home, "r1").shard("queries", "h0", 3, kind="rejected").parent / ".tmp-part-00003.parquet.x9y8z7"]
    foreign = [home / "runs" / "r1" / ".tmp-notes",  # not in a stage folder
               ours[0].parent / ".tmp-editor-swap",  # not our name pattern
               ours[0].parent / "part-00000.parquet",  # a real shard
               tmp_path / "elsewhere" / ".tmp-part-00000.parquet.abcdef"]  # outside the run
    for p in ours + foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    linked = tmp_path / "linked"  # a stage folder that is a symlink elsewhere is not followed
    linked.mkdir()
    (linked / "h9").mkdir()
    victim = linked / "h9" / ".tmp-part-00001.parquet.abcdef"
    victim.write_text("x")
    (home / "runs" / "r1" / "filter").symlink_to(linked)
    assert shards.clean_run_temp_files(home, "r1") == 2
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in foreign) and victim.exists()
    with pytest.raises(ValueError, match="not a run folder"):
        shards.clean_temp_files(tmp_path)  # a root that is not <home>/runs/<id>


def test_stage_metrics_are_stored_and_merged(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        _register(cat, tmp_path)
        assert cat.update_stage_stats("r1", "queries")["metrics"] == {}
        cat.update_stage_stats("r1", "queries", metrics={"cache_hits": 3, "cache_misses": 1})
        got = cat.update_stage_stats("r1", "queries", metrics={"cache_hits": 5})
        assert got["metrics"] == {"cache_hits": 5, "cache_misses": 1} and got["rows_out"] == 3
    with CatalogReader(tmp_path) as rd:
        assert rd.stage_stats("r1")[0]["metrics"] == {"cache_hits": 5, "cache_misses": 1}


def test_snapshot_rewrites_only_the_partitions_that_changed(tmp_path):
    with Catalog(tmp_path, snapshot_interval=0) as cat:
        for run in ("a", "b"):
            cat.start_run(run, "d", {}, "h", "v")
            _register(cat, tmp_path, run)
        part_a = tmp_path / SNAPSHOT_DIR / "shards" / "run_id=a" / "data.parquet"
        before = part_a.stat()
        _register(cat, tmp_path, "b", shard=1)
        cat.mark_failed("b", "queries", 2, "hx", "Boom")
        cat.update_stage_stats("b", "queries")
        after = part_a.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    with CatalogReader(tmp_path) as rd:
        assert [s["shard"] for s in rd.shards("b")] == [0, 1, 2] and len(rd.shards("a")) == 1


def test_a_throttled_change_reaches_the_snapshot_without_another_change(tmp_path):
    with Catalog(tmp_path, snapshot_interval=0.3) as cat:
        cat.start_run("r1", "d", {}, "h", "v")  # forced export
        cat.mark_running("r1", "queries", 0, "h0")  # within the interval: deferred, not dropped
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with CatalogReader(tmp_path) as rd:
                if rd.shards("r1"):
                    break
            time.sleep(0.05)
        with CatalogReader(tmp_path) as rd:
            assert rd.shards("r1")[0]["status"] == "running"


def test_raw_sql_through_con_is_exported_too(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        cat.con.execute("UPDATE runs SET dataset = 'changed' WHERE run_id = 'r1'")
    with CatalogReader(tmp_path) as rd:
        assert rd.run("r1")["dataset"] == "changed"


KILL_AT_LINK = textwrap.dedent("""
    import os, sys
    os.link = lambda *a, **k: os._exit(9)  # killed right before the catalog gets its name
    from storage.catalog import Catalog
    Catalog(sys.argv[1])
""")


def test_a_kill_during_catalog_creation_leaves_no_catalog_and_the_next_open_works(tmp_path):
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-c", KILL_AT_LINK, str(home)], cwd=os.getcwd())
    assert r.returncode == 9
    assert not (home / "catalog.duckdb").exists()  # never a catalog without tables under the name
    with Catalog(home) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
    assert not list(home.glob(".tmp-catalog-*"))  # the dead creator's temp file is cleaned


@pytest.mark.parametrize("kind", ["empty_file", "no_tables"])
def test_a_catalog_file_without_tables_opens_as_a_new_catalog(tmp_path, kind):
    from tests.plugins.reliability import catalog_rows

    path = tmp_path / "catalog.duckdb"
    if kind == "empty_file":
        path.write_bytes(b"")
    else:
        duckdb.connect(str(path)).close()
    assert catalog_rows(tmp_path, "SELECT * FROM shards") == []  # the crash harness treats it as absent
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        assert cat.get_run("r1")["status"] == "running"


def test_a_lost_catalog_is_rebuilt_from_the_snapshot_on_open(tmp_path):
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
        _register(cat, tmp_path)
    (tmp_path / "catalog.duckdb").unlink()
    with Catalog(tmp_path) as cat:
        assert cat.get_run("r1") is not None and cat.shards("r1")[0]["rows"] == 3


def test_reader_tells_a_missing_catalog_and_a_missing_snapshot(tmp_path):
    with pytest.raises(NoCatalog, match="has no catalog"):
        CatalogReader(tmp_path / "typo", require=True)
    with CatalogReader(tmp_path / "typo") as rd:  # not required: empty
        assert rd.runs() == []
    with Catalog(tmp_path) as cat:
        cat.start_run("r1", "d", {}, "h", "v")
    import shutil

    shutil.rmtree(tmp_path / SNAPSHOT_DIR)
    with pytest.raises(SnapshotMissing, match="ditto repair"):
        CatalogReader(tmp_path, require=True)


KILLED_HOLDER = textwrap.dedent("""
    import os, sys
    from storage.catalog import Catalog
    cat = Catalog(sys.argv[1])
    cat.start_run("r1", "d", {}, "h", "v")
    print("started", flush=True)
    sys.stdin.readline()
    os._exit(9)  # dies without finishing the run
""")


def test_a_run_whose_process_died_reads_as_interrupted(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", KILLED_HOLDER, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        assert catalog_held(tmp_path)
        with CatalogReader(tmp_path) as rd:
            assert rd.run("r1")["status"] == "running"
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(30) == 9
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not catalog_held(tmp_path)
    with CatalogReader(tmp_path) as rd:
        assert rd.run("r1")["status"] == "interrupted"
        assert rd.query("SELECT status FROM runs")[0]["status"] == "interrupted"


def test_two_catalogs_in_one_process_share_the_writer_lock(tmp_path):
    first = Catalog(tmp_path)
    with Catalog(tmp_path) as second:  # as DuckDB allows within a process
        second.start_run("r1", "d", {}, "h", "v")
    assert catalog_held(tmp_path)  # still held by the first
    first.close()
    assert not catalog_held(tmp_path)


def test_a_new_column_rewrites_every_partition_once_so_readers_see_one_schema(tmp_path):
    with Catalog(tmp_path) as cat:
        for run in ("a", "b"):
            cat.start_run(run, "d", {}, "h", "v")
        cat._con.execute("ALTER TABLE runs ADD COLUMN note VARCHAR")  # as a later version's MIGRATIONS would
        cat._con.execute("UPDATE runs SET note = 'x' WHERE run_id = 'b'")
    with Catalog(tmp_path):
        pass  # opening sees the columns changed and writes every partition again
    with CatalogReader(tmp_path) as rd:
        assert {r["run_id"]: r["note"] for r in rd.query("SELECT run_id, note FROM runs")} == {"a": None, "b": "x"}
