"""Push and pull of a ~200 MB PEFT adapter over loopback against `adapterhub serve`.

Reference runs in the same process against the same server: `HfApi.upload_folder` for push and
`snapshot_download` for pull. Prints seconds, MB/s and the ratio ours / reference (lower is better).

Run:  .venv/bin/python bench/hub.py [--mb 200] [--repeat 3]
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

os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ.pop("HF_HUB_OFFLINE", None)
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def make_adapter(dest: Path, mb: int) -> Path:
    """A PEFT LoRA (r=64 on q/k/v/o of a 4096-wide model) with as many layers as make ~``mb`` MB."""
    import numpy as np
    from safetensors.numpy import save_file

    dest.mkdir(parents=True, exist_ok=True)
    r, d = 64, 4096
    per_layer = 4 * 2 * r * d * 4
    layers = max(1, round(mb * 1_000_000 / per_layer))
    rng = np.random.default_rng(0)
    tensors = {}
    for i in range(layers):
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((r, d), dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((d, r), dtype=np.float32)
    save_file(tensors, str(dest / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "base_model_name_or_path": "bench/llama-like",
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
    }
    (dest / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return dest


def start_server(home: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "adapterhub", "--home", str(home), "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, line.split()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from huggingface_hub import HfApi, snapshot_download

    from adapterhub import Hub
    from adapterhub.server.tokens import create_token

    work = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    proc = None
    try:
        folder = make_adapter(work / "adapter", args.mb)
        size = (folder / "adapter_model.safetensors").stat().st_size
        mb = size / 1e6
        server_home = work / "server"
        with Hub(server_home) as sh:
            token = create_token(sh, "bench", write=True).token
        proc, url = start_server(server_home)
        api = HfApi(endpoint=url, token=token)
        client = Hub(work / "client")
        client.add_adapter(folder, name="big")

        push_ours, push_ref, pull_ours, pull_ref = [], [], [], []
        for i in range(args.repeat):
            # reference push: upload_folder into a fresh repo, then delete it so the server forgets the blob
            api.create_repo(f"bench/ref{i}")
            t = time.perf_counter()
            api.upload_folder(folder_path=str(folder), repo_id=f"bench/ref{i}")
            push_ref.append(time.perf_counter() - t)
            api.delete_repo(f"bench/ref{i}")
            # ours (creates the repo itself)
            t = time.perf_counter()
            client.push_adapter("big", f"bench/ours{i}", endpoint=url, token=token)
            push_ours.append(time.perf_counter() - t)
            if i < args.repeat - 1:
                api.delete_repo(f"bench/ours{i}")
        repo = f"bench/ours{args.repeat - 1}"
        for i in range(args.repeat):
            cache = work / f"cache{i}"
            t = time.perf_counter()
            snapshot_download(repo, cache_dir=str(cache), endpoint=url, token=token)
            pull_ref.append(time.perf_counter() - t)
            shutil.rmtree(cache)
            with Hub(work / f"pull{i}") as h:
                t = time.perf_counter()
                h.pull_adapter(repo, endpoint=url, token=token)
                pull_ours.append(time.perf_counter() - t)
            shutil.rmtree(work / f"pull{i}")

        def row(label: str, ours: list[float], ref: list[float]) -> None:
            o, r = statistics.median(ours), statistics.median(ref)
            print(
                f"{label:5s} ours {o:6.2f} s {mb / o:7.0f} MB/s | reference {r:6.2f} s {mb / r:7.0f} MB/s | "
                f"ratio {o / r:4.2f}"
            )

        print(f"adapter: {mb:.0f} MB, median of {args.repeat}, server and client on {os.cpu_count()} cores")
        row("push", push_ours, push_ref)
        row("pull", pull_ours, pull_ref)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
