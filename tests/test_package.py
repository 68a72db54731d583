"""Packaging: the public surface, lazy imports, and a wheel that carries schemas and migrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import adapterhub

ROOT = Path(__file__).resolve().parent.parent


def test_all_is_honest() -> None:
    for name in adapterhub.__all__:
        assert hasattr(adapterhub, name), name
    public = {n for n in dir(adapterhub) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(adapterhub.__all__), public - set(adapterhub.__all__)


def test_import_is_light() -> None:
    code = (
        "import sys, adapterhub, adapterhub.cli\n"
        "heavy = [m for m in ('torch', 'sqlalchemy', 'alembic', 'rich', 'jsonschema', 'huggingface_hub')"
        " if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr + res.stdout


def test_errors_inherit_the_builtins_callers_catch() -> None:
    from adapterhub import errors

    assert issubclass(errors.AdapterNotFoundError, LookupError)
    assert issubclass(errors.InvalidAdapterError, ValueError)
    assert issubclass(errors.PickleRefusedError, errors.InvalidAdapterError)
    assert issubclass(errors.CatalogVersionError, errors.CatalogError)
    for name in dir(errors):
        obj = getattr(errors, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == errors.__name__:
            assert issubclass(obj, errors.AdapterHubError), name
            assert name in (errors.__doc__ or ""), f"{name} missing from the tree in errors.py's docstring"


def test_wheel_ships_schemas_and_migrations_and_works_installed(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("adapterhub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "adapterhub/py.typed",
        "adapterhub/_data/schemas/adapter.schema.json",
        "adapterhub/_data/schemas/lora_config.schema.json",
        "adapterhub/_data/migrations/env.py",
        "adapterhub/_data/migrations/versions/0001_initial.py",
    ):
        assert expected in names, expected
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "import adapterhub, adapterhub.resources as r, sys\n"
        f"assert adapterhub.__file__.startswith({str(target)!r}), adapterhub.__file__\n"
        "assert '_data' in str(r.data_dir('migrations'))\n"
        f"h = adapterhub.Hub({str(tmp_path / 'home')!r}); print(h.db_revision())\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
    )
    assert res.returncode == 0, res.stderr
    from adapterhub.catalog.db import HEAD

    assert res.stdout.strip() == HEAD


def test_ruff_format_and_lint_are_clean() -> None:
    """`ruff format` is the formatting (of the Python sources; README's examples keep their aligned comments)."""
    paths = ["adapterhub", "tests", "bench", "examples", "migrations"]
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
