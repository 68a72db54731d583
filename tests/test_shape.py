"""The shape of the whole package (issue 9): no import cycle among adapterhub modules (imports inside
functions and under TYPE_CHECKING count), no module imports a private name from another package, the
lower layers import no database, every exception class lives in errors.py, no file is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "adapterhub"
MAX_LINES = 600
#: layers that must run with torch alone (a GPU box): they import nothing of these
LOWER = ("adapterhub.lora", "adapterhub.formats", "adapterhub.ops", "adapterhub.runtime")
UPPER = (
    "adapterhub.catalog",
    "adapterhub.store",
    "adapterhub.services",
    "adapterhub.hub",
    "adapterhub.remote",
    "adapterhub.server",
    "adapterhub.cli",
)


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _is_package(mod: str) -> bool:
    return MODULES.get(mod, Path()).name == "__init__.py"


def _imports(mod: str, path: Path) -> list[tuple[str, list[str]]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, [a.name for a in node.names]))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    private: list[str] = []
    for mod, path in MODULES.items():
        own = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for target, names in _imports(mod, path):
            if not target.startswith("adapterhub"):
                continue
            if not names and target in MODULES:
                graph[mod].add(target)
            for n in names:
                if f"{target}.{n}" in MODULES:  # `from .pkg import submodule`
                    graph[mod].add(f"{target}.{n}")
                    continue
                if target in MODULES:
                    graph[mod].add(target)
                tpkg = target if _is_package(target) else target.rsplit(".", 1)[0]
                if n.startswith("_") and not n.startswith("__") and tpkg != own:
                    private.append(f"{mod} imports {n} from {target}")
    for mod in graph:  # a package's __init__ is no edge to itself
        graph[mod].discard(mod)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _edge_ok(mod: str, target: str) -> bool:
    """`adapterhub.x.y` importing its own package's __init__ (`adapterhub.x`) through a relative import
    of a sibling is an edge to the package; ignore the root package, which only re-exports lazily."""
    return target != "adapterhub"


def test_no_import_cycles() -> None:
    graph, _ = _graph()
    graph = {m: {t for t in ts if _edge_ok(m, t)} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_no_private_name_crosses_a_package() -> None:
    _, private = _graph()
    assert private == []


def test_lower_layers_import_no_database_or_upper_layer() -> None:
    graph, _ = _graph()
    bad = []
    for mod, targets in graph.items():
        if mod.startswith(LOWER):
            bad += [f"{mod} -> {t}" for t in targets if t.startswith(UPPER)]
    for mod, path in MODULES.items():
        if mod.startswith(LOWER):
            bad += [
                f"{mod} -> {t}"
                for t, _ in _imports(mod, path)
                if t.split(".")[0] in ("sqlalchemy", "alembic")
            ]
    assert bad == []


def test_every_exception_class_is_in_errors_py() -> None:
    stray = []
    for mod, path in MODULES.items():
        if mod == "adapterhub.errors":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                names = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if any(n.endswith(("Error", "Exception")) for n in names) or node.name.endswith("Error"):
                    stray.append(f"{mod}.{node.name}")
    assert stray == []


def test_errors_docstring_draws_every_error() -> None:
    import adapterhub.errors as errors

    doc = errors.__doc__ or ""
    classes = [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)]
    assert [n for n in classes if n not in doc] == []


def test_no_file_over_600_lines() -> None:
    long = {
        m: n for m, p in MODULES.items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}
