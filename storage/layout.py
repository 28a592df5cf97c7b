"""Names that become paths under the home: one validation for run ids, shared by the CLI, the flow and
the dashboard, so that no id can point outside <home>/runs/ or collide with the project's own files, and
`RunLayout`, the one place that knows where a run's files lie under <home>/runs/<run_id>/."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_RUN_ID_RE = re.compile(RUN_ID_PATTERN)


class InvalidRunId(ValueError):
    """A run id that is not a plain folder name."""


def validate_run_id(s: object) -> str:
    """Return `s` if it is a valid run id: 1-128 characters of letters, digits, `.`, `_`, `-`, starting with
    a letter or digit, and no `..`. Raise InvalidRunId naming the value otherwise."""
    if not isinstance(s, str) or not _RUN_ID_RE.fullmatch(s) or ".." in s:
        raise InvalidRunId(f"invalid run id {s!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a "
                           f"letter or digit, without '..' (it names a folder under <home>/runs/)")
    return s


def is_valid_run_id(s: object) -> bool:
    try:
        validate_run_id(s)
    except InvalidRunId:
        return False
    return True


RUNS_DIR = "runs"  # <home>/runs/<run_id>/
REJECTED_DIR = "rejected"  # <home>/runs/<run_id>/rejected/<stage>/<input_hash>/
SHARD_KINDS = ("data", "rejected")


def part_name(shard: int, tag: str | None = None) -> str:
    """`part-00017.parquet`, the name of every per-shard file (`tag`: `part-00017-<tag>.parquet`)."""
    return f"part-{shard:05d}-{tag}.parquet" if tag else f"part-{shard:05d}.parquet"


@dataclass(frozen=True)
class RunLayout:
    """Where one run's files lie, under <home>/runs/<run_id>/:

        <stage>/<input_hash>/part-00017.parquet           a stage's shard (its key is the input hash)
        rejected/<stage>/<input_hash>/part-00017.parquet  the shard's rejected rows, with their reasons
        prepare/<stage>/<digest>/part-00017.parquet       a stage's per-shard preparation (queries: partners)
        dedup_global/                                     the dedup stage's global step (signatures, decisions)
        train/<train_hash>/                               a fine-tuning run of this run's data
        eval/<eval_id>/                                   an evaluation on this run's held-out characters

    Paths are absolute under `home` (the catalog stores them relative to it, so a moved home keeps working). The run id is validated: no layout points outside <home>/runs/."""

    home: Path
    run_id: str

    def __post_init__(self) -> None:
        validate_run_id(self.run_id)
        object.__setattr__(self, "home", Path(self.home))

    @property
    def root(self) -> Path:
        return self.home / RUNS_DIR / self.run_id

    def shard(self, stage: str, input_hash: str, shard: int, kind: str = "data") -> Path:
        """A stage's shard file (`kind="data"`) or its rejects file (`kind="rejected"`)."""
        if kind not in SHARD_KINDS:
            raise ValueError(f"shard kind {kind!r}: one of {', '.join(SHARD_KINDS)}")
        base = self.rejects(stage) if kind == "rejected" else self.root / stage
        return base / input_hash / part_name(shard)

    def rejects(self, stage: str) -> Path:
        """The folder of a stage's rejects files (one sub-folder per input hash)."""
        return self.root / REJECTED_DIR / stage

    def prepared(self, stage: str, digest: str, shard: int) -> Path:
        """A shard's file of a stage's preparation step, keyed by the digest of what it was made from."""
        return self.root / "prepare" / stage / digest / part_name(shard)

    @property
    def dedup_global(self) -> Path:
        return self.root / "dedup_global"

    def train(self, key: str) -> Path:
        return self.root / "train" / key

    def eval(self, eval_id: str) -> Path:
        return self.root / "eval" / eval_id

    @staticmethod
    def is_run_root(path: str | Path) -> bool:
        """True for a folder named like <home>/runs/<valid run id> (not followed through a symlink)."""
        p = Path(path)
        return not p.is_symlink() and p.parent.name == RUNS_DIR and is_valid_run_id(p.name)
