"""Load on two `adapterhub serve` replicas that share one PostgreSQL catalog and one store folder:
committers push to ONE repo (each commit an LFS weight file and a small text file, alternating replicas),
downloaders fetch what was acknowledged through the other replica and check its sha256, and commenters
post to one discussion and like the repo through both, all through the real huggingface_hub client; and
a pusher pushes adapters through one replica (the Hub API `adapterhub push` calls) and pulls each commit
through the other. At the
end every acknowledged commit must be in the history of ``main``, every acknowledged file at the head with
its content, every acknowledged comment in the thread and every like counted, as seen from both
replicas: "lost" is measured. With ``--kill-after S``, one replica is killed (SIGKILL) S seconds in,
mid-upload; the clients go on through the other, and requests cut off by the kill are counted apart
("interrupted": never acknowledged, so never owed; "client_resets": requests to the live replica that
huggingface_hub's own client cut off when it closed its shared connection pool after a refused connection
to the dead one).

    python bench/replica_load.py --db postgresql+psycopg://USER@HOST:PORT/DB [--seconds 60]

`tests/test_replicas.py` runs the same for a few seconds on a PostgreSQL server of its own.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import Stats  # noqa: E402

REPO = "team/shared"
PUSHED = "team/pushed"


def start_replica(home: Path, db: str) -> tuple[subprocess.Popen[str], str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "ADAPTERHUB_HOME")}
    env["ADAPTERHUB_DB"] = db
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
        raise RuntimeError(f"replica did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, line.split()[-1]


class Load(Stats):
    """Latencies and errors, less the requests a killed replica cut off; the replicas still up."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__()
        self.alive = list(urls)
        self.killed: set[str] = set()
        self.interrupted = 0
        self.client_resets = 0

    def url(self, k: int) -> str:
        with self.lock:
            return self.alive[k % len(self.alive)]

    def at(self, url: str, kind: str, fn: Any, *args: Any, **kw: Any) -> Any:
        """``fn(*args, **kw)`` through the replica at ``url``, timed; a failure is an error, unless that
        replica was killed (then the request was cut off: interrupted)."""
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        except Exception as exc:
            with self.lock:
                if url in self.killed:
                    self.interrupted += 1
                elif self.killed and "Bad file descriptor" in str(exc):
                    # huggingface_hub closes its one shared HTTP client when a connection is refused (the
                    # killed replica), under the requests other threads have in flight to the live one
                    self.client_resets += 1
                else:
                    self.errors.append(
                        f"{kind} via {url}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}"
                    )
            return None
        finally:
            with self.lock:
                self.latencies[kind].append(time.perf_counter() - t)


