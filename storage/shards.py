"""Atomic Parquet shard files: temp file in the same folder, fsync, rename. A half-written file never
matches the `part-*.parquet` glob and is never registered."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TMP_PREFIX = ".tmp-"


def shard_path(home: Path, run_id: str, stage: str, input_hash: str, shard: int, kind: str = "data") -> Path:
    """<home>/runs/<run_id>/<stage>/<input_hash>/part-00017.parquet; rejects under runs/<run>/rejected/<stage>/…"""
    base = Path(home) / "runs" / run_id
    if kind == "rejected":
        base = base / "rejected"
    return base / stage / input_hash / f"part-{shard:05d}.parquet"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(table: pa.Table, path: Path) -> int:
    """Write atomically; return the file size. zstd compressed, schema as given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


def clean_temp_files(root: Path) -> int:
    """Remove temp files a crash left behind; they were never registered."""
    n = 0
    root = Path(root)
    if not root.exists():
        return 0
    for p in root.rglob(TMP_PREFIX + "*"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
