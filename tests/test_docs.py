"""The docs stay true: docs/cli-reference.md equals `--help`, and README's two commands are what CI runs.

Regenerate the reference with:  .venv/bin/python tests/test_docs.py --update
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import click
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REFERENCE = ROOT / "docs" / "cli-reference.md"
START, END = "<!-- cli-reference:start -->", "<!-- cli-reference:end -->"


def _commands(
    group: click.Group, prefix: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out: list[tuple[tuple[str, ...], click.Command]] = []
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        out.append(((*prefix, name), cmd))
        if isinstance(cmd, click.Group):
            out += _commands(cmd, (*prefix, name))
    return out


def _help(path: tuple[str, ...]) -> str:
    from adapterhub.cli import cli

    res = CliRunner().invoke(cli, [*path, "--help"], prog_name="adapterhub", env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.output
    return res.output.rstrip() + "\n"


def reference() -> str:
    from adapterhub.cli import cli

    parts = [START, "", "### `adapterhub`", "", "```text", _help(()).rstrip(), "```", ""]
    for path, _cmd in _commands(cli):
        parts += [f"### `adapterhub {' '.join(path)}`", "", "```text", _help(path).rstrip(), "```", ""]
    parts.append(END)
    return "\n".join(parts)


def _current() -> str:
    text = REFERENCE.read_text()
    m = re.search(re.escape(START) + ".*?" + re.escape(END), text, re.S)
    assert m, "docs/cli-reference.md lacks the cli-reference markers"
    return m.group(0)


def test_cli_reference_matches_help() -> None:
    assert _current() == reference(), (
        "docs/cli-reference.md is stale: run `python tests/test_docs.py --update`"
    )


def test_every_command_has_help_text() -> None:
    from adapterhub.cli import cli

    for path, cmd in _commands(cli):
        assert (cmd.help or "").strip(), f"adapterhub {' '.join(path)} has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert (p.help or "").strip(), f"adapterhub {' '.join(path)} {p.opts[0]} has no help text"


def test_command_summaries_are_whole_and_options_read_alike() -> None:
    """In an 80-column terminal no group's list of commands cuts a summary with "..." and each fits its
    line; ``--json`` of a command that prints no adapters does not cite the adapter schema; a device
    option's metavar is DEV everywhere (issue 28, item 10)."""
    from adapterhub.cli import cli

    groups = [((), cli)] + [(p, c) for p, c in _commands(cli) if isinstance(c, click.Group)]
    for path, group in groups:
        res = CliRunner().invoke(cli, [*path, "--help"], prog_name="adapterhub", env={"COLUMNS": "80"})
        listing = res.output.split("Commands:\n", 1)[1]
        assert "..." not in listing, f"adapterhub {' '.join(path)} --help cuts a summary:\n{listing}"
        # a summary that wraps goes on over lines indented past the names: none may
        named = [line.split()[0] for line in listing.splitlines() if line.startswith("  ") and line[2] != " "]
        assert sorted(named) == sorted(group.commands), listing
        wrapped, last = set(), ""
        for line in listing.splitlines():
            if line.startswith("    "):
                wrapped.add(last)
            elif line.strip():
                last = line.split()[0]
        assert not wrapped, listing
    adapter_schema = "schemas/adapter.schema.json"
    for path, cmd in _commands(cli):
        for p in cmd.params:
            if isinstance(p, click.Option) and "--json" in p.opts and adapter_schema in (p.help or ""):
                assert path[-1] in ("list", "search", "show", "add", "tag", "pull"), (path, p.help)
            if isinstance(p, click.Option) and "--device" in p.opts:
                assert p.metavar == "DEV", (path, p.metavar)


def _fenced_sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README.read_text(), re.S)


def test_readme_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    blocks = _fenced_sh_blocks()
    assert len(blocks) == 2, blocks
    setup_and_run, setup_and_test = blocks
    assert "examples/quickstart.py" in setup_and_run
    assert "pytest" in setup_and_test
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_test in ci


def test_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) < 250


if __name__ == "__main__" and "--update" in sys.argv:
    text = REFERENCE.read_text()
    REFERENCE.write_text(text.replace(_current(), reference()))
    print("docs/cli-reference.md updated")
