"""`ditto run --dry-run`: the whole DAG at zero cost, to see the shard plan and the output shapes of a config
before paying for a real run.

The config is loaded and checked as for a run; then every engine in it (the run's, the judge's, the
evaluation's) becomes the dry-run engine (engines/dry_run.py: deterministic placeholder text and minimal
instances of the stages' JSON schemas, no model behind it), the checks that load an embedding model
(filter.identity, filter.relevance) and training are off, and SFT text is rendered with the built-in ChatML
template (no tokenizer). The run goes to a throw-away home, removed afterwards: the user's home, catalog and
generation cache are never touched. The characters stage reads the real input, so the shard plan is the one
a real run gets; what the placeholder text makes of the filters says nothing about a real model's output.

`dry_run(...)` returns, per stage in DAG order: shards planned, shards with rows, rows, rejected rows and the
columns (name and Arrow type) every shard of the stage is written with.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from flows.stages import get_stage, stages_until
from models.base import arrow_schema
from models.config import load_config

DRY_RUN_ENGINE = "dry_run"
RUN_ID = "dry-run"


def dry_run_config(config_path: str | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The config (as data) with every engine the dry-run engine and the model-loading steps off."""
    from flows.build import DEMO_CONFIG
    from tasks.chat_template import CHATML

    cfg = load_config(config_path or str(DEMO_CONFIG), overrides).model_dump(mode="json")
    cfg["engine"]["kind"] = DRY_RUN_ENGINE
    for engine in (cfg["filter"]["judge"].get("engine"), cfg["eval"].get("judge")):
        if engine:
            engine["kind"] = DRY_RUN_ENGINE
    cfg["eval"]["engine_kind"] = None
    cfg["filter"]["identity"]["enabled"] = False
    cfg["filter"]["relevance"]["enabled"] = False
    cfg["train"]["enabled"] = False
    cfg["sft"]["chat_template_model"] = CHATML
    return cfg


def _short(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_short(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(t.field(i).name for i in range(t.num_fields)) + ">"
    if pa.types.is_map(t):
        return f"map<{_short(t.key_type)}, {_short(t.item_type)}>"
    return str(t)


def columns(stage: str) -> list[str]:
    """'name: type' of every column the stage's shards are written with (its record's Arrow schema)."""
    return [f"{f.name}: {_short(f.type)}" for f in arrow_schema(get_stage(stage).output)]


def dry_run(config_path: str | None = None, overrides: list[str] | None = None,
            until: str | None = None) -> dict[str, Any]:
    """Run the DAG on the dry-run engine in a throw-away home; {"status", "error", "num_shards", "stages"}."""
    from flows.build import RunFailed, run_build
    from storage.reader import CatalogReader

    config = dry_run_config(config_path, overrides)
    names = stages_until(until)
    home = Path(tempfile.mkdtemp(prefix="ditto-dry-run-"))
    try:
        status, error = "completed", None
        try:
            run_build(config=config, run_id=RUN_ID, home=home, until=until)
        except RunFailed as exc:
            status, error = "failed", str(exc)
        with CatalogReader(home) as rd:
            run = rd.run(RUN_ID) or {}
            summaries = {s["stage"]: s for s in rd.stage_summaries(RUN_ID)}
            shards = rd.shards(RUN_ID)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    stages = []
    for name in names:
        mine = [s for s in shards if s["stage"] == name]
        done = [s for s in mine if s["status"] == "done"]
        summary = summaries.get(name, {})
        stages.append({"stage": name, "shards": len(mine), "shards_with_rows": sum(1 for s in done if s["rows"]),
                       "failed": sum(1 for s in mine if s["status"] == "failed"),
                       "rows": sum(s["rows"] or 0 for s in done),
                       "rows_out": summary.get("rows_out"), "rejected": sum(s["rejected_rows"] or 0 for s in done),
                       "dropped": summary.get("dropped") or {}, "columns": columns(name)})
    return {"status": status, "error": (error or "").replace(str(home), "<dry-run home>") or None,
            "num_shards": run.get("num_shards"), "engine": DRY_RUN_ENGINE, "stages": stages}
