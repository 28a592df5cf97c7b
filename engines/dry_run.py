"""The dry-run engine (`engine.kind: dry_run`; `ditto run --dry-run` puts it behind every engine): the whole DAG
at zero cost. No model behind it: each answer is plausible-shaped text derived from a hash of the prompt
(English or Chinese after the prompt's language), and with a JSON schema a minimal instance of that schema
(questions for the query stage, scores for the judge), so every stage runs its real parsing, filters, dedup
and SFT rendering on rows of the real shapes. Deterministic: the same prompt and engine seed give the same
text. Its `submit` completes synchronously (the base class runs `_generate` on the one request). The
orchestration benchmarks and the tests' fake engine build on it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from engines.base import Engine, Generation, Message, Sampling
from models.ids import content_hash

WORDS = ("river mountain letter winter garden voyage theory music battle harbour lantern empire treaty "
         "journal comet forest castle engine poem market desert island council vessel orchard bridge "
         "telescope manuscript festival storm archive meadow citadel workshop frontier chronicle").split()
ZH = "山河书信冬园航行理论音乐战役港口灯笼帝国条约日记彗星森林城堡引擎诗歌市场沙漠岛屿议会船只果园桥梁"


def _stream(seed: str):
    i = 0
    while True:
        yield from hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1


def _is_zh(text: str) -> bool:
    return any("\u4e00" <= ch <= "\u9fff" for ch in text[:400])


def _words(rnd, n: int, zh: bool) -> str:
    if zh:
        return "".join(ZH[next(rnd) % len(ZH)] for _ in range(n))
    return " ".join(WORDS[next(rnd) % len(WORDS)] for _ in range(n))


def instance(schema: dict[str, Any], rnd, zh: bool) -> Any:
    """A small value valid for the schema (the subset the project's prompts use)."""
    t = schema.get("type")
    if "enum" in schema:
        return schema["enum"][next(rnd) % len(schema["enum"])]
    if t == "object":
        props = schema.get("properties", {})
        return {k: instance(v, rnd, zh) for k, v in props.items() if k in schema.get("required", list(props))}
    if t == "array":
        lo, hi = schema.get("minItems", 1), schema.get("maxItems", max(3, schema.get("minItems", 1)))
        return [instance(schema.get("items", {"type": "string"}), rnd, zh) for _ in range(min(hi, max(lo, 3)))]
    if t == "integer":
        lo, hi = schema.get("minimum", 1), schema.get("maximum", 10)
        return lo + next(rnd) % (hi - lo + 1)
    if t == "number":
        return float(schema.get("minimum", 0.5))
    if t == "boolean":
        return bool(next(rnd) % 2)
    text = ("关于" + _words(rnd, 4, True) + "，你还记得什么？") if zh else \
        f"What do you remember about the {_words(rnd, 3, False)}?"
    return text[: schema.get("maxLength", 300)]


class DryRunEngine(Engine):
    kind = "dry_run"
    in_process = False  # nothing to batch
    has_model = False

    @property
    def model_id(self) -> str:
        return f"{self.kind}@" + content_hash(self.config.options, 8)

    def _one(self, chat: list[Message], sp: Sampling) -> str:
        rnd = _stream(content_hash([chat, self.config.seed], 16))
        zh = _is_zh(chat[-1]["content"]) or _is_zh(chat[0]["content"])
        if sp.json_schema is not None:
            return json.dumps(instance(sp.json_schema, rnd, zh), ensure_ascii=False)
        if zh:
            return f"我记得{_words(rnd, 6, True)}。那段日子里，{_words(rnd, 8, True)}，至今难忘。"
        return (f"I remember the {_words(rnd, 2, False)} well. In those days the {_words(rnd, 3, False)} "
                f"shaped my life, and the {_words(rnd, 3, False)} still stays with me.")

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        out = []
        for chat, sp in zip(chats, sampling, strict=True):
            text = self._one(chat, sp)
            out.append(Generation(text=text, prompt_tokens=sum(len(m["content"]) for m in chat) // 4,
                                  completion_tokens=max(1, len(text) // 4), finish_reason="stop",
                                  model=self.model_id))
        return out
