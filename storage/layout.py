"""Names that become paths under the home: one validation for run ids, shared by the CLI, the flow and
the dashboard, so that no id can point outside <home>/runs/ or collide with the project's own files."""

from __future__ import annotations

import re

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
