"""Import the paper's released WikiRoleEval file (data/wiki_roleplay_multilingual_test_input_w_evidence.jsonl
in the authors' repository) as evaluation items, so its benchmark runs through the same metrics.

One record per character: `system`, `prompts` (the questions, asked in order as one conversation),
`role_consist_cands` (identity candidates), rejection labels (1: outside the character's knowledge),
`evidence` (one per prompt) and `meta` (label, description, lang, category, summary, ...). The authors'
README puts the scoring fields at the top level while their scoring code reads some from `meta`, and
spells the rejection field both `rejection labels` and `rejection_labels`: every placement is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from models.eval_records import Candidate, EvalItem
from models.ids import row_id
from models.records import character_row_id


class WikiRoleEvalError(ValueError):
    pass


def _field(rec: dict, *names: str, default: Any = None) -> Any:
    meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
    for src in (rec, meta):
        for n in names:
            if n in src and src[n] is not None:
                return src[n]
    return default


def read_records(path: str | Path) -> list[dict]:
    """A JSONL file (one record a line) or a JSON file holding a list of records."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text:
        return []
    if text[0] == "[":
        data = json.loads(text)
        if not isinstance(data, list):
            raise WikiRoleEvalError(f"{path}: expected a list of records")
        return data
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise WikiRoleEvalError(f"{path}:{n}: not JSON ({exc.msg})") from None
    return out


def _prompts(rec: dict) -> list[str]:
    prompts = _field(rec, "prompts")
    if prompts is None:  # fall back to the user turns of messages/ref_messages
        msgs = _field(rec, "messages", "ref_messages", default=[])
        prompts = [m["content"] for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    return [p if isinstance(p, str) else str(p.get("content", "")) for p in prompts]


def _candidates(raw: list, label: str, description: str) -> tuple[list[Candidate], int]:
    cands = []
    for c in raw or []:
        if isinstance(c, dict):
            cands.append(Candidate(label=str(c.get("label", "")), description=str(c.get("description", ""))))
            continue
        c = str(c).strip()
        c = c[2:].strip() if c.startswith("- ") else c
        sep = ":" if ":" in c else "：" if "：" in c else ""
        if c == label or not sep:
            cands.append(Candidate(label=c))
        else:
            name, _, desc = c.partition(sep)
            cands.append(Candidate(label=name.strip(), description=desc.strip()))
    for i, c in enumerate(cands):
        if c.label == label:
            return cands, i
    for i, c in enumerate(cands):
        if c.label.lower() == label.lower() or label.lower() in c.text.lower():
            return cands, i
    cands.append(Candidate(label=label, description=description))  # the true role must be a candidate
    return cands, len(cands) - 1


def _evidence(ev: Any, i: int) -> str:
    if isinstance(ev, list):
        item = ev[i] if i < len(ev) else ""
        if isinstance(item, list):
            return "\n".join(f"- {x}" for x in item)
        return str(item or "")
    return str(ev or "")


def import_wikiroleeval(path: str | Path) -> list[EvalItem]:
    items: list[EvalItem] = []
    for n, rec in enumerate(read_records(path)):
        label = _field(rec, "label")
        if not label:
            raise WikiRoleEvalError(f"{path}: record {n} has no label (meta.label)")
        lang = str(_field(rec, "lang", "language", default="en"))
        description = str(_field(rec, "description", default=""))
        prompts = _prompts(rec)
        labels = _field(rec, "rejection_labels", "rejection labels", "rejection", default=[]) or []
        evidence = _field(rec, "evidence", default=[])
        cands, correct = _candidates(_field(rec, "role_consist_cands", default=[]), label, description)
        system = _field(rec, "system", default="")
        if not system:
            msgs = _field(rec, "messages", "ref_messages", default=[])
            system = next((m["content"] for m in msgs if isinstance(m, dict) and m.get("role") == "system"), "")
        char_id = str(_field(rec, "id", "qid", default="") or row_id("wre", label, lang))
        session_id = row_id("wikiroleeval", n, label, lang)
        for i, q in enumerate(prompts):
            items.append(EvalItem(
                id=row_id(session_id, i), session_id=session_id, turn=i,
                character_id=character_row_id({"id": char_id, "language": lang}), label=str(label),
                description=description, language=lang,
                category=str(_field(rec, "category", default="")), system=str(system), question=q,
                should_refuse=bool(int(labels[i])) if i < len(labels) and labels[i] is not None else False,
                evidence=_evidence(evidence, i), summary=str(_field(rec, "summary", default="")),
                candidates=cands, correct=correct, source="wikiroleeval"))
    return items