class Acked:
    """What the replicas acknowledged: commits (oid -> files) and files (path -> sha256)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commits: dict[str, dict[str, str]] = {}
        self.files: dict[str, str] = {}
        self.comments: set[str] = set()
        self.likers: set[str] = set()
        self.pushes: dict[str, str] = {}  # commit -> the pushed adapter's sha256

    def add(self, oid: str, files: dict[str, str]) -> None:
        with self.lock:
            self.commits[oid] = files
            self.files.update(files)

    def pick(self, rng: random.Random) -> tuple[str, str] | None:
        with self.lock:
            if not self.files:
                return None
            path = rng.choice(list(self.files))
            return path, self.files[path]


def committer(token: str, n: int, deadline: float, stats: Load, acked: Acked) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    i = 0
    while time.monotonic() < deadline:
        i += 1
        weights = os.urandom(64 * 1024)
        note = f"committer {n} round {i}\n".encode()
        files = {f"c{n}/{i}.safetensors": weights, f"c{n}/{i}.txt": note}
        ops = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in files.items()]
        url = stats.url(n + i)
        api = HfApi(endpoint=url, token=token)
        info = stats.at(url, "commit", api.create_commit, REPO, ops, commit_message=f"c{n} round {i}")
        if info is not None:
            acked.add(info.oid, {p: hashlib.sha256(b).hexdigest() for p, b in files.items()})


def commenter(tokens: dict[str, str], n: int, deadline: float, stats: Load, acked: Acked) -> None:
    """Comments on discussion 1 and likes the repo, through both replicas (read-modify-writes that a
    per-process lock could not order)."""
    import urllib.request

    from huggingface_hub import HfApi

    user = f"fan{n}"
    i = 0
    while time.monotonic() < deadline:
        i += 1
        url = stats.url(n + i)
        text = f"{user} says {i}"
        if stats.at(
            url, "comment", HfApi(endpoint=url, token=tokens[user]).comment_discussion, REPO, 1, text
        ):
            with acked.lock:
                acked.comments.add(text)
        if i == 1:
            req = urllib.request.Request(
                f"{url}/api/models/{REPO}/like",
                method="POST",
                headers={"Authorization": f"Bearer {tokens[user]}"},
            )
            if stats.at(url, "like", lambda r=req: urllib.request.urlopen(r, timeout=30).read()) is not None:
                with acked.lock:
                    acked.likers.add(user)


def tiny_adapter(folder: Path, seed: int) -> Path:
    """A small PEFT LoRA folder (rank 4 on q_proj and v_proj of two 64-wide layers), new content per seed."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((4, 64), dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((64, 4), dtype=np.float32) * 0.01
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": "tiny-base",
        "task_type": "CAUSAL_LM",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def pusher(token: str, deadline: float, stats: Load, acked: Acked, work: Path) -> None:
    """`adapterhub push` through one replica, `adapterhub pull` of that commit through the other (the Hub
    API the CLI calls), the pulled adapter checked against the pushed one."""
    from adapterhub import Hub

    i = 0
    with Hub(work / "pusher-home") as home, Hub(work / "puller-home") as other:
        while time.monotonic() < deadline:
            i += 1
            info = home.add_adapter(tiny_adapter(work / f"adapter-{i}", i), name=f"a{i}")
            up, down = stats.url(i), stats.url(i + 1)
            pushed = stats.at(up, "push", home.push_adapter, f"a{i}", PUSHED, endpoint=up, token=token)
            if pushed is None:
                continue
            with acked.lock:
                acked.pushes[pushed.commit] = info.sha256
            got = stats.at(
                down,
                "pull",
                other.pull_adapter,
                f"{PUSHED}@{pushed.commit}",
                name=f"a{i}",
                endpoint=down,
                token=token,
            )
            if got is not None and got.adapter.sha256 != info.sha256:
                with stats.lock:
                    stats.errors.append(f"pull: a{i} came back different through {down}")


def downloader(token: str, n: int, deadline: float, stats: Load, acked: Acked, work: Path) -> None:
    from huggingface_hub import HfApi, hf_hub_download

    rng = random.Random(n)
    i = 0
    while time.monotonic() < deadline:
        i += 1
        url = stats.url(n + i)
        found = acked.pick(rng)
        if found is None:
            time.sleep(0.05)
            continue
        path, digest = found
        got = stats.at(
            url,
            "download",
            hf_hub_download,
            REPO,
            path,
            endpoint=url,
            token=token,
            cache_dir=str(work / f"cache-{n}-{i}"),
        )
        if got is not None and hashlib.sha256(Path(got).read_bytes()).hexdigest() != digest:
            with stats.lock:
                stats.errors.append(f"download: {path} came back different from {url}")
        if i % 4 == 0:
            stats.at(
                url,
                "list_tree",
                lambda u=url: list(HfApi(endpoint=u, token=token).list_repo_tree(REPO, recursive=True)),
            )


