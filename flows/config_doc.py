"""The config reference, generated from the pydantic models (their Field descriptions are the docs)."""

from __future__ import annotations

import json

from pydantic import BaseModel

from models.config import RunConfig


def _rows(inst: BaseModel, prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    for name, info in type(inst).model_fields.items():
        key = f"{prefix}{name}"
        value = getattr(inst, name)
        if isinstance(value, BaseModel):
            out += _rows(value, key + ".")
            continue
        out.append((key, json.dumps(value, default=str, ensure_ascii=False), info.description or ""))
    return out


PIPE = "\\|"


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, desc in _rows(RunConfig()):
        default, desc = default.replace("|", PIPE), desc.replace("|", PIPE)
        lines.append(f"| `{key}` | `{default}` | {desc} |")
    return "\n".join(lines)


def default_yaml() -> str:
    import yaml

    return yaml.safe_dump(RunConfig().model_dump(mode="json"), sort_keys=False, allow_unicode=True)
