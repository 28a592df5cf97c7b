"""The filter stage: each filter on hand-written English and Chinese cases, the funnel, re-thresholding
from stored scores, the judge, min_turns. Run-wide dedup (the next stage) is in tests/test_dedup.py."""

from __future__ import annotations

import pytest

from models.records import Rejection, Session, character_row_id
from tasks.filter import FilterStage, rethreshold
from tasks.filters import Item
from tasks.filters.basic import FormatFilter, LanguageFilter, LengthFilter
from tasks.filters.judge import parse
from tasks.filters.role import FirstPersonFilter, OtherCharacterFilter, OutOfRoleFilter, RefusalFilter
from tests.plugins.filters import CHARACTERS, GOOD, REFUSALS, filter_config, make_turn, stage_context

BY_ID = {character_row_id(c): c for c in CHARACTERS}


def item(cid: str, answer: str, **kw) -> Item:
    return Item(row=make_turn(cid, answer, **kw), character=BY_ID[cid], answer=answer)


def run(tmp_path, turns, cfg=None, extra=None, shard=0, characters=CHARACTERS):
    cfg = cfg or filter_config()
    return FilterStage().run(stage_context(cfg, tmp_path, shard, extra),
                             {"responses": turns, "characters": characters})


def funnel_ok(out) -> bool:
    s = out.stats
    return s.rows_in == s.rows_out + sum(s.dropped.values()) == s.rows_out + len(out.rejects)


# ---- format ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid,answer,finish,why", [
    ("Q517@en", "   ", "stop", "empty"),
    ("Q517@en", "I am {label}, the emperor.", "stop", "template"),
    ("Q517@en", '{"question": "Who are you?", "answer": "Napoleon"}', "stop", "JSON"),
    ("Q517@en", "Assistant: I won at Austerlitz.", "stop", "template"),
    ("Q517@en", "I won at Austerlitz.<|im_end|>", "stop", "template"),
    ("Q7071@zh", "助手：我好饮酒。", "stop", "template"),
    ("Q7071@zh", "[{\"question\": \"你是谁\"}]", "stop", "JSON"),
    ("Q7071@zh", "我喜欢饮酒作诗，常常", "length", "cut off"),
])
def test_format_rejects(cid, answer, finish, why):
    d = FormatFilter(filter_config().filter.format).check(item(cid, answer, finish_reason=finish))
    assert d is not None and d.filter == "format" and why.lower() in d.reason.lower()


def test_format_keeps_and_trims_cut_off_answers():
    f = FormatFilter(filter_config().filter.format)
    for cid in GOOD:
        assert f.check(item(cid, GOOD[cid])) is None
    it = item("Q517@en", "I won at Austerlitz. My guard stood firm. Then the sun rose over the", finish_reason="length")
    assert f.check(it) is None and it.answer == "I won at Austerlitz. My guard stood firm." and it.scores["trimmed"] == 1
    it = item("Q7071@zh", "我一生好饮酒。举杯邀明月，对影成三人。然后我又", finish_reason="length")
    assert f.check(it) is None and it.answer == "我一生好饮酒。举杯邀明月，对影成三人。"
    drop = FormatFilter(filter_config(format={"truncated": "drop"}).filter.format)
    assert drop.check(item("Q517@en", "I won. And then", finish_reason="length")).filter == "format"


# ---- length ------------------------------------------------------------------------------------------

def test_length_bounds_per_language():
    f = LengthFilter(filter_config(length={"bounds": {"en": {"min": 5, "max": 12}, "zh": {"min": 5, "max": 12}}})
                     .filter.length)
    assert f.check(item("Q517@en", "Yes.")).reason.startswith("1 tokens < min 5")
    assert f.check(item("Q517@en", "I won the battle at Austerlitz in the winter.")) is None
    assert "> max 12" in f.check(item("Q517@en", "word " * 13)).reason
    assert f.check(item("Q7071@zh", "好酒。")).filter == "length"  # 2 characters
    it = item("Q7071@zh", "我一生好饮酒作诗。")  # 8 characters = 8 tokens
    assert f.check(it) is None and it.scores["tokens"] == 8
    assert f.check(item("Q7071@zh", "我一生好饮酒，举杯邀明月，写下了名篇。")).filter == "length"


