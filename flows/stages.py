"""The stage registry and the chain check: each stage's declared inputs must be produced, with the
declared record type, by an earlier stage. Checked before anything runs."""

from __future__ import annotations

import importlib
from functools import cache

from tasks.base import SourceStage, Stage

STAGE_ORDER = ["characters", "queries", "responses", "filter", "dedup", "sft_data"]

STAGES: dict[str, str] = {
    "characters": "tasks.characters:CharactersStage",
    "queries": "tasks.queries:QueriesStage",
    "responses": "tasks.responses:ResponsesStage",
    "filter": "tasks.filter:FilterStage",
    "dedup": "tasks.dedup:DedupStage",
    "sft_data": "tasks.sft_data:SFTDataStage",
}


class ChainError(ValueError):
    pass


@cache
def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ChainError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def stages_until(until: str | None) -> list[str]:
    if until is None:
        return list(STAGE_ORDER)
    if until not in STAGE_ORDER:
        raise ChainError(f"--until {until!r}: unknown stage; stages: {', '.join(STAGE_ORDER)}")
    return STAGE_ORDER[: STAGE_ORDER.index(until) + 1]


def check_chain(names: list[str], stages: dict[str, Stage] | None = None) -> None:
    """Raise ChainError naming the stage and column type that does not line up."""
    stages = stages or {n: get_stage(n) for n in names}
    produced: dict[str, type] = {}
    for i, name in enumerate(names):
        st = stages[name]
        if i == 0 and not isinstance(st, SourceStage):
            raise ChainError(f"stage {name!r} comes first but is not a source stage")
        for up, typ in st.inputs.items():
            if up not in produced:
                raise ChainError(f"stage {name!r} reads {up!r}, which no earlier stage produces")
            if not issubclass(produced[up], typ):
                raise ChainError(f"stage {name!r} expects {typ.__name__} rows from {up!r}, "
                                 f"but {up!r} writes {produced[up].__name__}")
        produced[name] = st.output
