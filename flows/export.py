"""`ditto export`: a run's shards as Parquet or JSONL per stage, or the SFT set as an HF dataset.

The target is a new or empty folder (a non-empty one only with `overwrite`, never mixed with what it
held): the export is written into a temp folder beside it and renamed into place when complete, so a
killed export leaves the old folder or the new one, never a mix. Every shard file is verified against
the catalog (size and sha256) before it is read; a run that is not completed is exported only with
`partial`, and then with a warning naming what is missing."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

from models.base import table_rows
from models.stages import STAGE_ORDER
from storage.layout import validate_run_id
from storage.reader import CatalogReader, ShardDamaged
from storage.shards import _fsync_dir, read_table, writable_dir_problem

FORMATS = ("parquet", "jsonl", "hf")
TMP_EXPORT = ".tmp-export-"


class ExportError(ValueError):
    pass


def _check_target(to: Path, overwrite: bool) -> None:
    if to.exists() or to.is_symlink():
        if not to.is_dir() or to.is_symlink():
            raise ExportError(f"--to {to} exists and is not a folder: give a new or empty folder")
        if any(to.iterdir()) and not overwrite:
            raise ExportError(f"--to {to} is not empty: give a new or empty folder, or pass --overwrite to "
                              f"replace its contents")
    if why := writable_dir_problem(to.parent):
        raise ExportError(f"--to {to}: {why}")


def _incomplete(rd: CatalogReader, run: dict) -> str | None:
    if run["status"] == "completed":
        return None
    parts = []
    n = run["num_shards"] or 0
    for stage in STAGE_ORDER:
        rows = rd.shards(run["run_id"], stage)
        done = sum(1 for r in rows if r["status"] == "done")
        if rows and done < n:
            parts.append(f"{stage} {done}/{n} shards done")
    return (f"run {run['run_id']} is {run['status']}"
            + (f" ({'; '.join(parts)})" if parts else "") + ": its data is incomplete")


def _swap_in(staging: Path, to: Path) -> None:
    """Put the complete export at `to`; an old folder there is moved aside first, then deleted."""
    old = None
    if to.exists():
        old = to.parent / f"{TMP_EXPORT}old-{to.name}-{secrets.token_hex(4)}"
        os.rename(to, old)
    os.rename(staging, to)
    _fsync_dir(to.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_id: str, to: str | Path, fmt: str = "parquet", home: str | Path | None = None,
               overwrite: bool = False, partial: bool = False,
               warn: Callable[[str], None] | None = None) -> list[Path]:
    from flows.build import resolve_home

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    validate_run_id(run_id)
    h = resolve_home(home)
    to = Path(to).expanduser().absolute()
    _check_target(to, overwrite)
    with CatalogReader(h, require=True) as rd:
        run = rd.run(run_id)
        if run is None:
            raise ExportError(f"no run {run_id!r} in {h}")
        note = _incomplete(rd, run)
        if note and not partial:
            raise ExportError(f"{note}; `ditto rerun {run_id}` finishes it, or pass --partial to export its done "
                              f"shards only")
        try:
            paths = {s: rd.done_paths(run_id, s) for s in STAGE_ORDER}
            rejected = {s: rd.done_paths(run_id, s, kind="rejected") for s in STAGE_ORDER}
        except ShardDamaged as exc:
            raise ExportError(f"{exc}; nothing was exported") from None
    if note and warn:
        warn(f"{note}; exporting its done shards only")
    for stale in to.parent.glob(f"{TMP_EXPORT}*{to.name}-*"):  # what a killed export left
        shutil.rmtree(stale, ignore_errors=True)
    staging = to.parent / f"{TMP_EXPORT}{to.name}-{secrets.token_hex(4)}"
    try:
        written = _write(staging, fmt, run, paths, rejected)
        _swap_in(staging, to)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [to / p.relative_to(staging) for p in written]


def _write(dst: Path, fmt: str, run: dict, paths: dict[str, list[str]], rejected: dict[str, list[str]]) -> list[Path]:
    run_id = run["run_id"]
    if fmt == "hf":
        if not paths["sft_data"]:
            raise ExportError(f"run {run_id} has no sft_data shards to export")
        from tasks.sft_data import export_hf

        cfg = json.loads(run["config"])
        info = {"run_id": run_id, "config_hash": run["config_hash"], "dataset": run["dataset"],
                "package_version": run["package_version"], "source": cfg.get("characters", {}).get("source")}
        return [Path(export_hf(paths["sft_data"], dst, info))]
    dst.mkdir()
    written = []
    for group, by_stage in (("", paths), ("rejected", rejected)):
        for stage, files in by_stage.items():
            if not files:
                continue
            folder = dst / group / stage if group else dst / stage
            folder.mkdir(parents=True, exist_ok=True)
            if fmt == "parquet":
                for i, f in enumerate(files):
                    out = folder / f"part-{i:05d}.parquet"
                    shutil.copyfile(f, out)
                    written.append(out)
            else:
                out = folder / "data.jsonl"
                with open(out, "w", encoding="utf-8") as fh:
                    for f in files:
                        for row in table_rows(read_table(f)):
                            fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
                written.append(out)
    return written