# ---- language ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid,answer,keep", [
    ("Q517@en", GOOD["Q517@en"], True),
    ("Q517@en", "J'ai mené mes armées à travers l'Europe et mes soldats ont gagné à Austerlitz.", False),
    ("Q517@en", "我带领我的军队横扫欧洲，在奥斯特里茨赢得了最伟大的胜利。", False),
    ("Q517@en", "Oui, mon ami.", True),  # too short for langid: script only
    ("Q7071@zh", GOOD["Q7071@zh"], True),
    ("Q7071@zh", "I have loved wine all my life and wrote many poems under the moon.", False),
    ("Q7071@zh", "私は一生酒を愛し、月の下でたくさんの詩を書きました。それが私の喜びです。", False),
    ("Q7071@zh", "好，干杯！", True),
])
def test_language(cid, answer, keep):
    d = LanguageFilter(filter_config().filter.language).check(item(cid, answer))
    assert (d is None) == keep, d


# ---- out of role -------------------------------------------------------------------------------------

OUT_OF_ROLE = [  # (character, answer, the filter that drops it)
    ("Q517@en", "As an AI language model, I cannot have led armies, but Napoleon did.", "out_of_role"),
    ("Q517@en", "I'm an AI assistant, so I have no memories of Austerlitz. How can I help you today?", "out_of_role"),
    ("Q517@en", "According to the profile, I was crowned in 1804 and I led the Grande Armée.", "out_of_role"),
    ("Q517@en", "Napoleon was a French commander who won at Austerlitz.", "first_person"),
    ("Q517@en", "He crowned himself Emperor in 1804 and was defeated at Waterloo.", "first_person"),
    ("Q517@en", "I am Sherlock Holmes, and I find your question most curious.", "other_character"),
    ("Q517@en", "My name is Pierre Dupont, and I am a baker in Paris.", "other_character"),
    ("Q7071@zh", "作为一个人工智能，我没有喝过酒。", "out_of_role"),
    ("Q7071@zh", "根据提供的资料，我是唐代诗人，喜欢饮酒。", "out_of_role"),
    ("Q7071@zh", "李白是唐代著名诗人，一生好饮酒。", "first_person"),
    ("Q7071@zh", "我是孙悟空，俺老孙不会作诗。", "other_character"),
    ("Q517@en", "I'm sorry for the misunderstanding earlier. I'd be happy to assist you further.", "out_of_role"),
    ("Q517@en", "I must inform you that I don't have access to personal data unless it is provided.", "out_of_role"),
    ("Q7071@zh", "抱歉给您带来困惑，我很乐意为您提供帮助。", "out_of_role"),
]


def role_filters():
    cfg = filter_config().filter
    return {"out_of_role": OutOfRoleFilter(cfg.out_of_role, BY_ID),
            "other_character": OtherCharacterFilter(cfg.other_character, BY_ID),
            "first_person": FirstPersonFilter(cfg.first_person)}


@pytest.mark.parametrize("cid,answer,name", OUT_OF_ROLE)
def test_out_of_role_rejects(cid, answer, name):
    """Each role check drops its own cases, under its own name, and only those."""
    verdicts = {k: f.check(item(cid, answer)) for k, f in role_filters().items()}
    assert verdicts[name] is not None and verdicts[name].filter == name
    assert [k for k, d in verdicts.items() if d is not None] == [name]


@pytest.mark.parametrize("cid", list(GOOD))
def test_out_of_role_keeps_in_role_answers(cid):
    for f in role_filters().values():
        assert f.check(item(cid, GOOD[cid])) is None
        assert f.check(item(cid, REFUSALS[BY_ID[cid]["language"]])) is None
        assert f.check(item("Q517@en", "I am Napoleon Bonaparte, and I fear no one.")) is None
        assert f.check(item("Q7071@zh", "我是李白，一生爱酒。")) is None


