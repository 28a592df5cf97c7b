"""The filter stage: per-turn checks, cheap first, then one session per character and language.

    format -> length -> language -> meta_talk -> out_of_role -> degeneration -> other_character
    -> first_person -> refusal -> relevance (embeddings) -> identity (embeddings) -> judge (LLM)

Every check here looks at one turn of this shard, so a filter shard depends on its own responses shard
only. Duplicates across the run are the next stage's business (tasks/dedup.py), on the turns kept here.

Each check keeps a turn or drops it with a reason; every dropped turn becomes a Rejection row and counts in
stats.dropped[filter]. Kept turns keep their scores (SessionTurn.scores) so a stricter threshold can be
applied later with `rethreshold` without regenerating. A session left with fewer than sessions.min_turns
turns is dropped too, its turns rejected as 'min_turns'. rows_in == rows_out + sum(dropped).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from models.config import RunConfig
from models.config.engine import EngineConfig
from models.config.filter import FilterConfig
from models.records import Character, Session, Turn, character_row_id
from tasks import prompts
from tasks.base import ShardOutput, Stage, StageContext, Stats
from tasks.filters import Drop, Filter, Item
from tasks.filters.basic import FormatFilter, LanguageFilter, LengthFilter
from tasks.filters.identity import IdentityFilter
from tasks.filters.judge import SCHEMA, JudgeFilter, judge_engine_config
from tasks.filters.quality import DegenerationFilter, RelevanceFilter
from tasks.filters.role import (
    FirstPersonFilter,
    MetaTalkFilter,
    OtherCharacterFilter,
    OutOfRoleFilter,
    RefusalFilter,
)
from tasks.sessions import assemble_sessions, reject_short_session


def _model_id(engine_cfg) -> str:
    try:
        from engines.base import engine_class

        return engine_class(engine_cfg.kind)(engine_cfg).model_id
    except Exception:  # noqa: BLE001 - an engine module that cannot load still has a config identity
        return f"{engine_cfg.model}@{engine_cfg.revision or 'main'}"


# The chain, cheapest first: (config section of filter.*, how to build its filter). A section's `enabled` decides.
CHAIN: list[tuple[str, Callable[[StageContext, Any, dict[str, dict], Stats], Filter]]] = [
    ("format", lambda ctx, cfg, chars, stats: FormatFilter(cfg)),
    ("length", lambda ctx, cfg, chars, stats: LengthFilter(cfg)),
    ("language", lambda ctx, cfg, chars, stats: LanguageFilter(cfg)),
    ("meta_talk", lambda ctx, cfg, chars, stats: MetaTalkFilter(cfg)),
    ("out_of_role", lambda ctx, cfg, chars, stats: OutOfRoleFilter(cfg, chars)),
    ("degeneration", lambda ctx, cfg, chars, stats: DegenerationFilter(cfg)),
    ("other_character", lambda ctx, cfg, chars, stats: OtherCharacterFilter(cfg, chars)),
    ("first_person", lambda ctx, cfg, chars, stats: FirstPersonFilter(cfg)),
    ("refusal", lambda ctx, cfg, chars, stats: RefusalFilter(cfg)),
    ("relevance", lambda ctx, cfg, chars, stats: RelevanceFilter(cfg)),
    ("identity", lambda ctx, cfg, chars, stats: IdentityFilter(cfg, chars, seed=ctx.seed)),
    ("judge", lambda ctx, cfg, chars, stats: JudgeFilter(
        cfg, ctx.engine(judge_engine_config(cfg, ctx.config.engine)), stats, seed=ctx.seed)),
]


def build_chain(ctx: StageContext, characters: dict[str, dict], stats: Stats) -> list[Filter]:
    cfg = ctx.config.filter
    return [make(ctx, getattr(cfg, name), characters, stats) for name, make in CHAIN if getattr(cfg, name).enabled]


class FilterStage(Stage):
    name = "filter"
    output = Session
    inputs = {"responses": Turn, "characters": Character}

    def engine_configs(self, config: RunConfig) -> list[EngineConfig]:
        fc = config.filter
        return [judge_engine_config(fc.judge, config.engine)] if fc.enabled and fc.judge.enabled else []

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        fc = config.filter
        fp: dict[str, Any] = {"filter": fc.model_dump(mode="json", exclude={"dedup", "questions"}),
                              "sessions": config.sessions.model_dump(mode="json")}
        if fc.enabled and fc.judge.enabled:
            ecfg = judge_engine_config(fc.judge, config.engine)
            fp["judge"] = {"prompts": prompts.fingerprint("judge", ["en", "zh"]), "model": _model_id(ecfg),
                           "engine": ecfg.model_dump(mode="json"), "schema": SCHEMA}
        if fc.enabled and fc.identity.enabled:
            fp["identity_model"] = fc.identity.model
        if fc.enabled and fc.relevance.enabled:
            fp["relevance_model"] = fc.relevance.model
        return fp

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        t0 = time.perf_counter()
        turns = inputs.get("responses") or []
        characters = {character_row_id(c): c for c in inputs.get("characters") or []}
        out = ShardOutput(rows=[], stats=Stats(rows_in=len(turns)))
        stats = out.stats

        def reject(it: Item, d: Drop) -> None:
            ctx.reject(out, it.id, d.filter, d.reason, score=d.score, character_id=it.row.get("character_id", ""),
                       text=it.answer)

        alive: list[Item] = []
        for t in turns:
            it = Item(row=t, character=characters.get(t["character_id"]), answer=t.get("answer") or "")
            if it.character is None:
                reject(it, Drop("unknown_character", f"no character row {t['character_id']!r} in this shard"))
            else:
                alive.append(it)
        timings: dict[str, float] = {}
        if ctx.config.filter.enabled:
            for f in build_chain(ctx, characters, stats):
                if not alive:
                    break
                t1 = time.perf_counter()
                verdicts = f.apply(alive)
                timings[f.name] = round(time.perf_counter() - t1, 4)
                nxt = []
                for it, d in zip(alive, verdicts, strict=True):
                    if d is None:
                        nxt.append(it)
                    else:
                        reject(it, d)
                alive = nxt
                if isinstance(f, JudgeFilter):
                    stats.extra["judge_errors"] = f.errors
        sessions, dropped_sessions = self.sessions(ctx, characters, alive, out)
        out.rows = sessions
        stats.rows_out = sum(len(s.turns) for s in sessions)
        stats.extra["sessions"] = len(sessions)
        stats.extra["sessions_dropped"] = dropped_sessions
        stats.extra["filter_seconds"] = timings
        stats.seconds = time.perf_counter() - t0
        return out

    @staticmethod
    def sessions(ctx: StageContext, characters: dict[str, dict], kept: list[Item],
                 out: ShardOutput) -> tuple[list[Session], int]:
        rows = [{**it.row, "answer": it.answer} for it in kept]
        sessions, _ = assemble_sessions(characters, rows, ctx.config.sessions, {it.id: it.scores for it in kept})
        by_character: dict[str, list[tuple[str, str]]] = {}
        for it in kept:
            by_character.setdefault(it.row["character_id"], []).append((it.id, it.answer))
        return sessions, sum(reject_short_session(ctx, out, cid, turns) for cid, turns in by_character.items())


def turn_passes(scores: dict[str, float], language: str, cfg: FilterConfig) -> str | None:
    """Re-apply the score-based thresholds of `cfg` to stored scores: the filter that would now drop the
    turn, or None. Only tightening is exact: turns dropped earlier are in the rejects, not in sessions."""
    if not cfg.enabled:
        return None
    if cfg.length.enabled and "tokens" in scores:
        b = cfg.length.bounds.get(language, cfg.length.default)
        if not b.min <= scores["tokens"] <= b.max:
            return "length"
    if cfg.language.enabled and "lang" in scores and scores["lang"] < cfg.language.min_confidence:
        return "language"
    if cfg.degeneration.enabled and scores.get("repeat", 0.0) > cfg.degeneration.max_repeated_share:
        return "degeneration"
    if (cfg.relevance.enabled and "relevance" in scores and language in cfg.relevance.min_similarity
            and scores["relevance"] < cfg.relevance.min_similarity[language]):
        return "relevance"
    if cfg.identity.enabled and "identity_margin" in scores and scores["identity_margin"] <= cfg.identity.min_margin:
        return "identity"
    if cfg.judge.enabled:
        if "judge" in scores and scores["judge"] < cfg.judge.min_score:
            return "judge"
        if scores.get("judge_error") and cfg.judge.on_error == "drop":
            return "judge_error"
    return None


def rethreshold(sessions: list[dict | Session], cfg: FilterConfig, min_turns: int = 1
                ) -> tuple[list[Session], Counter]:
    """Sessions with only the turns whose stored scores pass `cfg`'s thresholds; sessions left with fewer
    than min_turns turns are dropped. Returns (sessions, dropped turn counts per filter)."""
    dropped: Counter = Counter()
    out = []
    for s in sessions:
        s = s if isinstance(s, Session) else Session.model_validate(s)
        keep = []
        for t in s.turns:
            why = turn_passes(t.scores, s.language, cfg)
            if why is None:
                keep.append(t)
            else:
                dropped[why] += 1
        if len(keep) < min_turns:
            if keep:
                dropped["min_turns"] += len(keep)
            continue
        out.append(s.model_copy(update={"turns": keep, "parents": [t.turn_id for t in keep]}))
    return out, dropped
