"""Role classifiers shared by the filter chain and the evaluation, English and Chinese, and the filters
built on them. Each filter has its own name (the rejection's `filter`) and reason:

- meta_talk: an assistant talking about its responses, formats, templates, platforms, links, instructions,
  or a numbered list of how it works;
- out_of_role: assistant-speak (AI, language model, happy to assist) and talk about the profile, prompt or
  role-play;
- other_character: answering as another named character of the shard (introducing themselves by another
  name, or speaking about the other one instead);
- first_person: a role-specific answer that describes its own character in the third person;
- refusal: contrastive turns must be refused in role, role-specific ones must not be.

`tasks/evaluate/` measures its judge-free out-of-role rate and refusal accuracy with the same
`RoleClassifier` and `RefusalClassifier`, so the metric sees what the filter drops.
"""

from __future__ import annotations

import re
from functools import cache

from models.config.filter import (
    FirstPersonConfig,
    MetaTalkConfig,
    OtherCharacterConfig,
    OutOfRoleConfig,
    RefusalConfig,
)
from tasks.filters import Drop, Item, RowFilter
from tasks.filters.text import cjk_ratio, sentences, token_estimate

_I = re.IGNORECASE
ASSISTANT_EN = [
    r"\bas an? (?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|(?:ai |virtual )?assistant|chatbot)\b",
    r"\bi(?:'m| am) (?:just |only |merely |simply )?an? (?:ai|artificial intelligence|(?:large )?language model|"
    r"(?:ai |virtual |helpful )?assistant|chatbot|bot|computer program)\b",
    r"\b(?:language model|openai|chatgpt|smollm|my training data|knowledge cut-?off|training cut-?off)\b",
    r"\btrained by hugging ?face\b",
    r"\bi (?:do not|don't) have (?:personal |real |any )?(?:experiences|feelings|emotions|opinions|a (?:physical )?body)\b",
    r"\bhow (?:can|may) i (?:assist|help) you(?: today)?\b",
    # the register a small generator slips into (seen in 23% of a 135M model's kept turns before these)
    r"\b(?:happy|glad|here) to assist\b|\bassist you (?:further|with)\b",
    r"\bsorry for (?:the|any) (?:confusion|misunderstanding)\b",
    r"\b(?:i'm|i am) not programmed\b|\bprogrammed to\b|\b(?:can't|cannot|can not|unable to) (?:assist|fulfill)\b|"
    r"\bunable to provide\b|\bhappy to help\b|\bmy (?:services?|browser|capabilities)\b|"
    r"\bprovide me with (?:the|more|some)\b|\bcontinue providing\b",
    r"\b(?:i'm|i am) glad you(?:'re| are) interested\b|\bglad you asked\b|\bthank you for (?:your|the) question\b",
    r"\b(?:that's|that is|what|this is) an? (?:very |really )?(?:good|great|valid|excellent|interesting) question\b|"
    r"^\W*(?:great|good|excellent) question\b",
    r"\bi (?:do not|don't) have access to\b",
]
META_EN = [
    r"\brole-?play(?:ing)?\b|\bin character\b|\bstay(?:ing)? in (?:the )?role\b",
    r"\b(?:this|the|my) (?:profile|prompt|persona|character (?:description|profile|sheet))\b",
    r"\b(?:the|this) (?:instructions?|introduction) (?:provided|given|above)\b",
    r"\b(?:provided|given|above) (?:profile|information|text|introduction|description|context)\b",
    r"\baccording to (?:the|my) (?:profile|introduction|description|information|wikipedia|text)\b",
]
ASSISTANT_ZH = [
    r"(?:这是)?(?:一个)?(?:很|非常)?好的问题|^\W*好问题|(?:很高兴|乐意)为您(?:服务|提供帮助)|抱歉(?:给您)?(?:造成|带来)(?:的)?(?:困惑|误解)",
    r"作为(?:一个|一名|一位)?(?:人工智能|ai|语言模型|大语言模型|(?:ai|智能|虚拟)?助手)",
    r"我(?:只)?是(?:一个|一名|一位)?(?:人工智能|ai|语言模型|大语言模型|聊天机器人|(?:ai|智能|虚拟)助手)",
    r"语言模型|人工智能助手|openai|chatgpt|训练数据",
    r"我没有(?:个人的?|真实的?)?(?:经历|感情|情感|观点|身体)",
    r"有什么(?:可以|能|需要)?(?:帮|帮助|协助)(?:你|您)",
]
META_ZH = [
    r"角色扮演|扮演(?:的)?(?:这个)?角色|保持角色|提示词",
    r"(?:根据|按照|依据)(?:你)?(?:提供的|以上的?|上述的?|给定的|给出的)?(?:资料|简介|设定|人设|提示|介绍)",
    r"(?:提供的|以上的?|上述的?|给定的)(?:资料|简介|信息|设定|人设)",
]