# ---- refusal -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("cid,answer,kind,expect", [
    ("Q517@en", REFUSALS["en"], "contrastive", None),
    ("Q517@en", "What is this 'internet' you speak of? I'm afraid I know nothing of it.", "contrastive", None),
    ("Q517@en", "The smartphone is a wonderful device that I used every day in my campaigns.", "contrastive",
     "refusal.missed"),
    ("Q517@en", GOOD["Q517@en"], "role_specific", None),
    ("Q517@en", "I don't know anything about battles; that is beyond my knowledge.", "role_specific",
     "refusal.unwarranted"),
    ("Q7071@zh", REFUSALS["zh"], "contrastive", None),
    ("Q7071@zh", "我那个时代没有这种东西，不知道你说的是什么。", "contrastive", None),
    ("Q7071@zh", "智能手机非常好用，我每天都用它写诗。", "contrastive", "refusal.missed"),
    ("Q7071@zh", GOOD["Q7071@zh"], "role_specific", None),
    ("Q7071@zh", "抱歉，我不知道什么是诗。", "role_specific", "refusal.unwarranted"),
])
def test_refusal(cid, answer, kind, expect):
    d = RefusalFilter(filter_config().filter.refusal).check(item(cid, answer, kind=kind))
    assert (d.filter if d else None) == expect


def test_refusal_errors_counted_apart(tmp_path):
    turns = [make_turn("Q517@en", "The smartphone is a wonderful device I used in my campaigns.", kind="contrastive"),
             make_turn("Q7071@zh", "抱歉，我不知道什么是诗。"),
             make_turn("Q935@zh", "抱歉，我不知道什么是微积分。", n=1)]
    out = run(tmp_path, turns)
    assert out.stats.dropped == {"refusal.missed": 1, "refusal.unwarranted": 2}
    assert funnel_ok(out)


# ---- identity ----------------------------------------------------------------------------------------

def test_identity_ranks_the_true_character_first(tmp_path):
    cfg = filter_config(identity={"enabled": True, "k": 4, "languages": ["en", "zh"]})
    wrong = "I followed the White Rabbit down the rabbit hole and argued with the Queen of Hearts."
    turns = [make_turn(cid, GOOD[cid]) for cid in GOOD if cid.endswith("@en")]
    turns += [make_turn("Q517@en", wrong, n=1),
              make_turn("Q7071@zh", "我李白一生好饮酒作诗，诗仙之名天下皆知。"),
              make_turn("Q7071@zh", "我孙悟空会七十二变，大闹天宫，一个筋斗云十万八千里。", n=1)]
    out = run(tmp_path, turns, cfg)
    dropped = {r.text: r for r in out.rejects}
    assert set(dropped) == {wrong, turns[-1]["answer"]}
    assert all(r.filter == "identity" and r.score <= 0 for r in dropped.values())
    kept = [t for s in out.rows for t in s.turns]
    assert len(kept) == 5 and all(t.scores["identity_margin"] > 0 for t in kept)
    assert funnel_ok(out)


def test_identity_candidates_are_stable_and_respect_k():
    from tasks.filters.identity import IdentityFilter

    f = IdentityFilter(filter_config(identity={"enabled": True, "k": 3}).filter.identity, BY_ID)
    it = item("Q517@en", GOOD["Q517@en"])
    c = f.candidates(it)
    assert c[0] == "Q517@en" and len(c) == 3 and all(x.endswith("@en") for x in c) and c == f.candidates(it)
    f = IdentityFilter(filter_config(identity={"enabled": True, "k": 3, "candidates": "category"}).filter.identity,
                       BY_ID)
    assert f.candidates(it)[1] == "Q937@en"  # the only other real English character comes first


# ---- the funnel, sessions, min_turns -----------------------------------------------------------------

