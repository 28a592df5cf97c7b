"""The layers of the product, read from the source: every import (module-level and inside functions) of every
module of the product packages must go the allowed direction, and no import cycle may close, neither between
top-level packages nor between two modules.

    models  <-  storage  <-  engines  <-  tasks  <-  flows        (each may import those to its left)
    models, storage  <-  dashboard  <-  flows                     (the dashboard is a separate read-only process)

Nothing in the product imports `tests` or `benchmarks`, and no benchmark imports `tests`. An import that
breaks the rule and is being removed is listed in KNOWN with why; the list may only shrink."""

from __future__ import annotations

from pathlib import Path

import pytest

from flows.stages import module_imports  # the parser code_hash uses: one reading of imports

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "storage", "engines", "tasks", "flows", "dashboard")
ALLOWED: dict[str, set[str]] = {
    "models": set(),
    "storage": {"models"},
    "engines": {"models", "storage"},  # storage: the generation cache's chunk store (engines/cache.py)
    "tasks": {"models", "storage", "engines"},
    "flows": {"models", "storage", "engines", "tasks", "dashboard"},  # dashboard: `ditto dashboard`
    "dashboard": {"models", "storage"},
}
NEVER = {"tests", "benchmarks"}
# (importing module, imported module) against the rule, each with why and until when; may only shrink:
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _edges() -> set[tuple[str, str]]:
    """(module, module it imports) between product modules, plus (module, "tests"/"benchmarks") edges."""
    modules = _modules()
    edges = set()
    for module, path in modules.items():
        for name in module_imports(path, module):
            if name.split(".")[0] in NEVER:
                edges.add((module, name))
                continue
            while name and name not in modules:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.add((module, name))
    return edges


def _top(module: str) -> str:
    return module.split(".")[0]


def _against_the_rule(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in edges
            if _top(a) != _top(b) and (_top(b) in NEVER or _top(b) not in ALLOWED[_top(a)])}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


@pytest.fixture(scope="module")
def edges() -> set[tuple[str, str]]:
    return _edges()


def test_the_parser_sees_module_level_function_level_and_relative_imports(tmp_path):
    src = tmp_path / "pkg" / "mod.py"
    src.parent.mkdir()
    src.write_text("import a.b\nfrom c import d\nfrom . import sibling\nfrom ..up import x\n"
                   "def f():\n    from flows.train import resume\n")
    assert module_imports(src, "top.pkg.mod") == {"a.b", "c", "c.d", "top.pkg", "top.pkg.sibling", "top.up",
                                              "top.up.x", "flows.train", "flows.train.resume"}
    # what the checks make of a forbidden edge and of a cycle
    assert _against_the_rule({("dashboard.app", "flows.stages"), ("flows.cli", "dashboard.app"),
                              ("tasks.x", "tests.plugins")}) == {("dashboard.app", "flows.stages"),
                                                                 ("tasks.x", "tests.plugins")}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_import_goes_the_allowed_direction(edges):
    bad = _against_the_rule(edges)
    assert bad <= KNOWN, "imports against the layers (models <- storage <- engines <- tasks <- flows; dashboard " \
                         f"reads models and storage; nothing imports tests or benchmarks): {sorted(bad - KNOWN)}"


def test_known_exceptions_still_exist_so_the_list_only_shrinks(edges):
    fixed = KNOWN - _against_the_rule(edges)
    assert not fixed, f"no longer imported, remove from KNOWN: {sorted(fixed)}"


def test_no_import_cycle_between_top_level_packages(edges):
    graph: dict[str, set[str]] = {}
    for a, b in edges - KNOWN:
        if _top(a) != _top(b) and _top(b) not in NEVER:
            graph.setdefault(_top(a), set()).add(_top(b))
    assert _cycles(graph) == []


def test_no_import_cycle_between_modules(edges):
    graph: dict[str, set[str]] = {}
    for a, b in edges - KNOWN:
        graph.setdefault(a, set()).add(b)
    assert _cycles(graph) == []


def test_benchmarks_import_no_tests():
    """What a benchmark shares with the tests lives in the product or in benchmarks/ (the tests may import it)."""
    bad = {(path.name, name) for path in sorted((REPO / "benchmarks").glob("*.py"))
           for name in module_imports(path, f"benchmarks.{path.stem}") if name.split(".")[0] == "tests"}
    assert not bad, f"benchmarks importing tests: {sorted(bad)}"