# An assistant talking about its own output or the medium: what a small generator writes when it loses the
# role ("my responses", "the given format", "this template", "Just click here", "Directions:", "1. I will").
META_TALK_EN = [
    r"\b(?:my|these|this|the|our|your|following|above|previous|next) (?:responses?|replies|outputs?)\b",
    r"\b(?:responses?|replies) (?:should|must|will|are|is|to (?:the|your|this))\b",
    r"\b(?:given|following|above|below|required|specified|same|correct|proper|json|markdown|answer|response|"
    r"question|this|that|the) (?:format|formats|formatting)\b|\bformatted (?:as|in|like)\b",
    r"\btemplates?\b|\bplaceholders?\b",
    r"\bclick (?:here|on|the|below)\b|\bhttps?://|\bwww\.|\b\w+\.(?:com|org|net|io)\b|\b(?:the|this) link\b|"
    r"\blinks? (?:below|above)\b|\bsubscribe\b|\bsign (?:up|in)\b|\blog ?in\b|\bscroll (?:down|up)\b",
    r"\bjust (?:click|tap|press|type|select|enter)\b|\bcontinue reading\b|\bread more\b",
    r"\b(?:this|the|our|my) (?:platform|website|web ?site|app|application|interface|chat ?bot|chat window|"
    r"forum|thread|post)\b",
    r"\b(?:the|these|your|my) instructions? (?:say|says|given|provided|above|below|ask|asks|require)\b|"
    r"\bfollow(?:ing)? (?:the|your|these) (?:instructions|guidelines|rules)\b|\bas instructed\b",
    r"\bthe user\b|\busers?'?s? (?:question|query|request|input|prompt)\b|\b(?:your|the|this) (?:query|prompt)\b",
    r"(?:^|\n)\s*(?:\*\*)?(?:directions|interactions|instructions|guidelines|rules|steps|notes?|examples?|output|"
    r"response|answer|question|reason|character [ab])\s*(?:\d+\s*)?(?:\*\*)?\s*:",
    r"\bcharacter [ab]\b|\b(?:role|person) [ab]\b",
    r"\bhere(?:'s| is| are) (?:a|an|the|my|some|your) (?:[a-z]+ )?(?:response|answer|reply|list|summary|example|version|"
    r"breakdown|overview|rewrite|draft)\b|\bi hope this (?:helps|answers|clarifies)\b|\bfeel free to (?:ask|reach|share|let|provide)\b|"
    r"\blet me know if\b|\bif you have any (?:other|more|further) questions\b|\bis there anything else\b",
    r"\b(?:in|for) (?:this|the|my) (?:response|answer|reply|scenario|exercise|task|dialogue|conversation)\b",
    r"\bthe question (?:asks|is asking|requires|wants|was)\b|\b(?:answer|respond to) (?:the|this|your) question\b",
    r"\bstep \d\b|\bstep (?:one|two|three)\b",
]
META_TALK_ZH = [
    r"格式|模板|模版|占位符|点击|链接|网址|https?://|www\.|(?:本|这个|该|此)(?:平台|网站|应用|程序|页面|帖子)",
    r"用户|(?:根据|按照|遵循)(?:你的|您的|以上|上述)?(?:指令|指示|要求|说明)|提示词|指令",
    r"(?:我的|本|该|这个|以下|上述|上面的)(?:回答|回复|答案|输出)(?:如下|是|将|会|应该)?|以下是(?:我的)?(?:回答|回复|答案|列表)",
    r"希望(?:这|以上|我的回答)(?:个回答|些)?(?:能|对你|对您)?(?:有所)?帮助|如果(?:你|您)还有(?:其他|任何|更多)(?:的)?(?:问题|疑问)",
    r"(?:^|\n)\s*(?:问题|回答|答案|理由|说明|步骤|注意|示例|输出)\s*\d*\s*[:：]|角色\s*[AB甲乙]|第[一二三1-3]步",
    r"(?:这个|该|此)问题(?:问的是|要求|是在问)",
]
# numbered or bulleted lines about how the speaker works ("1. I will answer ...", "- Provide a ...")
_HOW_I_WORK_EN = re.compile(
    r"(?:^|\n)\s*(?:\d+[.)]|[-*•])\s*(?:\*\*)?(?:i will|i'll|i can|i would|i must|i should|i am going to|provide|"
    r"respond|answer|use|keep|maintain|ensure|include|avoid|stay|be|write|make sure|remember|focus|offer)\b")
