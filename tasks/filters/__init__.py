"""The filter chain's building blocks. A filter sees the turns still alive and answers, per turn, keep
(None) or a `Drop(filter, reason, score)`; the stage counts drops per filter and writes a Rejection for
each. Filters write the scores they compute into `Item.scores`; kept turns carry them into the session so
users can re-threshold without regenerating."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass
class Item:
    """One turn under test: the Turn row, its character row, the answer as it will be kept (format may
    trim a cut-off answer) and the scores so far."""

    row: dict
    character: dict | None
    answer: str
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.row["id"]

    @property
    def language(self) -> str:
        return self.row.get("language") or (self.character or {}).get("language", "en")


@dataclass(frozen=True)
class Drop:
    filter: str
    reason: str
    score: float | None = None


class Filter:
    name: ClassVar[str]

    def apply(self, items: list[Item]) -> list[Drop | None]:
        raise NotImplementedError


class RowFilter(Filter):
    """A filter that decides each turn alone."""

    def check(self, item: Item) -> Drop | None:
        raise NotImplementedError

    def apply(self, items: list[Item]) -> list[Drop | None]:
        return [self.check(it) for it in items]
