"""Answering and judging. The model under test answers every item with only the brief system prompt (never
the profile); the judge reads each answer with one prompt per metric (tasks/prompts/eval_*.<lang>.txt) and
is sampled `judge_samples` times per prompt."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from engines.base import Sampling
from models.config.eval import EvalConfig
from models.eval_records import EvalItem
from tasks import prompts
from tasks.generation import sampling_from

JUDGE_PROMPTS = ("eval_identity", "eval_knowledge", "eval_rejection")


def generate_answers(items: list[EvalItem], engine: Any, cfg: EvalConfig, seed: int = 0) -> dict[str, tuple[str, int]]:
    """item id -> (answer, completion tokens). Multi-turn: a session's questions are asked in order, each
    with the earlier questions and the model's own earlier answers in the context (the paper's protocol)."""
    sp = sampling_from(cfg.answer_sampling, seed=seed)
    out: dict[str, tuple[str, int]] = {}
    if not cfg.multi_turn:
        chats = [[{"role": "system", "content": it.system}, {"role": "user", "content": it.question}] for it in items]
        for it, g in zip(items, engine.generate(chats, sp) if chats else [], strict=True):
            out[it.id] = (g.text.strip(), g.completion_tokens)
        return out
    sessions: dict[str, list[EvalItem]] = defaultdict(list)
    for it in items:
        sessions[it.session_id].append(it)
    for v in sessions.values():
        v.sort(key=lambda it: it.turn)
    history = {sid: [{"role": "system", "content": v[0].system}] for sid, v in sessions.items()}
    for depth in range(max((len(v) for v in sessions.values()), default=0)):
        batch = [(sid, v[depth]) for sid, v in sessions.items() if depth < len(v)]
        chats = [history[sid] + [{"role": "user", "content": it.question}] for sid, it in batch]
        gens = engine.generate(chats, sp)
        for (sid, it), chat, g in zip(batch, chats, gens, strict=True):
            text = g.text.strip()
            out[it.id] = (text, g.completion_tokens)
            history[sid] = chat + [{"role": "assistant", "content": text}]
    return out


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n].rsplit(" ", 1)[0] + " …"


def judge_messages(kind: str, item: EvalItem, answer: str, max_evidence_chars: int = 1500) -> list[dict[str, str]]:
    tpl = prompts.load(kind, item.language)
    return tpl.messages(question=item.question, answer=answer, label=item.label,
                        candidates="\n".join(f"- {c.text}" for c in item.candidates),
                        summary=_clip(item.summary or item.description, max_evidence_chars),
                        evidence=_clip(item.evidence, max_evidence_chars) or "-")


def run_judge(items: list[EvalItem], answers: dict[str, str], engine: Any, cfg: EvalConfig, seed: int = 0
              ) -> dict[str, dict[str, list[str]]]:
    """item id -> {"identity"|"knowledge"|"rejection": [judge_samples raw outputs]}."""
    sp = Sampling(temperature=cfg.judge_temperature, top_p=1.0, max_tokens=cfg.judge_max_tokens, seed=seed,
                  n=cfg.judge_samples)
    jobs, chats = [], []
    for it in items:
        for kind in JUDGE_PROMPTS:
            if kind == "eval_identity" and len(it.candidates) < 2:
                continue
            jobs.append((it.id, kind.removeprefix("eval_")))
            chats.append(judge_messages(kind, it, answers.get(it.id, ""), cfg.max_evidence_chars))
    gens = engine.generate(chats, sp) if chats else []
    out: dict[str, dict[str, list[str]]] = defaultdict(dict)
    k = cfg.judge_samples
    for j, (iid, metric) in enumerate(jobs):
        out[iid][metric] = [g.text for g in gens[j * k:(j + 1) * k]]
    return dict(out)