_HOW_I_WORK_ZH = re.compile(r"(?:^|\n)\s*(?:\d+[.、)）]|[-*•]|[一二三四五]、)\s*(?:我会|我将|我可以|提供|回答|使用|保持|确保|避免|注意)")
FIRST_PERSON_EN = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself|we|our|us)\b")
FIRST_PERSON_ZH = re.compile(r"我|咱|俺|本人|吾|朕|寡人|在下|老夫|本王|本官|本座|小女子|妾身|贫道|老朽|洒家|本宫")
THIRD_EN = re.compile(r"\b(?:he|she|his|her|him)\b")  # not 'they': the people around the character
THIRD_ZH = re.compile(r"[他她](?!们)")
THIRD_VERB_AFTER = re.compile(r"\s+(?:was|is|had|has|became|served|lived|died|wrote|remains|were|did|"
                              r"[a-z]{3,}ed)\b")




def _names(character: dict | None) -> list[str]:
    if not character:
        return []
    names = [character.get("label", "")] + list(character.get("aliases") or [])
    return [n.strip() for n in names if n and len(n.strip()) >= 2]


def guess_language(text: str) -> str:
    return "zh" if cjk_ratio(text[:400]) > 0.3 else "en"


# Literal anchors of each META_TALK_EN pattern (one of them must occur for the pattern to match): a C-level
# substring test skips the regexes on most answers (one alternation of all of them runs at ~1k texts/s).
_META_ANCHORS_EN = [
    ("respons", "repl", "output"), ("respons", "repl"), ("format",), ("templat", "placeholder"),
    ("click", "http", "www.", ".com", ".org", ".net", ".io", "link", "subscribe", "sign ", "log", "scroll"),
    ("just ", "continue reading", "read more"),
    ("platform", "site", "app", "interface", "chat", "forum", "thread", "post"),
    ("instruct", "guideline", "rules"), ("user", "query", "prompt"), (":",), ("character ", "role ", "person "),
    ("here", "hope this", "feel free", "let me know", "questions", "anything else"),
    ("respons", "answer", "repl", "scenario", "exercise", "task", "dialogue", "conversation"),
    ("question",), ("step",),
]


class _Anchored:
    """Patterns each guarded by literal anchors; `search` returns the first match or None."""

    def __init__(self, patterns: list[str], anchors: list[tuple[str, ...]]):
        assert len(patterns) == len(anchors)
        self.parts = [(a, re.compile(p)) for p, a in zip(patterns, anchors, strict=True)]

    def search(self, text: str):
        for anchors, rx in self.parts:
            if any(a in text for a in anchors):
                m = rx.search(text)
                if m:
                    return m
        return None


