"""The answer checks added for data quality, each on English and Chinese answers it must drop and keep:
meta_talk, degeneration, other_character, first_person, relevance; the chain order and names; the
evaluation reading refusals and out-of-role answers with the filter's own classifiers."""

from __future__ import annotations

import pytest

from models.records import character_row_id
from tasks.filter import FilterStage, build_chain, rethreshold
from tasks.filters import Item
from tasks.filters.quality import DegenerationFilter, RelevanceFilter
from tasks.filters.role import FirstPersonFilter, MetaTalkFilter, OtherCharacterFilter
from tests.plugins.filters import CHARACTERS, GOOD, REFUSALS, filter_config, make_turn, stage_context

BY_ID = {character_row_id(c): c for c in CHARACTERS}
CFG = filter_config().filter


def item(cid: str, answer: str, **kw) -> Item:
    return Item(row=make_turn(cid, answer, **kw), character=BY_ID[cid], answer=answer)


IN_ROLE = [(cid, GOOD[cid]) for cid in GOOD] + [
    ("Q517@en", REFUSALS["en"]), ("Q7071@zh", REFUSALS["zh"]),
    ("Q517@en", "My marshals received my orders at dawn, and by noon the Pratzen Heights were ours."),
    ("Q4653@en", "The answer, Watson, lay in the dog that did nothing in the night-time."),
    ("Q7071@zh", "我的诗大多写于酒后，月下独酌，一挥而就。"),
]


# ---- meta talk ---------------------------------------------------------------------------------------

META = [
    ("Q517@en", "My responses will follow the given format and stay short."),
    ("Q517@en", "Please use this template to describe the battle: [battle], [date]."),
    ("Q517@en", "Just click here to continue reading about Austerlitz."),
    ("Q517@en", "Directions: answer each question in order. Interactions: be brief."),
    ("Q517@en", "1. I will answer as the emperor.\n2. I will keep my answers short.\n3. Provide dates."),
    ("Q517@en", "Here is a response to your question about my campaigns."),
    ("Q517@en", "Visit www.napoleon-history.com for more on my campaigns."),
    ("Q4653@en", "I hope this helps! Let me know if you have any other questions."),
    ("Q4653@en", "In this response I will explain how deduction works on this platform."),
    ("Q7071@zh", "我的回答如下：请按照以下格式填写。"),
    ("Q7071@zh", "点击链接即可查看我的诗集。"),
    ("Q7071@zh", "希望这个回答对您有所帮助，如果您还有其他问题请告诉我。"),
    ("Q7071@zh", "1. 我会以李白的身份回答。\n2. 我会保持简短。"),
    ("Q935@zh", "用户的问题是关于引力的，以下是回答。"),
]


@pytest.mark.parametrize("cid,answer", META)
def test_meta_talk_drops(cid, answer):
    d = MetaTalkFilter(CFG.meta_talk).check(item(cid, answer))
    assert d is not None and d.filter == "meta_talk" and d.reason


@pytest.mark.parametrize("cid,answer", IN_ROLE)
def test_meta_talk_keeps_in_role_answers(cid, answer):
    assert MetaTalkFilter(CFG.meta_talk).check(item(cid, answer)) is None


def test_meta_talk_extra_patterns():
    f = MetaTalkFilter(filter_config(meta_talk={"extra_patterns": ["pratzen"]}).filter.meta_talk)
    assert f.check(item("Q517@en", IN_ROLE[-3][1])) is not None


# ---- degeneration ------------------------------------------------------------------------------------

DEGENERATE = [
    ("Q517@en", "I won the battle and I won the battle and I won the battle and I won the battle again."),
    ("Q517@en", " ".join(["The guard, the guard, the guard marched on."] * 4)),
    ("Q517@en", "My campaigns:\n- Italy\n- Egypt\n- Austria\n- Prussia\n- Russia\n- Spain"),
    ("Q4653@en", "I like pipes, violins, chemistry, boxing, London, fog, cabs, maps, poisons, ciphers, bees."),
    ("Q7071@zh", "我喜欢喝酒我喜欢喝酒我喜欢喝酒我喜欢喝酒我喜欢喝酒。"),
    ("Q7071@zh", "我爱明月、清风、美酒、长剑、山水、白云、飞鸟、孤帆、江水、秋霜。"),
]


