"""The catalog: adapter metadata in a SQL database (SQLite by default), migrated on open."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from ..errors import CatalogError
from . import queries
from .db import HEAD, REVISIONS, current_revision, open_catalog, upgrade

__all__ = ["Catalog", "HEAD", "REVISIONS", "queries"]

#: the PostgreSQL advisory lock every catalog write transaction takes (any fixed 64-bit number)
WRITE_LOCK_KEY = 0x4164_6170_4875_62


class Catalog:
    def __init__(self, url: str, *, lock_path: Path | None = None) -> None:
        self.url = url
        self._lock_path = lock_path
        self.engine = open_catalog(url, lock_path=lock_path)

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction: every query in it sees one snapshot of the catalog."""
        try:
            with self.engine.connect() as conn:
                conn.begin()
                yield conn
                conn.rollback()
        except SQLAlchemyError as exc:
            raise CatalogError(f"catalog read failed: {str(exc).splitlines()[0]}") from None

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """One transaction that holds the catalog's write lock from its start: BEGIN IMMEDIATE on SQLite,
        a transaction-scoped advisory lock elsewhere (PostgreSQL). Writers are serialized, which is what
        lets `Library` decide safely, inside the transaction, which store objects are still referenced."""
        try:
            with self.engine.connect().execution_options(immediate=True) as conn, conn.begin():
                if conn.dialect.name == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITE_LOCK_KEY})")
                yield conn
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            raise CatalogError(f"catalog write failed: {str(exc).splitlines()[0]}") from None

    def revision(self) -> str | None:
        with self.read() as conn:
            return current_revision(conn)

    def upgrade(self) -> str:
        return upgrade(self.engine, lock_path=self._lock_path)

    def close(self) -> None:
        self.engine.dispose()