@cache
def _compiled(extra: tuple[str, ...] = ()) -> dict[str, re.Pattern]:
    extra_l = [p.lower() for p in extra]
    return {"assistant_en": re.compile("|".join(ASSISTANT_EN + META_EN)),
            "assistant_zh": re.compile("|".join(ASSISTANT_ZH + META_ZH + ASSISTANT_EN + META_EN)),
            "meta_en": _Anchored(META_TALK_EN, _META_ANCHORS_EN),
            "meta_zh": re.compile("|".join(META_TALK_ZH)),
            "extra": re.compile("|".join(extra_l)) if extra_l else None}


class RoleClassifier:
    """Text-only role checks (patterns are lower case and run on lower-cased text: much faster than
    re.IGNORECASE). `out_of_role_reason` is the evaluation's judge-free out-of-role test."""

    def __init__(self, meta_extra: tuple[str, ...] | list[str] = (), assistant_extra: tuple[str, ...] | list[str] = ()):
        self.rx = _compiled()
        self.meta_extra = _compiled(tuple(meta_extra))["extra"]
        self.assistant_extra = _compiled(tuple(assistant_extra))["extra"]

    def meta_talk(self, text: str, language: str | None = None) -> str | None:
        low = text.lower()
        zh = (language or guess_language(text)) == "zh"
        m = self.rx["meta_en"].search(low)
        if m is None and zh:
            m = self.rx["meta_zh"].search(low)
        if m is None and self.meta_extra is not None:
            m = self.meta_extra.search(low)
        if m is not None:
            return m.group(0).strip()
        m = (_HOW_I_WORK_ZH if zh else _HOW_I_WORK_EN).search(low) if "\n" in low else None
        if m is not None and len((_HOW_I_WORK_ZH if zh else _HOW_I_WORK_EN).findall(low)) >= 2:
            return "numbered list of how it works: " + m.group(0).strip()[:40]
        return None

    def assistant(self, text: str, language: str | None = None) -> str | None:
        low = text.lower()
        zh = (language or guess_language(text)) == "zh"
        m = (self.rx["assistant_zh"] if zh else self.rx["assistant_en"]).search(low)
        if m is None and self.assistant_extra is not None:
            m = self.assistant_extra.search(low)
        return m.group(0).strip() if m else None

    @staticmethod
    def third_person(text: str, language: str | None, own: list[str]) -> str | None:
        """The answer describes its own character (names in `own`) in the third person."""
        if not own:
            return None
        if (language or guess_language(text)) == "zh":
            if FIRST_PERSON_ZH.search(text):
                return None
            if any(n in text for n in own) or THIRD_ZH.search(text):
                return "describes the character in the third person (no first person)"
            return None
        low = text.lower()
        head = low[:200]
        for n in own:
            n = n.lower()
            if head.startswith(n) and THIRD_VERB_AFTER.match(head, len(n)):
                return f"describes the character in the third person: {text[:60]!r}"
        if FIRST_PERSON_EN.search(low):
            return None
        if any(n.lower() in low for n in own) or THIRD_EN.search(low):
            return "describes the character in the third person (no first person)"
        return None

    def out_of_role_reason(self, text: str, language: str | None = None, character: dict | None = None
                           ) -> str | None:
        """Meta-talk, assistant-speak or (given the character) third-person description: the evaluation's
        judge-free out-of-role test, the union of what the filter's role checks drop."""
        why = self.meta_talk(text, language)
        if why:
            return f"meta_talk: {why}"
        why = self.assistant(text, language)
        if why:
            return f"out_of_role: {why}"
        why = self.third_person(text, language, _names(character))
        return f"first_person: {why}" if why else None


class MetaTalkFilter(RowFilter):
    name = "meta_talk"

    def __init__(self, cfg: MetaTalkConfig):
        self.clf = RoleClassifier(meta_extra=cfg.extra_patterns)

    def check(self, item: Item) -> Drop | None:
        why = self.clf.meta_talk(item.answer, item.language)
        return Drop("meta_talk", f"talks about its output or the medium: {why!r}") if why else None


