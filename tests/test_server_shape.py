"""The server package keeps its shape: no import cycle among its modules (imports inside functions count),
no private name imported from another package, no file over 600 lines, every exception class in
adapterhub/errors.py, and the storage layer free of FastAPI/Starlette (it raises domain errors only)."""

from __future__ import annotations

import ast
from pathlib import Path

import adapterhub

PACKAGE = Path(adapterhub.__file__).parent
SERVER = PACKAGE / "server"
HTTP_FREE = (
    "storage.py",
    "tokens.py",
    "cards.py",
    "checks.py",
    "records.py",
    "payload.py",
    "gitfiles.py",
    "views.py",
    "access.py",
    "likes.py",
    "discussions.py",
    "collections.py",
    "webhooks.py",
    "legacy.py",
    "xetstore.py",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, str]]:
    """(module imported, name imported) for every import in the file, wherever it is."""
    mod = module_name(path)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out += [(target, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
    return out


def server_files() -> list[Path]:
    """The Hub API's modules (the web pages under server/pages/ are another engineer's, checked there)."""
    return sorted(p for p in SERVER.rglob("*.py") if "pages" not in p.relative_to(SERVER).parts)


def test_no_import_cycles_in_the_server() -> None:
    modules = {module_name(p): p for p in server_files()}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for m, p in modules.items():
        for target, name in imports(p):
            full = f"{target}.{name}"
            dep = full if full in modules else target
            if dep in modules and dep != m:
                graph[m].add(dep)

    def visit(m: str, path: list[str]) -> None:
        for dep in graph[m]:
            assert dep not in path, f"import cycle: {' -> '.join([*path, dep])}"
            visit(dep, [*path, dep])

    for m in modules:
        visit(m, [m])


def test_no_private_names_from_other_packages_and_small_files() -> None:
    for p in server_files():
        assert len(p.read_text().splitlines()) < 600, p
        for target, name in imports(p):
            if target.startswith("adapterhub") and not target.startswith("adapterhub.server"):
                assert not (name.startswith("_") and not name.startswith("__")), (p, target, name)
                assert not any(part.startswith("_") for part in target.split(".")), (p, target)


def test_exceptions_live_in_errors_py_and_storage_knows_no_http() -> None:
    for p in server_files():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not any(b.endswith(("Error", "Exception")) for b in bases), (p, node.name)
        if p.name in HTTP_FREE and p.parent == SERVER:
            for target, _ in imports(p):
                assert not target.startswith(("fastapi", "starlette", "uvicorn")), (p, target)
                assert not target.startswith("adapterhub.server.routes"), (p, target)


def test_routers_mounted_after_create_app_still_match_and_errors_keep_the_hub_shape(tmp_path: Path) -> None:
    from fastapi import APIRouter
    from starlette.testclient import TestClient

    from adapterhub import Hub
    from adapterhub.errors import ConflictError
    from adapterhub.server import create_app, server_store

    with Hub(tmp_path / "home") as hub:
        app = create_app(server_store(hub.catalog, hub.home))
        extra = APIRouter()

        @extra.get("/ui/hello")
        async def hello() -> dict[str, str]:
            return {"hello": "world"}

        @extra.get("/ui/conflict")
        async def conflict() -> None:
            raise ConflictError("already there\r\nX-Evil: 1")

        app.include_router(extra)
        client = TestClient(app)
        assert client.get("/ui/hello").json() == {"hello": "world"}
        r = client.get("/ui/conflict")
        assert r.status_code == 409 and r.json() == {"error": "already there\r\nX-Evil: 1"}
        assert (
            r.headers["X-Error-Message"] == "already there\\x0d\\x0aX-Evil: 1" and "X-Evil" not in r.headers
        )
        r = client.get("/no/such/thing")
        assert r.status_code == 404 and "no such endpoint" in r.json()["error"]
        r = client.put("/api/whoami-v2")
        assert r.status_code == 405 and "error" in r.json()
