"""The ``adapterhub`` command line. Each command parses, makes one `Hub` call and renders the result.

Nothing heavy is imported here: torch and SQLAlchemy load only inside the commands that need them.
"""

from __future__ import annotations

import sys

import click

# the command modules register themselves on the group when imported
from . import catalog_cmds, eval_cmds, hub_cmds, ops_cmds, run_cmds, train_cmds, validate_cmds  # noqa: F401
from .base import State, cli, output_options, pass_state

__all__ = ["State", "cli", "main", "output_options", "pass_state"]


def main(argv: list[str] | None = None) -> int:
    """Entry point: maps adapterhub errors to one line on stderr and exit code 1, usage errors to 2."""
    from ..errors import AdapterHubError

    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        rv = cli.main(args=args, prog_name="adapterhub", standalone_mode=False)
        if isinstance(rv, int):  # click returns the code of a ctx.exit() / Exit(n) in non-standalone mode
            return rv
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 1
    except AdapterHubError as exc:
        if debug:
            raise
        click.echo(f"error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # a full disk, a read-only folder, a file too large: say which file
        if debug:
            raise
        where = exc.filename or exc.filename2
        what = exc.strerror or str(exc)
        click.echo(f"error: {what}: {where}" if where else f"error: {what}", err=True)
        return 1
    except Exception as exc:
        if debug:
            raise
        click.echo(
            f"error: unexpected {exc.__class__.__name__}: {exc} (run with --debug for the traceback)",
            err=True,
        )
        return 1
    return 0