class OutOfRoleFilter(RowFilter):
    """Assistant-speak and talk about the prompt, profile or role-play."""

    name = "out_of_role"

    def __init__(self, cfg: OutOfRoleConfig, characters: dict[str, dict] | None = None):
        self.clf = RoleClassifier(assistant_extra=cfg.extra_patterns)

    def check(self, item: Item) -> Drop | None:
        why = self.clf.assistant(item.answer, item.language)
        return Drop("out_of_role", f"assistant or meta talk: {why!r}") if why else None


class OtherCharacterFilter(RowFilter):
    """Speaking as another named character of the shard: 'I am X' / '我是X' / 'my name is X' with another
    character's name, or an answer that opens with another character as its subject, or names another
    character at least twice with no first person in it."""

    name = "other_character"

    def __init__(self, cfg: OtherCharacterConfig, characters: dict[str, dict] | None = None):
        self.cfg = cfg
        # one generic pattern, then a dict lookup of the words after it: a regex alternation of every
        # label in the shard would be slow with thousands of characters
        self.labels = {n.lower() for c in (characters or {}).values() for n in _names(c)}
        self.max_words = max((len(n.split()) for n in self.labels), default=1)
        self.max_chars = max((len(n) for n in self.labels), default=1)
        self.intro = re.compile(r"(?:\b(?:i am|i'm|my name is|call me|they call me|this is)\s+|我是|我叫|我乃|"
                                r"我的名字(?:是|叫)|本人是|在下)")
        self.my_name_en = re.compile(r"\b(?i:my name is) ([A-Z][\w'.-]*(?: [A-Z][\w'.-]*)*)")
        self.words_en = re.compile(r"[\w'.-]+")

    def check(self, item: Item) -> Drop | None:
        text = item.answer
        low = text.lower()
        own_l = [n.lower() for n in _names(item.character)]

        def other(name: str | None) -> bool:
            return bool(name) and not any(name in n or n in name for n in own_l)

        for m in self.intro.finditer(low):
            name = self._known_name(low[m.end():m.end() + self.max_chars + 1])
            if other(name):
                return Drop("other_character", f"speaks as another character: {low[m.start():m.end()] + name!r}")
        m = self.my_name_en.search(text)
        if m and own_l and not any(w.lower() in " ".join(own_l) for w in m.group(1).split()):
            return Drop("other_character", f"gives another name: {m.group(0)!r}")
        if not self.labels:
            return None
        zh = item.language == "zh"
        start = self._known_name(low.lstrip(" \"'“”‘’*-")[:self.max_chars + 1])
        if other(start) and (zh or THIRD_VERB_AFTER.match(low.lstrip(" \"'“”‘’*-"), len(start))):
            return Drop("other_character", f"about another character: opens with {start!r}")
        first = FIRST_PERSON_ZH.search(text) if zh else FIRST_PERSON_EN.search(low)
        if first is None:
            counts = {n: low.count(n) for n in self.labels if n in low and other(n)}
            if counts and max(counts.values()) >= 2 and not any(n in low for n in own_l):
                name = max(counts, key=counts.get)
                return Drop("other_character", f"about another character: {name!r} named {counts[name]} times, "
                                               f"no first person")
        return None

    def _known_name(self, tail: str) -> str | None:
        """The longest known label the text starts with."""
        tail = tail.lower()
        if not self.labels:
            return None
        if tail[:1] and "\u4e00" <= tail[0] <= "\u9fff":
            for k in range(min(len(tail), self.max_chars), 1, -1):
                if tail[:k] in self.labels:
                    return tail[:k]
            return None
        words = self.words_en.findall(tail)
        for k in range(min(len(words), self.max_words), 0, -1):
            cand = " ".join(words[:k]).rstrip(".")
            if cand in self.labels:
                return cand
        return None


