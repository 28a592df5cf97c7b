"""Question validation for the queries stage, English and Chinese.

A synthesised question is kept only if a careful annotator would ask it of the character: a question or a
request, addressed to the character in the second person, in the row's language, long enough, and not a
fragment, a number, a bare name, an echo of the prompt's labels (`Question:`, `A`/`B`, "Character A") or a
piece of the prompt, nor a repeat of another question of the same call.

`validate_question` answers None (valid) or a reason "code: detail"; the code (the part before the colon)
is what the stage counts per reason ("question.<code>"). Codes: too_short, too_long, number, bare_name,
label_echo, prompt_echo, wrong_language, degenerate, meta, not_a_question, not_second_person, duplicate.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from functools import cache

from models.config.filter import QuestionsConfig
from tasks.filters.text import cjk_ratio, normalise, tokens

CODES = ("too_short", "too_long", "number", "bare_name", "label_echo", "prompt_echo", "wrong_language",
         "degenerate", "meta", "not_a_question", "not_second_person", "duplicate")

_LABEL_PREFIX = re.compile(r"^\W*(?:questions?|answers?|reasons?|q|a|问题|回答|答案|理由)\s*\d*\s*[:：]", re.I)
_LABEL_ANYWHERE = re.compile(r"\b(?:questions?|answers?|reasons?)\s*\d*\s*:", re.I)
_CHARACTER_LETTER_EN = re.compile(r"\b(?:character|role|person|profile|persona)\s+[AB]\b", re.I)
# "A"/"B" as the prompt's labels: a capital A or B standing alone, not the article at a sentence start
_LETTER_EN = re.compile(r"(?<![.?!:;\"'(]\s)(?<!^)(?<![\w'’-])[AB](?![\w'’-])")
_LETTER_SUBJECT_EN = re.compile(
    r"^\W*[AB]\s+(?:should|can|could|would|will|must|may|might|is|was|has|had|does|did|asks?|knows?|wants?|"
    r"answers?|says?|lives?|lived)\b")
_CHARACTER_LETTER_ZH = re.compile(r"(?:角色|人物|资料)\s*[AB甲乙]|(?<![A-Za-z])[AB](?![A-Za-z])")
_NUMBER = re.compile(r"^[\W\d_]*$")
_SECOND_EN = re.compile(r"\b(?:you|your|yours|yourself|yourselves|you'(?:re|ve|d|ll)|ya|thee|thou|thy|thine|"
                        r"y'all)\b", re.I)
_REQUEST_EN = re.compile(
    r"^\W*(?:please\s+)?(?:tell|describe|share|explain|imagine|talk|walk|give|name|recall|recount|"
    r"paint|picture|remind|teach|show|help|let's|let us)\b", re.I)
_WH_EN = re.compile(r"^\W*(?:what|how|why|when|where|who|whom|whose|which|do|did|does|are|is|was|were|have|has|had|"
                    r"can|could|would|will|should|shall|may|might|if|in what|at what|on what)\b", re.I)
_SECOND_ZH = re.compile(r"你|您|阁下|汝|足下|君")
_REQUEST_ZH = re.compile(r"^\W*(?:请|能否|可否|能不能|可不可以|麻烦)?(?:你|您)?(?:说说|谈谈|讲讲|聊聊|介绍|描述|分享|"
                         r"回忆|讲述|告诉|解释)")
_WH_ZH = re.compile(r"[?？]|吗|呢|什么|怎么|怎样|如何|为什么|为何|哪|谁|几|多少|是否|是不是|有没有|能否|可否|难道|何")
_PLACEHOLDER = re.compile(r"^\W*(?:\.\.\.|…|etc\.?|n/?a|none|null|todo|tbd|xxx+|\?+)\W*$", re.I)
_FIELD = re.compile(r"\{[a-z_]+\}|<<<|>>>|\[\{|\}\]|\"question\"|\"reason\"|(?:\.\.\.|…)\s*[?？]\s*$|\[insert\b|"
                    r"\[(?:name|date|time|place|topic|character|your \w+)\]", re.I)
# about the task rather than the character's life: the prompt, profile, user, document; or the interviewer's
# side turned round ("what would you like to know", "who am I?")
_META_EN = re.compile(
    r"\b(?:the|this|that|above|following|given|provided) (?:profile|document|text|prompt|template|json|format|"
    r"instructions?|task|passage|article|topic)\b|\bthe user\b|\b(?:the )?(?:above|following) (?:\w+ )?"
    r"(?:characters?|questions?|profiles?)\b|\b(?:would you like|do you want|did you want) to know\b|"
    r"\banything else\b|\b(?:can|may|shall) i (?:help|assist)\b|^\W*who am i\b|\bcharacter (?:a|b)\b", re.I)
_META_ZH = re.compile(r"资料|简介|提示|模板|格式|用户|上述|以上|下面的(?:角色|问题)|(?:你|您)还?(?:想|想要)(?:知道|了解)|"
                      r"还有(?:什么|其他)(?:问题|需要)|我是谁")


def _words(text: str) -> list[str]:
    return re.findall(r"[^\W_]+(?:['’][^\W_]+)?", text.lower())


def _grams(toks: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)}


@cache
def _template_grams(language: str, n: int) -> frozenset[tuple[str, ...]]:
    """Word (en) or character (zh) n-grams of the queries prompt's own wording, fields removed: a
    question sharing many of them is the instruction copied back."""
    from tasks import prompts

    tpl = prompts.load("queries", language)
    text = re.sub(r"\{[a-z_]+\}", " ", tpl.system + "\n" + tpl.user)
    return frozenset(_grams(tokens(text), n))


def _names(labels: Iterable[str]) -> set[str]:
    return {normalise(x) for x in labels if x and normalise(x)}


def validate_question(text: str, language: str, *, a_label: str = "", b_label: str = "", prompt_text: str = "",
                      earlier: Iterable[str] = (), aliases: Iterable[str] = (),
                      cfg: QuestionsConfig | None = None) -> str | None:
    """None when `text` is a valid question of a role-play interview in `language`, else "code: detail".
    `earlier`: the questions already kept from the same call (duplicates); `prompt_text`: the rendered
    prompt (pieces of it copied back are echoes)."""
    cfg = cfg or QuestionsConfig()
    q = " ".join((text or "").split()).strip()
    zh = language == "zh"
    core = q.strip(" \"'“”‘’「」『』()（）[]【】*-–—,.;:，。；：、")
    if not core or _NUMBER.match(core):
        return f"number: {q[:40]!r}" if re.search(r"\d", q) else f"too_short: {q[:40]!r}"
    if _PLACEHOLDER.match(core) or _FIELD.search(q):
        return f"prompt_echo: placeholder or template field {q[:60]!r}"
    if _LABEL_PREFIX.match(q) or _LABEL_ANYWHERE.search(q):
        return f"label_echo: {q[:60]!r}"
    names = _names([a_label, b_label, *aliases])
    if normalise(core) in names:
        return f"bare_name: {q[:60]!r}"
    ratio = cjk_ratio(q)
    if zh:
        if ratio < cfg.min_cjk_ratio_zh:
            return f"wrong_language: expected zh, CJK share {ratio:.2f}"
        if _CHARACTER_LETTER_ZH.search(q):
            return f"label_echo: refers to the prompt's labels: {q[:60]!r}"
        toks = tokens(core)
        n_units = sum(1 for t in toks if "\u3400" <= t[0] <= "\u9fff")
        if n_units < cfg.min_chars_zh:
            return f"too_short: {n_units} characters < {cfg.min_chars_zh}"
        if n_units > cfg.max_chars_zh:
            return f"too_long: {n_units} characters > {cfg.max_chars_zh}"
    else:
        if ratio > 0.3:
            return f"wrong_language: expected {language}, CJK share {ratio:.2f}"
        if _CHARACTER_LETTER_EN.search(q) or _LETTER_SUBJECT_EN.match(q) or _LETTER_EN.search(q):
            return f"label_echo: refers to the prompt's labels: {q[:60]!r}"
        toks = _words(core)
        if len(toks) < cfg.min_words:
            return f"too_short: {len(toks)} words < {cfg.min_words}"
        if len(toks) > cfg.max_words:
            return f"too_long: {len(toks)} words > {cfg.max_words}"
    # a run of the same word or phrase ("you you you", "what what what")
    top = Counter(toks).most_common(1)[0][1]
    if len(toks) >= 6 and top / len(toks) > 0.5:
        return f"degenerate: one token is {top} of {len(toks)}"
    grams3 = [tuple(toks[i:i + 3]) for i in range(len(toks) - 2)]
    if len(grams3) >= 4 and len(set(grams3)) / len(grams3) < 0.6:
        return "degenerate: repeated phrases"
    # pieces of the prompt: the instruction copied back, or a verbatim stretch of the rendered prompt
    n = cfg.echo_ngram_zh if zh else cfg.echo_ngram
    mine = _grams(tokens(core), n)
    if mine:
        share = len(mine & _template_grams("zh" if zh else "en", n)) / len(mine)
        if share >= cfg.echo_share:
            return f"prompt_echo: {share:.0%} of its {n}-grams are the prompt's instructions"
    if prompt_text:
        norm = normalise(core)
        if len(norm) >= (12 if zh else 30) and norm in normalise(prompt_text) and not re.search(r"[?？]", q):
            return "prompt_echo: copied verbatim from the prompt"
    m = (_META_ZH if zh else _META_EN).search(q)
    if m:
        return f"meta: about the task, not the character's life: {m.group(0)!r}"
    # a question or a request, addressed to the character
    if zh:
        if not (_WH_ZH.search(q) or _REQUEST_ZH.match(q)):
            return f"not_a_question: {q[:60]!r}"
        if cfg.second_person and not _SECOND_ZH.search(q):
            return f"not_second_person: {q[:60]!r}"
    else:
        if not ("?" in q or _WH_EN.match(q) or _REQUEST_EN.match(q)):
            return f"not_a_question: {q[:60]!r}"
        if cfg.second_person and not _SECOND_EN.search(q):
            return f"not_second_person: {q[:60]!r}"
    key = normalise(core)
    for e in earlier:
        ek = normalise(e)
        if ek == key:
            return f"duplicate: same as {e[:60]!r}"
        a, b = set(tokens(e)), set(tokens(core))
        if a and b and len(a & b) / len(a | b) >= cfg.duplicate_jaccard:
            return f"duplicate: near copy of {e[:60]!r}"
    return None


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


class QuestionCheck:
    """The `validate` hook of tasks.queries.parse_questions for one call: the call's language, labels and
    rendered prompt. `check(question, kept)` -> reason or None."""

    def __init__(self, language: str, *, a_label: str, b_label: str, prompt_text: str,
                 aliases: Iterable[str] = (), cfg: QuestionsConfig | None = None):
        self.language = language
        self.a_label, self.b_label = a_label, b_label
        self.prompt_text = prompt_text
        self.aliases = list(aliases)
        self.cfg = cfg or QuestionsConfig()

    def __call__(self, question: str, kept: list[str]) -> str | None:
        return validate_question(question, self.language, a_label=self.a_label, b_label=self.b_label,
                                 prompt_text=self.prompt_text, earlier=kept, aliases=self.aliases, cfg=self.cfg)


def summarise(dropped: list[tuple[str, str]]) -> str:
    """'label_echo x2, too_short' plus the first example: the message of a call with no valid question."""
    counts = Counter(reason_code(r) for _, r in dropped)
    parts = [f"{c} x{n}" if n > 1 else c for c, n in counts.most_common()]
    head = f"; first: {dropped[0][1]}" if dropped else ""
    return (", ".join(parts) or "no question") + head


Validate = Callable[[str, list[str]], "str | None"]


def question_check(cfg: QuestionsConfig, a: dict, b: dict, chat: list[dict[str, str]]) -> QuestionCheck | None:
    """The validator of one (A, B) call of the queries stage, or None when validation is off."""
    if not cfg.enabled:
        return None
    return QuestionCheck(a["language"], a_label=a.get("label", ""), b_label=b.get("label", ""),
                         prompt_text="\n".join(m["content"] for m in chat), aliases=a.get("aliases") or (), cfg=cfg)
