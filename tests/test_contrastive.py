"""Contrastive questions independent of sharding: partners drawn from the whole run on a consistent-hash
ring, B's shard issuing the same (A, B) request as A's shard (answered once by the generation cache), the
same queries at 4 and 64 shards, and an edited character changing only the shards that hold its pairs."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from engines.base import get_engine
from models.base import table_rows, to_table
from models.config import load_config
from models.ids import shard_of
from models.records import Character
from models.records import character_row_id as _rid
from storage.reader import CatalogReader
from storage.shards import read_table, write_table
from tasks.queries import PartnerRing, QueriesStage, plan_pairs
from tests.plugins.core import make_characters


def _rows(n: int, zh: int = 0) -> list[dict]:
    return make_characters(n) + make_characters(zh, language="zh")


# -- the ring -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 5])
def test_partners_are_deterministic_same_language_first_and_never_the_same_character(k):
    rows = _rows(30, zh=3)
    ring, again = PartnerRing(rows, seed=7), PartnerRing(list(reversed(rows)), seed=7)
    for a in rows:
        ps = ring.partners(a, k)
        assert ps == again.partners(a, k)  # row order does not matter, only ids
        assert len(ps) == len(set(ps)) == k
        assert all(p.split("@")[0] != a["id"] for p in ps)  # not A, nor A in another language
        if a["language"] == "zh":  # 3 zh characters: 2 zh partners at most, then en ones
            assert [p.endswith("@zh") for p in ps] == [True] * min(k, 2) + [False] * (k - min(k, 2))
        else:
            assert all(p.endswith("@en") for p in ps)
    assert PartnerRing(rows, seed=8).partners(rows[0], 5) != ring.partners(rows[0], 5)


def test_a_lone_character_has_no_partner_and_a_pair_of_two_has_one():
    assert plan_pairs(_rows(1), 2, 0) == []
    assert sorted(plan_pairs(_rows(2), 2, 0)) == [("Q1@en", "Q2@en"), ("Q2@en", "Q1@en")]


def test_partner_draws_are_spread_like_uniform_random_ones():
    rows = [{"id": f"Q{i}", "language": "en"} for i in range(3000)]
    drawn = Counter(b for _, b in plan_pairs(rows, 2, seed=0))
    counts = [drawn.get(f"Q{i}@en", 0) for i in range(3000)]
    # uniform random draws would give Poisson(2): 13.5% never drawn, none drawn more than ~10 times
    assert 0.09 < counts.count(0) / 3000 < 0.18
    assert max(counts) <= 12


def test_a_new_character_moves_few_existing_pairings():
    rows = [{"id": f"Q{i}", "language": "en"} for i in range(500)]
    before = set(plan_pairs(rows, 3, seed=1))
    after = set(plan_pairs([*rows, {"id": "QNEW", "language": "en"}], 3, seed=1))
    moved = {p for p in before - after}
    assert len(after - before - moved) >= 3  # its own three
    assert len(moved) <= 4  # of 1500 existing draws, about one in 500 lands on the newcomer


# -- the global step ------------------------------------------------------------------------------------
def _write_shards(tmp_path: Path, rows: list[dict], n: int, tag: str) -> dict[int, str]:
    paths = {}
    for k in range(n):
        part = sorted((Character.model_validate(r) for r in rows if shard_of(r["id"], n) == k), key=lambda c: c.id)
        p = tmp_path / tag / f"part-{k:05d}.parquet"
        write_table(to_table(part, Character), p)
        paths[k] = str(p)
    return paths


def test_prepare_sends_each_pair_to_both_shards_and_only_the_partner_rows_they_lack(tmp_path):
    rows = _rows(24, zh=4)
    n = 8
    cfg = load_config(overrides=["queries.pairings=2"])
    extra = QueriesStage().prepare(cfg, tmp_path, "r", {"characters": _write_shards(tmp_path, rows, n, "a")})
    shard = {_rid(r): shard_of(r["id"], n) for r in rows}
    everything = plan_pairs(rows, 2, cfg.seed)
    for k in range(n):
        mine = {tuple(p) for p in extra[k]["pairs"]}
        assert mine == {p for p in everything if shard[p[0]] == k or shard[p[1]] == k}
        foreign = {r for p in mine for r in p if shard[r] != k}
        have = {_rid(r) for r in table_rows(read_table(extra[k]["partners"]))} if extra[k]["partners"] else set()
        assert have == foreign
    # an edited profile changes the digest of exactly the other shards that hold a pair with it
    x = rows[5]
    edited = [dict(r, summary="An entirely new summary of this life. " * 5) if r is x else r for r in rows]
    extra2 = QueriesStage().prepare(cfg, tmp_path, "r", {"characters": _write_shards(tmp_path, edited, n, "b")})
    changed = {k for k in range(n) if extra[k]["digest"] != extra2[k]["digest"]}
    holding = {shard[r] for p in everything if _rid(x) in p for r in p} - {shard[_rid(x)]}
    assert changed == holding and holding


# -- the flow -------------------------------------------------------------------------------------------
def _run(tmp_path: Path, rows: list[dict], name: str, shards: int, home: Path | None = None,
         until: str = "queries", file: str | None = None) -> tuple[Path, str]:
    from flows.build import run_build

    f = tmp_path / f"{file or name}.jsonl"  # the same file for the nightly of an edited input
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    home = home or tmp_path / name
    ov = ["engine.kind=fake", f"characters.path={f}", "characters.source=jsonl", f"runner.num_shards={shards}",
          "runner.retry_delay_seconds=[0]", "queries.pairings=2"]
    return home, run_build(overrides=ov, home=home, until=until)["run_id"]


def _queries(home: Path, run_id: str) -> list[dict]:
    with CatalogReader(home) as rd:
        paths = [s["path"] for s in rd.shards(run_id, "queries")]
    return sorted((q for p in paths for q in table_rows(read_table(p))), key=lambda q: (q["id"], q["character_id"]))


def _fake_requests() -> int:
    return get_engine(load_config(overrides=["engine.kind=fake"]).engine).metrics().requests


@pytest.mark.usefixtures("list_source")
def test_the_same_characters_and_seed_give_the_same_queries_at_4_and_64_shards(tmp_path):
    rows = _rows(20, zh=4)
    before = _fake_requests()
    h4, r4 = _run(tmp_path, rows, "four", 4)
    asked4 = _fake_requests() - before
    h64, r64 = _run(tmp_path, rows, "sixty-four", 64)
    q4, q64 = _queries(h4, r4), _queries(h64, r64)
    assert q4 == q64 and q4
    kinds = Counter(q["kind"] for q in q4)
    assert kinds["contrastive"] == kinds["role_specific"]  # every pair's questions reach A and B
    # each contrastive question is the role-specific one of the same pair, word for word
    role = {(q["author_id"], q["partner_id"], q["question"]) for q in q4 if q["kind"] == "role_specific"}
    assert all((q["author_id"], q["partner_id"], q["question"]) in role for q in q4 if q["kind"] == "contrastive")
    assert all(q["character_id"] == q["partner_id"] for q in q4 if q["kind"] == "contrastive")
    # one engine request per pair although both shards of a cross-shard pair asked for it
    pairs = plan_pairs(rows, 2, 0)
    assert asked4 == len(pairs)
    with CatalogReader(h4) as rd:
        stats = [json.loads(s["stats"]) for s in rd.shards(r4, "queries")]
        placed = {s["shard"]: table_rows(read_table(s["path"])) for s in rd.shards(r4, "queries")}
    cross = sum(1 for a, b in pairs if shard_of(a.split("@")[0], 4) != shard_of(b.split("@")[0], 4))
    assert sum(s["cache_misses"] for s in stats) == len(pairs) and sum(s["cache_hits"] for s in stats) == cross
    for k, qs in placed.items():  # every row lives in its own character's shard
        assert all(shard_of(q["character_id"].split("@")[0], 4) == k for q in qs)


@pytest.mark.usefixtures("list_source")
def test_an_edited_character_rebuilds_only_the_shards_holding_its_pairs(tmp_path):
    rows = _rows(24)
    home, first = _run(tmp_path, rows, "v1", 8, until="responses", file="characters")
    x = rows[3]
    edited = [dict(r, summary=f"{r['label']} was rewritten today. " * 6, article="") if r is x else r for r in rows]
    before = _fake_requests()
    _, second = _run(tmp_path, edited, "v2", 8, home=home, until="responses", file="characters")
    asked = _fake_requests() - before
    pairs = plan_pairs(rows, 2, 0)
    with_x = [p for p in pairs if _rid(x) in p]
    expected = {shard_of(r.split("@")[0], 8) for p in with_x for r in p}
    with CatalogReader(home) as rd:
        rebuilt = {st: {s["shard"] for s in rd.shards(second, st) if not s["reused_from"]}
                   for st in ("queries", "responses")}
    assert rebuilt["queries"] == expected and len(expected) <= 1 + 2 * 2 + sum(1 for a, b in pairs if b == _rid(x))
    assert rebuilt["responses"] == expected and len(expected) < 8
    # engine requests: the pairs with X, and the answers to their questions (plus X's own answers, whose
    # prompt carries the new profile: every question X answers comes from a pair with X)
    new_queries = [q for q in _queries(home, second) if _rid(x) in (q["author_id"], q["partner_id"])]
    assert asked == len(with_x) + len(new_queries)