class FirstPersonFilter(RowFilter):
    """A role-specific answer speaks as the character: not about the character in the third person."""

    name = "first_person"

    def __init__(self, cfg: FirstPersonConfig):
        self.cfg = cfg

    def check(self, item: Item) -> Drop | None:
        if item.row.get("kind") not in self.cfg.kinds:
            return None
        why = RoleClassifier.third_person(item.answer, item.language, _names(item.character))
        if why:
            return Drop("first_person", why)
        if self.cfg.require and token_estimate(item.answer) >= self.cfg.min_tokens:
            zh = item.language == "zh"
            if not (FIRST_PERSON_ZH.search(item.answer) if zh else FIRST_PERSON_EN.search(item.answer.lower())):
                return Drop("first_person", "no first person: not in the character's voice")
        return None

REFUSAL_EN = [
    r"\b(?:i|we)\s+(?:do not|don't|did not|didn't|cannot|can't|could not|couldn't|can ?not)\s+(?:really |truly )?"
    r"(?:know|say|tell|answer|speak|comment|recall|understand|imagine|fathom|claim)\b",
    r"\b(?:i'm|i am|i was)\s+(?:not|never)\s+(?:familiar|aware|acquainted|versed|able to (?:answer|say|speak))",
    r"\bnever (?:heard|been told|encountered|known|come across)\b",
    r"\bunfamiliar\b|\b(?:beyond|outside(?: of)?) (?:my|the) (?:time|era|knowledge|ken|understanding|experience|world|"
    r"expertise|day)\b",
    r"\bi (?:have|had) no (?:idea|knowledge|notion|way of knowing|experience|acquaintance)\b",
    r"\bi know (?:nothing|little|naught) (?:of|about)\b|\bnot something i (?:know|would know|can speak)\b",
    r"\b(?:in|during) my (?:time|day|days|era|lifetime),? (?:there (?:was|were) no|no one|nobody|such)\b",
    r"\bhaven't the (?:faintest|slightest)\b|\bno such thing\b|\bstrange (?:word|term|name) to me\b",
    r"\b(?:i'm|i am) afraid i\b|\bforgive me,? (?:but )?i\b",
]
REFUSAL_ZH = [
    r"不知道|不了解|不太了解|没听说过?|从没听说|从未听说|不曾听|闻所未闻|不清楚|无法回答|回答不了|答不上|不太懂|不懂|"
    r"超出了我|不熟悉|不认识|一无所知|无从知晓|无从得知|恕我|请恕|抱歉|对不起|未曾",
    r"(?:我那个|我的|我所在的?)(?:时代|年代)|那时(?:候)?(?:还)?没有|(?:当时|那时)(?:还)?不存在",
]


# other languages, for the evaluation of models answering in them (the filter's rows are en or zh)
REFUSAL_OTHER = [
    r"\bich weiß (?:es )?nicht\b|\bkeine ahnung\b|\bje ne (?:sais|connais) pas\b|\bno (?:lo )?sé\b|"
    r"\bno conozco\b|\bnon (?:lo )?so\b|\bnão sei\b|知りません|分かりません|わかりません",
]


