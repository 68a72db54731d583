"""The sharing CLI: token create/list/revoke, push, pull, search --hub, serve; JSON output, one-line errors,
and no huggingface_hub / FastAPI imports on the light commands."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from helpers.adapters import make_catalog_adapter
from helpers.cli import Cli
from test_server import Server, online_hf, start_server

from adapterhub.resources import load_schema


@pytest.fixture
def hf(monkeypatch: pytest.MonkeyPatch) -> Any:
    return online_hf(monkeypatch)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from start_server(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_catalog_adapter(
        tmp_path_factory.mktemp("cli-hub") / "sql", 8, 16, ["q_proj", "v_proj"], seed=5
    )


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], hf: Any) -> Cli:
    return Cli(tmp_path / "home", capsys)


def test_tokens_are_shown_once_and_stored_hashed(cli: Cli, server: Server) -> None:
    made = cli.json("token", "create", "dora", "--write")
    assert made["token"].startswith("ahub_") and made["user"] == "dora" and made["role"] == "write"
    plain = cli("token", "create", "eve").strip()
    assert plain.startswith("ahub_") and "shown once" in cli.err
    listed = cli.json("token", "list")
    assert [(t["user"], t["role"]) for t in listed] == [("dora", "write"), ("eve", "read")]
    table = cli("token", "list")
    assert "dora" in table and made["token"] not in table and plain not in table
    assert made["token"].encode() not in (cli.home / "catalog.db").read_bytes()
    cli("token", "revoke", str(made["id"]))
    cli("token", "revoke", plain)
    assert cli.json("token", "list") == []
    cli("token", "revoke", "99", code=1)
    assert cli.err.startswith("error: no such token") and cli.err.count("\n") == 1
    cli("token", "create", "no/slash", code=1)


def test_push_pull_show_and_search(cli: Cli, server: Server, adapter: Path, tmp_path: Path) -> None:
    remote = ["--endpoint", server.url]
    cli("add", str(adapter), "--name", "sql", "--tag", "sql")
    out = cli("push", "sql", "alice/cli-sql", *remote, "--token", server.alice)
    url = out.strip()
    assert url.startswith(f"{server.url}/alice/cli-sql/commit/") and "new commit" in cli.err
    assert server.alice not in out + cli.err
    again = cli.json("push", "sql", "alice/cli-sql", *remote, "--token", server.alice)
    assert again["changed"] is False and again["commit_url"] == url

    puller = Cli(tmp_path / "puller", cli.capsys)
    out = puller("pull", "alice/cli-sql", *remote)
    commit = url.rsplit("/", 1)[1]
    assert f"pulled alice/cli-sql@{commit} as sql" in out
    rec = puller.json("show", "sql")
    assert rec["source"] == f"alice/cli-sql@{commit}" and rec["tags"] == ["sql"]
    assert "alice/cli-sql@" in puller("show", "sql")
    res = puller.json("pull", f"alice/cli-sql@{commit}", *remote)
    assert res["changed"] is False and res["commit"] == commit
    jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).validate(res["adapter"])

    found = cli.json("search", "cli-sql", "--hub", *remote)
    assert [f["repo_id"] for f in found] == ["alice/cli-sql"]
    assert "alice/cli-sql" in cli("search", "cli", "--hub", "--base", "tiny-llama", *remote)
    cli("search", "cli", "--hub", "--rank", "8", code=2)
    cli("search", "cli", "--endpoint", server.url, code=2)


def test_errors_are_one_line(cli: Cli, server: Server, adapter: Path) -> None:
    remote = ["--endpoint", server.url]
    cli("pull", "alice/nothing-here", *remote, code=1)
    assert cli.err.startswith("error: alice/nothing-here at ") and "repository not found" in cli.err
    assert cli.err.count("\n") == 1
    cli("add", str(adapter), "--name", "sql")
    cli("push", "sql", "alice/denied", *remote, "--token", server.bob, code=1)
    assert "403" in cli.err and server.bob not in cli.err and cli.err.count("\n") == 1
    cli("push", "missing", "alice/x", *remote, "--token", server.alice, code=1)
    assert "no adapter named 'missing'" in cli.err
    cli("pull", "alice/x", "--endpoint", "ftp://nowhere", code=1)
    assert "not an http(s) URL" in cli.err
    cli("pull", "alice/x", "--endpoint", "http://127.0.0.1:9", code=1)
    assert cli.err.startswith("error: cannot") and cli.err.count("\n") == 1


def test_serve_refuses_a_busy_port(tmp_path: Path, server: Server) -> None:
    port = server.url.rsplit(":", 1)[1]
    res = subprocess.run(
        [sys.executable, "-m", "adapterhub", "--home", str(tmp_path), "serve", "--port", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and "cannot listen on 127.0.0.1:" in res.stderr


def test_light_commands_import_no_hub_client_or_server(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from adapterhub.cli import main\n"
        "rc = main(json.loads(sys.argv[1]))\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'huggingface_hub', 'fastapi', 'uvicorn') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    for args in (["--help"], ["list"], ["search", "x"], ["token", "list"], ["push", "--help"]):
        res = subprocess.run(
            [sys.executable, "-c", code, json.dumps(["--home", str(tmp_path), *args])],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, (args, res.stderr)


def test_push_into_another_users_namespace_says_forbidden(cli: Cli, server: Server, adapter: Path) -> None:
    remote = ["--endpoint", server.url]
    cli("add", str(adapter), "--name", "sql")
    cli("push", "sql", "alice/owned-by-alice", *remote, "--token", server.alice)
    for repo in ("alice/owned-by-alice", "alice/not-yet-there"):
        cli("push", "sql", repo, *remote, "--token", server.bob, code=1)
        line = cli.err.strip()
        assert line.count("\n") == 0 and line.startswith("error: "), cli.err
        assert "403" in line or "may not write" in line or "Forbidden" in line, line
        assert "Invalid HF URI" not in line and "Unrecognized host" not in line
