"""Question validation in the queries stage (tasks/filters/questions.py): each rule on English and Chinese
cases, kept and dropped, the parser hook, and the stage dropping invalid questions with their reason, re-
sampling a call with none left and then rejecting it."""

from __future__ import annotations

import json

import pytest

from models.config import load_config
from tasks.base import StageContext
from tasks.filters.questions import reason_code, validate_question
from tasks.queries import ParseError, QueriesStage, parse_questions
from tests.plugins.core import make_characters

A, B = "Amy Kadish", "Napoleon"
PROMPT = ("Character A: Amy Kadish, American actress\nProfile of A:\n<<<PROFILE\nAmy Kadish is an American actress "
          "known for her roles in film and television.\nPROFILE>>>\nWrite 3 casual questions addressed to A in the "
          "second person.")


def check(q: str, lang: str = "en", **kw) -> str | None:
    why = validate_question(q, lang, a_label=kw.pop("a", A if lang == "en" else "李白"),
                            b_label=kw.pop("b", B if lang == "en" else "牛顿"), prompt_text=kw.pop("prompt", PROMPT),
                            **kw)
    return reason_code(why) if why else None


@pytest.mark.parametrize("q,code", [
    # the defects a 135M generator wrote into kept turns of the demo
    ("Amy Kadish,", "bare_name"),
    ("1578920464", "number"),
    (", Question:", "label_echo"),
    ("The first part", "not_a_question"),
    ("A should ask you about me.", "label_echo"),
    ("Write 3 casual questions addressed to A...", "label_echo"),
    ("Give each a short reason.", "prompt_echo"),
    ("Answer with JSON only, in this form", "prompt_echo"),
    ("You are a careful writer of role-play interview questions?", "prompt_echo"),
    ("Amy Kadish is an American actress known for her roles in film and television.", "prompt_echo"),
    ("Question: What is your favourite film?", "label_echo"),
    ("What do you think of Character B?", "label_echo"),
    ("Did you ever meet B at a party?", "label_echo"),
    ('{"question": "..."}', "prompt_echo"),
    ("...", "too_short"),
    ("How did Amy Kadish start acting?", "not_second_person"),
    ("Your favourite roles and the films you made in the nineties.", "not_a_question"),
    ("你最喜欢哪部电影？", "wrong_language"),
    ("you you you you you you you", "degenerate"),
    (" ".join(["Why do you"] * 25) + "?", "too_long"),
])
def test_invalid_english_questions(q, code):
    assert check(q) == code


@pytest.mark.parametrize("q", [
    "What was it like to act in your first film?",
    "Tell me about your first role on stage.",
    "Have you ever been to Paris?",
    "A day in your life: what does it look like?",
    "Describe the moment you knew you wanted to act.",
    "If you could play any role again, which would it be?",
])
def test_valid_english_questions(q):
    assert check(q) is None


@pytest.mark.parametrize("q,code", [
    ("李白", "bare_name"),
    ("12345", "number"),
    ("问题：你喜欢喝酒吗？", "label_echo"),
    ("A的资料里说你喜欢喝酒吗？", "label_echo"),
    ("角色B会写诗吗？", "label_echo"),
    ("你好", "too_short"),
    ("李白最喜欢什么酒？", "not_second_person"),
    ("你的诗歌和你的酒。", "not_a_question"),
    ("What is your favourite poem?", "wrong_language"),
    ("只用JSON回答，格式如下", "prompt_echo"),
    ("你是一名严谨的角色扮演访谈问题设计者吗？", "prompt_echo"),
])
def test_invalid_chinese_questions(q, code):
    assert check(q, "zh") == code


@pytest.mark.parametrize("q", ["你最喜欢哪首诗？", "请谈谈你的诗歌创作。", "您当年为什么离开长安？", "说说你和杜甫的交情吧。"])
def test_valid_chinese_questions(q):
    assert check(q, "zh") is None


@pytest.mark.parametrize("lang,first,again", [
    ("en", "What is your favourite film?", "what is your favourite film"),
    ("en", "What did you eat before your first premiere?", "What did you eat before your first big premiere?"),
    ("zh", "你最喜欢哪首诗？", "你最喜欢哪首诗"),
])
def test_duplicates_within_a_call(lang, first, again):
    assert check(again, lang, earlier=[first]) == "duplicate"
    assert check(again, lang, earlier=[]) is None


