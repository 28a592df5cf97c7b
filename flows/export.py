"""`ditto export`: a run's shards as Parquet or JSONL per stage, or the SFT set as an HF dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flows.stages import STAGE_ORDER
from models.base import table_rows
from storage.reader import CatalogReader
from storage.shards import read_table

FORMATS = ("parquet", "jsonl", "hf")


class ExportError(ValueError):
    pass


def export_run(run_id: str, to: str | Path, fmt: str = "parquet", home: str | Path | None = None) -> list[Path]:
    from flows.build import resolve_home

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    h = resolve_home(home)
    to = Path(to)
    with CatalogReader(h) as rd:
        run = rd.run(run_id)
        if run is None:
            raise ExportError(f"no run {run_id!r} in {h}")
        paths = {s: rd.done_paths(run_id, s) for s in STAGE_ORDER}
        rejected = {s: rd.done_paths(run_id, s, kind="rejected") for s in STAGE_ORDER}
    if fmt == "hf":
        if not paths["sft_data"]:
            raise ExportError(f"run {run_id} has no sft_data shards to export")
        from tasks.sft_data import export_hf

        cfg = json.loads(run["config"])
        info = {"run_id": run_id, "config_hash": run["config_hash"], "dataset": run["dataset"],
                "package_version": run["package_version"], "source": cfg.get("characters", {}).get("source")}
        return [Path(export_hf(paths["sft_data"], to, info))]
    written = []
    for group, by_stage in (("", paths), ("rejected", rejected)):
        for stage, files in by_stage.items():
            if not files:
                continue
            folder = to / group / stage if group else to / stage
            folder.mkdir(parents=True, exist_ok=True)
            if fmt == "parquet":
                for i, f in enumerate(files):
                    dst = folder / f"part-{i:05d}.parquet"
                    shutil.copyfile(f, dst)
                    written.append(dst)
            else:
                dst = folder / "data.jsonl"
                with open(dst, "w", encoding="utf-8") as fh:
                    for f in files:
                        for row in table_rows(read_table(f)):
                            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                written.append(dst)
    return written
