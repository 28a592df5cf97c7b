"""The dedup stage: MinHash equal to datasketch's, exact and near duplicates across shards through the
global step, the within-shard fallback, signature and decision reuse, min_turns after dedup, and the
filter stage's independence from other shards' duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models.base import to_table
from models.records import Session
from storage.catalog import Catalog
from storage.reader import CatalogReader
from storage.shards import write_table
from tasks.dedup import DedupStage
from tasks.filter import FilterStage
from tasks.filters import dedup
from tasks.filters.dedup import minhash_batch, shingles
from tests.plugins.filters import CHARACTERS, GOOD, REFUSALS, filter_config, make_turn, stage_context

BASE = ("I remember the cold morning at Austerlitz when the fog lifted and the sun rose over the Pratzen "
        "heights, and my soldiers cheered as the enemy center broke before noon.")
NEAR = BASE.replace("cold morning", "freezing morning").replace("before noon", "before midday")
ZH = "我一生好饮酒，举杯邀明月，对影成三人，写下了《将进酒》，诗酒相伴便是我最大的快乐，月下独酌最是逍遥。"
ZH_NEAR = ZH.replace("最大的", "最深的")
CFG = filter_config(refusal={"enabled": False}, out_of_role={"enabled": False})


def with_dedup(cfg, **dedup_settings):
    return cfg.model_copy(update={"dedup": cfg.dedup.model_copy(update=dedup_settings)})


def prepared(stage, cfg, home: Path, run_id: str, up: dict):
    """The global step as the flow runs it: prepare (reads the catalog's snapshot), then the flow process
    registers the artifacts it built."""
    plan = stage.prepare(cfg, home, run_id, up)
    with Catalog(home) as cat:
        for art in plan.artifacts:
            cat.register_artifact(art)
    return plan


def test_minhash_matches_datasketch():
    from datasketch import MinHash

    sets = [shingles("the quick brown fox jumps over the lazy dog", 3), shingles("我一生好饮酒作诗", 3),
            np.empty(0, np.uint32)]
    sig = minhash_batch(sets, 128, 1)
    for s, row in zip(sets[:2], sig[:2], strict=True):
        m = MinHash(num_perm=128, seed=1, hashfunc=lambda x: int(x))
        m.update_batch(s.tolist())
        assert np.array_equal(m.hashvalues, row)
    assert (sig[2] == np.iinfo(np.uint32).max).all()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_vectorised_signatures_equal_per_document_minhash(n):
    from models.config.dedup import DedupConfig

    texts = list(GOOD.values()) + list(REFUSALS.values()) + ["", "one", "two words", "我", "我们", "?!"]
    cfg = DedupConfig(shingle=n)
    assert np.array_equal(dedup.signatures(texts, cfg, batch=5, chunk=64),
                          minhash_batch([shingles(t, n) for t in texts], cfg.num_perm, cfg.seed))


def filtered(home: Path, shard: int, turns: list[dict], cfg=CFG) -> str:
    """Run the filter stage on one shard and write its sessions where the dedup stage reads them."""
    out = FilterStage().run(stage_context(cfg, home, shard), {"responses": turns, "characters": CHARACTERS})
    path = home / "filter" / f"part-{shard:05d}.parquet"
    write_table(to_table(out.rows, Session), path)
    return str(path)


def dedup_run(home: Path, path: str, extra: dict | None, shard: int = 0, cfg=CFG):
    from models.base import table_rows
    from storage.shards import read_table

    ctx = stage_context(cfg, home, shard, extra)
    return DedupStage().run(ctx, {"filter": table_rows(read_table(path))})


def funnel_ok(out) -> bool:
    s = out.stats
    return s.rows_in == s.rows_out + sum(s.dropped.values()) == s.rows_out + len(out.rejects)


def test_dedup_across_shards(tmp_path):
    shards = {
        0: [make_turn("Q517@en", BASE), make_turn("Q7071@zh", ZH), make_turn("Q4653@en", GOOD["Q4653@en"])],
        1: [make_turn("Q937@en", NEAR), make_turn("Q935@zh", ZH_NEAR), make_turn("Q11@en", GOOD["Q11@en"])],
        2: [make_turn("Q1107@zh", ZH.upper() + "！"), make_turn("Q1200@zh", GOOD["Q1200@zh"]),
            make_turn("Q517@en", BASE + "  ", n=1)],
    }
    stage = DedupStage()
    up = {"filter": {s: filtered(tmp_path, s, t) for s, t in shards.items()}}
    plan = prepared(stage, CFG, tmp_path, "r1", up)
    assert set(plan) == {0, 1, 2} and all(p["dup_file"].startswith(str(tmp_path / "runs/r1/dedup_global"))
                                         for p in plan.values())
    assert list((tmp_path / "runs/r1/dedup_global/signatures").rglob("*.parquet"))
    outs = {s: dedup_run(tmp_path, up["filter"][s], plan[s], s) for s in shards}
    drops = [(r.filter, r.text) for o in outs.values() for r in o.rejects]
    # one copy of each group survives: 4 of the 6 planted copies go, whatever shard they sit in
    assert sorted(f for f, _ in drops) == ["exact_dup", "exact_dup", "near_dup", "near_dup"]
    assert all(r.reason.startswith("duplicate of ") for o in outs.values() for r in o.rejects)
    kept = {t.answer for o in outs.values() for s in o.rows for t in s.turns}
    assert len(kept & {BASE, NEAR}) == 1 and len(kept & {ZH, ZH_NEAR, ZH.upper() + "！"}) == 1
    assert GOOD["Q4653@en"] in kept and GOOD["Q1200@zh"] in kept
    assert all(o.stats.extra["dedup_scope"] == "run" and funnel_ok(o) for o in outs.values())
    # sessions keep their ids and carry exactly their kept turns
    for o in outs.values():
        for s in o.rows:
            assert s.parents == [t.turn_id for t in s.turns] and s.turns
    # the same inputs give the same decisions and digests; a changed shard changes them
    assert prepared(stage, CFG, tmp_path, "r1", up) == plan
    shards[2][0] = make_turn("Q1107@zh", GOOD["Q1107@zh"])
    up["filter"][2] = filtered(tmp_path / "v2", 2, shards[2])
    plan2 = prepared(stage, CFG, tmp_path, "r1", up)
    assert plan2[2]["digest"] != plan[2]["digest"]


def test_dedup_within_shard_without_global_step(tmp_path):
    path = filtered(tmp_path, 0, [make_turn("Q517@en", GOOD["Q517@en"]),
                                  make_turn("Q937@en", GOOD["Q517@en"].upper())])
    out = dedup_run(tmp_path, path, None)
    assert out.stats.dropped == {"exact_dup": 1} and out.stats.extra["dedup_scope"] == "shard" and funnel_ok(out)


def test_a_session_left_below_min_turns_after_dedup_is_dropped(tmp_path):
    cfg = filter_config(refusal={"enabled": False}, out_of_role={"enabled": False})
    cfg = cfg.model_copy(update={"sessions": cfg.sessions.model_copy(update={"min_turns": 2})})
    a = filtered(tmp_path, 0, [make_turn("Q517@en", BASE, n=0), make_turn("Q517@en", GOOD["Q517@en"], n=1)], cfg)
    b = filtered(tmp_path, 1, [make_turn("Q937@en", BASE.upper(), n=0), make_turn("Q937@en", GOOD["Q937@en"], n=1)],
                 cfg)
    plan = DedupStage().prepare(cfg, tmp_path, "r1", {"filter": {0: a, 1: b}})
    outs = [dedup_run(tmp_path, p, plan[s], s, cfg) for s, p in ((0, a), (1, b))]
    loser = next(o for o in outs if o.stats.dropped)
    assert loser.stats.dropped == {"exact_dup": 1, "min_turns": 1} and not loser.rows and funnel_ok(loser)
    assert "after dedup < min_turns 2" in next(r.reason for r in loser.rejects if r.filter == "min_turns")


def test_dedup_off_passes_sessions_through(tmp_path):
    cfg = with_dedup(filter_config(refusal={"enabled": False}), exact=False, near=False)
    path = filtered(tmp_path, 0, [make_turn("Q517@en", GOOD["Q517@en"]),
                                  make_turn("Q937@en", GOOD["Q517@en"].upper())], cfg)
    assert DedupStage().prepare(cfg, tmp_path, "r1", {"filter": {0: path}}) is None
    out = dedup_run(tmp_path, path, None, cfg=cfg)
    assert out.stats.rows_out == out.stats.rows_in == 2 and not out.rejects


def test_filter_shards_do_not_depend_on_dedup():
    """The per-turn chain's key covers no dedup setting: other shards' duplicates never rebuild it."""
    base = filter_config()
    other = with_dedup(filter_config(), threshold=0.9, near=False)
    assert FilterStage().fingerprint(base) == FilterStage().fingerprint(other)
    assert DedupStage().fingerprint(base) != DedupStage().fingerprint(other)


def _count_work(monkeypatch) -> tuple[list[int], list[int]]:
    """Shards signed per call of the signing step, and the decision passes run."""
    signed, decided = [], []
    real_sign, real_decide = dedup._sign_all, dedup.decide
    monkeypatch.setattr(dedup, "_sign_all", lambda todo, *a: (signed.append(len(todo)), real_sign(todo, *a)))
    monkeypatch.setattr(dedup, "decide", lambda *a: (decided.append(1), real_decide(*a))[1])
    return signed, decided


def test_dedup_signatures_follow_the_shard_content_not_its_path(tmp_path, monkeypatch):
    """A filter shard rewritten at the same path (same turn ids, other sampled text) is signed again;
    an unchanged shard reuses its signatures, and an unchanged set of shards reuses the decisions."""
    first = [make_turn("Q517@en", BASE)]
    other = [make_turn("Q937@en", GOOD["Q11@en"])]
    up = {"filter": {0: filtered(tmp_path, 0, first), 1: filtered(tmp_path, 1, other)}}
    stage = DedupStage()
    signed, decided = _count_work(monkeypatch)
    plan = prepared(stage, CFG, tmp_path, "r1", up)
    assert signed == [2] and decided == [1] and not dedup.load_decisions(plan[1]["dup_file"])
    # nothing changed upstream (a rerun): the registered step's decisions and digests stand, nothing is
    # signed or decided again
    assert prepared(stage, CFG, tmp_path, "r1", up) == plan and signed == [2] and decided == [1]
    # a decisions part lost (a step killed while writing them): decided again, signatures reused
    Path(plan[1]["dup_file"]).unlink()
    assert prepared(stage, CFG, tmp_path, "r1", up) == plan and signed == [2, 0] and decided == [1, 1]

    # shard 1 rewritten at the same path with the same turn id: now it duplicates shard 0
    again = [{**make_turn("Q937@en", BASE), "id": other[0]["id"]}]
    assert filtered(tmp_path, 1, again) == up["filter"][1]
    plan2 = prepared(stage, CFG, tmp_path, "r1", up)
    assert signed == [2, 0, 1] and decided == [1, 1, 1]
    decisions = [d for s in (0, 1) for d in dedup.load_decisions(plan2[s]["dup_file"]).values()]
    assert [d["filter"] for d in decisions] == ["exact_dup"]  # whichever id is smaller is kept
    assert {d["id"] for d in decisions} | {d["dup_of"] for d in decisions} == {first[0]["id"], other[0]["id"]}


def _corrupt(path: str | Path) -> None:
    """Same size, other bytes: only the registered sha256 tells."""
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(path).write_bytes(bytes(data))


def test_global_step_resumes_from_the_catalog_entry_in_another_run(tmp_path, monkeypatch):
    """The step's signatures and decisions are catalog artifacts under content keys: another run over the same
    filter shards reuses them (nothing signed or decided), a damaged file is rebuilt, not trusted, and a
    changed setting rebuilds exactly what it changes."""
    up = {"filter": {0: filtered(tmp_path, 0, [make_turn("Q517@en", BASE)]),
                     1: filtered(tmp_path, 1, [make_turn("Q937@en", NEAR)])}}
    stage = DedupStage()
    signed, decided = _count_work(monkeypatch)
    plan = prepared(stage, CFG, tmp_path, "r1", up)
    with CatalogReader(tmp_path) as rd:
        kinds = sorted(r["kind"] for r in rd.query("SELECT kind, run_id FROM artifacts WHERE run_id='r1'"))
    assert kinds == ["dedup_decisions", "dedup_signatures", "dedup_signatures"]
    assert prepared(stage, CFG, tmp_path, "r2", up) == plan and signed == [2] and decided == [1]
    assert all("/runs/r1/" in p["dup_file"] for p in plan.values())  # the registered copy, wherever it lies

    _corrupt(plan[0]["dup_file"])  # damaged decisions: decided again (signatures are whole), in this run
    again = prepared(stage, CFG, tmp_path, "r2", up)
    assert signed == [2, 0] and decided == [1, 1]
    assert {s: p["digest"] for s, p in again.items()} == {s: p["digest"] for s, p in plan.items()}
    with CatalogReader(tmp_path) as rd:
        (row,) = rd.query("SELECT run_id, path FROM artifacts WHERE kind='dedup_decisions'")
    assert row["run_id"] == "r2" and "/runs/r2/" in row["path"]
    sig = next((tmp_path / "runs/r1/dedup_global/signatures").glob("*.parquet"))
    _corrupt(sig)  # a damaged signature table (and decisions over it): that shard is signed again
    Path(row["path"], "part-00000.parquet").unlink()
    prepared(stage, CFG, tmp_path, "r2", up)
    assert signed == [2, 0, 1] and decided == [1, 1, 1]

    # a decision setting changes the decisions' key only; a signature setting both keys
    prepared(stage, with_dedup(CFG, threshold=0.95), tmp_path, "r2", up)
    assert signed == [2, 0, 1, 0] and decided == [1, 1, 1, 1]
    prepared(stage, with_dedup(CFG, shingle=3), tmp_path, "r2", up)
    assert signed == [2, 0, 1, 0, 2] and decided == [1, 1, 1, 1, 1]
    prepared(stage, with_dedup(CFG, workers=1), tmp_path, "r2", up)  # how it is computed is no part of the key
    assert signed == [2, 0, 1, 0, 2] and decided == [1, 1, 1, 1, 1]


def test_decision_schema_is_derived_from_its_record():
    import pyarrow as pa

    assert dedup.DECISION_SCHEMA.names == list(dedup.DedupDecision.model_fields)
    assert dedup.DECISION_SCHEMA.field("score").type == pa.float64()
    row = {"id": "t1", "filter": "near_dup", "dup_of": "t0", "score": 0.8}
    assert to_table([row], dedup.DedupDecision).schema == dedup.DECISION_SCHEMA
    with pytest.raises(ValueError):
        dedup.DedupDecision.model_validate({**row, "filter": "min_turns"})


@pytest.mark.parametrize("shards", [{0: [], 1: []}, {0: []}, {}])
def test_global_step_over_empty_shards_decides_nothing(tmp_path, shards):
    stage = DedupStage()
    up = {"filter": {s: filtered(tmp_path, s, t) for s, t in shards.items()}}
    plan = prepared(stage, CFG, tmp_path, "r0", up)
    assert set(plan) == set(shards)
    for s in shards:
        out = dedup_run(tmp_path, up["filter"][s], plan[s], s)
        assert out.rows == [] and out.rejects == [] and funnel_ok(out)


def test_zero_kept_turns_is_a_completed_run_with_empty_shards_and_a_note(tmp_path, fake_overrides, list_source):
    """sessions.min_turns above every session's length: nothing survives the filter. Dedup and sft_data run
    on empty shards, the run completes (and a rerun too), and `ditto show` says why the dataset is empty."""
    from flows.build import rerun, run_build
    from storage.reader import CatalogReader
    from storage.report import run_notes

    home = tmp_path / "h"
    ov = [*fake_overrides, "sessions.min_turns=100", "filter.identity.enabled=false"]
    s = run_build(overrides=ov, home=home, run_id="empty")
    assert s["status"] == "completed" and s["stages"]["sft_data"]["rows_out"] == 0
    assert json.loads(s["stages"]["filter"]["dropped"]).get("min_turns", 0) > 0
    with CatalogReader(home) as rd:
        for stage in ("dedup", "sft_data"):
            shards = rd.shards("empty", stage)
            assert len(shards) == s["num_shards"] and all(r["status"] == "done" and r["rows"] == 0 for r in shards)
        notes = run_notes(rd, "empty")
        # the flow registered what the global step built: a rerun finds its decisions in the catalog
        assert rd.query("SELECT run_id FROM artifacts WHERE kind='dedup_decisions'") == [{"run_id": "empty"}]
    assert any(n.startswith("filter kept no rows") and "min_turns=" in n and "dedup, sft_data ran on empty shards"
               in n for n in notes), notes
    assert rerun("empty", home)["status"] == "completed"


def test_dedup_has_its_own_config_section_and_old_keys_are_moved_or_refused(tmp_path):
    from models.config import ConfigError, load_config, migrate_stored_config

    assert load_config(overrides=["dedup.threshold=0.9"]).dedup.threshold == 0.9
    assert "dedup" not in load_config().filter.model_dump()
    with pytest.raises(ConfigError, match=r"unknown key 'filter.dedup' \(it is 'dedup' now\)"):
        load_config(overrides=["filter.dedup.near=false"])
    old = tmp_path / "old.yaml"
    old.write_text("filter:\n  dedup:\n    threshold: 0.8\n")
    with pytest.raises(ConfigError, match=r"old.yaml: unknown key 'filter.dedup' \(it is 'dedup' now\)"):
        load_config(old)
    # a run stored by an earlier release (`ditto rerun`, `ditto train`) keeps its settings in their new place
    stored = {"filter": {"dedup": {"threshold": 0.8, "near": False}, "enabled": True}}
    cfg = load_config(data=migrate_stored_config(stored))
    assert (cfg.dedup.threshold, cfg.dedup.near, cfg.filter.enabled) == (0.8, False, True)
