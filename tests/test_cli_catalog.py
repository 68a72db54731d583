"""The catalog CLI: commands, JSON records against the schema, exit codes, no torch on light commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from helpers.adapters import make_all, make_kohya
from helpers.cli import Cli

from adapterhub.cli import main
from adapterhub.resources import load_schema


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-adapters")
    out = make_all(root)
    out["kohya"] = make_kohya(root / "anime.safetensors")
    return out


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "home", capsys)


def validate_record(rec: object) -> None:
    jsonschema.Draft202012Validator(load_schema("adapter.schema.json")).validate(rec)


def test_add_list_show_search_tag_rm(cli: Cli, made: dict[str, Path]) -> None:
    out = cli("add", str(made["sql-r8"]), "--tag", "sql", "--description", "text to SQL")
    assert "sql-r8" in out and "q_proj, v_proj" in out
    rec = cli.json("add", str(made["chat-r4"]), "--name", "chat")
    validate_record(rec)
    assert rec["name"] == "chat" and rec["use_rslora"] is True  # type: ignore[index]
    cli("add", str(made["kohya"]))
    records = cli.json("list")
    assert [r["name"] for r in records] == ["anime", "chat", "sql-r8"]  # type: ignore[union-attr, index]
    for r in records:  # type: ignore[union-attr]
        validate_record(r)
    assert [r["name"] for r in json.loads(cli("list", "--json", "--format", "kohya"))] == ["anime"]
    assert [r["name"] for r in json.loads(cli("list", "--json", "--target", "k_proj"))] == ["chat"]
    assert [r["name"] for r in json.loads(cli("search", "--json", "SQL"))] == ["sql-r8"]
    shown = cli.json("show", "sql-r8")
    validate_record(shown)
    assert len(shown["modules"]) == 4 and {f["role"] for f in shown["files"]} == {"config", "weights"}  # type: ignore[index]
    table = cli("show", "anime")
    assert "kohya" in table and "ss_output_name" in table
    csv_out = cli("list", "--csv")
    assert csv_out.splitlines()[0].startswith("name,format,base_model,rank")
    tagged = cli.json("tag", "chat", "fav", "v2")
    validate_record(tagged)
    assert tagged["tags"] == ["fav", "v2"]  # type: ignore[index]
    assert "chat: tags v2" in cli("tag", "chat", "fav", "--remove")
    assert "removed anime, chat" in cli("rm", "--yes", "anime", "chat")
    assert [r["name"] for r in cli.json("list")] == ["sql-r8"]  # type: ignore[union-attr, index]


def test_export_command(cli: Cli, made: dict[str, Path], tmp_path: Path) -> None:
    cli("add", str(made["sql-r8"]))
    assert "exported sql-r8" in cli("export", "sql-r8", str(tmp_path / "x"))
    assert (tmp_path / "x" / "adapter_model.safetensors").is_file()
    assert cli.json("export", "sql-r8", str(tmp_path / "k.safetensors"), "--format", "kohya") == {
        "name": "sql-r8",
        "path": str(tmp_path / "k.safetensors"),
    }
    cli("export", "sql-r8", str(tmp_path / "x"), code=1)
    assert cli.err.startswith("error: ") and "already exists" in cli.err


def test_errors_are_one_line_with_exit_code_1(cli: Cli, made: dict[str, Path], tmp_path: Path) -> None:
    cli("show", "missing", code=1)
    assert (
        cli.err == "error: no adapter named 'missing' in the catalog; `adapterhub list` shows what is there\n"
    )
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    cli("add", str(bad), code=1)
    assert cli.err.count("\n") == 1 and "header is not JSON" in cli.err and "Traceback" not in cli.err
    cli("add", str(made["sql-r8"]))
    cli("add", str(made["sql-r8"]), code=1)
    assert "already cataloged" in cli.err
    assert [r["name"] for r in cli.json("list")] == ["sql-r8"]  # type: ignore[union-attr, index]


def test_usage_errors_exit_2(cli: Cli) -> None:
    cli("list", "--json", "--csv", code=2)
    assert "--json and --csv cannot be used together" in cli.err
    cli("list", "--rank", "zero", code=2)
    cli("list", "--min-rank", "9", "--max-rank", "2", code=2)
    cli("add", "/does/not/exist", code=2)
    cli("nosuchcommand", code=2)


def test_rm_needs_yes_when_not_interactive(cli: Cli, made: dict[str, Path]) -> None:
    cli("add", str(made["sql-r8"]))
    cli("rm", "sql-r8", code=2)
    assert "--yes" in cli.err
    assert [r["name"] for r in cli.json("list")] == ["sql-r8"]  # type: ignore[union-attr, index]


def test_db_upgrade_and_version(cli: Cli) -> None:
    from adapterhub.catalog.db import HEAD

    assert cli.json("db", "upgrade") == {"revision": HEAD}
    assert "0.1.0" in cli("--version")


def test_global_json_flag_and_home_env(
    tmp_path: Path, made: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "envhome"))
    assert main(["add", str(made["sql-r8"])]) == 0
    capsys.readouterr()
    assert main(["--json", "list"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["sql-r8"]
    assert (tmp_path / "envhome" / "catalog.db").is_file()


LIGHT = [
    ["--help"],
    ["list"],
    ["--json", "list", "--target", "q_proj"],
    ["search", "sql"],
    ["show", "sql-r8"],
    ["tag", "sql-r8", "x"],
    ["rm", "--yes", "sql-r8"],
]


def test_light_commands_never_import_torch(tmp_path: Path, made: dict[str, Path]) -> None:
    home = tmp_path / "home"
    assert main(["--home", str(home), "add", str(made["sql-r8"])]) == 0
    code = (
        "import sys, json\n"
        "from adapterhub.cli import main\n"
        "rc = main(json.loads(sys.argv[1]))\n"
        "assert rc == 0, rc\n"
        "heavy = [m for m in ('torch', 'safetensors.torch', 'transformers', 'peft') if m in sys.modules]\n"
        "sys.exit(f'imported {heavy}' if heavy else 0)\n"
    )
    for args in LIGHT:
        res = subprocess.run(
            [sys.executable, "-c", code, json.dumps(["--home", str(home), *args])],
            capture_output=True,
            text=True,
        )
        assert res.returncode == 0, (args, res.stderr)
