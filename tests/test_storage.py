import os
import subprocess
import sys
import textwrap

import duckdb
import pyarrow as pa
import pytest

from models.base import arrow_schema, from_table, to_table
from models.records import Query, Session, SessionTurn, Turn
from storage import shards
from storage.catalog import Catalog, CatalogBusy, CatalogError
from storage.reader import CatalogReader


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
    out = shards.shard_path(tmp_path, "r1", "queries", "abc", 0).parent
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