@pytest.mark.parametrize("cid,answer", DEGENERATE)
def test_degeneration_drops(cid, answer):
    it = item(cid, answer)
    d = DegenerationFilter(CFG.degeneration).check(it)
    assert d is not None and d.filter == "degeneration" and "repeat" in it.scores


@pytest.mark.parametrize("cid,answer", IN_ROLE)
def test_degeneration_keeps_in_role_answers(cid, answer):
    it = item(cid, answer)
    assert DegenerationFilter(CFG.degeneration).check(it) is None and it.scores["repeat"] < 0.1


# ---- other character, first person -------------------------------------------------------------------

OTHER = [
    ("Q517@en", "I am Sherlock Holmes, and I find your question most curious."),
    ("Q517@en", "This is Albert Einstein speaking: relativity is my life."),
    ("Q517@en", "Sherlock Holmes was a detective who lived in Baker Street."),
    ("Q937@en", "Alice fell down a rabbit hole. Alice met a cat that grinned."),
    ("Q7071@zh", "我是孙悟空，俺老孙不会作诗。"),
    ("Q7071@zh", "林黛玉寄居贾府，林黛玉多愁善感。"),
]


@pytest.mark.parametrize("cid,answer", OTHER)
def test_other_character_drops(cid, answer):
    d = OtherCharacterFilter(CFG.other_character, BY_ID).check(item(cid, answer))
    assert d is not None and d.filter == "other_character"


@pytest.mark.parametrize("cid,answer", IN_ROLE + [
    ("Q517@en", "I once read about a detective like Sherlock Holmes, but I had battles to fight."),
    ("Q7071@zh", "我读过孙悟空的故事，孙悟空大闹天宫让我拍案叫绝。"),
])
def test_other_character_keeps(cid, answer):
    assert OtherCharacterFilter(CFG.other_character, BY_ID).check(item(cid, answer)) is None


@pytest.mark.parametrize("cid,answer,kind,dropped", [
    ("Q517@en", "Napoleon was a French commander who won at Austerlitz.", "role_specific", True),
    ("Q517@en", "He crowned himself Emperor in 1804 and was defeated at Waterloo.", "role_specific", True),
    ("Q517@en", GOOD["Q517@en"], "role_specific", False),
    ("Q517@en", "He crowned himself Emperor in 1804.", "contrastive", False),  # kinds: role_specific only
    ("Q7071@zh", "李白是唐代著名诗人，一生好饮酒。", "role_specific", True),
    ("Q7071@zh", "他一生好饮酒，写下了很多诗。", "role_specific", True),
    ("Q7071@zh", GOOD["Q7071@zh"], "role_specific", False),
])
def test_first_person(cid, answer, kind, dropped):
    d = FirstPersonFilter(CFG.first_person).check(item(cid, answer, kind=kind))
    assert (d is not None) == dropped and (d is None or d.filter == "first_person")


# ---- relevance ---------------------------------------------------------------------------------------

def test_relevance_drops_answers_about_something_else_and_stores_the_score():
    cfg = filter_config(relevance={"enabled": True, "min_similarity": {"en": 0.2}}).filter.relevance
    q = "How did you win the battle of Austerlitz?"
    on = item("Q517@en", "At Austerlitz I let the allies attack my weak right, then my soldiers took the Pratzen "
                         "Heights and split their army; it was my greatest battle.", question=q)
    off = item("Q517@en", "Baking bread needs flour, water, salt and yeast; knead the dough well.", question=q, n=1)
    zh = item("Q7071@zh", "面包需要面粉和酵母。", question="你最喜欢哪首诗？")
    refusal = item("Q517@en", "Baking bread needs flour, water, salt and yeast.", question=q, kind="contrastive", n=2)
    verdicts = RelevanceFilter(cfg).apply([on, off, zh, refusal])
    assert verdicts[0] is None and verdicts[1] is not None and verdicts[1].filter == "relevance"
    assert verdicts[2] is None and verdicts[3] is None  # zh and contrastive not checked by default
    assert on.scores["relevance"] > 0.2 > off.scores["relevance"] and "relevance" not in zh.scores
    assert verdicts[1].score == off.scores["relevance"]


