"""RunConfig: YAML in, `--set key.path=value` overrides, unknown keys are errors naming the key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from models.base import Strict
from models.config.characters import CharactersConfig
from models.config.engine import BUNDLED_MODEL, EngineConfig
from models.config.eval import EvalConfig
from models.config.filter import FilterConfig
from models.config.generation import (
    QueriesConfig,
    ResponsesConfig,
    SamplingConfig,
    SessionsConfig,
    SFTDataConfig,
)
from models.config.run import RunnerConfig
from models.config.train import TrainConfig
from models.ids import content_hash

__all__ = [
    "BUNDLED_MODEL", "CharactersConfig", "ConfigError", "EngineConfig", "EvalConfig", "FilterConfig",
    "QueriesConfig", "ResponsesConfig", "RunConfig", "RunnerConfig", "SFTDataConfig", "SamplingConfig",
    "SessionsConfig", "TrainConfig", "load_config",
]


class RunConfig(Strict):
    dataset: str = Field("ditto", description="dataset name: a Prefect tag and the export's name")
    seed: int = Field(0, description="seed of pairings, splits and sampling")
    engine: EngineConfig = Field(default_factory=EngineConfig)
    characters: CharactersConfig = Field(default_factory=CharactersConfig)
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    sft: SFTDataConfig = Field(default_factory=SFTDataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    def config_hash(self) -> str:
        return content_hash(self.model_dump(mode="json"))


class ConfigError(ValueError):
    """A config problem, with the key path that caused it."""


def _describe(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{origin}: unknown key '{key}'")
        else:
            lines.append(f"{origin}: bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_path(data: dict, path: str, raw: str) -> None:
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {path}: cannot parse value {raw!r}: {exc}") from None
    parts = path.split(".")
    if not all(parts):
        raise ConfigError(f"--set: bad key path {path!r}")
    node = data
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {path}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig from YAML (or a dict), then apply `key.path=value` overrides."""
    origin = str(path) if path else "config"
    raw: dict[str, Any] = json.loads(json.dumps(data)) if data else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw.update(loaded)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        _set_path(raw, key.strip(), value)
        origin = f"{origin} (with --set)" if "--set" not in origin else origin
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
