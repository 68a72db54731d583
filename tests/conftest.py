"""Fixtures shared by the test files: the catalog backends (SQLite and a real PostgreSQL server) and
homes on them.

`new_hub` makes a `Hub` whose catalog is on the backend of the test's ``backend`` parameter: a test that
uses it (directly or through a file's ``hub`` fixture) runs once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from _pg import PostgresServer, postgres_server  # noqa: E402

from adapterhub import Hub  # noqa: E402

BACKENDS = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer | None]:
    """One PostgreSQL server per test process (None where PostgreSQL is not installed)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _pg_or_skip(request: pytest.FixtureRequest) -> PostgresServer:
    server = request.getfixturevalue("pg_server")
    if server is None:
        if os.environ.get("ADAPTERHUB_REQUIRE_PG"):
            pytest.fail("PostgreSQL is required (ADAPTERHUB_REQUIRE_PG) but its binaries are not installed")
        pytest.skip("PostgreSQL is not installed here (apt-get install postgresql)")
    return server


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest) -> str | None:
    """None for SQLite in the home folder, else the URL of a fresh PostgreSQL database."""
    return None if backend == "sqlite" else _pg_or_skip(request).new_database()


@pytest.fixture
def new_hub(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., Hub]]:
    """``new_hub("home")``: a Hub in ``tmp_path / "home"`` on this test's backend, each with a catalog
    of its own (a fresh PostgreSQL database each, on that backend)."""
    made: list[Hub] = []

    def make(name: str = "home") -> Hub:
        url = None if backend == "sqlite" else _pg_or_skip(request).new_database()
        hub = Hub(tmp_path / name, db=url)
        made.append(hub)
        return hub

    yield make
    for hub in made:
        hub.close()


@pytest.fixture
def hub(new_hub: Callable[..., Hub]) -> Hub:
    """An empty home on this test's backend."""
    return new_hub()
