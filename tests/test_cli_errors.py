"""User-facing error paths of the CLI: one line on stderr naming what was wrong, exit code 1, and the
catalog and files left as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.adapters import make_all
from helpers.cli import Cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_all(tmp_path_factory.mktemp("adapters"))


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "home", capsys)


def one_error_line(cli: Cli, *args: str) -> str:
    cli(*args, code=1)
    lines = cli.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cli.err
    return lines[0]


def test_add_of_what_is_not_a_file(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    os.mkfifo(tmp_path / "pipe.safetensors")
    assert "loops back on itself" in one_error_line(cli, "add", str(tmp_path / "loop1"))
    assert "a pipe or a device" in one_error_line(cli, "add", str(tmp_path / "pipe.safetensors"))
    assert "a pipe or a device" in one_error_line(cli, "add", "/dev/zero")
    cli("add", str(tmp_path / "nowhere"), code=2)  # a usage error, as for any missing argument path
    assert "does not exist" in cli.err
    assert json.loads(cli("list", "--json")) == []


def test_a_new_home_is_announced(cli: Cli) -> None:
    assert cli("list") == ""
    assert "made a new, empty adapterhub home" in cli.err
    cli("list")
    assert "made a new" not in cli.err  # only the first time


def test_a_file_too_large_names_the_file(made: dict[str, Path], tmp_path: Path) -> None:
    """A write error (here EFBIG under a file size limit, as ENOSPC or EROFS would be) is one line with the
    path, and the export leaves nothing behind."""
    from helpers.adapters import make_catalog_adapter

    big = make_catalog_adapter(
        tmp_path / "big", 128, 128, ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    )
    assert (big / "adapter_model.safetensors").stat().st_size > 300_000
    home = tmp_path / "home"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "from adapterhub.cli import main\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))\n"
        "sys.exit(main(['--home', sys.argv[1], 'export', 'a', sys.argv[2]]))\n"
    )
    from adapterhub.cli import main

    assert main(["--home", str(home), "--quiet", "add", str(big), "--name", "a"]) == 0
    out = tmp_path / "exports" / "a"
    res = subprocess.run([sys.executable, "-c", code, str(home), str(out)], capture_output=True, text=True)
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: File too large: "), res.stderr
    assert str(out.parent) in lines[0]
    assert list(out.parent.iterdir()) == []  # the scratch folder is gone


def test_combine_method_options_are_named_as_flags(cli: Cli, made: dict[str, Path]) -> None:
    cli("add", str(made["sql-r8"]), "--name", "a")
    cli("add", str(made["chat-r4"]), "--name", "b")
    line = one_error_line(cli, "combine", "a", "b", "--name", "x", "--method", "dare_ties")
    assert "--rank" in line
    assert [r["name"] for r in json.loads(cli("list", "--json"))] == ["a", "b"]


def test_write_adapter_refuses_to_overwrite(made: dict[str, Path], tmp_path: Path) -> None:
    from adapterhub import OutputExistsError
    from adapterhub.formats import read_adapter, write_adapter

    w = read_adapter(made["sql-r8"], load=True)
    out = write_adapter(w, tmp_path / "k.safetensors", format="kohya")
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        write_adapter(w, out, format="kohya")
    assert out.read_bytes() == before
    folder = tmp_path / "peft"
    write_adapter(w, folder)
    with pytest.raises(OutputExistsError):
        write_adapter(w, folder)
    write_adapter(w, folder, overwrite=True)


def test_an_unknown_adapter_or_a_weight_that_is_not_a_number_is_named(
    cli: Cli, made: dict[str, Path], tmp_path: Path
) -> None:
    """`run -a nosuch` says there is no cataloged adapter of that name (nor a path); `-a shout:abc` says
    the weight is not a number, not that there is no such file (issue 28, item 3)."""
    cli("add", str(made["sql-r8"]), "--name", "shout")
    nosuch = "error: no adapter named 'nosuch' in the catalog and no file or folder at that path"
    assert one_error_line(cli, "run", "any-base", "hi", "-a", "nosuch").startswith(nosuch)
    assert one_error_line(cli, "run", "any-base", "hi", "--embed", "-a", "nosuch").startswith(nosuch)
    weight = "error: shout:abc: the weight 'abc' is not a number (give NAME:WEIGHT, as shout:0.5)"
    assert one_error_line(cli, "run", "any-base", "hi", "-a", "shout:abc") == weight
    path = str(made["chat-r4"])
    assert "the weight 'x' is not a number" in one_error_line(cli, "run", "any-base", "hi", "-a", f"{path}:x")
    # combine (and merge, through the same inputs) name them the same way
    assert one_error_line(cli, "combine", "nosuch", "shout", "--name", "c").startswith(nosuch)
    assert one_error_line(cli, "combine", "shout:abc", "shout", "--name", "c") == weight
    assert [a["name"] for a in cli.json("list")] == ["shout"]
