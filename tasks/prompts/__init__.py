"""Prompt templates as data: one file per stage and language, `[system]` and `[user]` sections,
str.format fields, and `[part NAME]` sections for the other texts (and numbers) the stage puts into its
prompt: the judge's expected behaviour per turn kind, the responses' alias and no-claims fragments, the
queries' profile budgets. A section runs from its header line to the next header. A template's hash
(every section) enters the shard key of every row it produced."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
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
    parts: dict[str, str] = field(default_factory=dict)

    @property
    def sha(self) -> str:
        return content_hash([self.system, self.user, *([self.parts] if self.parts else [])])

    def part(self, name: str) -> str:
        if name not in self.parts:
            raise KeyError(f"prompt {self.name}.{self.language}: no [part {name}] section")
        return self.parts[name]

    def int_part(self, name: str) -> int:
        text = self.part(name).strip()
        if not text.isdigit():
            raise ValueError(f"prompt {self.name}.{self.language}: [part {name}] must be a whole number, not {text!r}")
        return int(text)

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
    sections: dict[str, str] = {}
    current: str | None = None
    lines: list[str] = []
    for line in [*path.read_text(encoding="utf-8").split("\n"), "[end]"]:
        head = _HEADER.match(line)
        if head is None:
            lines.append(line)
            continue
        if current is not None:
            if current in sections:
                raise ValueError(f"{path}: section [{current}] given twice")
            sections[current] = "\n".join(lines).strip("\n")
        current, lines = head.group(1), []
    if "user" not in sections:
        raise ValueError(f"{path}: a template needs a [user] section")
    parts = {k.removeprefix("part "): v for k, v in sections.items() if k.startswith("part ")}
    return Template(name, language, sections.get("system", ""), sections["user"], parts)


_HEADER = re.compile(r"^\[(system|user|part [a-z0-9_.]+|end)\]\s*$")


def fingerprint(name: str, languages: list[str]) -> dict[str, str]:
    return {lang: load(name, lang).sha for lang in sorted(set(languages) | {"en"})}


# The fences are runs of three angle brackets ("<<<PROFILE" ... "PROFILE>>>"); fence_safe shortens every run of
# three or more brackets in fenced text to two, counting the look-alikes that read as brackets (fullwidth,
# small, single guillemets, math angles) and the spaces or invisible characters between them. So no fenced
# text can contain a fence, whatever its case, spacing or spelling ("profile>>>", "PROFILE >>>", "PROFILE＞＞＞").
_LT = "<\uff1c\ufe64\u2039\u2329\u3008\u27e8\u276e"
_GT = ">\uff1e\ufe65\u203a\u232a\u3009\u27e9\u276f"
_GAP = "[\\s\u00ad\u034f\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufe00-\ufe0f\ufeff]*"
_RUNS = re.compile(f"[{_LT}](?:{_GAP}[{_LT}]){{2,}}|[{_GT}](?:{_GAP}[{_GT}]){{2,}}")


def fence_safe(text: str) -> str:
    """Text to put between fences: it cannot close (or open) a fence early (prompt-injection hygiene)."""
    return _RUNS.sub(lambda m: "<<" if m.group(0)[0] in _LT else ">>", text)