# The in-role denials a character gives to a question about a life it did not live ("I never ruled any
# empire", "None; I was never an actor", "I built no pyramid", "that was Michelangelo"). Weak on their own:
# a role-specific answer may say "I never learned to swim". They count for contrastive turns (refused or
# not) but never make a role-specific answer 'unwarranted'.
REFUSAL_WEAK_EN = [
    r"^\W*(?:none|nothing|never|no|not i|not me|neither|nor i)\b",
    r"\b[a-z]+, not (?:a |an |the |any )?[a-z]+\b",
    r"\bi (?:have |had )?never\b|\bi(?:'ve| have) not ever\b|\bnever (?:in my life|once)\b",
    r"\bi (?:did not|didn't|was not|wasn't|were not) (?:\w+ )?(?:there|born|alive|do|did|have|ever|in|at|on|a|an|"
    r"the|any)\b|^\W*i did not\b|^\W*i didn't\b",
    r"\bi (?:\w+ ){1,2}(?:no|nothing|none|naught)\b(?! (?:doubt|matter|longer|less|more)\b)",
    r"\b(?:not sure what you mean|do not understand|don't understand|what is this \w+|what (?:is|are) (?:a|an) \w+\?)",
    r"\b(?:no|never) (?:such|one|man|woman) (?:\w+ )?(?:has|have|could|can|did|was|is)?\b|\bnor can any\b",
    r"\b(?:centuries|years|long|ages) (?:before|after) (?:i|my)\b|\b(?:before|after) my (?:time|day|birth)\b|"
    r"\bin my (?:day|time|era)\b|\bthat was (?:not me|someone else|[a-z]+ [a-z]+'s)\b",
    r"\b(?:wrong (?:person|man|woman)|mistak(?:e|en) me|confus(?:e|ed|ing) me with|mixed me up|mix me up)\b",
    r"\b(?:i'm|i am) afraid not\b|\bnot (?:one|something) (?:i|i've|i have)\b|\bi could never\b",
]
REFUSAL_WEAK_ZH = [
    r"[一半](?:块|分|次|种|个|位|点|件|本|场|首|部)?(?:也|都)没|什么\S{0,4}也没有|从没|从来没|从未|没\S{0,3}过|"
    r"不是我|(?:我)?不明白|哪里都没|我没有|不在那里|并非我|弄混|认错人|搞错|搞混|我只是\S{0,10}(?:而已|罢了)|"
    r"不是[^，。！？]{1,12}[。！!]|(?:之前|之后)很久|几百年(?:前|后)|几个世纪|我(?:出生|降生)(?:前|之前|以前)",
]


class RefusalClassifier:
    """Patterns over the answer's first sentences: the paper's refusals explain themselves up front.
    `score` counts the strong patterns (an explicit "I don't know", "never heard of it"); `weak=True` adds
    the in-role denials ("I never ruled any empire"), which decide contrastive turns only."""

    def __init__(self, head_sentences: int = 2):
        self.head = head_sentences
        self.en = re.compile("|".join(REFUSAL_EN))
        self.zh = re.compile("|".join(REFUSAL_ZH))
        self.other = re.compile("|".join(REFUSAL_OTHER))  # apart: joined to the others it slows them ten-fold
        self.en_weak = re.compile("|".join(REFUSAL_WEAK_EN))
        self.zh_weak = re.compile("|".join(REFUSAL_WEAK_ZH))

    def score(self, text: str, language: str | None, weak: bool = False) -> float:
        head = " ".join(sentences(text[:600])[:self.head]).lower() or text.lower()
        zh = (language or guess_language(text)) == "zh"
        n = len((self.zh if zh else self.en).findall(head))
        if n == 0 and language not in ("en", "zh"):
            n = len(self.other.findall(head))
        if weak and n == 0:
            n = 0.5 * len((self.zh_weak if zh else self.en_weak).findall(head))
        return float(n)

    def refused(self, text: str, language: str | None = None, weak: bool = True) -> bool:
        """Any refusal, in-role denials included: what an evaluation of contrastive turns counts."""
        return self.score(text, language, weak) > 0


class RefusalFilter(RowFilter):
    """Contrastive turns must be refused in role ('refusal.missed' otherwise); role-specific turns must
    not be refused ('refusal.unwarranted'). The two error kinds are counted apart."""

    name = "refusal"

    def __init__(self, cfg: RefusalConfig):
        self.cfg = cfg
        self.clf = RefusalClassifier(cfg.head_sentences)

    def check(self, item: Item) -> Drop | None:
        kind = item.row.get("kind")
        s = self.clf.score(item.answer, item.language, weak=kind == "contrastive")
        item.scores["refusal"] = s
        if kind == "contrastive" and s <= 0 and self.cfg.contrastive_must_refuse:
            return Drop("refusal.missed", "contrastive question answered instead of refused in role", s)
        if kind == "role_specific" and s >= 1 and self.cfg.role_specific_must_answer:
            return Drop("refusal.unwarranted", "role-specific question refused", s)
        return None