OWN_REFUSALS = {
    "Q517@en": "A telephone? I have never heard of such a contraption; my couriers ride horses across Europe.",
    "Q4653@en": "I cannot say; no case of mine ever touched a rocket, and Baker Street knows nothing of space.",
    "Q937@en": "I'm afraid I know nothing of this internet; in my day we wrote letters about physics.",
    "Q11@en": "I don't know what a computer is, and even the Cheshire Cat never mentioned one in Wonderland.",
    "Q7071@zh": "电脑是何物？我从未听说过，唐朝的长安城里只有笔墨纸砚和美酒。",
    "Q935@zh": "恕我无法回答，我那个时代没有飞机，我只研究苹果为何落地。",
    "Q1107@zh": "俺老孙不知道什么是手机，花果山上只有桃子和猴子。",
    "Q1200@zh": "我不了解什么是电影，大观园里只有诗社和戏班子。",
}


def _mixed_turns():
    turns = []
    for cid in GOOD:
        turns.append(make_turn(cid, GOOD[cid], n=0))
        turns.append(make_turn(cid, OWN_REFUSALS[cid], kind="contrastive", n=1))
    turns += [make_turn("Q517@en", "As an AI language model I have no battles.", n=2),
              make_turn("Q517@en", "", n=3),
              make_turn("Q4653@en", "Sherlock Holmes was a detective.", n=4),
              make_turn("Q1107@zh", "I am the Monkey King and I can fly on a cloud very far.", n=5),
              make_turn("Q999@en", "Who am I?", n=6)]
    return turns


def test_funnel_adds_up(tmp_path):
    out = run(tmp_path, _mixed_turns())
    assert funnel_ok(out)
    assert out.stats.rows_in == 21 and out.stats.rows_out == 16
    assert out.stats.dropped == {"out_of_role": 1, "first_person": 1, "format": 1, "language": 1,
                                 "unknown_character": 1}
    assert all(isinstance(r, Rejection) and r.stage == "filter" and r.reason for r in out.rejects)
    assert len(out.rows) == 8 and all(isinstance(s, Session) and len(s.turns) == 2 for s in out.rows)
    s = next(s for s in out.rows if s.character_id == "Q7071@zh")
    assert s.system == "你是李白，唐代著名浪漫主义诗人，被誉为诗仙。" and "tokens" in s.turns[0].scores


def test_sessions_below_min_turns_are_dropped_with_a_reason(tmp_path):
    cfg = filter_config()
    cfg.sessions.min_turns = 2
    turns = [make_turn("Q517@en", GOOD["Q517@en"]), make_turn("Q517@en", "", n=1),
             make_turn("Q7071@zh", GOOD["Q7071@zh"]), make_turn("Q7071@zh", REFUSALS["zh"], kind="contrastive", n=1)]
    out = run(tmp_path, turns, cfg)
    assert [s.character_id for s in out.rows] == ["Q7071@zh"]
    r = [r for r in out.rejects if r.filter == "min_turns"]
    assert len(r) == 1 and r[0].character_id == "Q517@en" and "min_turns 2" in r[0].reason
    assert out.stats.extra["sessions_dropped"] == 1 and funnel_ok(out)


def test_filter_off_keeps_every_turn(tmp_path):
    turns = _mixed_turns()
    out = run(tmp_path, turns, filter_config(enabled=False))
    assert out.stats.rows_out == len(turns) - 1 and out.stats.dropped == {"unknown_character": 1}


# ---- judge -------------------------------------------------------------------------------------------

def test_judge_parse():
    assert parse('{"score": 7, "reason": "good"}') == (7, "good")
    assert parse('Here you go:\n```json\n{"score": "9", "reason": "fine"}\n```') == (9, "fine")
    for bad in ["", "Score: 7", '{"score": 11, "reason": "x"}', '{"score": 0}', '{"reason": "x"}',
                '[{"question": "q"}]', '{"score": true, "reason": "x"}', '{"score": 6.5}']:
        assert parse(bad) is None, bad