# ---- the chain ---------------------------------------------------------------------------------------

def test_chain_order_cheapest_first_and_each_drop_named(tmp_path):
    cfg = filter_config(relevance={"enabled": True})
    names = [f.name for f in build_chain(stage_context(cfg, tmp_path), BY_ID, None)]
    assert names == ["format", "length", "language", "meta_talk", "out_of_role", "degeneration", "other_character",
                     "first_person", "refusal", "relevance"]
    turns = [make_turn(cid, a, n=i) for i, (cid, a) in enumerate(META[:2] + DEGENERATE[:1] + OTHER[:1])]
    turns.append(make_turn("Q517@en", GOOD["Q517@en"], n=9, question="What was your greatest victory as emperor?"))
    out = FilterStage().run(stage_context(filter_config(), tmp_path), {"responses": turns,
                                                                       "characters": CHARACTERS})
    assert out.stats.dropped == {"meta_talk": 2, "degeneration": 1, "other_character": 1}
    assert out.stats.rows_out == 1 and len(out.rejects) == 4


def test_rethreshold_applies_relevance_and_repetition_scores(tmp_path):
    turns = [make_turn("Q517@en", GOOD["Q517@en"], question="What was your greatest victory as emperor?"),
             make_turn("Q937@en", GOOD["Q937@en"], n=1, question="What do you think of the rabbit?")]
    cfg = filter_config(relevance={"enabled": True, "min_similarity": {"en": 0.0}})
    out = FilterStage().run(stage_context(cfg, tmp_path), {"responses": turns, "characters": CHARACTERS})
    scores = sorted(t.scores["relevance"] for s in out.rows for t in s.turns)
    assert len(scores) == 2 and all("repeat" in t.scores for s in out.rows for t in s.turns)
    mid = (scores[0] + scores[1]) / 2
    strict = filter_config(relevance={"enabled": True, "min_similarity": {"en": mid}}).filter
    again, dropped = rethreshold([s.model_dump() for s in out.rows], strict)
    assert dropped == {"relevance": 1} and sum(len(s.turns) for s in again) == 1
    tight = filter_config(degeneration={"max_repeated_share": 0.0001}).filter
    _, dropped = rethreshold([s.model_dump() for s in out.rows], tight)
    assert dropped.get("degeneration", 0) == sum(t.scores["repeat"] > 0.0001 for s in out.rows for t in s.turns)


# ---- the evaluation uses the same classifiers --------------------------------------------------------

@pytest.mark.parametrize("cid,answer", META + [("Q517@en", "Napoleon was a French commander who won at Austerlitz."),
                                               ("Q7071@zh", "李白是唐代著名诗人，一生好饮酒。")])
def test_evaluation_counts_what_the_filter_drops_as_out_of_role(cid, answer):
    from tasks.evaluate import is_out_of_role

    c = BY_ID[cid]
    assert is_out_of_role(answer, c["language"], c["label"])


def test_filter_and_evaluation_embed_through_one_loader(monkeypatch):
    """Identity and relevance in the filter, identity_embed in the evaluation: one model loader
    (tasks/embeddings.py), each with its own input cut."""
    import numpy as np

    from models.eval_records import Candidate, EvalItem
    from tasks import embeddings
    from tasks.evaluate import embed_identity
    from tasks.filters.identity import IdentityFilter
    from tasks.filters.quality import similarities

    loaded: list[tuple[str, int | None]] = []

    class Letters:  # a bag-of-letters embedding: texts sharing words land close
        def encode(self, texts, **kw):
            v = np.array([[t.lower().count(ch) for ch in "abcdefghijklmnopqrstuvwxyz"] for t in texts], float)
            return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)

    def embedder(name=embeddings.BUNDLED, max_seq_length=None):
        loaded.append((name, max_seq_length))
        return Letters()

    monkeypatch.setattr(embeddings, "embedder", embedder)
    cfg = filter_config().filter
    assert similarities(["Who are you?"], ["I am who I am."], cfg.relevance).shape == (1,)
    napoleon = BY_ID["Q517@en"]
    en = {cid: c for cid, c in BY_ID.items() if c["language"] == "en"}
    IdentityFilter(cfg.identity, en).apply([Item(row=make_turn("Q517@en", "x"), character=napoleon, answer="x")])
    item = EvalItem(id="e", session_id="s", turn=0, character_id="Q1@en", label="Ada", language="en", system="",
                    question="q", should_refuse=False, candidates=[Candidate(label="Ada"), Candidate(label="Zed")],
                    correct=0)
    assert embed_identity([item], {"e": "Ada Ada"}) == {"e": 0}
    assert loaded == [(cfg.relevance.model, cfg.relevance.max_seq_length)] * 2 + [
        (cfg.identity.model, cfg.identity.max_seq_length)] * 2 + [(embeddings.BUNDLED, None)] * 2


