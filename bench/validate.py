"""Validation speed: 1,000 cataloged adapters checked against one registered base, catalog alone.

Builds an 8B Llama-shaped base checkpoint as sparse safetensors files (real headers, holes for data:
`base add` reads headers only), registers it, catalogs 1,000 adapters' rows (all seven projections of
all 32 layers, ranks 8-64; every tenth made for another hidden size so some fail), then times
`adapterhub validate --all --base llama-8b --json` (CLI start included) against the 2 s goal, and
`list --compatible-with`.

Usage: python bench/validate.py [--adapters 1000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYERS, HIDDEN, INTER, KV, VOCAB = 32, 4096, 14336, 1024, 128256
PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN),
    "self_attn.k_proj": (KV, HIDDEN),
    "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTER, HIDDEN),
    "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def sparse_safetensors(path: Path, tensors: dict[str, tuple[int, ...]]) -> None:
    header, offset = {}, 0
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a hole: no data written


def make_base(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        for p, shape in PROJ.items():
            names[f"model.layers.{i}.{p}.weight"] = shape
        names[f"model.layers.{i}.input_layernorm.weight"] = (HIDDEN,)
        names[f"model.layers.{i}.post_attention_layernorm.weight"] = (HIDDEN,)
    items = list(names.items())
    shards = [dict(items[i : i + len(items) // 4 + 1]) for i in range(0, len(items), len(items) // 4 + 1)]
    weight_map = {}
    for k, shard in enumerate(shards):
        fn = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        sparse_safetensors(root / fn, shard)
        weight_map.update({n: fn for n in shard})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": VOCAB,
                "hidden_size": HIDDEN,
                "_name_or_path": "meta-llama/Llama-3.1-8B",
            }
        )
    )
    return root


def fill(home: Path, n: int) -> None:
    from adapterhub import Hub
    from adapterhub.catalog import queries

    with Hub(home) as hub, hub.catalog.write() as conn:
        for i in range(n):
            rank = (8, 16, 32, 64)[i % 4]
            wrong = i % 10 == 9  # made for a 5120-wide model
            mods = []
            for layer in range(LAYERS):
                for p, (out_f, in_f) in PROJ.items():
                    if wrong:
                        out_f, in_f = (5120 if out_f == HIDDEN else out_f), (5120 if in_f == HIDDEN else in_f)
                    mods.append(
                        {
                            "module": f"model.layers.{layer}.{p}",
                            "short_name": p.split(".")[-1],
                            "kind": "linear",
                            "rank": rank,
                            "alpha": 2.0 * rank,
                            "scale": 2.0,
                            "in_features": in_f,
                            "out_features": out_f,
                            "kernel_size": None,
                            "dora": False,
                            "dtype": "BF16",
                            "lora_bias": False,
                        }
                    )
            queries.insert_adapter(
                conn,
                row={
                    "name": f"adapter-{i:04d}",
                    "sha256": f"{i:064x}",
                    "format": "peft",
                    "peft_type": "LORA",
                    "base_model": "meta-llama/Llama-3.1-8B",
                    "base_revision": None,
                    "rank": rank,
                    "alpha": 2.0 * rank,
                    "use_rslora": False,
                    "use_dora": False,
                    "rank_pattern": {},
                    "alpha_pattern": {},
                    "task_type": "CAUSAL_LM",
                    "dtype": "BF16",
                    "num_params": 0,
                    "size_bytes": 0,
                    "num_modules": len(mods),
                    "target_modules": sorted({m["short_name"] for m in mods}),
                    "description": None,
                    "source": None,
                    "config": {"r": rank, "lora_alpha": 2 * rank},
                    "extra": None,
                    "replacements": None,
                },
                modules=mods,
                files=[],
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--workdir")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="adapterhub-bench-validate-"))
    exe = [sys.executable, "-m", "adapterhub", "--home", str(work / "home")]
    try:
        base = make_base(work / "llama-8b")
        subprocess.run(
            [*exe, "base", "add", str(base), "--name", "llama-8b"], check=True, stdout=subprocess.DEVNULL
        )
        t = time.perf_counter()
        fill(work / "home", args.adapters)
        print(
            f"cataloged {args.adapters} adapters x {LAYERS * len(PROJ)} modules in {time.perf_counter() - t:.1f} s"
        )
        times, out = [], b""
        for _ in range(3):
            t = time.perf_counter()
            res = subprocess.run(
                [*exe, "--json", "validate", "--all", "--base", "llama-8b"], capture_output=True
            )
            times.append(time.perf_counter() - t)
            out = res.stdout
        reports = json.loads(out)
        ok = sum(r["ok"] for r in reports)
        t_list = []
        for _ in range(3):
            t = time.perf_counter()
            subprocess.run(
                [*exe, "--json", "list", "--compatible-with", "llama-8b"],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            t_list.append(time.perf_counter() - t)
        v, lst = statistics.median(times), statistics.median(t_list)
        print(f"validate --all: {len(reports)} reports, {ok} fit, {len(reports) - ok} refused")
        print(
            f"{'validate --all --base llama-8b --json':45} {v:6.3f} s  (goal < 2 s: {'ok' if v < 2 else 'MISSED'})"
        )
        print(f"{'list --compatible-with llama-8b --json':45} {lst:6.3f} s")
        print(f"per adapter: {v / len(reports) * 1e3:.2f} ms ({LAYERS * len(PROJ)} modules each)")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
