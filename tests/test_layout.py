"""The layout keeps the design's promises (DESIGN.md section 2): module size, no import cycles, and
the import directions between the parts of the service.

Imports are read from the source with ``ast``, everywhere in a module: imports inside functions
(lazy imports) count like top-level ones, relative imports are resolved, and ``from pkg import
name`` counts as an import of the submodule ``pkg.name`` when there is one. The implicit import of
a parent package when a submodule is imported is not an edge (a package's ``__init__`` may
re-export its submodules; a submodule importing its own package's ``__init__`` is an edge and would
show up as a cycle). The checker itself is tested on small trees built in a temporary directory,
so each check is known to fail when its rule is broken.
"""

from __future__ import annotations

import ast
import importlib
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("aggregation", "proxy")
MAX_LINES = 450
#: Exempt from the size limit: the development fake upstream (a self-contained test server).
SIZE_EXEMPT = ("proxy.devtools",)
#: The proxy modules directly under proxy/ that every part may use (shared vocabulary).
SHARED_TOP_LEVEL = ("proxy.auth", "proxy.budget", "proxy.config", "proxy.errors", "proxy.heartbeat", "proxy.logs",
                    "proxy.metrics")

#: importer (module or package prefix) -> what it must never import, and why.
FORBIDDEN: dict[str, tuple[tuple[str, ...], str]] = {
    "aggregation": (("proxy",), "the DP core knows no web code"),
    "proxy.serving": (("proxy.api", "proxy.jobs", "proxy.cli", "proxy.app"), "api -> serving, never back"),
    "proxy.jobs": (("proxy.api", "proxy.serving", "proxy.cli", "proxy.app"), "jobs stand beside serving"),
    "proxy.api": (("proxy.cli", "proxy.app"), "the app wires the routers, not the other way round"),
    "proxy.app": (("proxy.cli",), "the CLI starts the app"),
    **{m: (("proxy.api", "proxy.serving", "proxy.jobs", "proxy.upstreams", "proxy.cli", "proxy.app"),
           "shared top-level modules sit below every part") for m in SHARED_TOP_LEVEL},
}
#: importer package -> the only project modules it may import (besides the standard library and
#: third-party packages).
ONLY: dict[str, tuple[tuple[str, ...], str]] = {
    "proxy.upstreams": (("proxy.upstreams",), "forwarding knows nothing of DP (no aggregation) or of the service"),
    "proxy.store": (("proxy.store",), "stores hold data, not policy (no serving, api, jobs, or DP code)"),
}
#: Nothing in the service imports the development helpers.
DEV_ONLY = "proxy.devtools"


# -- the checker ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # a project module (package __init__ or .py file)
    names: tuple[str, ...]  # names taken with ``from target import ...`` (empty for ``import target``)
    line: int


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def collect_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """``{"proxy.api.admin": path, "proxy.api": path of its __init__.py, ...}``."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute module name of a (possibly relative) import in ``module``."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _project_module(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest project module that ``name`` (a dotted path) refers to, if any."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import of a project module in ``module``, wherever it is in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _project_module(alias.name, modules)
                if target:
                    out.append(Import(module, target, (), node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # ``from pkg import submodule``
                    out.append(Import(module, sub, (), node.lineno))
                else:
                    target = _project_module(base, modules)
                    if target:
                        out.append(Import(module, target, (alias.name,), node.lineno))
    return out


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[dict[str, Path], list[Import]]:
    modules = collect_modules(root, packages)
    edges = [imp for name, path in modules.items() for imp in imports_of(name, path, modules)]
    return modules, edges


def find_cycles(modules: dict[str, Path], edges: list[Import]) -> list[list[str]]:
    """One cycle (as a module path ending where it starts) per strongly connected component."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph[e.importer].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def connect(v: str) -> None:  # Tarjan (the graph is small, recursion depth is fine)
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
            if len(comp) > 1 or v in graph[v]:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            connect(v)

    cycles = []
    for comp in components:
        members = set(comp)
        start = min(comp)
        # Shortest way back to ``start`` inside the component (breadth-first).
        paths = {start: [start]}
        frontier = [start]
        found: list[str] | None = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = paths[v] + [start]
                        break
                    if w not in paths:
                        paths[w] = paths[v] + [w]
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        cycles.append(found or sorted(comp))
    return cycles


