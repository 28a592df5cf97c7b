"""RunConfig: YAML in, `--set key.path=value` overrides, unknown keys are errors naming the key."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Field, ValidationError

from models.base import Strict
from models.config.characters import CharactersConfig
from models.config.dedup import DedupConfig
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
    "BUNDLED_MODEL", "CharactersConfig", "ConfigError", "DedupConfig", "EngineConfig", "EvalConfig", "FilterConfig",
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
    dedup: DedupConfig = Field(default_factory=DedupConfig)
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
            moved = _moved(key)
            lines.append(f"{origin}: unknown key '{key}'" + (f" (it is '{moved}' now)" if moved else ""))
        elif e["type"] == "missing":
            lines.append(f"{origin}: missing key '{key}'")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{origin}: bad value for '{key}': {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (line {line}; first given on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 (PyYAML) reads 5e-5 as a string; YAML 1.2 and every user read it as a number
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _set_path(data: dict, path: str, raw: str) -> None:
    try:
        value = _yaml(raw) if raw != "" else ""
    except yaml.constructor.ConstructorError as exc:  # a duplicate key
        raise ConfigError(f"--set {path}: cannot parse value {raw!r}: {exc}") from None
    except yaml.YAMLError:
        value = raw  # not YAML ("{label} ({description})"): the text itself; the model checks its type
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


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config section type of a field (`X` or `X | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return models[0] if len(models) == 1 else None
    return None


def _merge(model: type[BaseModel], base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`given` over `base` (a dump of the defaults): a section given in part keeps the defaults of the rest,
    including a field's own default (queries.sampling.max_tokens=320, not SamplingConfig's 256). Values that
    are not sections (lists, mappings like filter.length.bounds) are replaced whole."""
    out = dict(base)
    for key, value in given.items():
        info = model.model_fields.get(key)
        section = _model_of(info.annotation) if info else None
        if section is not None and isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = _merge(section, base[key], value)
        else:
            out[key] = value
    return out


# keys an earlier release wrote into stored run configs, and where their meaning lives now: a run made
# before the change can still be rerun (`ditto rerun` loads its stored config through this)
RENAMED_KEYS: dict[str, str] = {
    "filter.out_of_role.third_person": "filter.first_person.enabled",
    "filter.out_of_role.other_names": "filter.other_character.enabled",
    "filter.dedup": "dedup",
}


def _moved(key: str) -> str | None:
    """Where a key of RENAMED_KEYS (or a key under it) lives now."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def migrate_stored_config(data: dict[str, Any]) -> dict[str, Any]:
    """A stored run config with the keys of RENAMED_KEYS moved to their new place (a copy)."""
    data = json.loads(json.dumps(data))
    for old, new in RENAMED_KEYS.items():
        *parents, leaf = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *new_parents, new_leaf = new.split(".")
        target = data
        for part in new_parents:
            target = target.setdefault(part, {})
        target.setdefault(new_leaf, value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> RunConfig:
    """Build a RunConfig: the defaults, then `data` / the YAML file (what they give, section by section), then
    the `key.path=value` overrides, each setting one value of that result. Validated strictly: `top_n: yes`
    is not 1, `"5"` is not 5; unknown keys, duplicate YAML keys and bad values are errors naming the key."""
    origin = str(path) if path else "config"
    given: dict[str, Any] = json.loads(json.dumps(data)) if data else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = _yaml(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        given.update(loaded)
    raw = _merge(RunConfig, RunConfig().model_dump(mode="json"), given)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        key, value = item.split("=", 1)
        _set_path(raw, key.strip(), value)
        origin = f"{origin} (with --set)" if "--set" not in origin else origin
    try:
        return RunConfig.model_validate(raw, strict=True)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origin)) from None
