"""Judge-free checks of an answer. One classifier for the filter and the evaluation (tasks/filters/role.py):
the out-of-role rate counts what the filter's meta-talk, out-of-role and first-person checks drop, and
refusals are read the same way."""

from __future__ import annotations

from tasks.filters.role import RefusalClassifier, RoleClassifier

_REFUSAL = RefusalClassifier()
_ROLE = RoleClassifier()


def is_refusal(text: str, language: str | None = None) -> bool:
    return _REFUSAL.refused(text or "", language)


def is_out_of_role(text: str, language: str | None = None, label: str = "") -> bool:
    """Meta-talk, assistant-speak, or (given the role's label) describing the role in the third person."""
    return _ROLE.out_of_role_reason(text or "", language, {"label": label} if label else None) is not None
