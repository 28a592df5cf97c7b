"""Stage `responses`: the paper's T_R. The full profile is in the prompt (reading comprehension); the
character answers in role, refusing in role when a (contrastive) question lies outside its identity.
Each turn is one request, all submitted at once (tasks/generation.py), so the engine never waits for a
shard's slowest answer before taking more work. Long profiles are cut to `max_profile_tokens`, flagged.
The prompt (tasks/prompts/responses.<lang>.txt) holds the alias and no-claims fragments too."""

from __future__ import annotations

import re
from typing import Any

from models.config import RunConfig
from models.config.engine import EngineConfig
from models.ids import row_id
from models.records import Character, Query, Turn, character_row_id
from tasks import prompts
from tasks.base import ShardOutput, Stage, StageContext
from tasks.generation import generate_parsed, generation_meta, sampling_from
from tasks.profile import profile_text


def clean_answer(text: str, label: str) -> str:
    """Strip a leading speaker tag ("Alice:" / "**Alice**:") and surrounding whitespace."""
    text = text.strip()
    text = re.sub(rf"^\**{re.escape(label)}\**\s*[:：]\s*", "", text)
    return text.strip()


def build_messages(character: dict, question: str, max_profile_tokens: int) -> tuple[list[dict[str, str]], bool]:
    tpl = prompts.load("responses", character["language"])
    profile, truncated = profile_text(character, max_profile_tokens)
    aliases = [a for a in (character.get("aliases") or []) if a][:5]
    claims = (character.get("claims") or "").strip() or tpl.part("no_claims")
    msgs = tpl.messages(label=character["label"], description=(character.get("description") or "").rstrip(".。"),
                        aliases=tpl.part("aliases").format(names=", ".join(aliases)) if aliases else "",
                        claims=prompts.fence_safe(claims[:1500]), profile=prompts.fence_safe(profile),
                        question=question)
    return msgs, truncated


class ResponsesStage(Stage):
    name = "responses"
    output = Turn
    inputs = {"queries": Query, "characters": Character}

    def engine_configs(self, config: RunConfig) -> list[EngineConfig]:
        return [config.engine]

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        return {"responses": config.responses.model_dump(mode="json"),
                "prompts": prompts.fingerprint("responses", config.characters.languages),
                "engine": config.engine.model_dump(mode="json", include={"kind", "model", "revision", "seed"})}

    def run(self, ctx: StageContext, inputs: dict[str, list[dict]]) -> ShardOutput:
        cfg = ctx.config.responses
        chars = {character_row_id(c): c for c in inputs["characters"]}
        out = ShardOutput(rows=[])
        queries = inputs["queries"]
        out.stats.rows_in = len(queries)
        jobs = []
        for q in queries:
            ch = chars.get(q["character_id"])
            if ch is None:
                ctx.reject(out, q["id"], "lineage", f"character {q['character_id']} not in this shard",
                           character_id=q["character_id"], text=q["question"])
                continue
            msgs, truncated = build_messages(ch, q["question"], cfg.max_profile_tokens)
            jobs.append((q, ch, msgs, truncated))
        if not jobs:
            return out
        engine = ctx.engine()
        outcomes = generate_parsed(engine, [m for _, _, m, _ in jobs], sampling_from(cfg.sampling), lambda g: g,
                                   stats=out.stats)
        for (q, ch, msgs, truncated), res in zip(jobs, outcomes, strict=True):
            answer = clean_answer(res.last.text, ch["label"])
            out.rows.append(Turn(
                id=row_id("turn", q["id"]), query_id=q["id"], character_id=q["character_id"],
                language=q["language"], kind=q["kind"], question=q["question"], answer=answer,
                profile_truncated=truncated, parents=[q["id"], q["character_id"]],
                gen=generation_meta(msgs, res, engine, ctx.config.engine.seed)))
            if truncated:
                out.stats.extra["profiles_truncated"] = out.stats.extra.get("profiles_truncated", 0) + 1
        out.stats.rows_out = len(out.rows)
        return out
