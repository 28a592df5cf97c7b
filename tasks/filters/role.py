"""Out-of-role / assistant-speak detection and refusal correctness, English and Chinese patterns."""

from __future__ import annotations

import re

from models.config.filter import OutOfRoleConfig, RefusalConfig
from tasks.filters import Drop, Item, RowFilter
from tasks.filters.text import sentences

_I = re.IGNORECASE
ASSISTANT_EN = [
    r"\bas an? (?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|(?:ai |virtual )?assistant|chatbot)\b",
    r"\bi(?:'m| am) (?:just |only |merely |simply )?an? (?:ai|artificial intelligence|(?:large )?language model|"
    r"(?:ai |virtual |helpful )?assistant|chatbot|bot|computer program)\b",
    r"\b(?:language model|openai|chatgpt|my training data|knowledge cut-?off|training cut-?off)\b",
    r"\bi (?:do not|don't) have (?:personal |real |any )?(?:experiences|feelings|emotions|opinions|a (?:physical )?body)\b",
    r"\bhow (?:can|may) i (?:assist|help) you(?: today)?\b",
    # the register a small generator slips into (seen in 23% of a 135M model's kept turns before these)
    r"\b(?:happy|glad|here) to assist\b|\bassist you (?:further|with)\b",
    r"\bsorry for (?:the|any) (?:confusion|misunderstanding)\b",
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
    r"(?:很高兴|乐意)为您(?:服务|提供帮助)|抱歉(?:给您)?(?:造成|带来)(?:的)?(?:困惑|误解)",
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
FIRST_PERSON_EN = re.compile(r"\b(?:i|i'm|i've|i'd|i'll|me|my|mine|myself|we|our|us)\b")
FIRST_PERSON_ZH = re.compile(r"我|咱|俺|本人|吾|朕|寡人|在下|老夫|本王|本官|本座|小女子|妾身|贫道|老朽|洒家|本宫")
THIRD_EN = re.compile(r"\b(?:he|she|his|her|him|they)\b")
THIRD_ZH = re.compile(r"他|她")
THIRD_VERB_AFTER = re.compile(r"\s+(?:was|is|had|has|became|served|lived|died|wrote|remains|were|did)\b")


def _names(character: dict | None) -> list[str]:
    if not character:
        return []
    names = [character.get("label", "")] + list(character.get("aliases") or [])
    return [n.strip() for n in names if n and len(n.strip()) >= 2]


class OutOfRoleFilter(RowFilter):
    """Assistant-speak, meta-talk about the prompt/profile, describing the character in the third person,
    or introducing oneself as another character of the shard."""

    name = "out_of_role"

    def __init__(self, cfg: OutOfRoleConfig, characters: dict[str, dict] | None = None):
        self.cfg = cfg
        # patterns are lower case and run on lower-cased text: much faster than re.IGNORECASE
        self.en = re.compile("|".join(ASSISTANT_EN + META_EN + [p.lower() for p in cfg.extra_patterns]))
        self.zh = re.compile("|".join(ASSISTANT_ZH + META_ZH + [p.lower() for p in cfg.extra_patterns]))
        # one generic pattern, then a dict lookup of the words after it: a regex alternation of every
        # label in the shard would be slow with thousands of characters
        self.labels = {n.lower() for c in (characters or {}).values() for n in _names(c)}
        self.max_words = max((len(n.split()) for n in self.labels), default=1)
        self.max_chars = max((len(n) for n in self.labels), default=1)
        self.intro = re.compile(r"(?:\b(?:i am|i'm|my name is|call me|they call me)\s+|我是|我叫|我乃|我的名字(?:是|叫))")
        self.my_name_en = re.compile(r"\b(?i:my name is) ([A-Z][\w'.-]*(?: [A-Z][\w'.-]*)*)")

    def check(self, item: Item) -> Drop | None:
        text = item.answer
        low = text.lower()
        m = (self.zh.search(low) or self.en.search(low)) if item.language == "zh" else self.en.search(low)
        if m:
            return Drop("out_of_role", f"assistant or meta talk: {m.group(0)!r}")
        own = _names(item.character)
        own_l = [n.lower() for n in own]
        if self.cfg.other_names:
            for m in self.intro.finditer(low):
                name = self._known_name(low[m.end():m.end() + self.max_chars + 1])
                if name and not any(name in n or n in name for n in own_l):
                    return Drop("out_of_role", f"speaks as another character: {low[m.start():m.end()] + name!r}")
            m = self.my_name_en.search(text)
            if m and own_l and not any(w.lower() in " ".join(own_l) for w in m.group(1).split()):
                return Drop("out_of_role", f"gives another name: {m.group(0)!r}")
        if self.cfg.third_person and own:
            return self._third_person(item, own)
        return None

    def _known_name(self, tail: str) -> str | None:
        """The longest known label the text after 'I am' / '我是' starts with."""
        tail = tail.lower()
        if not self.labels:
            return None
        if tail[:1] and "\u4e00" <= tail[0] <= "\u9fff":
            for k in range(min(len(tail), self.max_chars), 1, -1):
                if tail[:k] in self.labels:
                    return tail[:k]
            return None
        words = re.findall(r"[\w'.-]+", tail)
        for k in range(min(len(words), self.max_words), 0, -1):
            cand = " ".join(words[:k]).rstrip(".")
            if cand in self.labels:
                return cand
        return None

    def _third_person(self, item: Item, own: list[str]) -> Drop | None:
        text = item.answer
        if item.language == "zh":
            if FIRST_PERSON_ZH.search(text):
                return None
            if any(n in text for n in own) or THIRD_ZH.search(text):
                return Drop("out_of_role", "describes the character in the third person (no first person)")
            return None
        low = text.lower()
        head = low[:200]
        for n in own:
            n = n.lower()
            if head.startswith(n) and THIRD_VERB_AFTER.match(head, len(n)):
                return Drop("out_of_role", f"describes the character in the third person: {text[:60]!r}")
        if FIRST_PERSON_EN.search(low):
            return None
        if any(n.lower() in low for n in own) or THIRD_EN.search(low):
            return Drop("out_of_role", "describes the character in the third person (no first person)")
        return None


REFUSAL_EN = [
    r"\b(?:i|we)\s+(?:do not|don't|did not|didn't|cannot|can't|could not|couldn't|can ?not)\s+(?:really |truly )?"
    r"(?:know|say|tell|answer|speak|comment|recall|understand|imagine|fathom|claim)\b",
    r"\b(?:i'm|i am|i was)\s+(?:not|never)\s+(?:familiar|aware|acquainted|versed|able to (?:answer|say|speak))",
    r"\bnever (?:heard|been told|learned|encountered|known|come across)\b",
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


class RefusalClassifier:
    """Patterns over the answer's first sentences: the paper's refusals explain themselves up front."""

    def __init__(self, head_sentences: int = 2):
        self.head = head_sentences
        self.en = re.compile("|".join(REFUSAL_EN))
        self.zh = re.compile("|".join(REFUSAL_ZH))

    def score(self, text: str, language: str) -> float:
        head = " ".join(sentences(text[:600])[:self.head]).lower() or text.lower()
        pattern = self.zh if language == "zh" else self.en
        return float(len(pattern.findall(head)))

    def refused(self, text: str, language: str) -> bool:
        return self.score(text, language) >= 1


class RefusalFilter(RowFilter):
    """Contrastive turns must be refused in role ('refusal.missed' otherwise); role-specific turns must
    not be refused ('refusal.unwarranted'). The two error kinds are counted apart."""

    name = "refusal"

    def __init__(self, cfg: RefusalConfig):
        self.cfg = cfg
        self.clf = RefusalClassifier(cfg.head_sentences)

    def check(self, item: Item) -> Drop | None:
        s = self.clf.score(item.answer, item.language)
        item.scores["refusal"] = s
        kind = item.row.get("kind")
        if kind == "contrastive" and s < 1 and self.cfg.contrastive_must_refuse:
            return Drop("refusal.missed", "contrastive question answered instead of refused in role", s)
        if kind == "role_specific" and s >= 1 and self.cfg.role_specific_must_answer:
            return Drop("refusal.unwarranted", "role-specific question refused", s)
        return None
