"""The stage registry, the chain check (each stage's declared inputs must be produced, with the
declared record type, by an earlier stage; checked before anything runs) and each stage's code hash.

`code_hash(stage)` is what makes shard keys follow the code: a hash of the source of the modules the
stage runs (its own module and, transitively, the modules it imports from the `tasks` package or from its
own package, lazy imports included), of the record schemas (`models/records.py`, `models/base.py`) and of
its prompt files. An edit to any of them changes the stage's keys, so an upgrade recomputes exactly the
stages whose code changed; an edit elsewhere (another stage, the engines, storage, the flow) does not.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
from functools import cache
from pathlib import Path

from models.stages import STAGE_ORDER
from tasks.base import SourceStage, Stage

STAGES: dict[str, str] = {
    "characters": "tasks.characters:CharactersStage",
    "queries": "tasks.queries:QueriesStage",
    "responses": "tasks.responses:ResponsesStage",
    "filter": "tasks.filter:FilterStage",
    "dedup": "tasks.dedup:DedupStage",
    "sft_data": "tasks.sft_data:SFTDataStage",
}


# prompt templates a stage renders (tasks/prompts/<name>.<lang>.txt): the loader takes the name at run time
STAGE_PROMPTS: dict[str, tuple[str, ...]] = {"queries": ("queries",), "responses": ("responses",),
                                             "filter": ("judge",)}
# the record schemas and their Arrow conversion: every shard is written with them
SHARED_CODE = ("models.records", "models.base")
CODE_PACKAGES = ("tasks",)


class ChainError(ValueError):
    pass


@cache
def get_stage(name: str) -> Stage:
    if name not in STAGES:
        raise ChainError(f"unknown stage {name!r}; stages: {', '.join(STAGE_ORDER)}")
    module, cls = STAGES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def stages_until(until: str | None) -> list[str]:
    if until is None:
        return list(STAGE_ORDER)
    if until not in STAGE_ORDER:
        raise ChainError(f"--until {until!r}: unknown stage; stages: {', '.join(STAGE_ORDER)}")
    return STAGE_ORDER[: STAGE_ORDER.index(until) + 1]


def check_chain(names: list[str], stages: dict[str, Stage] | None = None) -> None:
    """Raise ChainError naming the stage and column type that does not line up."""
    stages = stages or {n: get_stage(n) for n in names}
    produced: dict[str, type] = {}
    for i, name in enumerate(names):
        st = stages[name]
        if i == 0 and not isinstance(st, SourceStage):
            raise ChainError(f"stage {name!r} comes first but is not a source stage")
        for up, typ in st.inputs.items():
            if up not in produced:
                raise ChainError(f"stage {name!r} reads {up!r}, which no earlier stage produces")
            if not issubclass(produced[up], typ):
                raise ChainError(f"stage {name!r} expects {typ.__name__} rows from {up!r}, "
                                 f"but {up!r} writes {produced[up].__name__}")
        produced[name] = st.output


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def module_imports(path: Path, module: str) -> set[str]:
    """Modules named by import statements anywhere in the file (function-level lazy imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return out


def stage_modules(name: str, stage: Stage | None = None) -> list[str]:
    """The modules a stage runs: its own module and what it imports, transitively, from `tasks` or its
    own top-level package; plus the shared record schemas."""
    root = type(stage or get_stage(name)).__module__
    allowed = {*CODE_PACKAGES, root.split(".")[0]}
    seen: dict[str, Path] = {}
    todo = [root, *SHARED_CODE]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        path = _module_file(mod)
        if path is None:
            continue
        seen[mod] = path
        if mod in SHARED_CODE:
            continue  # schemas only; what they import is not the stage's code
        todo += [m for m in module_imports(path, mod) if m.split(".")[0] in allowed and m not in seen]
    return sorted(seen)


def stage_code_files(name: str, stage: Stage | None = None) -> list[Path]:
    files = [p for m in stage_modules(name, stage) if (p := _module_file(m)) is not None]
    prompts_dir = Path(importlib.util.find_spec("tasks").origin).parent / "prompts"  # type: ignore[union-attr]
    for prompt in STAGE_PROMPTS.get(name, ()):
        files += sorted(prompts_dir.glob(f"{prompt}.*.txt"))
    return sorted(set(files))


def code_hash(name: str, stage: Stage | None = None) -> str:
    """sha256 (16 hex) over the stage's code files (path relative to its package root, then content)."""
    h = hashlib.sha256()
    for path in stage_code_files(name, stage):
        parts = path.parts
        rel = "/".join(parts[-3:])  # stable across checkouts: a/b/c.py, not the absolute path
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]
