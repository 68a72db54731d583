"""`Cli`: run `adapterhub.cli.main` in-process against one home, asserting the exit code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapterhub.cli import main


def home_args(hub: Any) -> list[str]:
    """The global options that point the CLI at ``hub``'s home and catalog."""
    return ["--home", str(hub.home), *(["--db", hub.db_url] if hub.db_url else [])]


class Cli:
    def __init__(self, home: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.home = home
        self.capsys = capsys
        self.err = ""

    def __call__(self, *args: str, code: int = 0) -> str:
        self.capsys.readouterr()
        rc = main(["--home", str(self.home), *args])
        out, err = self.capsys.readouterr()
        assert rc == code, f"exit {rc} != {code}\nstdout: {out}\nstderr: {err}"
        self.err = err
        return out

    def json(self, *args: str) -> Any:
        return json.loads(self("--json", *args))