def direction_violations(edges: list[Import]) -> list[str]:
    out = []
    for e in edges:
        for importer, (banned, why) in FORBIDDEN.items():
            if under(e.importer, importer) and any(under(e.target, b) for b in banned):
                out.append(f"{e.importer}:{e.line} imports {e.target} ({why})")
        for importer, (allowed, why) in ONLY.items():
            if under(e.importer, importer) and not any(under(e.target, a) for a in allowed):
                out.append(f"{e.importer}:{e.line} imports {e.target} ({why})")
        if under(e.target, DEV_ONLY) and not under(e.importer, DEV_ONLY):
            out.append(f"{e.importer}:{e.line} imports {e.target} (development helpers stay out of the service)")
    return out


def routers(modules: dict[str, Path]) -> set[str]:
    """Modules of proxy.api that define routes: a FastAPI ``APIRouter`` or plain Starlette ``Route``s
    (the /v1 hot path), possibly through a ``Route`` subclass."""
    out = set()
    for name, path in modules.items():
        if under(name, "proxy.api") and name != "proxy.api":
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("APIRouter", "Route"):
                    out.add(name)
                if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "Route" for b in node.bases):
                    out.add(name)
    return out


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_router_imports(modules: dict[str, Path], edges: list[Import]) -> list[str]:
    """Private names one router takes from another, by ``from`` import or as a module attribute."""
    rs = routers(modules)
    out = []
    for e in edges:
        if e.importer in rs and e.target in rs and e.importer != e.target:
            out += [f"{e.importer}:{e.line} imports {e.target}.{n}" for n in e.names if _private(n)]
    for name in rs:
        tree = ast.parse(modules[name].read_text())
        aliases: dict[str, str] = {}  # local name -> router module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in rs and a.asname:
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, False, node.level, node.module)
                for a in node.names:
                    if f"{base}.{a.name}" in rs:
                        aliases[a.asname or a.name] = f"{base}.{a.name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                value = node.value
                dotted = ast.unparse(value)
                target = aliases.get(dotted) or (dotted if dotted in rs else None)
                if target and target != name:
                    out.append(f"{name}:{node.lineno} uses {target}.{node.attr}")
    return out


def cross_package_private_imports(modules: dict[str, Path], edges: list[Import]) -> list[str]:
    """Private names taken from a module of another package (within a package they may be shared)."""
    def package(m: str) -> str:
        return m if modules[m].name == "__init__.py" else m.rpartition(".")[0]

    return [f"{e.importer}:{e.line} imports {e.target}.{n}" for e in edges for n in e.names
            if _private(n) and package(e.importer) != package(e.target)]


def long_modules(root: Path, modules: dict[str, Path], limit: int = MAX_LINES) -> list[str]:
    out = []
    for name, path in modules.items():
        if any(under(name, x) for x in SIZE_EXEMPT):
            continue
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


# -- the repository ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> tuple[dict[str, Path], list[Import]]:
    return import_graph(REPO)


def test_no_module_over_the_size_limit(graph):
    modules, _ = graph
    assert len(modules) > 40  # the walk found the packages
    problems = long_modules(REPO, modules)
    assert not problems, "split these (one concept per module):\n" + "\n".join(problems)


def test_no_import_cycles(graph):
    modules, edges = graph
    cycles = find_cycles(modules, edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_import_directions(graph):
    _, edges = graph
    problems = direction_violations(edges)
    assert not problems, "\n".join(problems)


def test_routers_take_no_private_names_from_each_other(graph):
    modules, edges = graph
    assert routers(modules) >= {"proxy.api.openai", "proxy.api.admin", "proxy.api.jobs"}
    problems = private_router_imports(modules, edges)
    assert not problems, "\n".join(problems)


def test_no_private_names_across_packages(graph):
    modules, edges = graph
    problems = cross_package_private_imports(modules, edges)
    assert not problems, "\n".join(problems)


def test_every_package_says_what_lives_there_and_what_it_may_import(graph):
    modules, _ = graph
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert 2 <= len([x for x in doc.splitlines() if x.strip()]) <= 3, f"{name}: a two- or three-line docstring"
        assert "import" in doc.lower(), f"{name}: the docstring says what the package may import"


def test_entry_points_named_by_strings_resolve():
    """Entry points that are strings, not imports: the console script, uvicorn's factory, RQ's job."""
    from proxy.jobs.runners import RQ_ENTRY

    script = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["dpicl"]
    for ref in (script, "proxy.app:app_from_env", RQ_ENTRY.replace(".rq_execute", ":rq_execute"),
                "proxy.jobs:rq_execute"):  # jobs queued by servers from before the jobs package
        module, _, attr = ref.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), ref


