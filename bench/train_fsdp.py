"""Data-parallel training on this machine: one process against 2-process DDP and 2-process FSDP
(``--fsdp``), the same run (same base, data, global batch, seed) in the same invocation.

    python bench/train_fsdp.py                 # a random Llama of ~100 MB in fp32 (8 layers, hidden 512)
    python bench/train_fsdp.py --layers 16 --hidden 1024   # ~0.8 GB

Each case runs `Hub.train` in a process of its own, so its peak RSS is its own (the largest of the
launcher and its ranks: ``ru_maxrss`` of the process and its children). Reported per case: seconds a
step (the run's seconds over its steps, load excluded), the weights one process holds while it trains
(``TrainResult.weight_bytes``: its FSDP shard under ``--fsdp``), peak RSS, and the largest factor gap
against the single-process adapter (the exactness check of tests/test_train_fsdp.py at a bigger shape).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CASES = {"one": dict(nproc=1), "ddp": dict(nproc=2), "fsdp": dict(nproc=2, fsdp=True)}


def _case(home: Path, data: Path, case: str, steps: int) -> None:
    from adapterhub import Hub

    hub = Hub(home)
    r = hub.train(
        "big",
        data,
        name=case,
        steps=steps,
        batch_size=8,
        lr=1e-3,
        seed=0,
        targets="all-linear",
        **CASES[case],
    )
    peak = max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )
    print(
        json.dumps(
            {"seconds_per_step": r.seconds / r.steps, "weight_bytes": r.weight_bytes, "peak_rss_kb": peak}
        )
    )
    hub.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--case", choices=sorted(CASES))
    ap.add_argument("--home")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.case:
        _case(Path(a.home), Path(a.data), a.case, a.steps)
        return
    from helpers.trainkit import jsonl, text_rows, tiny_base
    from safetensors.torch import load_file

    from adapterhub import Hub

    with tempfile.TemporaryDirectory() as tmp:
        home, data = Path(tmp) / "home", jsonl(Path(tmp) / "t.jsonl", text_rows(64))
        base = tiny_base(
            Path(tmp) / "big",
            hidden_size=a.hidden,
            intermediate_size=a.hidden * 43 // 16,
            num_hidden_layers=a.layers,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
        hub = Hub(home)
        hub.add_base(base, name="big")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
        out = {}
        for case in CASES:
            cmd = [sys.executable, __file__, "--case", case, "--home", str(home), "--data", str(data)]
            proc = subprocess.run([*cmd, "--steps", str(a.steps)], env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(proc.stderr[-2000:])
            out[case] = json.loads(proc.stdout.strip().splitlines()[-1])
        ref = load_file(str(hub.library.files("one").weights))
        print(
            f"random Llama, {a.layers} layers, hidden {a.hidden}, fp32; {a.steps} steps of 8 rows; all-linear r=8"
        )
        print(f"{'case':6} {'s/step':>8} {'weights/process':>16} {'peak RSS':>10} {'gap vs one':>11}")
        for case, r in out.items():
            got = load_file(str(hub.library.files(case).weights))
            gap = max(float((ref[k] - got[k]).abs().max()) for k in ref)
            print(
                f"{case:6} {r['seconds_per_step']:8.3f} {r['weight_bytes'] / 1e6:13.1f} MB "
                f"{r['peak_rss_kb'] / 1e3:7.0f} MB {gap:11.2e}"
            )
        hub.close()


if __name__ == "__main__":
    main()