@pytest.mark.parametrize("cid,answer", IN_ROLE)
def test_evaluation_keeps_in_role_answers(cid, answer):
    from tasks.evaluate import is_out_of_role, is_refusal

    c = BY_ID[cid]
    assert not is_out_of_role(answer, c["language"], c["label"])
    assert is_refusal(answer, c["language"]) == (answer in REFUSALS.values())


# ---- rules added from the labeled dev set -------------------------------------------------------------

@pytest.mark.parametrize("cid,answer,name", [
    ("Q517@en", "Napoleon performed wonders at Austerlitz. I think the guard was best.", "first_person"),
    ("Q517@en", "Austerlitz is a town in Moravia where a famous battle took place in December.", "first_person"),
    ("Q7071@zh", "长安城里有很多酒楼，诗人们常常在那里饮酒作诗，十分热闹。", "first_person"),
    ("Q517@en", "I'm glad you're interested in my campaigns. I won many battles.", "out_of_role"),
    ("Q517@en", "That's a very good question. I won at Austerlitz.", "out_of_role"),
    ("Q7071@zh", "这是一个很好的问题。我一生好饮酒。", "out_of_role"),
    ("Q7071@zh", "我住在长安。 1. 开场 2. 角色 3. 结局 4. 开场 5. 角色 6. 结局 7. 开场 8. 角色 9. 结局", "degeneration"),
    ("Q7071@zh", "I live in Chang'an with my friends and my wine. 我住在长安，和朋友们饮酒。", "language"),
])
def test_devset_rules_drop(tmp_path, cid, answer, name):
    out = FilterStage().run(stage_context(filter_config(), tmp_path),
                            {"responses": [make_turn(cid, answer, question="What do you remember of your life?")],
                             "characters": CHARACTERS})
    assert out.stats.dropped == {name: 1}, out.rejects


@pytest.mark.parametrize("cid,answer", [
    ("Q517@en", "Yes, Austerlitz, of course."),  # short: exempt from the first-person requirement
    ("Q4653@en", "A little, though my methods are simple. The ink on your cuff says you write in haste."),
    ("Q7071@zh", "我住在长安，常读 Li Bai 的诗集。"),  # a short Latin-script name inside Chinese is fine
    ("Q517@en", "I weighed the odds: 3.5 to 1 against us, and in 1805 I still won."),
])
def test_devset_rules_keep(tmp_path, cid, answer):
    out = FilterStage().run(stage_context(filter_config(), tmp_path),
                            {"responses": [make_turn(cid, answer)], "characters": CHARACTERS})
    assert out.stats.rows_out == 1, out.rejects


@pytest.mark.parametrize("answer", [
    # kept by the chain before these patterns, in a run of the bundled 135M model on the demo config
    "I'm sorry, but I can't assist with my browser's ability to translate. I'll be happy to help.",
    "I'm not programmed to decide my story's tone just yet, so I pick something that fits.",
    "It seems like you're referring to my work, but I'm afraid I'm unable to provide direct links to it.",
    "Instead of that, here's a revised version with different wording: I am going to meet someone.",
])
def test_assistant_register_of_the_bundled_model_is_dropped(tmp_path, answer):
    out = FilterStage().run(stage_context(filter_config(), tmp_path),
                            {"responses": [make_turn("Q517@en", answer)], "characters": CHARACTERS})
    assert out.stats.rows_out == 0 and set(out.stats.dropped) <= {"out_of_role", "meta_talk"}, out.rejects
