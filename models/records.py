"""The rows each stage writes. Every generated row keeps its raw prompt, raw output, token counts,
model id and sampling seed; every row keeps the ids it came from (`parents`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from models.base import Record

Category = Literal["real", "fictional"]
QueryKind = Literal["role_specific", "contrastive"]


def character_row_id(row: Mapping[str, Any]) -> str:
    """A character row's id in every later stage, `QID@language` (`Character.row_id` of a dict row)."""
    return f"{row['id']}@{row['language']}"


def base_id(character_row_id: str) -> str:
    """'Q42@en' -> 'Q42': what a character's rows share across languages (split key, distractor exclusion)."""
    return character_row_id.split("@", 1)[0]


class Character(Record):
    id: str = Field(description="Wikidata QID, else a stable id from the source")
    label: str
    description: str = ""
    aliases: list[str] = Field(default_factory=list)
    claims: str = Field("", description="properties rendered as 'property: value' lines")
    category: Category
    language: str = Field(description="language of label, description and profile (en, zh, ...)")
    popularity: float = Field(0.0, description="number of sitelinks, or the source's own rank score")
    summary: str = ""
    article: str = ""
    source: str = Field(description="wikidata | bundled | jsonl | csv")
    license: str = ""
    url: str = ""

    @property
    def row_id(self) -> str:
        return character_row_id({"id": self.id, "language": self.language})


class GenerationMeta(Record):
    """What produced a generated row, for audit and re-use."""

    prompt: str = Field(description="the chat messages sent, as JSON")
    raw_output: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    model: str = ""
    seed: int | None = None
    rounds: int = Field(1, description="sampling rounds used before a valid output")


class Query(Record):
    id: str
    character_id: str = Field(description="the character who is asked (row_id: id@language)")
    language: str
    kind: QueryKind = Field(description="role_specific: the character should answer; contrastive: refuse")
    question: str
    reason: str = ""
    author_id: str = Field(description="row_id of the character whose profile the question was written from")
    partner_id: str = Field(description="row_id of the other character of the pair")
    parents: list[str] = Field(default_factory=list)
    gen: GenerationMeta


class Turn(Record):
    """One simulated answer to one query, written with the full profile in the prompt."""

    id: str
    query_id: str
    character_id: str
    language: str
    kind: QueryKind
    question: str
    answer: str
    profile_truncated: bool = False
    parents: list[str] = Field(default_factory=list)
    gen: GenerationMeta


class SessionTurn(Record):
    turn_id: str
    query_id: str
    kind: QueryKind
    question: str
    answer: str
    scores: dict[str, float] = Field(default_factory=dict)


class Session(Record):
    """One multi-turn role-play session: a brief-introduction system prompt (never the profile) + turns."""

    id: str
    character_id: str
    label: str
    language: str
    category: Category
    system: str
    turns: list[SessionTurn]
    parents: list[str] = Field(default_factory=list)


class ChatMessage(Record):
    role: Literal["system", "user", "assistant"]
    content: str


class SFTExample(Record):
    id: str
    session_id: str
    character_id: str
    language: str
    split: Literal["train", "validation"]
    messages: list[ChatMessage]
    text: str = Field(description="the messages rendered with the student model's chat template")
    num_tokens: int = 0
    parents: list[str] = Field(default_factory=list)


class Rejection(Record):
    """A row a stage did not keep, with the reason; nothing is dropped silently."""

    row_id: str
    stage: str
    shard: int
    filter: str = Field(description="the check that rejected it (e.g. format, exact_dup, judge)")
    reason: str
    score: float | None = None
    character_id: str = ""
    text: str = ""
