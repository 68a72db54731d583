"""The ``adapterhub`` group and what every command shares: the `State` (home, db, output mode), the
output options and the Hub it opens lazily. Command modules import this one; nothing imports them back."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from .. import __version__

if TYPE_CHECKING:
    from ..hub import Hub


@dataclass
class State:
    home: str | None = None
    db: str | None = None
    json: bool = False
    quiet: bool = False
    debug: bool = False
    _hub: Any = field(default=None, repr=False)

    @property
    def hub(self) -> Hub:
        if self._hub is None:
            from ..hub import Hub

            self._hub = Hub(self.home, db=self.db)
        return self._hub

    def close(self) -> None:
        if self._hub is None:
            return
        failed = sys.exc_info()[0] is not None  # an error line is printed instead; keep it the only line
        if self._hub.created_home and not self.quiet and not failed:
            click.echo(f"note: made a new, empty adapterhub home at {self._hub.home}", err=True)
        self._hub.close()

    def progress_enabled(self) -> bool:
        return not (
            self.quiet or self.json or os.environ.get("ADAPTERHUB_NO_PROGRESS") or not sys.stderr.isatty()
        )


#: the ``--json`` help of a command whose records are adapters
ADAPTER_JSON = "Print JSON records (schemas/adapter.schema.json)."


def output_options(
    f: Callable[..., Any] | None = None, *, json_help: str = "Print JSON."
) -> Callable[..., Any]:
    """``--json`` / ``--csv`` on a command that prints records; resolves to ``mode`` (table|json|csv).
    ``@output_options(json_help=ADAPTER_JSON)`` on a command whose records are adapters."""
    if f is None:
        return functools.partial(output_options, json_help=json_help)

    @click.option("--json", "as_json", is_flag=True, help=json_help)
    @click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
    @functools.wraps(f)
    def wrapper(*args: Any, as_json: bool, as_csv: bool, **kwargs: Any) -> Any:
        state = click.get_current_context().find_object(State)
        use_json = as_json or bool(state and state.json)
        if use_json and as_csv:
            raise click.UsageError("--json and --csv cannot be used together")
        return f(*args, mode="json" if use_json else "csv" if as_csv else "table", **kwargs)

    return wrapper


pass_state = click.make_pass_decorator(State)


class Group(click.Group):
    """A group whose list of commands shows each command's summary (``short_help``, else the first
    sentence of its help) whole: a long one wraps rather than being cut with "...". Its subgroups are
    of this class too."""

    group_class = type

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [
            (name, cmd.get_short_help_str(limit=10_000))
            for name in self.list_commands(ctx)
            if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden
        ]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    envvar="ADAPTERHUB_HOME",
    help="Home folder (catalog.db and the store). [env: ADAPTERHUB_HOME]",
)
@click.option(
    "--db",
    metavar="URL",
    envvar="ADAPTERHUB_DB",
    help="SQLAlchemy URL of the catalog instead of HOME/catalog.db. [env: ADAPTERHUB_DB]",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or notes.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.version_option(__version__, "--version", prog_name="adapterhub")
@click.pass_context
def cli(
    ctx: click.Context, home: str | None, db: str | None, as_json: bool, quiet: bool, debug: bool
) -> None:
    """adapterhub: catalog, validate, merge, combine and share LoRA adapters."""
    ctx.obj = State(home=home, db=db, json=as_json, quiet=quiet, debug=debug)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    ctx.call_on_close(ctx.obj.close)


@contextlib.contextmanager
def progress_bar(state: State, what: str, *, unit_bytes: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar on stderr, or None when output is not a terminal, --quiet, --json, or
    ADAPTERHUB_NO_PROGRESS is set."""
    if not state.progress_enabled():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    columns = [BarColumn(), DownloadColumn() if unit_bytes else MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(f"[bold]{what}", *columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
