"""Artifacts: what a run builds besides its shards (the dedup global step's signatures and decisions, trained
models, evaluation results), registered in the catalog's `artifacts` table under a content key, and resumed
the way shards are: a whole registered artifact with the same key is reused, a missing or damaged one is
rebuilt.

An artifact is one file or one folder. Its size and sha256 are recorded at registration (a folder's as a
manifest: every file's relative path, size and sha256; the artifact's sha256 hashes the manifest) and
checked before reuse, with the same check as a shard's file (`storage.shards.shard_problem`).

The process that builds an artifact never writes the catalog: it looks the key up in the snapshot
(`find`), builds what is missing and hands the `Artifact` records back; the flow process registers them
(`Catalog.register_artifact`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.ids import content_hash
from storage.shards import TMP_PREFIX, file_sha256, shard_problem

# the kinds of artifact (one namespace of keys each)
DEDUP_SIGNATURES = "dedup_signatures"
DEDUP_DECISIONS = "dedup_decisions"
MODEL = "model"
EVALUATION = "evaluation"


class Artifact(BaseModel):
    """An `artifacts` row. `path` is absolute here (the catalog stores it relative to the home)."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    key: str
    run_id: str = Field(description="the run that built it")
    path: str
    bytes: int
    sha256: str
    files: dict[str, tuple[int, str]] | None = Field(
        None, description="a folder's manifest: relative path -> (size, sha256); None for a single file")
    meta: dict[str, Any] = Field(default_factory=dict, description="what its builder needs back on reuse")

    @field_validator("files", "meta", mode="before")
    @classmethod
    def _json(cls, v: Any) -> Any:
        return json.loads(v) if isinstance(v, str) else v

    @classmethod
    def of(cls, kind: str, key: str, run_id: str, path: str | Path, meta: dict[str, Any] | None = None) -> Artifact:
        """Describe a file or a folder as it is on disk now (sizes and hashes computed here)."""
        p = Path(path)
        if p.is_dir():
            files = {}
            for f in sorted(x for x in p.rglob("*") if x.is_file() and not x.name.startswith(TMP_PREFIX)):
                files[f.relative_to(p).as_posix()] = (f.stat().st_size, file_sha256(f))
            return cls(kind=kind, key=key, run_id=run_id, path=str(p), bytes=sum(s for s, _ in files.values()),
                       sha256=content_hash(files, 64), files=files, meta=meta or {})
        return cls(kind=kind, key=key, run_id=run_id, path=str(p), bytes=p.stat().st_size, sha256=file_sha256(p),
                   meta=meta or {})

    def problem(self) -> str | None:
        """Why this artifact cannot be reused (missing, size or sha256 differs), or None when it is whole."""
        if self.files is None:
            return shard_problem({"path": self.path, "bytes": self.bytes, "sha256": self.sha256})
        if not os.path.isdir(self.path):
            return f"folder {self.path} is missing"
        for rel, (size, sha) in self.files.items():
            problem = shard_problem({"path": os.path.join(self.path, rel), "bytes": size, "sha256": sha})
            if problem:
                return problem
        return None


def find(reader: Any, kind: str, key: str) -> tuple[Artifact | None, str | None]:
    """(the whole artifact registered under this key, None) or (None, why the registered one cannot be
    used, or None if none is registered). `reader`: a CatalogReader (the snapshot) or the Catalog."""
    rows = reader.query("SELECT * FROM artifacts WHERE kind=? AND key=?", [kind, key])
    if not rows:
        return None, None
    art = Artifact.model_validate(rows[0])
    problem = art.problem()
    return (None, problem) if problem else (art, None)
