"""benchmarks/quality_gate.py on a small labeled set: verdicts per row, precision/recall, the confusion table
per defect, the deterministic split, and the judge path with a configured judge engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from models.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_gate as qg  # noqa: E402

ROWS = [
    {"id": "g1", "language": "en", "character_id": "Q517@en", "label": "Napoleon", "description": "French emperor",
     "kind": "role_specific", "question": "How did you win at Austerlitz?",
     "answer": "I let the allies attack my right, then I took the Pratzen Heights and split their army in two.",
     "label_quality": "good", "defect": "none", "source": "written", "note": ""},
    {"id": "g2", "language": "zh", "character_id": "Q7071@zh", "label": "李白", "description": "唐代诗人",
     "kind": "contrastive", "question": "你用智能手机写诗吗？", "answer": "智能手机是何物？我从未听说过，我只用笔墨写诗。",
     "label_quality": "good", "defect": "none", "source": "written", "note": ""},
    {"id": "b1", "language": "en", "character_id": "Q517@en", "label": "Napoleon", "description": "French emperor",
     "kind": "role_specific", "question": ", Question:", "answer": "I won many battles in my life as emperor.",
     "label_quality": "bad", "defect": "question_fragment", "source": "bundled_run", "note": ""},
    {"id": "b2", "language": "en", "character_id": "Q517@en", "label": "Napoleon", "description": "French emperor",
     "kind": "role_specific", "question": "What was your greatest battle?",
     "answer": "My responses will follow the given format. Just click here to continue.",
     "label_quality": "bad", "defect": "meta_talk", "source": "bundled_run", "note": ""},
    {"id": "b3", "language": "zh", "character_id": "Q7071@zh", "label": "李白", "description": "唐代诗人",
     "kind": "role_specific", "question": "你最喜欢哪首诗？", "answer": "我最喜欢《静夜思》，那是我思乡时写的。",
     "label_quality": "bad", "defect": "other", "source": "written", "note": "labeled bad, looks fine: a miss"},
]
FAST = ["filter.judge.enabled=false", "filter.identity.enabled=false", "filter.relevance.enabled=false"]


def test_gate_verdicts_metrics_and_confusion_table():
    v = qg.gate(ROWS, load_config(overrides=FAST))
    assert v["g1"][0] is None and v["g2"][0] is None and v["b3"][0] is None
    assert v["b1"][0] == "question.label_echo" and v["b2"][0] == "meta_talk"
    m = qg.metrics(ROWS, v)
    assert (m["rows"], m["good"], m["bad"], m["kept"]) == (5, 2, 3, 3)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1.0
    assert m["by_defect"] == {"meta_talk": {"meta_talk": 1}, "none": {"kept": 2}, "other": {"kept": 1},
                              "question_fragment": {"question.label_echo": 1}}
    assert m["by_language"]["zh"]["precision"] == 0.5
    text = qg.report("all", m)
    assert "| question_fragment | 1 | 0 | question.label_echo 1 |" in text and "precision (good among kept) 0.667" in text


def test_split_is_deterministic_and_by_row():
    ids = [{"id": f"r{i}"} for i in range(200)]
    first = [qg.split_of(r) for r in ids]
    assert first == [qg.split_of(r) for r in ids] and 60 < first.count("calibration") < 140


def test_main_reads_a_devset_folder_and_runs_the_judge_when_asked(tmp_path, capsys):
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n")
    args = ["--devset", str(tmp_path), "--json", "--set", "engine.kind=fake", "--set", "engine.model=fake",
            *[x for o in FAST[1:] for x in ("--set", o)]]
    assert qg.main(args) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["all"]["kept"] == 3 and not plain["config"]["judge"]
    assert qg.main([*args, "--judge", "--set", "filter.judge.min_score=10"]) == 0
    judged = json.loads(capsys.readouterr().out)
    dropped = {k for c in judged["all"]["by_defect"].values() for k in c}
    # the fake engine's verdicts are deterministic: two of the three kept rows score under 10
    assert judged["config"]["judge"] and judged["all"]["kept"] == 1 and "judge" in dropped
