"""Prompt templates as data: one file per stage and language, `[system]` and `[user]` sections,
str.format fields. A template's hash enters the shard key of every row it produced."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from models.ids import content_hash

PROMPTS = Path(__file__).parent
FENCE = ("<<<PROFILE", "PROFILE>>>")


@dataclass(frozen=True)
class Template:
    name: str
    language: str
    system: str
    user: str

    @property
    def sha(self) -> str:
        return content_hash([self.system, self.user])

    def messages(self, **fields: str) -> list[dict[str, str]]:
        msgs = []
        system = self.system.format(**fields).strip()
        if system:
            msgs.append({"role": "system", "content": system})
        msgs.append({"role": "user", "content": self.user.format(**fields).strip()})
        return msgs


@cache
def load(name: str, language: str) -> Template:
    """The template for a stage and language; languages without their own file use English."""
    path = PROMPTS / f"{name}.{language}.txt"
    if not path.exists():
        path = PROMPTS / f"{name}.en.txt"
        language = "en"
    text = path.read_text(encoding="utf-8")
    if "[user]" not in text:
        raise ValueError(f"{path}: a template needs a [user] section")
    head, user = text.split("[user]", 1)
    system = head.split("[system]", 1)[1] if "[system]" in head else ""
    return Template(name, language, system.strip("\n"), user.strip("\n"))


def fingerprint(name: str, languages: list[str]) -> dict[str, str]:
    return {lang: load(name, lang).sha for lang in sorted(set(languages) | {"en"})}


def fence_safe(text: str) -> str:
    """Profile text must not close the data fence early (prompt-injection hygiene)."""
    for f in FENCE:
        text = text.replace(f, f.replace("PROFILE", "PR0FILE"))
    return text