def verify(urls: list[str], token: str, acked: Acked) -> list[str]:
    """Every acknowledged commit in main's history and every acknowledged file at the head (LFS ones with
    their sha256), from each replica."""
    from huggingface_hub import HfApi

    lost = []
    for url in urls:
        api = HfApi(endpoint=url, token=token)
        history = {c.commit_id for c in api.list_repo_commits(REPO)}
        lost += [
            f"{url}: commit {oid} is not in main's history" for oid in acked.commits if oid not in history
        ]
        listed = {e.path: e for e in api.list_repo_tree(REPO, recursive=True) if hasattr(e, "blob_id")}
        for path, digest in acked.files.items():
            e = listed.get(path)
            if e is None:
                lost.append(f"{url}: {path} is gone")
            elif e.lfs is not None and e.lfs.sha256 != digest:
                lost.append(f"{url}: {path} has another sha256")
        thread = api.get_discussion_details(REPO, 1)
        said = {e.content for e in thread.events if e.type == "comment"}
        lost += [f"{url}: comment {t!r} is gone" for t in sorted(acked.comments - said)]
        likers = {u.username for u in api.list_repo_likers(REPO)}
        lost += [f"{url}: the like of {u} is gone" for u in sorted(acked.likers - likers)]
        if acked.pushes:
            pushed = {c.commit_id for c in api.list_repo_commits(PUSHED)}
            lost += [
                f"{url}: push {oid} is not in {PUSHED}'s history" for oid in acked.pushes if oid not in pushed
            ]
    return lost


def run(
    db: str,
    work: Path,
    *,
    seconds: float = 60,
    committers: int = 6,
    downloaders: int = 6,
    commenters: int = 4,
    kill_after: float | None = None,
    pushers: bool = True,
) -> dict[str, Any]:
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import disable_progress_bars

    from adapterhub import Hub
    from adapterhub.server.tokens import create_token

    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_XET = True
    disable_progress_bars()
    home = work / "home"
    with Hub(home, db=db) as hub:
        token = create_token(hub, "team", write=True).token
        fans = {f"fan{n}": create_token(hub, f"fan{n}", write=True).token for n in range(commenters)}
    procs = []
    try:
        for _ in range(2):
            procs.append(start_replica(home, db))
        urls = [u for _, u in procs]
        HfApi(endpoint=urls[0], token=token).create_repo(REPO)
        HfApi(endpoint=urls[1], token=token).create_discussion(REPO, title="load")
        stats, acked = Load(urls), Acked()
        deadline = time.monotonic() + seconds
        threads = [
            threading.Thread(target=committer, args=(token, n, deadline, stats, acked))
            for n in range(committers)
        ]
        threads += [
            threading.Thread(target=downloader, args=(token, n, deadline, stats, acked, work))
            for n in range(downloaders)
        ]
        threads += [
            threading.Thread(target=commenter, args=(fans, n, deadline, stats, acked))
            for n in range(commenters)
        ]
        if pushers:
            threads.append(threading.Thread(target=pusher, args=(token, deadline, stats, acked, work)))
        if kill_after is not None:

            def kill() -> None:
                time.sleep(kill_after)
                proc, url = procs[1]
                with stats.lock:
                    stats.killed.add(url)
                    stats.alive.remove(url)
                proc.kill()  # SIGKILL: no shutdown, whatever it was doing is cut off

            threads.append(threading.Thread(target=kill))
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        lost = verify(stats.alive, token, acked)
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(timeout=30)
    out = stats.summary()
    out.update(
        replicas=2,
        killed=len(stats.killed),
        interrupted=stats.interrupted,
        client_resets=stats.client_resets,
        seconds=round(wall, 1),
        committers=committers,
        downloaders=downloaders,
        commenters=commenters,
        commits=len(acked.commits),
        files_committed=len(acked.files),
        comments=len(acked.comments),
        likes=len(acked.likers),
        pushes=len(acked.pushes),
        lost=lost,
        error_samples=stats.errors[:5],
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--db", required=True, help="the PostgreSQL URL both replicas share (an empty database)")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--committers", type=int, default=6)
    ap.add_argument("--downloaders", type=int, default=6)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adapterhub-replicas-") as tmp:
        out = run(
            args.db, Path(tmp), seconds=args.seconds, committers=args.committers, downloaders=args.downloaders
        )
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
