"""Stage `queries`: the paper's T_Q. Each character A is paired with partners B drawn from the same
shard (seeded by A's id, so pairings are reproducible and one edited character touches one shard).
The model writes questions A can answer but B cannot; each is recorded twice: role_specific for A,
contrastive (should be refused) for B. Invalid JSON is re-sampled per request, at once, up to `rounds`
attempts (tasks/generation.py), then rejected."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from engines.base import Sampling
from models.base import table_rows
from models.config import RunConfig
from models.ids import content_hash, row_id
from models.records import Character, GenerationMeta, Query
from storage.shards import read_table
from tasks import prompts
from tasks.base import ShardOutput, Stage, StageContext
from tasks.generation import generate_parsed
from tasks.profile import profile_text

PARTNER_PROFILE_TOKENS = 250
FALLBACK_POOL = 4
POOL_COLUMNS = ["id", "label", "description", "language", "category", "summary"]


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


def parse_questions(text: str, n: int) -> list[dict[str, str]]:
    """`[{"question": ..., "reason": ...}]` -> up to n clean questions, or ParseError saying why."""
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
    for item in data:
        if isinstance(item, str):
            item = {"question": item, "reason": ""}
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            continue
        q = " ".join(item["question"].split())
        if len(q) < 8 or q.lower() in seen or "{" in q or "..." == q:
            continue
        seen.add(q.lower())
        reason = item.get("reason")
        out.append({"question": q, "reason": " ".join(reason.split()) if isinstance(reason, str) else ""})
    if not out:
        raise ParseError("no usable question in the output")
    return out[:n]


def pick_partners(a: dict, pool: list[dict], k: int, seed: int) -> list[dict]:
    """Partners for A from the same shard, same language first; deterministic for (seed, A)."""
    same = [c for c in pool if c["language"] == a["language"] and c["id"] != a["id"]]
    others = [c for c in pool if c["language"] != a["language"] and c["id"] != a["id"]]
    rng = random.Random(f"{seed}:{a['id']}:{a['language']}")
    chosen = rng.sample(same, min(k, len(same)))
    if len(chosen) < k and others:
        chosen += rng.sample(others, min(k - len(chosen), len(others)))
    return chosen


def _rid(c: dict) -> str:
    return f"{c['id']}@{c['language']}"


class QueriesStage(Stage):
    name = "queries"
    output = Query
    inputs = {"characters": Character}
    uses_engine = True

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        return {"queries": config.queries.model_dump(mode="json"), "seed": config.seed,
                "prompts": prompts.fingerprint("queries", config.characters.languages),
                "engine": config.engine.model_dump(mode="json", include={"kind", "model", "revision", "seed"})}

    def prepare(self, config: RunConfig, home: Path, run_id: str,
                upstream: dict[str, dict[int, str]]) -> dict[int, dict[str, Any]]:
        """Shards where a language has a single character get a small fallback partner pool drawn from
        the other shards (deterministic); only the digest of that pool enters those shards' keys."""
        by_shard: dict[int, list[dict]] = {}
        for k, path in upstream["characters"].items():
            by_shard[k] = table_rows(read_table(path, columns=POOL_COLUMNS))
        out: dict[int, dict[str, Any]] = {}
        for k, rows in by_shard.items():
            lonely = sorted({r["language"] for r in rows} - {r["language"] for r in rows
                                                               if sum(x["language"] == r["language"] for x in rows) > 1})
            if not lonely:
                continue
            pool = []
            for lang in lonely:
                # the FALLBACK_POOL other-shard characters with the smallest seeded hash: a new character
                # changes this pool only if its own hash is among the smallest (a bottom-k sample)
                others = [r for j, rs in by_shard.items() if j != k for r in rs if r["language"] == lang]
                others.sort(key=lambda r: content_hash([config.seed, k, lang, r["id"]]))
                pool += others[:FALLBACK_POOL]
            if pool:
                out[k] = {"pool": pool, "digest": content_hash(pool)}
        return out

    def build_messages(self, a: dict, b: dict, n: int) -> list[dict[str, str]]:
        tpl = prompts.load("queries", a["language"])
        a_profile, _ = profile_text(a, 600)
        b_profile, _ = profile_text(b, PARTNER_PROFILE_TOKENS)
        return tpl.messages(a_label=a["label"], a_description=a.get("description") or "",
                            a_profile=prompts.fence_safe(a_profile), b_label=b["label"],
                            b_description=b.get("description") or "", b_profile=prompts.fence_safe(b_profile), n=n)

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        cfg = ctx.config.queries
        chars = inputs["characters"]
        out = ShardOutput(rows=[])
        out.stats.rows_in = len(chars)
        pairs = []
        here = {_rid(c) for c in chars}
        for a in chars:
            partners = pick_partners(a, chars, cfg.pairings, ctx.seed)
            if not [b for b in partners if b["language"] == a["language"]] and ctx.extra.get("pool"):
                partners = pick_partners(a, [c for c in ctx.extra["pool"] if c["language"] == a["language"]],
                                         cfg.pairings, ctx.seed) or partners
            if not partners:
                out.rejects.append(ctx.reject(_rid(a), "no_partner", "no other character in this shard to pair with",
                                              character_id=_rid(a)))
                out.stats.dropped["no_partner"] += 1
            pairs += [(a, b) for b in partners]
        if not pairs:
            return out
        engine = ctx.engine()
        sp = ctx.config.queries.sampling
        sampling = Sampling(temperature=sp.temperature, top_p=sp.top_p, repetition_penalty=sp.repetition_penalty,
                            max_tokens=sp.max_tokens,
                            json_schema=question_schema(cfg.questions) if cfg.guided_json else None)
        chats = [self.build_messages(a, b, cfg.questions) for a, b in pairs]
        outcomes = generate_parsed(engine, chats, sampling, lambda g: parse_questions(g.text, cfg.questions),
                                   rounds=cfg.rounds, stats=out.stats)
        for i, res in enumerate(outcomes):
            a, b = pairs[i]
            out.stats.format_failures += res.attempts - (1 if res.ok else 0)
            if not res.ok:
                out.rejects.append(ctx.reject(row_id("pair", _rid(a), _rid(b)), "format",
                                              f"no valid question JSON after {cfg.rounds} rounds: {res.error}",
                                              character_id=_rid(a), text=res.last.text))
                out.stats.dropped["format"] += 1
                continue
            g = res.last
            meta = GenerationMeta(prompt=json.dumps(chats[i], ensure_ascii=False), raw_output=g.text,
                                  prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                                  finish_reason=g.finish_reason, model=g.model or engine.model_id,
                                  seed=ctx.config.engine.seed, rounds=res.attempts)
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
