"""Load on `adapterhub serve`: concurrent clients commit files (LFS weights and regular files), download
them back and list repos, through the real huggingface_hub client; every answer is checked, so "nothing
lost" is measured, not assumed.

    python bench/server_load.py [--seconds 60] [--clients 20]

Starts its own server in a temporary home. Prints requests, errors, p50/p99 per kind, and the check.
`tests/test_load.py` runs the same for a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Stats:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    committed: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, path) -> sha256
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, kind: str, fn: Any, *args: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        except Exception as exc:
            with self.lock:
                self.errors.append(f"{kind}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}")
            return None
        finally:
            with self.lock:
                self.latencies[kind].append(time.perf_counter() - t)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": sum(len(v) for v in self.latencies.values()),
            "errors": len(self.errors),
        }
        for kind, xs in sorted(self.latencies.items()):
            xs = sorted(xs)
            out[kind] = {
                "n": len(xs),
                "p50_ms": round(1000 * statistics.median(xs), 1),
                "p99_ms": round(1000 * xs[min(len(xs) - 1, int(0.99 * len(xs)))], 1),
            }
        return out


def client(url: str, user: str, token: str, n: int, deadline: float, stats: Stats, work: Path) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    api = HfApi(endpoint=url, token=token)
    repo = f"{user}/load-{n}"
    stats.timed("create_repo", api.create_repo, repo, exist_ok=True)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        weights = os.urandom(256 * 1024)  # LFS (binary)
        note = f"client {n} round {i}\n".encode()
        ops = [
            CommitOperationAdd(path_in_repo=f"w/{i}.safetensors", path_or_fileobj=weights),
            CommitOperationAdd(path_in_repo=f"notes/{i}.txt", path_or_fileobj=note),
        ]
        if stats.timed("commit", api.create_commit, repo, ops, commit_message=f"round {i}") is None:
            continue
        with stats.lock:
            stats.committed[(repo, f"w/{i}.safetensors")] = hashlib.sha256(weights).hexdigest()
            stats.committed[(repo, f"notes/{i}.txt")] = hashlib.sha256(note).hexdigest()
        got = stats.timed(
            "download",
            hf_hub_download,
            repo,
            f"w/{i}.safetensors",
            endpoint=url,
            token=token,
            cache_dir=str(work / f"cache-{n}"),
        )
        if (
            got is not None
            and hashlib.sha256(Path(got).read_bytes()).hexdigest() != hashlib.sha256(weights).hexdigest()
        ):
            with stats.lock:
                stats.errors.append(f"download: {repo} w/{i} came back different")
        stats.timed("list_tree", lambda: list(api.list_repo_tree(repo, recursive=True)))


def verify(url: str, token: str, stats: Stats) -> list[str]:
    """Every committed file is still there, with its content, at the head of its repo."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url, token=token)
    problems = []
    by_repo: dict[str, dict[str, str]] = defaultdict(dict)
    for (repo, path), digest in stats.committed.items():
        by_repo[repo][path] = digest
    for repo, files in by_repo.items():
        listed = {e.path: e for e in api.list_repo_tree(repo, recursive=True) if hasattr(e, "blob_id")}
        for path, digest in files.items():
            e = listed.get(path)
            if e is None:
                problems.append(f"{repo}/{path} is gone")
            elif e.lfs is not None and e.lfs.sha256 != digest:
                problems.append(f"{repo}/{path} has another sha256")
    return problems


def start_server(home: Path, users: list[str]) -> tuple[subprocess.Popen[str], str, dict[str, str]]:
    from adapterhub import Hub
    from adapterhub.server.tokens import create_token

    with Hub(home) as hub:
        tokens = {u: create_token(hub, u, write=True).token for u in users}
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterhub", "--home", str(home), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.split()[-1], tokens


def run(seconds: float, clients: int, work: Path) -> dict[str, Any]:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_XET = True
    disable_progress_bars()
    users = [f"user{i}" for i in range(clients)]
    proc, url, tokens = start_server(work / "server", users)
    stats = Stats()
    try:
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(target=client, args=(url, u, tokens[u], n, deadline, stats, work))
            for n, u in enumerate(users)
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lost = verify(url, tokens[users[0]], stats) if stats.committed else []
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = stats.summary()
    out.update(
        seconds=round(wall, 1),
        clients=clients,
        files_committed=len(stats.committed),
        lost=lost,
        error_samples=stats.errors[:5],
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterhub-load-") as tmp:
        print(json.dumps(run(args.seconds, args.clients, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
