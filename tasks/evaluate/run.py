"""One model's evaluation: answer every item with the model under test, judge, score, aggregate."""

from __future__ import annotations

from typing import Any

from models.config.engine import EngineConfig
from models.config.eval import EvalConfig
from models.eval_records import EvalItem, EvalResult
from tasks.evaluate.embedding import embed_identity
from tasks.evaluate.judging import generate_answers, run_judge
from tasks.evaluate.scoring import aggregate, score_item


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
