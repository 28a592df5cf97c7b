"""Shared fixtures for the filter stage: hand-written characters (en, zh), a turn factory, a stage runner
and a scripted judge engine whose output is written by the test."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from engines.base import ENGINES, Engine, Generation, Message, Sampling, register_engine
from models.config import load_config
from models.ids import row_id
from tasks.base import StageContext

CHARACTERS = [
    {"id": "Q517", "label": "Napoleon", "description": "French military commander and Emperor of the French",
     "aliases": ["Napoleon Bonaparte"], "category": "real", "language": "en", "source": "jsonl",
     "summary": "Napoleon Bonaparte was a French military commander who rose to prominence during the French "
                "Revolution, crowned himself Emperor in 1804 and was defeated at Waterloo in 1815."},
    {"id": "Q4653", "label": "Sherlock Holmes", "description": "fictional detective created by Arthur Conan Doyle",
     "aliases": ["Holmes"], "category": "fictional", "language": "en", "source": "jsonl",
     "summary": "Sherlock Holmes is a consulting detective living at 221B Baker Street in London, known for "
                "deduction, violin playing and his friend Dr Watson."},
    {"id": "Q937", "label": "Albert Einstein", "description": "German-born theoretical physicist",
     "aliases": ["Einstein"], "category": "real", "language": "en", "source": "jsonl",
     "summary": "Albert Einstein developed the theory of relativity and received the Nobel Prize in Physics "
                "in 1921 for the photoelectric effect."},
    {"id": "Q11", "label": "Alice", "description": "protagonist of Lewis Carroll's Alice's Adventures in Wonderland",
     "aliases": [], "category": "fictional", "language": "en", "source": "jsonl",
     "summary": "Alice is a curious girl who falls down a rabbit hole into Wonderland, meets the White Rabbit, "
                "the Cheshire Cat and the Queen of Hearts."},
    {"id": "Q7071", "label": "李白", "description": "唐代著名浪漫主义诗人，被誉为诗仙", "aliases": ["李太白"],
     "category": "real", "language": "zh", "source": "jsonl",
     "summary": "李白，字太白，号青莲居士，唐代诗人，好饮酒，作有《静夜思》《将进酒》等名篇。"},
    {"id": "Q935", "label": "牛顿", "description": "英国物理学家、数学家", "aliases": ["艾萨克·牛顿"],
     "category": "real", "language": "zh", "source": "jsonl",
     "summary": "艾萨克·牛顿提出了万有引力定律和三大运动定律，发明了微积分，著有《自然哲学的数学原理》。"},
    {"id": "Q1107", "label": "孙悟空", "description": "《西游记》中的主要角色，齐天大圣", "aliases": ["美猴王"],
     "category": "fictional", "language": "zh", "source": "jsonl",
     "summary": "孙悟空是花果山的石猴，拜菩提祖师学得七十二变和筋斗云，大闹天宫，后保护唐僧西天取经。"},
    {"id": "Q1200", "label": "林黛玉", "description": "《红楼梦》中的女主角之一", "aliases": ["林妹妹"],
     "category": "fictional", "language": "zh", "source": "jsonl",
     "summary": "林黛玉是《红楼梦》的女主角之一，寄居贾府，才情出众，多愁善感，与贾宝玉相知相爱。"},
]

GOOD = {
    "Q517@en": "I led my armies across Europe, and at Austerlitz my soldiers won the greatest victory of my "
               "career as Emperor of the French.",
    "Q4653@en": "I deduced from the mud on his boots and the ink on his cuff that he had come straight from the "
                "docks; Watson was astonished, as usual.",
    "Q937@en": "I spent years thinking about light and gravity; the theory of relativity changed how I saw "
               "space and time, and the Nobel Prize came for the photoelectric effect.",
    "Q11@en": "I followed the White Rabbit down the rabbit hole, and the Cheshire Cat grinned at me while the "
              "Queen of Hearts shouted for heads.",
    "Q7071@zh": "我一生好饮酒，举杯邀明月，写下了《将进酒》，诗酒相伴便是我最大的快乐。",
    "Q935@zh": "我从苹果落地想到了万有引力，又写成了《自然哲学的数学原理》，用数学描述运动的规律。",
    "Q1107@zh": "俺老孙在花果山学会了七十二变，一个筋斗云十万八千里，后来保护师父西天取经。",
    "Q1200@zh": "我寄居在外祖母家里，常常葬花伤春，宝玉哥哥是最懂我心思的人。",
}
REFUSALS = {
    "en": "I have never heard of such a thing; it lies beyond my time, and I cannot say anything about it.",
    "zh": "我从未听说过这种东西，那已超出了我所在的时代，恕我无法回答。",
}


def make_turn(character_id: str, answer: str, *, kind: str = "role_specific", n: int = 0,
              question: str = "What do you remember?", finish_reason: str = "stop",
              language: str | None = None) -> dict[str, Any]:
    lang = language or character_id.split("@")[1]
    qid = row_id("query", character_id, kind, n, question)
    return {"id": row_id("turn", qid, answer), "query_id": qid, "character_id": character_id, "language": lang,
            "kind": kind, "question": question, "answer": answer, "profile_truncated": False,
            "parents": [qid], "gen": {"prompt": "[]", "raw_output": answer, "prompt_tokens": 10,
                                      "completion_tokens": 10, "finish_reason": finish_reason, "model": "m",
                                      "seed": 0, "rounds": 1}}


def filter_config(**filter_overrides: Any):
    """A run config with the fake engine; the judge and the embedding checks (identity, relevance) off
    unless asked for."""
    filt: dict[str, Any] = {"judge": {"enabled": False}, "identity": {"enabled": False},
                            "relevance": {"enabled": False}}
    for k, v in filter_overrides.items():
        filt[k] = {**filt.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(data={"engine": {"kind": "fake", "model": "fake"}, "filter": filt})


def stage_context(cfg, home: Path, shard: int = 0, extra: dict | None = None) -> StageContext:
    return StageContext(run_id="r1", stage="filter", shard=shard, num_shards=4, config=cfg, home=home,
                        extra=extra or {})


class ScriptedJudge(Engine):
    """Judge output written by the test: options {"scores": {answer substring: score}, "default": 8,
    "garbage_rounds": n, "garbage": text}. Round r of the judge samples with seed base + r, so 'the first n
    rounds are unparseable' needs no state."""

    kind = "scripted_judge"
    in_process = False

    def load(self) -> None:
        self.calls = 0

    def _generate(self, chats: list[list[Message]], sampling: list[Sampling]) -> list[Generation]:
        self.calls += 1
        opts = self.config.options
        out = []
        for chat, sp in zip(chats, sampling, strict=True):
            user = chat[-1]["content"]
            answer = re.search(r"<<<ANSWER\n(.*)\nANSWER>>>", user, re.S).group(1)
            if (sp.seed or 0) < int(opts.get("garbage_rounds", 0)):
                text = opts.get("garbage", "Sure! The score is: great")
            else:
                score = next((s for k, s in opts.get("scores", {}).items() if k in answer), opts.get("default", 8))
                text = json.dumps({"score": score, "reason": "scripted"})
            out.append(Generation(text=text, prompt_tokens=len(user) // 4, completion_tokens=len(text) // 4,
                                  model="scripted"))
        return out


@pytest.fixture
def characters() -> list[dict]:
    return [dict(c) for c in CHARACTERS]


@pytest.fixture
def scripted_judge():
    if "scripted_judge" not in ENGINES:
        register_engine("scripted_judge", "tests.plugins.filters:ScriptedJudge")
    yield "scripted_judge"
