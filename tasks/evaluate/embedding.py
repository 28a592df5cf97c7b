"""Judge-free identity: which candidate's "label: description" is nearest to the answer, with the
sentence-embedding model the filter's identity check uses (tasks/embeddings.py)."""

from __future__ import annotations

from models.eval_records import EvalItem
from tasks.embeddings import embed


def embed_identity(items: list[EvalItem], answers: dict[str, str]) -> dict[str, int]:
    """Candidate index whose "label: description" is nearest to the answer (cosine)."""
    todo = [it for it in items if len(it.candidates) >= 2 and answers.get(it.id)]
    if not todo:
        return {}
    texts = sorted({c.text for it in todo for c in it.candidates})
    cvec = dict(zip(texts, embed(texts), strict=True))
    avec = embed([answers[it.id] for it in todo])
    out = {}
    for it, a in zip(todo, avec, strict=True):
        sims = [float(a @ cvec[c.text]) for c in it.candidates]
        out[it.id] = max(range(len(sims)), key=sims.__getitem__)
    return out
