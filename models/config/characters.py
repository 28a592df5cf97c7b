from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.base import Strict


class CharactersConfig(Strict):
    source: Literal["bundled", "wikidata", "jsonl", "csv"] = Field("bundled", description="where characters come from")
    wikidata_dump: str | None = Field(None, description="Wikidata JSON dump (.json, .json.gz, .json.bz2)")
    wikipedia: list[str] = Field(default_factory=list, description="wikimedia/wikipedia Parquet/JSONL files")
    wikipedia_hub: str | None = Field(None, description="load_dataset('wikimedia/wikipedia', NAME) streaming, e.g. 20231101.en")
    path: str | None = Field(None, description="jsonl/csv: the user's own characters file")
    languages: list[str] = Field(default_factory=lambda: ["en"], description="languages kept (en, zh)")
    top_n: int = Field(20, ge=1, description="characters kept per language, by popularity")
    categories: list[Literal["real", "fictional"]] = Field(default_factory=lambda: ["real", "fictional"])
    min_profile_chars: int = Field(80, ge=0, description="a shorter summary+article is rejected as no usable profile")
    max_article_chars: int = Field(20000, ge=0, description="article text kept per character")
    shard_size: int = Field(8, ge=1, description="target characters per shard (shard count = next power of two)")
