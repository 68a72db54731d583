"""Opening a catalog: engine set-up and schema migration on open.

SQLite (the default) runs in WAL mode with a busy timeout, foreign keys on, and write transactions
started with ``BEGIN IMMEDIATE`` so that two processes writing at once queue on the lock instead of
failing with "database is locked". The schema is created and upgraded only by the Alembic migrations;
when the catalog is already at `HEAD`, Alembic is not even imported, so opening stays fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from ..errors import CatalogError, CatalogVersionError

log = logging.getLogger(__name__)

#: every migration revision this version of adapterhub knows, oldest first (a test checks it
#: against migrations/versions)
REVISIONS: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005", "0006")
HEAD = REVISIONS[-1]

BUSY_TIMEOUT_MS = 60_000


def make_engine(url: str) -> Engine:
    is_sqlite = url.startswith("sqlite")
    kwargs: dict[str, Any] = {}
    if is_sqlite:
        kwargs["connect_args"] = {"timeout": BUSY_TIMEOUT_MS / 1000}
    try:
        engine = create_engine(url, **kwargs)
    except (SQLAlchemyError, ImportError, ValueError) as exc:
        raise CatalogError(f"cannot use catalog URL {url!r}: {exc}") from None
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if url not in ("sqlite://", "sqlite:///:memory:"):
                cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            immediate = conn.get_execution_options().get("immediate", False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def current_revision(conn: Connection) -> str | None:
    try:
        row = conn.execute(text("SELECT version_num FROM alembic_version")).first()
    except OperationalError:
        return None
    except SQLAlchemyError:
        return None
    return row[0] if row else None


@contextlib.contextmanager
def _migration_lock(lock_path: Path | None) -> Iterator[None]:
    if lock_path is None:
        yield
        return
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def upgrade(engine: Engine, *, lock_path: Path | None = None) -> str:
    """Bring the catalog to `HEAD` through Alembic; returns the revision it is at."""
    with _migration_lock(lock_path):
        with engine.connect() as conn:
            rev = current_revision(conn)
            conn.rollback()
        if rev == HEAD:
            return rev
        if rev is not None and rev not in REVISIONS:
            raise CatalogVersionError(
                f"this catalog is at schema revision {rev}, written by a newer adapterhub than this one "
                f"(which knows up to {HEAD}); upgrade adapterhub (pip install -U adapterhub)"
            )
        from alembic import command
        from alembic.config import Config

        from ..resources import data_dir

        cfg = Config()
        cfg.set_main_option("script_location", str(data_dir("migrations")))
        log.info("migrating catalog from %s to %s", rev or "empty", HEAD)
        with engine.connect() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            conn.commit()
        return HEAD


def open_catalog(url: str, *, lock_path: Path | None = None) -> Engine:
    """An engine for the catalog at ``url``, migrated to `HEAD` if needed."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rev = current_revision(conn)
            conn.rollback()
        if rev != HEAD:
            upgrade(engine, lock_path=lock_path)
    except CatalogError:
        engine.dispose()
        raise
    except SQLAlchemyError as exc:
        engine.dispose()
        raise CatalogError(f"cannot open catalog {url}: {str(exc).splitlines()[0]}") from None
    return engine


def sqlite_url(path: str | os.PathLike[str]) -> str:
    return f"sqlite:///{Path(path)}"
