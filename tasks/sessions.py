"""Sessions: one multi-turn role-play session per character and language. The system prompt is only a
brief introduction ("You are {label}, {description}."), never the profile."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from models.config.generation import SessionsConfig
from models.ids import row_id
from models.records import Session, SessionTurn

if TYPE_CHECKING:
    from tasks.base import ShardOutput, StageContext


def system_prompt(character: dict, cfg: SessionsConfig) -> str:
    template = cfg.system_template_zh if character.get("language") == "zh" else cfg.system_template
    description = (character.get("description") or "").strip().rstrip(".。")
    text = template.format(label=character["label"], description=description or "a character")
    return text.replace(", .", ".").replace("，。", "。")


def assemble_sessions(characters: dict[str, dict], turns: Iterable[dict], cfg: SessionsConfig,
                      scores: dict[str, dict[str, float]] | None = None) -> tuple[list[Session], list[str]]:
    """Group kept turns by character (row id `QID@lang`), in query order. Returns the sessions and the
    character ids whose sessions were left with fewer than `min_turns` turns."""
    by_char: dict[str, list[dict]] = {}
    for t in turns:
        by_char.setdefault(t["character_id"], []).append(t)
    sessions, too_short = [], []
    for cid, ts in sorted(by_char.items()):
        ch = characters.get(cid)
        if ch is None:
            continue
        if len(ts) < cfg.min_turns:
            too_short.append(cid)
            continue
        ts = sorted(ts, key=lambda t: t["query_id"])
        sessions.append(Session(
            id=row_id("session", cid), character_id=cid, label=ch["label"], language=ch["language"],
            category=ch["category"], system=system_prompt(ch, cfg),
            turns=[SessionTurn(turn_id=t["id"], query_id=t["query_id"], kind=t["kind"], question=t["question"],
                               answer=t["answer"], scores=(scores or {}).get(t["id"], {})) for t in ts],
            parents=[t["id"] for t in ts]))
    return sessions, too_short


def reject_short_session(ctx: StageContext, out: ShardOutput, character_id: str, turns: list[tuple[str, str]],
                         after: str = "") -> bool:
    """The `sessions.min_turns` rule, one place for the filter and dedup stages: a session left with fewer
    kept turns is dropped, each of its turns (turn id, answer) rejected as 'min_turns'. True if dropped."""
    n, need = len(turns), ctx.config.sessions.min_turns
    if n >= need:
        return False
    when = f" after {after}" if after else ""
    for turn_id, text in turns:
        ctx.reject(out, turn_id, "min_turns", f"session of {character_id} kept {n} turn(s){when} < min_turns {need}; "
                   f"the session is dropped", score=float(n), character_id=character_id, text=text)
    return True
