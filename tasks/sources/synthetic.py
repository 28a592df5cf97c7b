"""Synthetic characters: n small, valid Character rows (eight well-known names, then numbered copies), for
runs on no data (`characters.source: jsonl` over `write_characters`), the orchestration benchmarks and the
tests. Deterministic: the same n and language give the same rows."""

from __future__ import annotations

import json
from pathlib import Path

from models.records import Character

NAMES = [
    ("Q1", "Ada Lovelace", "English mathematician", "real"),
    ("Q2", "Sherlock Holmes", "fictional detective created by Arthur Conan Doyle", "fictional"),
    ("Q3", "Napoleon", "French emperor", "real"),
    ("Q4", "Sun Wukong", "Monkey King of Journey to the West", "fictional"),
    ("Q5", "Marie Curie", "physicist and chemist", "real"),
    ("Q6", "James Bond", "fictional British spy", "fictional"),
    ("Q7", "Cleopatra", "queen of Ptolemaic Egypt", "real"),
    ("Q8", "Frodo Baggins", "hobbit of the Shire", "fictional"),
]


def synthetic_characters(n: int = 8, language: str = "en") -> list[dict]:
    out = []
    for i in range(n):
        qid, label, desc, cat = NAMES[i % len(NAMES)]
        qid = qid if i < len(NAMES) else f"Q{100 + i}"
        out.append(Character(id=qid, label=label if i < len(NAMES) else f"{label} {i}", description=desc,
                             category=cat, language=language, popularity=100 - i,
                             summary=f"{label} is {desc}. " * 4, article=f"{label} is {desc}. " * 8,
                             source="jsonl").model_dump())
    return out


def write_characters(path: Path, n: int = 8, language: str = "en") -> Path:
    """The rows of `synthetic_characters` as a JSONL file (one Character per line)."""
    path.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in synthetic_characters(n, language)))
    return path
