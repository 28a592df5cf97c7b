"""Value types shared by config sections: checked when the config is loaded, so a bad value stops the run
before anything is written, naming its key (not after generation, where it would first be used)."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator


def check_regex(pattern: str, flags: int = 0) -> str:
    """`pattern` if `re` compiles it, else a ValueError saying where it fails."""
    try:
        re.compile(pattern, flags)
    except re.error as exc:
        where = f" at position {exc.pos}" if exc.pos is not None else ""
        raise ValueError(f"invalid regular expression {pattern!r}: {exc.msg}{where}") from None
    return pattern


def _regex_ci(pattern: str) -> str:
    return check_regex(pattern, re.IGNORECASE)


Regex = Annotated[str, AfterValidator(check_regex)]
"""A regular expression that compiles."""

RegexCI = Annotated[str, AfterValidator(_regex_ci)]
"""A regular expression that compiles case-insensitively (how the filters apply extra patterns)."""


def check_template(template: str, fields: Iterable[str]) -> str:
    """`template` if `str.format` with exactly these keyword fields renders it, else a ValueError naming the
    unknown field and the fields there are. Only plain names: no positional `{}`, no `{a.b}` or `{a[0]}`."""
    allowed = sorted(set(fields))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone "{" or "}"
        raise ValueError(f"not a valid template ({exc}; write a literal brace as '{{{{' or '}}}}')") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(f"positional field '{{{name}}}' in the template; use one of {allowed}")
        if name not in allowed:
            raise ValueError(f"unknown field '{{{name}}}' in the template; the fields are {allowed}")
        if spec and "{" in spec:
            raise ValueError(f"nested field in the format spec of '{{{name}}}'")
    try:
        template.format(**dict.fromkeys(allowed, "x"))
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(f"not a valid template: {exc}") from None
    return template


def template_type(fields: Iterable[str]) -> object:
    """An annotated str type for a template whose fields must be among `fields`."""
    names = tuple(fields)
    return Annotated[str, AfterValidator(lambda t: check_template(t, names))]