def test_parse_questions_hook_drops_with_reasons_and_fails_when_none_is_left():
    def validate(q, kept):
        return validate_question(q, "en", a_label=A, b_label=B, prompt_text=PROMPT, earlier=kept)

    text = json.dumps([{"question": "Amy Kadish,", "reason": ""},
                       {"question": "What was your first film like for you?", "reason": "career"},
                       {"question": "What was your first film like for you?", "reason": "again"},
                       {"question": "1578920464", "reason": ""}])
    dropped: list = []
    qs = parse_questions(text, 3, validate=validate, dropped=dropped)
    assert [q["question"] for q in qs] == ["What was your first film like for you?"]
    assert [reason_code(r) for _, r in dropped] == ["bare_name", "duplicate", "number"]
    with pytest.raises(ParseError, match="no usable question.*label_echo.*not_a_question"):
        parse_questions(json.dumps([", Question:", "The first part"]), 3, validate=validate)
    # without a validator the parser behaves as before
    assert len(parse_questions(text, 3)) == 3


def _ctx(overrides):
    return StageContext(run_id="t", stage="queries", shard=0, num_shards=1, config=load_config(overrides=overrides),
                        home=None)


GOOD = json.dumps([{"question": "What did you see on your voyage to the Galapagos?", "reason": "travels"},
                   {"question": "Sherlock Holmes,", "reason": ""}])
BAD = json.dumps([{"question": ", Question:", "reason": ""}, {"question": "1578920464", "reason": ""}])


def test_stage_drops_invalid_questions_resamples_then_rejects(scripted_engine):
    chars = make_characters(2)
    ov = ["engine.kind=listed", "queries.pairings=1", "queries.rounds=2"]
    out = QueriesStage().run(_ctx([*ov, "engine.options=" + json.dumps({"outputs": [BAD, GOOD, GOOD]})]),
                             {"characters": chars})
    # one call gets BAD (no valid question: re-sampled, then GOOD), the other GOOD; each GOOD drops its bare name
    assert out.stats.format_failures == 1
    assert {q.question for q in out.rows} == {"What did you see on your voyage to the Galapagos?"}
    assert out.stats.dropped == {"question.bare_name": 2}
    assert all(r.filter == "question.bare_name" and r.text == "Sherlock Holmes," for r in out.rejects)
    out = QueriesStage().run(_ctx([*ov, "engine.options=" + json.dumps({"outputs": [BAD]})]), {"characters": chars})
    assert not out.rows and out.stats.dropped["format"] == 2
    fmt = [r for r in out.rejects if r.filter == "format"]
    assert len(fmt) == 2 and all("label_echo" in r.reason and "number" in r.reason for r in fmt)
    assert out.stats.dropped["question.label_echo"] == out.stats.dropped["question.number"] == 2
    off = QueriesStage().run(_ctx([*ov, "filter.questions.enabled=false",
                                   "engine.options=" + json.dumps({"outputs": [GOOD]})]), {"characters": chars})
    assert {q.question for q in off.rows} == {"What did you see on your voyage to the Galapagos?", "Sherlock Holmes,"}


def test_question_config_enters_the_queries_key_not_the_filter_key():
    from tasks.filter import FilterStage

    base, other = load_config(), load_config(overrides=["filter.questions.min_words=6"])
    assert QueriesStage().fingerprint(base) != QueriesStage().fingerprint(other)
    assert FilterStage().fingerprint(base) == FilterStage().fingerprint(other)


@pytest.mark.parametrize("q,lang", [
    # what the bundled 135M generator wrote for the questions of a real run
    ("What do you know about...?", "en"),
    ("How do you feel about the above profile?", "en"),
    ("What does the user want to know?", "en"),
    ("What do you think about the following characters?", "en"),
    ("Is there anything else you would like to know about the topic?", "en"),
    ("The last day of [insert time].", "en"),
    ("who am i?", "en"),
    ("根据资料，你出生在哪里？", "zh"),
    ("你还想了解什么？", "zh"),
])
def test_questions_about_the_task_are_dropped(q, lang):
    assert check(q, lang) in ("meta", "prompt_echo")
