"""Stable ids and hashes: canonical JSON, sha256."""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def content_hash(obj: Any, length: int = 16) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:length]


def shard_of(key: str, num_shards: int) -> int:
    """Stable shard assignment of a row key (independent of PYTHONHASHSEED)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % num_shards


def row_id(*parts: Any) -> str:
    return content_hash([str(p) for p in parts], 16)
