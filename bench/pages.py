"""Web pages on 10,000 adapters: server time per page (the ``Server-Timing`` header the pages send) and
the client's wall time, beside the Hub call each index page is built on (`Hub.adapter_records_json` with
the same filters, timed in this process in the same run).

The catalog is filled as bench/catalog.py fills it: rows written straight through the catalog layer
(`catalog.queries.insert_adapter`, 4-14 module rows each, tags), not 10,000 file copies, plus one
real 100 MB PEFT adapter added through `Hub.add_adapter` (for the spectra); 200 hosted repos
are created through `ServerStore.create_repo`. The server is tests/_pages_server.py (create_app +
mount_pages) in a subprocess on 127.0.0.1.

Usage: python bench/pages.py [--adapters 10000] [--repeat 15] [--workdir DIR] [--write FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

CASES: list[tuple[str, str, dict[str, object]]] = [
    ("index, page 1", "/", {}),
    ("index, page 150", "/?page=150", {}),
    ("sorted by size, descending", "/?sort=size&order=desc", {}),
    ("200 per page, newest first", "/?format=peft&sort=created&order=desc&per_page=200", {"format": "peft"}),
    ("search 'synthetic 77'", "/?q=synthetic+77", {"query": "synthetic 77"}),
    (
        "base + rank range + target + tag",
        "/?base=meta-llama%2FLlama-3.1-8B&min_rank=8&max_rank=32&target=q_proj&tag=team3",
        {
            "base": "meta-llama/Llama-3.1-8B",
            "min_rank": 8,
            "max_rank": 32,
            "target": "q_proj",
            "tag": "team3",
        },
    ),
    ("adapter page (catalog rows only)", "/adapters/adapter-00042", {}),
    ("adapter page, 95 modules of rank 64, spectra cached", "/adapters/real-r64", {}),
    ("hosted repo page", "/team/repo-007", {}),
]


def fill(home: Path, n: int, repos: int) -> None:
    from catalog import fill_catalog, make_big_adapter

    from adapterhub import Hub
    from adapterhub.server import server_store

    fill_catalog(home, n)
    with Hub(home) as hub:
        hub.add_adapter(
            make_big_adapter(home.parent / "real-r64", 100), name="real-r64", base="meta-llama/Llama-3.1-8B"
        )
        store = server_store(hub.catalog, home)
        for i in range(repos):
            store.repos.create_repo("team", f"repo-{i:03d}", private=i % 10 == 0, author="team")


def fetch(url: str) -> tuple[float, float]:
    t = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp:
        resp.read()
        timing = resp.headers.get("Server-Timing", "")
    wall = time.perf_counter() - t
    server = float(timing.split("dur=")[1]) / 1000 if "dur=" in timing else float("nan")
    return server, wall


def reference(home: Path, kwargs: dict[str, object], repeat: int) -> float:
    from adapterhub import Hub

    kw = dict(kwargs)
    query = kw.pop("query", None)
    times = []
    with Hub(home) as hub:
        for _ in range(repeat):
            t = time.perf_counter()
            hub.adapter_records_json(query, **kw)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--repos", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--write", type=Path, default=None, help="write the table as Markdown to this file")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="adapterhub-pages-bench-"))
    home = work / "home"
    if not (home / "catalog.db").exists():
        t = time.perf_counter()
        fill(home, args.adapters, args.repos)
        print(f"filled {args.adapters:,} adapters and {args.repos} repos in {time.perf_counter() - t:.1f} s")
    env = {k: v for k, v in os.environ.items() if k not in ("ADAPTERHUB_HOME", "ADAPTERHUB_DB")}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "_pages_server.py"), str(home)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    rows = []
    try:
        cold_server, cold_wall = fetch(url + "/")
        cache = home / "cache" / "spectra"

        def uncached() -> tuple[float, float]:
            for f in cache.glob("*.json"):
                f.unlink()
            return fetch(url + "/adapters/real-r64")

        first_server, _ = uncached()  # the server's first: imports torch, then computes the spectra
        again = sorted(uncached()[0] for _ in range(3))  # torch loaded: computing them is all
        spectra_server = again[1]
        for label, path, kwargs in CASES:
            fetch(url + path)  # warm: the first look at a record parses it
            runs = [fetch(url + path) for _ in range(args.repeat)]
            server = sorted(r[0] for r in runs)
            wall = sorted(r[1] for r in runs)
            ref = reference(home, kwargs, args.repeat) if path.startswith("/?") or path == "/" else None
            rows.append(
                (
                    label,
                    statistics.median(server),
                    server[int(0.9 * (len(server) - 1))],
                    statistics.median(wall),
                    ref,
                )
            )
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    lines = [
        f"# Web pages on {args.adapters:,} adapters ({args.repos} hosted repos)",
        "",
        f"`python bench/pages.py --adapters {args.adapters}` on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {args.repeat} requests per page after one warm-up; server time is "
        "the page's `Server-Timing` header (request in, HTML out), wall time is the client's. The Hub call is "
        "`Hub.adapter_records_json` with the page's filters, timed in the bench process: the floor each index "
        "page is built on.",
        "",
        f"First request after start (every record parsed once): server {cold_server * 1000:.0f} ms, "
        f"wall {cold_wall * 1000:.0f} ms.",
        "",
        "A view of `real-r64` (95 modules, rank 64, 4096 x 4096) while its spectra are not cached: they are "
        f"computed from its factors and cached: server {spectra_server * 1000:.0f} ms (median of 3; "
        f"{', '.join(f'{x * 1000:.0f}' for x in again)} ms), the server's very first, which also imports torch: "
        f"{first_server * 1000:.0f} ms. Once cached, as in the table.",
        "",
        "| page | server median | server p90 | wall median | Hub call median | server / Hub call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, med, p90, wall, ref in rows:
        ratio = f"{med / ref:.2f}" if ref else "–"
        refs = f"{ref * 1000:.0f} ms" if ref else "–"
        lines.append(
            f"| {label} | {med * 1000:.0f} ms | {p90 * 1000:.0f} ms | {wall * 1000:.0f} ms | {refs} | {ratio} |"
        )
    lines += ["", "Goal: under 300 ms of server time per page."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        args.write.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
