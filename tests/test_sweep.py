"""Issue 28, item 1: the scratch of killed runs (``kill -9`` through ``ADAPTERHUB_FAULT``) of add, combine,
merge and pull is cleared by the next run of the same kind, once its process is gone; scratch of another
kind is left to `db gc`; `db check` says in one line how much `db gc` would reclaim meanwhile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.adapters import make_catalog_adapter, tiny_llama
from test_faults import killed, run


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    tiny_llama().save_pretrained(str(root / "base"))
    return {
        "base": root / "base",
        "a": make_catalog_adapter(root / "a", 4, 8, ["q_proj", "v_proj"], seed=1),
        "b": make_catalog_adapter(root / "b", 4, 8, ["q_proj"], seed=2),
        "c": make_catalog_adapter(root / "c", 2, 4, ["v_proj"], seed=3),
    }


def scratch(home: Path, prefix: str) -> list[str]:
    tmp = home / "store" / "tmp"
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(prefix + "-")) if tmp.is_dir() else []


def reclaim_line(home: Path) -> str:
    """`db check`'s summary (stderr; the problems themselves go to stdout)."""
    res = subprocess.run(
        [sys.executable, "-m", "adapterhub", "--home", str(home), "db", "check", "--quick", "--csv"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "ADAPTERHUB_FAULT": ""},
    )
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    return lines[0]


def test_the_next_run_of_a_kind_clears_what_killed_runs_of_that_kind_left(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    assert run(home, "add", str(world["a"]), "--name", "a").returncode == 0
    assert run(home, "base", "add", str(world["base"]), "--name", "tiny").returncode == 0

    # a killed add leaves a half-copied file, a killed combine its derived adapter
    assert killed(run(home, "add", str(world["b"]), "--name", "b", fault="add.copying"))
    left_by_add = scratch(home, "in")
    assert left_by_add
    res = run(home, "combine", "a", str(world["c"]), "--name", "mix", fault="combine.written")
    assert killed(res), res.stderr
    left_by_combine = scratch(home, "derived")
    assert left_by_combine
    line = reclaim_line(home)
    assert "problem" in line and "reclaims" in line  # one line: how much `db gc` would free

    # the next add clears the add's scratch, not the combine's
    assert run(home, "add", str(world["b"]), "--name", "b").returncode == 0
    assert not set(left_by_add) & set(scratch(home, "in"))
    assert scratch(home, "derived") == left_by_combine
    # the next combine clears the combine's
    assert run(home, "combine", "a", str(world["c"]), "--name", "mix").returncode == 0
    assert scratch(home, "derived") == []

    # a killed merge leaves its unfinished output beside --out; the next merge (elsewhere) clears it
    out = tmp_path / "merged"
    assert killed(run(home, "merge", "tiny", "a", "--out", str(out), fault="merge.writing"))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged.tmp-")]
    assert any((home / "work").glob("*.json"))
    assert run(home, "merge", "tiny", "b", "--out", str(tmp_path / "merged-b")).returncode == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    assert not any((home / "work").glob("*.json"))
    doc = json.loads(run(home, "db", "check", "--json").stdout)
    assert doc["ok"], doc


def test_a_live_runs_scratch_and_unknown_scratch_are_left_alone(
    tmp_path: Path, world: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    tmp = home / "store" / "tmp"
    tmp.mkdir(parents=True)
    live = tmp / f"in-{os.getpid()}-live"  # this test process is alive
    live.write_bytes(b"x")
    other = tmp / "in-notapid-x"  # no process id: not provably anyone's
    other.write_bytes(b"x")
    assert run(home, "add", str(world["a"]), "--name", "a").returncode == 0
    assert live.exists() and other.exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from test_server import start_server

    yield from start_server(tmp_path_factory)


def test_the_next_pull_clears_a_killed_pulls_download(
    server: Any, tmp_path: Path, world: dict[str, Path]
) -> None:
    env = {
        "HF_ENDPOINT": server.url,
        "HF_TOKEN": server.alice,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }
    home = tmp_path / "home"
    assert run(home, "add", str(world["a"]), "--name", "a").returncode == 0
    assert run(home, "push", "a", "alice/sweep-a", env=env).returncode == 0
    other = tmp_path / "other"
    assert killed(run(other, "pull", "alice/sweep-a", "--name", "p", fault="pull.downloaded", env=env))
    assert scratch(other, "pull")
    res = run(other, "pull", "alice/sweep-a", "--name", "p", env=env)
    assert res.returncode == 0, res.stderr
    assert scratch(other, "pull") == []
    assert json.loads(run(other, "db", "check", "--json").stdout)["ok"]
