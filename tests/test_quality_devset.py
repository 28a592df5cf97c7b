"""Schema of the labeled quality dev set (tests/data/quality/, see its README): the benchmark
benchmarks/quality_gate.py calibrates the filter chain on it, so a malformed row must fail here."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

DEVSET = Path(__file__).parent / "data" / "quality"
FIELDS = {"id", "language", "character_id", "label", "description", "kind", "question", "answer",
          "label_quality", "defect", "source", "note"}
ENUMS = {"language": {"en", "zh"}, "kind": {"role_specific", "contrastive"}, "label_quality": {"good", "bad"},
         "source": {"bundled_run", "written"}}
DEFECTS = {"none", "question_fragment", "question_echo", "question_not_addressed", "meta_talk", "irrelevant",
           "degenerate", "other_character", "not_first_person", "out_of_role", "refusal_wrong", "wrong_language",
           "truncated", "other"}


def load_rows() -> list[dict]:
    rows = []
    for path in sorted(DEVSET.glob("*.jsonl")):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AssertionError(f"{path.name}:{n}: not JSON: {exc}") from exc
    return rows


ROWS = load_rows()


@pytest.mark.parametrize("row", ROWS, ids=[r.get("id", "?") for r in ROWS])
def test_row_schema(row):
    assert set(row) == FIELDS, f"{row.get('id')}: fields {sorted(set(row) ^ FIELDS)}"
    for key, allowed in ENUMS.items():
        assert row[key] in allowed, f"{row['id']}: {key}={row[key]!r}"
    assert row["defect"] in DEFECTS, f"{row['id']}: defect={row['defect']!r}"
    assert (row["defect"] == "none") == (row["label_quality"] == "good"), f"{row['id']}: good rows have defect none"
    for key in ("id", "character_id", "label", "question"):
        assert isinstance(row[key], str) and row[key].strip(), f"{row['id']}: empty {key}"
    assert isinstance(row["answer"], str) and isinstance(row["note"], str) and "\n" not in row["description"]
    assert row["character_id"].endswith("@" + row["language"]), f"{row['id']}: character_id {row['character_id']}"


def test_ids_unique():
    dup = [k for k, v in Counter(r["id"] for r in ROWS).items() if v > 1]
    assert not dup, f"duplicate ids: {dup}"


@pytest.mark.parametrize("key, value", [("language", "en"), ("language", "zh"), ("label_quality", "good"),
                                        ("label_quality", "bad"), ("source", "bundled_run"), ("source", "written"),
                                        ("kind", "role_specific"), ("kind", "contrastive")])
def test_both_sides_present(key, value):
    assert any(r[key] == value for r in ROWS), f"no row with {key}={value}"


def test_size_and_every_defect_present():
    assert len(ROWS) >= 400, f"{len(ROWS)} rows, want >= 400"
    missing = DEFECTS - {r["defect"] for r in ROWS}
    assert not missing, f"defects without a row: {sorted(missing)}"
