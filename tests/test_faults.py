"""Crash tests: ``kill -9`` (SIGKILL through ``ADAPTERHUB_FAULT``) at points of add, rm, merge, combine,
export, pull and push; afterwards `db check` finds only what `db gc` reclaims (or restores), the catalog
is what it was before the killed command, and the same command then works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter, tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    tiny_llama().save_pretrained(str(root / "base"))
    return {
        "base": root / "base",
        "a": make_catalog_adapter(root / "a", 4, 8, ["q_proj", "v_proj"], seed=1),
        "b": make_catalog_adapter(root / "b", 4, 8, ["q_proj"], seed=2),
    }


def run(home: Path, *args: str, fault: str | None = None, env: dict[str, str] | None = None) -> Any:
    e = {**os.environ, **(env or {})}
    e.pop("ADAPTERHUB_FAULT", None)
    if fault:
        e["ADAPTERHUB_FAULT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "adapterhub", "--home", str(home), "--quiet", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=300,
        cwd=str(home.parent),
    )


def names(home: Path) -> list[str]:
    res = run(home, "list", "--json")
    assert res.returncode == 0, res.stderr
    return sorted(r["name"] for r in json.loads(res.stdout))


def check(home: Path) -> dict[str, Any]:
    res = run(home, "db", "check", "--json")
    doc = json.loads(res.stdout)
    assert res.returncode == (0 if doc["ok"] else 1)
    return doc


def recover(home: Path, allowed: tuple[str, ...] = ("leftover", "orphan", "trashed")) -> list[dict[str, Any]]:
    """After a kill: every problem is one gc handles; gc handles it; the check is clean again."""
    found = check(home)["problems"]
    assert {p["kind"] for p in found} <= set(allowed), found
    dry = run(home, "db", "gc", "--json")
    assert dry.returncode == 0 and len(json.loads(dry.stdout)["items"]) == len(found)
    assert check(home)["problems"] == found  # the dry run changed nothing
    res = run(home, "db", "gc", "--yes", "--json")
    assert res.returncode == 0, res.stderr
    after = check(home)
    assert after["ok"], after
    return found


@pytest.fixture
def home(tmp_path: Path, world: dict[str, Path]) -> Path:
    h = tmp_path / "home"
    assert run(h, "add", str(world["a"]), "--name", "a").returncode == 0
    assert run(h, "base", "add", str(world["base"]), "--name", "tiny").returncode == 0
    return h


def killed(res: Any) -> bool:
    return res.returncode == -signal.SIGKILL


def test_kill_during_add_leaves_nothing_cataloged(home: Path, world: dict[str, Path]) -> None:
    res = run(home, "add", str(world["b"]), "--name", "b", fault="add.stored")
    assert killed(res)
    assert names(home) == ["a"]
    found = recover(home)
    assert {p["kind"] for p in found} == {"orphan"}  # b's objects reached the store, no row did
    assert run(home, "add", str(world["b"]), "--name", "b").returncode == 0
    assert names(home) == ["a", "b"] and check(home)["ok"]


def test_kill_during_rm_loses_nothing(home: Path) -> None:
    res = run(home, "rm", "-y", "a", fault="remove.trashed")
    assert killed(res)
    assert names(home) == ["a"]  # the transaction never committed
    found = recover(home)
    assert {p["kind"] for p in found} == {"trashed"}  # gc put the objects back
    assert run(home, "export", "a", str(home.parent / "a-out")).returncode == 0
    assert run(home, "rm", "-y", "a").returncode == 0
    assert names(home) == [] and check(home)["ok"]


def test_kill_during_merge_leaves_no_partial_output(home: Path) -> None:
    out = home.parent / "merged"
    res = run(home, "merge", "tiny", "a", "--out", str(out), fault="merge.writing")
    assert killed(res)
    assert not out.exists()
    found = recover(home)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged")]
    assert any(".merged.tmp-" in p["subject"] for p in found)
    assert run(home, "merge", "tiny", "a", "--out", str(out)).returncode == 0
    assert (out / "config.json").is_file() and check(home)["ok"]


def test_kill_during_combine_catalogs_nothing(home: Path, world: dict[str, Path]) -> None:
    assert run(home, "add", str(world["b"]), "--name", "b").returncode == 0
    res = run(home, "combine", "a:0.5", "b:0.5", "--name", "mix", fault="combine.written")
    assert killed(res)
    assert names(home) == ["a", "b"]
    recover(home)
    assert run(home, "combine", "a:0.5", "b:0.5", "--name", "mix").returncode == 0
    assert names(home) == ["a", "b", "mix"] and check(home)["ok"]


def test_kill_during_export_keeps_the_earlier_export(home: Path) -> None:
    out = home.parent / "exported"
    assert run(home, "export", "a", str(out)).returncode == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir())
    res = run(home, "export", "a", str(out), "--overwrite", fault="export.writing")
    assert killed(res)
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir()) == before
    recover(home)
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".exported")] == []


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_server import start_server

    yield from start_server(tmp_path_factory)


def test_kill_during_push_and_pull(home: Path, server: Any, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": server.url, "HF_TOKEN": server.alice, "HF_HUB_DISABLE_XET": "1"}
    env = {**env, "HF_HUB_OFFLINE": "0"}
    res = run(home, "push", "a", "alice/fault-a", fault="push.uploading", env=env)
    assert killed(res)
    assert check(home)["ok"]  # a push writes nothing locally before its commit
    assert run(home, "push", "a", "alice/fault-a", env=env).returncode == 0
    other = tmp_path / "other"
    res = run(other, "pull", "alice/fault-a", "--name", "pulled", fault="pull.downloaded", env=env)
    assert killed(res)
    found = recover(other)
    assert {p["kind"] for p in found} <= {"leftover"} and found  # the download folder
    res = run(other, "pull", "alice/fault-a", "--name", "pulled", env=env)
    assert res.returncode == 0, res.stderr
    assert names(other) == ["pulled"] and check(other)["ok"]
