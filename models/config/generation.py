from __future__ import annotations

from pydantic import Field

from models.base import Strict
from models.config.validators import template_type

SYSTEM_TEMPLATE_FIELDS = ("label", "description")
"""What tasks.sessions.system_prompt fills a system template with (from the character record)."""
SystemTemplate = template_type(SYSTEM_TEMPLATE_FIELDS)


class SamplingConfig(Strict):
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    max_tokens: int = Field(256, ge=1)


class QueriesConfig(Strict):
    pairings: int = Field(2, ge=1, description="partners B drawn per character A (each call gives A and B questions)")
    questions: int = Field(3, ge=1, description="questions asked per call (the paper: 3)")
    rounds: int = Field(3, ge=1, description="sampling rounds before a format-invalid output is rejected")
    guided_json: bool = Field(True, description="constrain output with the JSON schema where the engine can")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=320))


class ResponsesConfig(Strict):
    max_profile_tokens: int = Field(1200, ge=16, description="profile cut to fit the context (flagged)")
    sampling: SamplingConfig = Field(default_factory=lambda: SamplingConfig(max_tokens=200))


class SessionsConfig(Strict):
    system_template: SystemTemplate = Field(
        "You are {label}, {description}.",
        description="SFT system prompt (never the profile); fields: {label}, {description}")
    system_template_zh: SystemTemplate = Field("你是{label}，{description}。", description="Chinese SFT system prompt")
    min_turns: int = Field(1, ge=1, description="sessions with fewer kept turns are dropped with a reason")


class SFTDataConfig(Strict):
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="share of characters held out for validation")
    chat_template_model: str | None = Field(None, description="tokenizer whose chat template renders text (default: engine model)")
