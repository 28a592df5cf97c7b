"""A deterministic zero-cost engine for logic tests and orchestration benchmarks. Not a product engine:
it writes plausible-shaped text derived from a hash of the prompt, with no model behind it."""

from __future__ import annotations

import json
import os

from engines.base import Engine, EngineError, Generation, Message, Sampling, TransientEngineError
from models.ids import content_hash


class FakeEngine(Engine):
    kind = "fake"
    in_process = False  # nothing to batch

    def load(self) -> None:
        self.calls = 0

    @property
    def model_id(self) -> str:
        return "fake@" + content_hash(self.config.options, 8)

    def _one(self, chat: list[Message], sp: Sampling) -> str:
        h = content_hash([chat, self.config.seed], 8)
        user = chat[-1]["content"]
        if sp.json_schema is not None:
            n = int(self.config.options.get("questions", 3))
            zh = any("\u4e00" <= ch <= "\u9fff" for ch in user[:400])
            q = ("你还记得{i}号那天发生了什么吗？" if zh else "What do you remember about day {i} of your life ({h})?")
            return json.dumps([{"question": q.format(i=i, h=h), "reason": f"reason {i}"} for i in range(n)],
                              ensure_ascii=False)
        if any("\u4e00" <= ch <= "\u9fff" for ch in user[:400]):
            return f"我记得很清楚，那是一段难忘的日子。{h}"
        return f"I remember it well; those were remarkable days for me, and I think of them often. ({h})"

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        self.calls += 1
        opts = self.config.options
        fail_on, switch = opts.get("fail_on"), opts.get("fail_while_exists")
        if fail_on and (switch is None or os.path.exists(switch)) and any(
                fail_on in m["content"] for chat in chats for m in chat):
            raise EngineError(f"fake engine: permanent failure on a prompt containing {fail_on!r}")
        if self.calls <= int(opts.get("transient_failures", 0)):
            raise TransientEngineError(f"fake engine: transient failure {self.calls}")
        out = []
        for chat, sp in zip(chats, sampling, strict=True):
            text = self._one(chat, sp)
            out.append(Generation(text=text, prompt_tokens=sum(len(m["content"]) for m in chat) // 4,
                                  completion_tokens=max(1, len(text) // 4), finish_reason="stop",
                                  model=self.model_id))
        return out
