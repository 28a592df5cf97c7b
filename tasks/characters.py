"""Stage `characters`: source characters (Wikidata + Wikipedia, the bundled offline corpus, or a
user's JSONL/CSV) into one `Character` row per character and language, top-N per language by
popularity, every dropped candidate kept as a Rejection. Sources and their bad-input decisions are
documented in tasks/sources/."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.config import RunConfig
from models.config.characters import CharactersConfig
from models.records import Character, Rejection
from tasks.base import SourceStage
from tasks.sources import bundled, file_fingerprint, userfile, wikidata

Collector = Callable[[CharactersConfig], tuple[list[Character], list[Rejection]]]

SOURCES: dict[str, Collector] = {
    "wikidata": wikidata.collect,
    "bundled": bundled.collect,
    "jsonl": userfile.collect,
    "csv": userfile.collect,
}


def input_files(cfg: CharactersConfig) -> list[str]:
    if cfg.source == "wikidata":
        return [f for f in [cfg.wikidata_dump, *cfg.wikipedia] if f]
    if cfg.source == "bundled":
        try:
            return [str(bundled.bundled_path(cfg))]
        except FileNotFoundError:
            return [cfg.bundled_file] if cfg.bundled_file else []
    return [cfg.path] if cfg.path else []


def collect_characters(cfg: CharactersConfig) -> tuple[list[Character], list[Rejection]]:
    return SOURCES[cfg.source](cfg)


class CharactersStage(SourceStage):
    name = "characters"
    output = Character

    def fingerprint(self, config: RunConfig) -> dict[str, Any]:
        cfg = config.characters
        return {"characters": cfg.model_dump(mode="json"),
                "inputs": [file_fingerprint(f) for f in input_files(cfg)]}

    def collect(self, config: RunConfig) -> tuple[list[Character], list[Rejection]]:
        return collect_characters(config.characters)

    def describe_input(self, config: RunConfig) -> str:
        return f"characters.source={config.characters.source}: " + (", ".join(input_files(config.characters))
                                                                    or "(no file)")

    @staticmethod
    def shard_key(row: Character) -> str:
        # the character id, not id@language: both language versions land in the same shard
        return row.id
