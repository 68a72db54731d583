"""The shape of the lower layers (issue 9): lora.py, formats/ and ops/ import no module in a loop (imports
inside functions and under TYPE_CHECKING count), no private name crosses a package, the layers point
downwards only, and no file is over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "adapterhub"
#: the modules this test walks: the lower layers of DESIGN.md
SCOPE = ("lora.py", "errors.py", "names.py", "formats", "ops")
#: what each layer may import from the package (DESIGN.md: each imports only the ones listed before it)
ALLOWED = {
    "adapterhub.lora": ("adapterhub.errors",),
    "adapterhub.formats": (
        "adapterhub.errors",
        "adapterhub.lora",
        "adapterhub.resources",
        "adapterhub.formats",
    ),
    "adapterhub.ops": ("adapterhub.errors", "adapterhub.lora", "adapterhub.formats", "adapterhub.ops"),
}


def _files() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for entry in SCOPE:
        p = PKG / entry
        paths = sorted(p.rglob("*.py")) if p.is_dir() else ([p] if p.exists() else [])
        for f in paths:
            rel = f.relative_to(PKG.parent).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import statement anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.append((mod, [a.name for a in node.names]))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    files = _files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    private: list[str] = []
    for mod, path in files.items():
        own_pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        for target, names in _imports(mod, path):
            if not target.startswith("adapterhub"):
                continue
            for n in names:  # `from .pkg import submodule` imports the submodule
                if f"{target}.{n}" in files:
                    graph[mod].add(f"{target}.{n}")
                elif target in files:
                    graph[mod].add(target)
                target_pkg = (
                    target if (PKG.parent / target.replace(".", "/")).is_dir() else target.rsplit(".", 1)[0]
                )
                if n.startswith("_") and not n.startswith("__") and target_pkg != own_pkg:
                    private.append(f"{mod} imports {n} from {target}")
            if not names and target in files:
                graph[mod].add(target)
    return graph, private


def test_no_import_cycles_in_the_lower_layers() -> None:
    graph, _ = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n) :] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_name_crosses_a_package() -> None:
    _, private = _graph()
    assert not private, "\n".join(private)


def test_layers_point_downwards() -> None:
    files = _files()
    wrong = []
    for mod, path in files.items():
        layer = next((k for k in ALLOWED if mod == k or mod.startswith(k + ".")), None)
        if layer is None:
            continue
        for target, _ in _imports(mod, path):
            inside = target.startswith("adapterhub") and target != "adapterhub"
            if inside and not any(target == a or target.startswith(a + ".") for a in ALLOWED[layer]):
                wrong.append(f"{mod} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_files_stay_small() -> None:
    big = {m: n for m, p in _files().items() if (n := len(p.read_text(encoding="utf-8").splitlines())) > 600}
    assert not big, big
