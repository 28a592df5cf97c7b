"""Stage `queries`: the paper's T_Q. Each character A is paired with partners B drawn from the whole run
(seeded, from the characters table, independent of the shard count); the model writes questions A can
answer but B cannot, recorded as role_specific for A and contrastive (should be refused) for B. Invalid
JSON is re-sampled per request, at once, up to `rounds` attempts (tasks/generation.py), then rejected.
The prompt (tasks/prompts/queries.<lang>.txt) also sets how many tokens of A's and B's profiles it shows.

Partners and sharding. The global step `prepare` reads the ids of every characters shard, draws each
A's partners on a consistent-hash ring (`PartnerRing`: each character owns VNODES points; A's j-th draw
takes the owner of the first point after a hash of (seed, A, j)), and gives each shard its pairs: those
whose A lives there and those whose B lives there, with the prompt fields of the other-shard characters
in a small Parquet file. B's shard issues the same (A, B) request as A's shard, so the generation cache
(engines/cache.py: single-flight in process, durable across runs) answers it once, with the same text,
for both; each shard keeps the copy that belongs to its own character. Without the cache, B's shard asks
the model again (the same prompt; still a valid contrastive question for B). Same characters and seed
give the same queries at any shard count.

What one edit changes. Pairings depend on ids only, so an edited profile changes the queries shards
holding a pair with that character: its own shard, its partners' shards and the shards of the characters
that drew it (about 1 + 2 * pairings). A new character changes those too, plus, on the ring, an expected
one draw in N per existing draw (a partner it displaces)."""

from __future__ import annotations

import hashlib
import json
import re
from bisect import bisect_left
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.base import table_rows
from models.config import RunConfig
from models.config.engine import EngineConfig
from models.ids import content_hash, row_id
from models.records import Character, Query
from models.records import character_row_id as _rid
from storage.layout import RunLayout
from storage.shards import read_table, write_table
from tasks import prompts
from tasks.base import ShardOutput, Stage, StageContext
from tasks.filters.questions import Validate, question_check, reason_code, summarise
from tasks.generation import generate_parsed, generation_meta, sampling_from
from tasks.profile import profile_text

VNODES = 32  # ring points per character: each is drawn with probability close to 1/N (relative spread ~1/sqrt(32))
ID_COLUMNS = ["id", "language"]
PROMPT_COLUMNS = ["id", "language", "label", "description", "category", "summary", "article"]
PARTNER_COLUMNS = ["id", "language", "label", "description", "category"]


def question_schema(n: int) -> dict[str, Any]:
    return {
        "type": "array", "minItems": 1, "maxItems": n,
        "items": {"type": "object", "additionalProperties": False, "required": ["question", "reason"],
                  "properties": {"question": {"type": "string", "minLength": 8, "maxLength": 300},
                                 "reason": {"type": "string", "maxLength": 300}}},
    }


class ParseError(ValueError):
    pass


def _json_candidates(text: str) -> list[str]:
    text = text.strip()
    text = re.sub(r"^```(?:json)?\s*|\s*```$", "", text)
    out = [text]
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        out.append(text[start:end + 1])
    return out


def parse_questions(text: str, n: int, validate: Validate | None = None,
                    dropped: list[tuple[str, str]] | None = None) -> list[dict[str, str]]:
    """`[{"question": ..., "reason": ...}]` -> up to n clean questions, or ParseError saying why.
    `validate(question, kept) -> reason | None` (tasks/filters/questions.py) drops invalid questions; each
    dropped (question, reason) is appended to `dropped`."""
    data = None
    for cand in _json_candidates(text):
        try:
            data = json.loads(cand)
            break
        except json.JSONDecodeError:
            continue
    if data is None:
        raise ParseError("not JSON")
    if isinstance(data, dict):
        data = data.get("questions", [data])
    if not isinstance(data, list):
        raise ParseError(f"expected a JSON array, got {type(data).__name__}")
    out, seen = [], set()
    dropped = [] if dropped is None else dropped
    for item in data:
        if isinstance(item, str):
            item = {"question": item, "reason": ""}
        if not isinstance(item, dict) or not isinstance(item.get("question"), str) or len(out) >= n:
            continue
        q = " ".join(item["question"].split())
        if validate is not None:
            why = validate(q, [o["question"] for o in out])
            if why is not None:
                dropped.append((q, why))
                continue
        elif len(q) < 8 or q.lower() in seen or "{" in q or "..." == q:
            continue
        seen.add(q.lower())
        reason = item.get("reason")
        out.append({"question": q, "reason": " ".join(reason.split()) if isinstance(reason, str) else ""})
    if not out:
        raise ParseError("no usable question in the output" + (f": {summarise(dropped)}" if dropped else ""))
    return out[:n]


