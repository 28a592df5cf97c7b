"""Atomic Parquet shard files: temp file in the same folder, fsync, rename. A half-written file never
matches the `part-*.parquet` glob and is never registered. Each registered file's size and sha256 are
kept in the catalog, and `shard_is_whole` checks them before a shard is skipped, reused, read or exported."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from storage.layout import REJECTED_DIR, RunLayout

TMP_PREFIX = ".tmp-"
# the names write_table's mkstemp gives: .tmp-part-00017.parquet.<random>; cleanup deletes only these
TMP_NAME_RE = re.compile(r"^\.tmp-part-\d{5}\.parquet\.[A-Za-z0-9_]{6,}$")
_HASH_CHUNK = 1 << 20


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


def writable_dir_problem(path: Path, what: str = "") -> str | None:
    """Create the folder `path` where missing; why it cannot be written to (`what` names it), or None."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {what}{path}: {exc.strerror}"
    if not os.access(path, os.W_OK):
        return f"{what}{path} is not writable"
    return None


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


# -- integrity -------------------------------------------------------------------------------------
def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=65536)
def _hash_of(path: str, size: int, mtime_ns: int, ino: int, ctime_ns: int) -> str:
    # keyed by the file's identity: a file rewritten, truncated or touched in place is hashed again
    return file_sha256(path)


def shard_problem(row: Mapping[str, Any], check_hash: bool = True) -> str | None:
    """Why a registered shard cannot be used (missing, size or sha256 differs; same for its rejects file),
    or None when it is whole. Rows registered before sizes/hashes were recorded are checked as far as
    they allow (existence, and size where known)."""
    checks = [("path", "bytes", "sha256", "file")]
    if row.get("rejects_path"):
        checks.append(("rejects_path", "rejects_bytes", "rejects_sha256", "rejects file"))
    for pcol, scol, hcol, what in checks:
        p = row.get(pcol)
        if not p:
            return f"no {what} registered"
        try:
            st = os.stat(p)
        except FileNotFoundError:
            return f"{what} {p} is missing"
        except OSError as exc:
            return f"{what} {p} cannot be read ({exc.strerror})"
        if not os.path.isfile(p):
            return f"{what} {p} is not a file"
        size = row.get(scol)
        if size is not None and st.st_size != int(size):
            return f"{what} {p} has {st.st_size} bytes, {int(size)} were registered (truncated or rewritten)"
        sha = row.get(hcol)
        if check_hash and sha:
            try:
                actual = _hash_of(str(p), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
            except OSError as exc:
                return f"{what} {p} cannot be read ({exc.strerror})"
            if actual != sha:
                return f"{what} {p} does not match its registered sha256 (corrupted or rewritten)"
    return None


def shard_is_whole(row: Mapping[str, Any], check_hash: bool = True) -> bool:
    """The shard's file exists and its size and sha256 match the catalog (its rejects file too).
    `check_hash=False` checks existence and size only (cheap; for listings)."""
    return shard_problem(row, check_hash) is None


# -- cleanup ---------------------------------------------------------------------------------------
def _temp_candidates(run_root: Path) -> list[Path]:
    """Temp files write_table leaves when killed, in a run's stage folders only:
    runs/<run>/<stage>/<hash>/ and runs/<run>/rejected/<stage>/<hash>/. Symlinks are never followed."""
    out: list[Path] = []

    def subdirs(p: Path) -> list[Path]:
        try:
            return [c for c in p.iterdir() if c.is_dir() and not c.is_symlink()]
        except OSError:
            return []

    folders: list[Path] = []
    for stage in subdirs(run_root):
        if stage.name == REJECTED_DIR:
            folders += [h for s in subdirs(stage) for h in subdirs(s)]
        else:
            folders += subdirs(stage)
    for folder in folders:
        try:
            entries = list(folder.iterdir())
        except OSError:
            continue
        out += [e for e in entries if TMP_NAME_RE.match(e.name) and e.is_file() and not e.is_symlink()]
    return out


def clean_run_temp_files(home: Path, run_id: str) -> int:
    """Remove the temp files a crash left in <home>/runs/<run_id>/ (never registered). Only files named like
    write_table's temp files, inside the run's stage folders, are touched."""
    return clean_temp_files(RunLayout(home, run_id).root)


def clean_temp_files(root: Path) -> int:
    """Remove write_table temp files under a run folder (`<home>/runs/<run_id>`); see clean_run_temp_files.
    A root that is not a run folder (its parent not named `runs`, or an invalid id) is refused."""
    root = Path(root)
    if not RunLayout.is_run_root(root):
        raise ValueError(f"clean_temp_files: {root} is not a run folder (<home>/runs/<run_id>)")
    if not root.is_dir():
        return 0
    n = 0
    for p in _temp_candidates(root):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