# -- the checker on trees that break each rule ----------------------------------------------------------
def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_finds_cycles_through_lazy_and_relative_imports(tmp_path):
    write_tree(tmp_path, {
        "aggregation/__init__.py": "",
        "aggregation/a.py": "def f():\n    from aggregation import b\n",  # lazy, from-import of a module
        "aggregation/b.py": "from .c import thing\n",  # relative
        "aggregation/c.py": "import aggregation.a\nthing = 1\n",
        "aggregation/d.py": "from aggregation.c import thing\n",  # imports into the cycle, not part of it
        "proxy/__init__.py": "",
        "proxy/pkg/__init__.py": "from proxy.pkg.mod import x\n",  # a re-exporting __init__: no cycle
        "proxy/pkg/mod.py": "x = 1\n",
        "proxy/pkg/bad.py": "from proxy.pkg import x\n",  # a submodule importing its own package
        "proxy/pkg/other.py": "from proxy.pkg.bad import x\n",
    })
    modules, edges = import_graph(tmp_path)
    cycles = find_cycles(modules, edges)
    assert sorted(sorted(set(c)) for c in cycles) == [["aggregation.a", "aggregation.b", "aggregation.c"]]
    write_tree(tmp_path, {"proxy/pkg/__init__.py": "from proxy.pkg.other import x\n"})
    modules, edges = import_graph(tmp_path)
    assert ["proxy.pkg", "proxy.pkg.other", "proxy.pkg.bad", "proxy.pkg"] in find_cycles(modules, edges)


def test_checker_finds_wrong_directions(tmp_path):
    write_tree(tmp_path, {
        "aggregation/__init__.py": "",
        "aggregation/core.py": "def f():\n    import proxy.budget\n",
        "proxy/__init__.py": "",
        "proxy/budget.py": "",
        "proxy/upstreams/__init__.py": "",
        "proxy/upstreams/local.py": "def load():\n    from aggregation.core import f\n",
        "proxy/store/__init__.py": "",
        "proxy/store/sqlite.py": "from proxy.serving import demos\n",
        "proxy/serving/__init__.py": "",
        "proxy/serving/demos.py": "from proxy.api.errors import APIError\n",
        "proxy/api/__init__.py": "",
        "proxy/api/errors.py": "APIError = Exception\n",
        "proxy/devtools/__init__.py": "",
        "proxy/devtools/fake.py": "",
        "proxy/jobs/__init__.py": "from proxy.devtools import fake\n",
    })
    _, edges = import_graph(tmp_path)
    found = "\n".join(direction_violations(edges))
    for pair in ("aggregation.core:2 imports proxy.budget", "proxy.upstreams.local:2 imports aggregation.core",
                 "proxy.store.sqlite:1 imports proxy.serving.demos", "proxy.serving.demos:1 imports proxy.api.errors",
                 "proxy.jobs:1 imports proxy.devtools.fake"):
        assert pair in found
    assert len(direction_violations(edges)) == 5


def test_checker_finds_private_names_between_routers(tmp_path):
    router = "from fastapi import APIRouter\nrouter = APIRouter()\n"
    write_tree(tmp_path, {
        "aggregation/__init__.py": "",
        "proxy/__init__.py": "",
        "proxy/api/__init__.py": "",
        "proxy/api/common.py": "def _helper():\n    pass\n",
        "proxy/api/admin.py": router + "def _json():\n    pass\ndef read_json():\n    pass\n",
        "proxy/api/jobs.py": router + "from proxy.api.admin import _json, read_json\nfrom proxy.api.common import _helper\n",
        "proxy/api/openai.py": router + "from proxy.api import admin as adm\n\ndef f():\n    return adm._json()\n",
        "proxy/serving/__init__.py": "",
        "proxy/serving/tasks.py": "from proxy.api.common import _helper\n",
    })
    modules, edges = import_graph(tmp_path)
    assert routers(modules) == {"proxy.api.admin", "proxy.api.jobs", "proxy.api.openai"}
    assert private_router_imports(modules, edges) == ["proxy.api.jobs:3 imports proxy.api.admin._json",
                                                      "proxy.api.openai:6 uses proxy.api.admin._json"]
    assert cross_package_private_imports(modules, edges) == ["proxy.serving.tasks:1 imports proxy.api.common._helper"]


def test_checker_finds_long_modules(tmp_path):
    write_tree(tmp_path, {
        "aggregation/__init__.py": "",
        "aggregation/long.py": "x = 1\n" * (MAX_LINES + 1),
        "aggregation/ok.py": "x = 1\n" * MAX_LINES,
        "proxy/__init__.py": "",
        "proxy/devtools/__init__.py": "",
        "proxy/devtools/fake.py": "x = 1\n" * (MAX_LINES + 100),
    })
    modules, _ = import_graph(tmp_path)
    assert long_modules(tmp_path, modules) == [f"aggregation/long.py: {MAX_LINES + 1} lines"]