_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _h64(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def _mix(x: int) -> int:
    """splitmix64's finaliser (a bijection of 64-bit ints)."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _MASK
    return x ^ (x >> 31)


def _mix_array(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


class PartnerRing:
    """Deterministic partner draws over a set of characters (rows with id and language), same language
    first. Depends on the ids, the languages and the seed only: never on shards or on profile text."""

    def __init__(self, rows: list[dict], seed: int, vnodes: int = VNODES):
        self.seed = seed
        self.rows = {_rid(r): r for r in rows}
        self.rids = sorted(self.rows)
        self._rings: dict[str | None, tuple[list[int], list[str]]] = {}
        by_lang: dict[str | None, list[str]] = {None: self.rids}
        for rid in self.rids:
            by_lang.setdefault(self.rows[rid]["language"], []).append(rid)
        for lang, rids in by_lang.items():
            base = np.array([_h64(seed, "node", rid) for rid in rids], dtype=np.uint64)
            with np.errstate(over="ignore"):
                pts = _mix_array(base[:, None] + np.arange(vnodes, dtype=np.uint64)[None, :]
                                 * np.uint64(_GOLDEN)).ravel()
            owner = np.repeat(np.arange(len(rids)), vnodes)
            order = np.lexsort((owner, pts))
            self._rings[lang] = (pts[order].tolist(), [rids[o] for o in owner[order]])
        self.per_lang = {lang: len(r) for lang, r in by_lang.items() if lang is not None}
        self.by_id: dict[str, list[str]] = {}
        for rid in self.rids:
            self.by_id.setdefault(self.rows[rid]["id"], []).append(rid)

    def _draw(self, lang: str | None, a: dict, need: int, avail: int, chosen: list[str], ok) -> None:
        """Append min(need, avail) owners for which ok() holds; `avail` is how many there are."""
        pts, owners = self._rings[lang]
        target = len(chosen) + min(need, avail)
        j = 0
        while len(chosen) < target:
            p = _mix((_h64(self.seed, "draw", lang or "*", _rid(a)) + j * _GOLDEN) & _MASK)
            j += 1
            i = bisect_left(pts, p) % len(pts)
            while owners[i] in chosen or not ok(owners[i]):
                i = (i + 1) % len(pts)
            chosen.append(owners[i])

    def partners(self, a: dict, k: int) -> list[str]:
        """The rids of A's k partners: other characters of A's language, then of other languages if too few."""
        lang, aid = a["language"], a["id"]
        same_id = self.by_id.get(aid, [])
        chosen: list[str] = []
        if lang in self._rings:
            avail = self.per_lang[lang] - sum(1 for r in same_id if self.rows[r]["language"] == lang)
            self._draw(lang, a, k, avail, chosen, lambda r: self.rows[r]["id"] != aid)
        if len(chosen) < k and self.rids:
            avail = len(self.rids) - self.per_lang.get(lang, 0) - sum(
                1 for r in same_id if self.rows[r]["language"] != lang)
            self._draw(None, a, k - len(chosen), avail, chosen,
                       lambda r: self.rows[r]["id"] != aid and self.rows[r]["language"] != lang)
        return chosen


def pick_partners(a: dict, pool: list[dict], k: int, seed: int) -> list[dict]:
    """A's partners among `pool` (the whole run's characters), same language first; deterministic for
    (seed, A, the pool's ids)."""
    ring = PartnerRing(pool if any(_rid(c) == _rid(a) for c in pool) else [*pool, a], seed)
    by = {_rid(c): c for c in pool}
    return [by[r] for r in ring.partners(a, k)]


def plan_pairs(rows: list[dict], k: int, seed: int) -> list[tuple[str, str]]:
    """Every (A, B) pair of the run, as rids, A-major in rid order, B in draw order."""
    ring = PartnerRing(rows, seed)
    return [(a, b) for a in ring.rids for b in ring.partners(ring.rows[a], k)]


def profile_budgets(language: str) -> tuple[int, int]:
    """(author, partner) profile budgets in tokens: the `[part author_profile_tokens]` and
    `[part partner_profile_tokens]` of the language's queries prompt."""
    tpl = prompts.load("queries", language)
    return tpl.int_part("author_profile_tokens"), tpl.int_part("partner_profile_tokens")


def all_budgets(languages: Iterable[str]) -> list[int]:
    """Every profile budget the prompts of these languages (and English, the fallback) cut to."""
    return sorted({b for lang in {*languages, "en"} for b in profile_budgets(lang)})


def partner_schema(budgets: list[int]) -> pa.Schema:
    return pa.schema([(c, pa.string()) for c in PARTNER_COLUMNS] + [(f"profile_{b}", pa.string()) for b in budgets])


def partner_fields(c: dict, budgets: list[int]) -> dict[str, Any]:
    """What a prompt needs of a character from another shard: the profiles cut to every budget are computed
    here, from the full row, so a prompt is the same text whichever shard renders it."""
    return {"id": c["id"], "language": c["language"], "label": c["label"], "description": c.get("description"),
            "category": c.get("category"), **{f"profile_{b}": profile_text(c, b)[0] for b in budgets}}


def _profile(c: dict, budget: int) -> str:
    pre = c.get(f"profile_{budget}")
    return pre if pre is not None else profile_text(c, budget)[0]


def partners_path(home: Path, run_id: str, digest: str, shard: int) -> Path:
    return RunLayout(home, run_id).prepared("queries", digest, shard)


class QueriesStage(Stage):
    name = "queries"
    output = Query
    inputs = {"characters": Character}

    def engine_configs(self, config: RunConfig) -> list[EngineConfig]:
        return [config.engine]

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        return {"queries": config.queries.model_dump(mode="json"), "seed": config.seed,
                "prompts": prompts.fingerprint("queries", config.characters.languages),
                "engine": config.engine.model_dump(mode="json", include={"kind", "model", "revision", "seed"}),
                "questions": config.filter.questions.model_dump(mode="json")}

    def prepare(self, config: RunConfig, home: Path, run_id: str,
                upstream: dict[str, dict[int, str]]) -> dict[int, dict[str, Any]]:
        """Partners from the whole run: every shard gets the pairs whose A or B lives there, and the prompt
        fields of the other-shard characters of those pairs (a Parquet file; the job carries its path).
        The digest (pairs + those fields) enters the shard's key, so a shard is rebuilt exactly when one of
        its prompts changed. Memory: the ids of the run plus the cut profiles (about 3 KB) of the
        characters some other shard needs."""
        paths = upstream["characters"]
        shard_of_rid: dict[str, int] = {}
        ids: list[dict] = []
        for k, path in sorted(paths.items()):
            for r in table_rows(read_table(path, columns=ID_COLUMNS)):
                shard_of_rid[_rid(r)] = k
                ids.append(r)
        pairs: dict[int, list[tuple[str, str]]] = {k: [] for k in paths}
        needs: dict[int, set[str]] = {k: set() for k in paths}
        for a, b in plan_pairs(ids, config.queries.pairings, config.seed):
            ka, kb = shard_of_rid[a], shard_of_rid[b]
            pairs[ka].append((a, b))
            if kb != ka:
                pairs[kb].append((a, b))
                needs[ka].add(b)
                needs[kb].add(a)
        wanted = set().union(*needs.values()) if needs else set()
        budgets = all_budgets({r["language"] for r in ids})
        fields: dict[str, dict[str, Any]] = {}
        for path in paths.values():
            if not wanted:
                break
            for r in table_rows(read_table(path, columns=PROMPT_COLUMNS)):
                if _rid(r) in wanted:
                    fields[_rid(r)] = partner_fields(r, budgets)
        out: dict[int, dict[str, Any]] = {}
        for k in paths:
            rows = [fields[r] for r in sorted(needs[k])]
            digest = content_hash({"pairs": pairs[k], "partners": rows})
            target = None
            if rows:
                target = partners_path(home, run_id, digest, k)
                if not target.exists():
                    write_table(pa.Table.from_pylist(rows, schema=partner_schema(budgets)), target)
                target = str(target)
            out[k] = {"digest": digest, "pairs": [list(p) for p in pairs[k]], "partners": target}
        return out

    def build_messages(self, a: dict, b: dict, n: int) -> list[dict[str, str]]:
        tpl = prompts.load("queries", a["language"])
        a_budget, b_budget = profile_budgets(a["language"])
        a_profile = _profile(a, a_budget)
        b_profile = _profile(b, b_budget)
        return tpl.messages(a_label=a["label"], a_description=a.get("description") or "",
                            a_profile=prompts.fence_safe(a_profile), b_label=b["label"],
                            b_description=b.get("description") or "", b_profile=prompts.fence_safe(b_profile), n=n)

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        cfg = ctx.config.queries
        chars = inputs["characters"]
        out = ShardOutput(rows=[])
        out.stats.rows_in = len(chars)
        here = {_rid(c) for c in chars}
        by_rid = {_rid(c): c for c in chars}
        if "pairs" in ctx.extra:  # the global step's pairs: partners from the whole run
            plan = [tuple(p) for p in ctx.extra["pairs"]]
            if ctx.extra.get("partners"):
                by_rid.update({_rid(r): r for r in table_rows(read_table(ctx.extra["partners"]))})
        else:  # run on its own (no prepare): partners from this shard
            plan = plan_pairs(chars, cfg.pairings, ctx.seed)
        authors = {a for a, _ in plan}
        for c in chars:
            if _rid(c) not in authors:
                ctx.reject(out, _rid(c), "no_partner", "no other character in the run to pair with",
                           character_id=_rid(c))
        missing = sorted({r for p in plan for r in p} - set(by_rid))
        if missing:
            raise ValueError(f"queries shard {ctx.shard}: the pair plan names characters that are neither in this "
                             f"shard nor in its partner file: {', '.join(missing[:5])}")
        pairs = [(by_rid[a], by_rid[b]) for a, b in plan]
        if not pairs:
            return out
        engine = ctx.engine()
        sampling = sampling_from(cfg.sampling, json_schema=question_schema(cfg.questions) if cfg.guided_json else None)
        chats = [self.build_messages(a, b, cfg.questions) for a, b in pairs]
        checks = [question_check(ctx.config.filter.questions, a, b, chats[i]) for i, (a, b) in enumerate(pairs)]
        drops: list[list[tuple[str, str]]] = [[] for _ in pairs]  # the questions the latest attempt dropped

        def parser(i: int):
            def parse(g):
                drops[i] = []
                return parse_questions(g.text, cfg.questions, validate=checks[i], dropped=drops[i])
            return parse

        outcomes = generate_parsed(engine, chats, sampling, [parser(i) for i in range(len(pairs))],
                                   rounds=cfg.rounds, stats=out.stats)
        for i, res in enumerate(outcomes):
            a, b = pairs[i]
            for q, why in drops[i] if _rid(a) in here else ():  # counted once, in the author's shard
                ctx.reject(out, row_id("question", _rid(a), _rid(b), content_hash(q, 8)), f"question.{reason_code(why)}",
                           why, character_id=_rid(a), text=q)
            out.stats.format_failures += res.attempts - (1 if res.ok else 0)
            if not res.ok:
                ctx.reject(out, row_id("pair", _rid(a), _rid(b)), "format",
                           f"no valid question JSON after {cfg.rounds} rounds: {res.error}",
                           character_id=_rid(a), text=res.last.text)
                continue
            meta = generation_meta(chats[i], res, engine, ctx.config.engine.seed)
            for j, q in enumerate(res.value):
                for kind, who in (("role_specific", a), ("contrastive", b)):
                    if _rid(who) not in here:
                        continue  # a partner from another shard: its contrastive copy belongs there
                    out.rows.append(Query(
                        id=row_id("query", _rid(a), _rid(b), j, kind, content_hash(q["question"], 8)),
                        character_id=_rid(who), language=who["language"], kind=kind, question=q["question"],
                        reason=q["reason"], author_id=_rid(a), partner_id=_rid(b),
                        parents=[_rid(a), _rid(b)], gen=meta))
        out.stats.rows_out = len(out.rows)
        return out
