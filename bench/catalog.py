"""Catalog speed: `list --json` on 10,000 adapters, `--help`, and `add` of a 200 MB adapter.

Each figure is printed beside its reference from the same run:
- `adapterhub list --json` (CLI start included) against the 0.5 s goal;
- `adapterhub --help` against the 0.3 s goal;
- `adapterhub add` of a 200 MB PEFT adapter against `sha256sum` + `cp` of the same files.

Usage: python bench/catalog.py [--adapters 10000] [--add-mb 200] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def wall(cmd: list[str], *, repeat: int = 5, env: dict[str, str] | None = None) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def fill_catalog(home: Path, n: int) -> None:
    """n adapters with realistic rows (16 modules each, tags, lineage) written straight through the
    catalog layer, so the bench measures listing rather than 10,000 file copies."""
    from adapterhub import Hub
    from adapterhub.catalog import queries

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    with Hub(home) as hub, hub.catalog.write() as conn:
        for i in range(n):
            rank = (4, 8, 16, 32, 64)[i % 5]
            t = targets[: 2 + i % 6]
            modules = [
                {
                    "module": f"model.layers.{layer}.self_attn.{name}",
                    "short_name": name,
                    "kind": "linear",
                    "rank": rank,
                    "alpha": 2.0 * rank,
                    "scale": 2.0,
                    "in_features": 4096,
                    "out_features": 4096,
                    "kernel_size": None,
                    "dora": False,
                    "dtype": "BF16",
                }
                for layer in range(2)
                for name in t
            ]
            digest = f"{i:064x}"
            queries.insert_adapter(
                conn,
                row={
                    "name": f"adapter-{i:05d}",
                    "sha256": digest,
                    "format": "peft",
                    "peft_type": "LORA",
                    "base_model": ("meta-llama/Llama-3.1-8B", "mistralai/Mistral-7B-v0.3")[i % 2],
                    "base_revision": None,
                    "rank": rank,
                    "alpha": 2.0 * rank,
                    "use_rslora": False,
                    "use_dora": False,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "task_type": "CAUSAL_LM",
                    "dtype": "BF16",
                    "num_params": rank * 8192 * 32 * len(t),
                    "size_bytes": rank * 8192 * 64 * len(t),
                    "num_modules": 32 * len(t),
                    "target_modules": sorted(t),
                    "description": f"synthetic adapter number {i}",
                    "source": f"/data/runs/{i}",
                    "config": None,
                    "extra": None,
                },
                modules=modules,
                files=[
                    {
                        "filename": "adapter_model.safetensors",
                        "role": "weights",
                        "sha256": digest,
                        "size_bytes": 1,
                    }
                ],
                tag_names=[f"team{i % 7}", "bench"],
            )


def make_big_adapter(dest: Path, mb: int) -> Path:
    import torch
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    rank, dim = 64, 4096
    per_module = 2 * rank * dim * 2  # A and B in bf16
    n_modules = max(1, mb * 1_000_000 // per_module)
    tensors = {}
    g = torch.Generator().manual_seed(0)
    for i in range(n_modules):
        layer, proj = divmod(i, 4)
        pre = f"base_model.model.model.layers.{layer}.self_attn.{('q', 'k', 'v', 'o')[proj]}_proj"
        tensors[pre + ".lora_A.weight"] = torch.randn(rank, dim, generator=g).to(torch.bfloat16)
        tensors[pre + ".lora_B.weight"] = torch.randn(dim, rank, generator=g).to(torch.bfloat16)
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    (dest / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            }
        )
    )
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=10_000)
    ap.add_argument("--add-mb", type=int, default=200)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adapterhub-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    exe = [sys.executable, "-m", "adapterhub"]
    try:
        home = work / "home"
        t = time.perf_counter()
        fill_catalog(home, args.adapters)
        print(f"filled a catalog with {args.adapters} adapters in {time.perf_counter() - t:.1f} s")
        out = subprocess.run(
            [*exe, "--home", str(home), "--json", "list"], capture_output=True, check=True
        ).stdout
        assert len(json.loads(out)) == args.adapters
        t_list = wall([*exe, "--home", str(home), "--json", "list"])
        t_list_f = wall(
            [*exe, "--home", str(home), "--json", "list", "--target", "down_proj", "--min-rank", "16"]
        )
        t_search = wall([*exe, "--home", str(home), "--json", "search", "team3 llama"])
        t_help = wall([*exe, "--help"])
        t_py = wall([sys.executable, "-c", "pass"])

        src = make_big_adapter(work / "big", args.add_mb)
        size = sum(f.stat().st_size for f in src.iterdir())
        ref_times, add_times = [], []
        for i in range(3):
            dest = work / f"copy{i}"
            dest.mkdir()
            t = time.perf_counter()
            subprocess.run(["sha256sum", *map(str, src.iterdir())], check=True, stdout=subprocess.DEVNULL)
            subprocess.run(["cp", *map(str, src.iterdir()), str(dest)], check=True)
            ref_times.append(time.perf_counter() - t)
            shutil.rmtree(dest)
            addhome = work / f"addhome{i}"
            subprocess.run(
                [*exe, "--home", str(addhome), "db", "upgrade"], check=True, stdout=subprocess.DEVNULL
            )
            t = time.perf_counter()
            subprocess.run(
                [*exe, "--home", str(addhome), "-q", "add", str(src), "--name", "big"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            add_times.append(time.perf_counter() - t)
            shutil.rmtree(addhome)
        t_ref, t_add = statistics.median(ref_times), statistics.median(add_times)

        rows = [
            (f"list --json ({args.adapters} adapters)", t_list, 0.5, "goal"),
            ("list --json --target down_proj --min-rank 16", t_list_f, 0.5, "goal"),
            ("search --json 'team3 llama'", t_search, 0.5, "goal"),
            ("--help", t_help, 0.3, "goal"),
            ("python -c pass (interpreter start)", t_py, None, ""),
            (f"sha256sum + cp ({size / 1e6:.0f} MB)", t_ref, None, "reference"),
            (f"add ({size / 1e6:.0f} MB adapter, CLI start included)", t_add, 2 * t_ref, "2x reference"),
        ]
        print(f"\n{'what':58} {'seconds':>8}  target")
        for what, secs, goal, label in rows:
            tgt = f"< {goal:.3f} s ({label})" if goal else ""
            ok = "" if goal is None else ("  ok" if secs < goal else "  MISSED")
            print(f"{what:58} {secs:8.3f}  {tgt}{ok}")
        print(
            f"\nadd / (sha256sum + cp) = {t_add / t_ref:.2f}x; add throughput {size / t_add / 1e6:.0f} MB/s"
        )
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("ADAPTERHUB_NO_PROGRESS", "1")
    main()
