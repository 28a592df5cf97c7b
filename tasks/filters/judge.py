"""The LLM judge: one request per turn, guided JSON {"score": 1-10, "reason": str}; unparseable output is
re-asked at once, per request, up to `rounds` attempts (tasks/generation.py), then counts as judge_error
(kept or dropped by config). The prompt templates are tasks/prompts/judge.<lang>.txt (with the expected
behaviour per turn kind, `[part expectation.<kind>]`); `parse` is their parser."""

from __future__ import annotations

import json
import re
from typing import Any

from engines.base import Sampling
from models.config.engine import EngineConfig
from models.config.filter import JudgeConfig
from tasks import prompts
from tasks.base import Stats
from tasks.filters import Drop, Filter, Item
from tasks.generation import generate_parsed

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10}, "reason": {"type": "string"}},
    "required": ["score", "reason"],
    "additionalProperties": False,
}
_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


def parse(text: str) -> tuple[int, str] | None:
    """(score, reason) from the judge's output, or None when it is not a valid verdict."""
    if not text:
        return None
    for cand in [text.strip()] + _OBJECT.findall(text):
        cand = re.sub(r"^```(?:json)?\s*|\s*```$", "", cand.strip())
        try:
            obj = json.loads(cand)
        except (json.JSONDecodeError, ValueError):
            continue
        if not isinstance(obj, dict) or "score" not in obj:
            continue
        score = obj["score"]
        if isinstance(score, str) and score.strip().isdigit():
            score = int(score.strip())
        if isinstance(score, float) and score.is_integer():
            score = int(score)
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 10:
            continue
        return score, str(obj.get("reason", ""))[:500]
    return None


def build_messages(item: Item, cfg: JudgeConfig) -> list[dict[str, str]]:
    c = item.character or {}
    lang = "zh" if item.language == "zh" else "en"
    profile = (c.get("summary") or c.get("article") or "")[:cfg.profile_chars]
    tpl = prompts.load("judge", lang)
    return tpl.messages(
        label=c.get("label", ""), description=c.get("description", ""),
        profile=prompts.fence_safe(profile), question=item.row.get("question", ""),
        expectation=tpl.part(f"expectation.{item.row.get('kind', 'role_specific')}"),
        answer=item.answer.replace("ANSWER>>>", "ANSWER>>"))


def judge_engine_config(cfg: JudgeConfig, run_engine: EngineConfig) -> EngineConfig:
    return cfg.engine or run_engine


class JudgeFilter(Filter):
    name = "judge"

    def __init__(self, cfg: JudgeConfig, engine: Any, stats: Stats, seed: int = 0):
        self.cfg = cfg
        self.engine = engine
        self.stats = stats
        self.seed = seed
        self.errors = 0

    def apply(self, items: list[Item]) -> list[Drop | None]:
        out: list[Drop | None] = [None] * len(items)
        chats = [build_messages(it, self.cfg) for it in items]
        sp = Sampling(temperature=self.cfg.temperature, max_tokens=self.cfg.max_tokens, json_schema=SCHEMA)
        # attempt r samples with seed base + r - 1: a re-asked verdict is a fresh draw on seeded engines
        outcomes = generate_parsed(
            self.engine, chats, sp, lambda g: parse(g.text), rounds=self.cfg.rounds, stats=self.stats,
            vary=lambda s, a: s.model_copy(update={"attempt": a, "seed": self.seed + a - 1}))
        for i, res in enumerate(outcomes):
            if res.ok:
                score, reason = res.value
                items[i].scores["judge"] = float(score)
                if score < self.cfg.min_score:
                    out[i] = Drop("judge", f"score {score} < {self.cfg.min_score}: {reason}", float(score))
                continue
            self.errors += 1
            items[i].scores["judge_error"] = 1.0
            if self.cfg.on_error == "drop":
                out[i] = Drop("judge_error", f"no valid verdict in {self.cfg.rounds} rounds; last output: "
                                             f"{res.last.text[:200]!r}")
        return out