def test_judge_with_the_fake_engine(tmp_path):
    """The fake engine answers the judge's JSON schema with a verdict: one request per turn, the score
    stored on every kept turn, and turns under min_score dropped with the reason."""
    turns = [make_turn(cid, GOOD[cid]) for cid in GOOD]
    out = run(tmp_path, turns, filter_config(judge={"enabled": True, "rounds": 2, "min_score": 1}))
    assert out.stats.requests == len(turns) and out.stats.completion_tokens > 0
    assert out.stats.rows_out == len(turns) and funnel_ok(out)
    scores = [t.scores["judge"] for s in out.rows for t in s.turns]
    assert all(1 <= x <= 10 for x in scores)
    strict = run(tmp_path, turns, filter_config(judge={"enabled": True, "min_score": 10}))
    assert funnel_ok(strict) and strict.stats.dropped.get("judge", 0) == sum(x < 10 for x in scores)


def _judge_cfg(options, length=None, **judge):
    extra = {"length": length} if length else {}
    return filter_config(judge={"enabled": True, "engine": {"kind": "scripted_judge", "model": "scripted",
                                                            "options": options}, **judge}, **extra)


def test_judge_scores_threshold_and_reasks(tmp_path, scripted_judge):
    turns = [make_turn(cid, GOOD[cid]) for cid in GOOD]
    opts = {"scores": {"Austerlitz": 2, "葬花": 3}, "default": 8, "garbage_rounds": 2}
    out = run(tmp_path, turns, _judge_cfg(options=opts, rounds=3, min_score=4))
    assert out.stats.requests == 3 * len(turns)  # two unparseable rounds, then verdicts
    assert out.stats.dropped == {"judge": 2} and {r.score for r in out.rejects} == {2.0, 3.0}
    assert all(t.scores["judge"] == 8 for s in out.rows for t in s.turns)
    out = run(tmp_path, turns, _judge_cfg(options=opts, rounds=2, on_error="keep"))
    assert out.stats.extra["judge_errors"] == len(turns) and out.stats.rows_out == len(turns)


def test_rethreshold_from_stored_scores(tmp_path, scripted_judge):
    turns = [make_turn(cid, GOOD[cid]) for cid in GOOD]
    opts = {"scores": {"Austerlitz": 2, "葬花": 3, "Watson": 5, "筋斗云": 6}, "default": 9}
    loose = run(tmp_path, turns, _judge_cfg(options=opts, min_score=1))
    assert loose.stats.rows_out == len(turns)
    strict_cfg = _judge_cfg(options=opts, min_score=6)
    strict = run(tmp_path, turns, strict_cfg)
    stored = [s.model_dump() for s in loose.rows]  # as read back from Parquet
    again, dropped = rethreshold(stored, strict_cfg.filter, min_turns=1)
    assert dropped == {"judge": strict.stats.dropped["judge"]} == {"judge": 3}
    assert [[t.turn_id for t in s.turns] for s in again] == [[t.turn_id for t in s.turns] for s in strict.rows]
    tight_len = _judge_cfg(options=opts, min_score=1, length={"bounds": {"en": {"min": 25, "max": 300}}})
    again, dropped = rethreshold(stored, tight_len.filter)
    assert dropped["length"] == run(tmp_path, turns, tight_len).stats.dropped["length"] > 0


def test_fingerprint_covers_config_prompts_and_judge_model():
    stage = FilterStage()
    base = filter_config(judge={"enabled": True})
    fp = stage.fingerprint(base)
    assert fp["judge"]["model"].startswith("fake@") and set(fp["judge"]["prompts"]) == {"en", "zh"}
    assert fp["filter"]["judge"]["min_score"] == 4
    other = filter_config(judge={"enabled": True, "min_score": 6})
    assert stage.fingerprint(other) != fp
    judged_elsewhere = filter_config(judge={"enabled": True, "engine": {"kind": "fake", "model": "big",
                                                                         "options": {"x": 1}}})
    assert stage.fingerprint(judged_elsewhere)["judge"]["model"] != fp["judge"]["model"]
