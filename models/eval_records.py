"""Rows of the evaluation: the items (one per question turn, with gold labels and evidence) and the
per-model results (the answer, every judge sample and the judge-free checks)."""

from __future__ import annotations

from pydantic import Field

from models.base import Record


class Candidate(Record):
    label: str
    description: str = ""

    @property
    def text(self) -> str:
        return f"{self.label}: {self.description}" if self.description else self.label


class EvalItem(Record):
    id: str
    session_id: str = Field(description="items of one session are asked in turn order, as one conversation")
    turn: int = Field(description="position of the question in its session")
    character_id: str
    label: str
    description: str = ""
    language: str
    category: str = ""
    system: str = Field(description="the brief introduction the model under test gets (never the profile)")
    question: str
    should_refuse: bool = Field(description="gold: the question lies outside the character's knowledge")
    evidence: str = Field("", description="the profile passage the knowledge judge sees")
    summary: str = Field("", description="the character's profile summary, for the knowledge judge")
    candidates: list[Candidate] = Field(default_factory=list, description="identity test: true role + distractors")
    correct: int = Field(0, description="index of the true role in candidates")
    source: str = Field("heldout", description="heldout | wikiroleeval")


class EvalResult(Record):
    item_id: str
    model: str
    language: str
    answer: str
    answer_tokens: int = 0
    identity_picks: list[int] = Field(default_factory=list, description="parsed judge picks (-1: unparseable)")
    identity: float | None = Field(None, description="share of parsed judge picks naming the true role")
    knowledge_scores: list[float] = Field(default_factory=list)
    knowledge: float | None = None
    refusal_votes: list[int] = Field(default_factory=list, description="1 refused, 0 answered, -1 unparseable")
    refused: bool | None = Field(None, description="judge majority")
    rejection_correct: bool | None = None
    unparsable: dict[str, int] = Field(default_factory=dict, description="judge samples not parsed, per metric")
    embed_pick: int | None = None
    embed_correct: bool | None = None
    pattern_refused: bool = False
    pattern_rejection_correct: bool = False
    out_of_role: bool = False
    judge_raw: list[str] = Field(default_factory=list, description="raw judge outputs, identity/knowledge/rejection")
