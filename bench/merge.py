"""Benchmark: adapterhub merge_checkpoint against a plain copy of the folder and against PEFT.

Builds a synthetic Llama-shaped bf16 checkpoint (hidden 2048, intermediate 5632, 32 heads / 4 KV heads,
vocab 32000, as many layers as fit the size asked for, in 500 MB shards) and a rank-16 adapter on all
seven linear layers, then times, each in its own subprocess so peak RSS is measured per step:

- copy:   shutil.copytree of the checkpoint folder (the floor: every byte read and written once);
- merge:  read_adapter + adapterhub merge_checkpoint;
- peft:   transformers from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained.

    python bench/merge.py                      # ~1 GB
    python bench/merge.py --size-gb 1 2        # also check that merge memory stays flat
    python bench/merge.py --device cuda --skip-peft

Seconds are the operation itself (imports and interpreter start excluded). Each step runs in its own
process, which runs the operation --repeat times (PEFT once): the first run is "cold" and the median of
the others "warm". Before each step the base is read into the page cache and the machine is left alone
for --settle seconds; see `measure` for why that matters on a VM with free page reporting. Peak RSS is
the step process's VmHWM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 32, 4, 32000
#: --shape: "small" (the default above) or "8b" (Llama-3-8B: 32 layers make 16 GB in bf16)
SHAPES = {"small": (2048, 5632, 32, 4, 32000), "8b": (4096, 14336, 32, 8, 128256)}


def set_shape(name: str) -> None:
    global HIDDEN, INTER, HEADS, KV_HEADS, VOCAB
    HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = SHAPES[name]


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _layer_shapes(i: int) -> dict[str, tuple[int, int]]:
    kv = HIDDEN // HEADS * KV_HEADS
    p = f"model.layers.{i}."
    return {
        p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
        p + "self_attn.k_proj.weight": (kv, HIDDEN),
        p + "self_attn.v_proj.weight": (kv, HIDDEN),
        p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
        p + "mlp.gate_proj.weight": (INTER, HIDDEN),
        p + "mlp.up_proj.weight": (INTER, HIDDEN),
        p + "mlp.down_proj.weight": (HIDDEN, INTER),
        p + "input_layernorm.weight": (HIDDEN,),  # type: ignore[dict-item]
        p + "post_attention_layernorm.weight": (HIDDEN,),  # type: ignore[dict-item]
    }


def layers_for(size_gb: float) -> int:
    per_layer = sum(math.prod(s) for s in _layer_shapes(0).values()) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    return max(1, round((size_gb * 1e9 - fixed) / per_layer))


def build(root: Path, size_gb: float, shard_mb: int, rank: int) -> tuple[Path, Path]:
    """Write the synthetic base checkpoint and the adapter; return their folders."""
    import torch
    from safetensors.torch import save_file

    layers = layers_for(size_gb)
    base, adapter = root / "base", root / "adapter"
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        shapes.update(_layer_shapes(i))
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers for 16 GB are faster on a GPU
    g = torch.Generator(device=dev).manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = math.prod(shape) * 2
        if shards[-1] and size + n > shard_mb * 1e6:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            if len(shapes[name]) == 1:
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                tensors[name] = (
                    (torch.randn(shapes[name], generator=g, device=dev) * 0.02).to(torch.bfloat16).cpu()
                )
            weight_map[name] = fname
            total += tensors[name].numel() * 2
        save_file(tensors, str(base / fname), metadata={"format": "pt"})
        del tensors
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": layers,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (base / "config.json").write_text(json.dumps(config, indent=2))
    (base / "tokenizer.json").write_text('{"version": "1.0"}\n')

    lora = {}
    for name, shape in shapes.items():
        if any(f".{t}." in name for t in TARGETS):
            module = "base_model.model." + name[: -len(".weight")]
            out_f, in_f = shape
            lora[module + ".lora_A.weight"] = (torch.randn(rank, in_f, generator=g, device=dev) * 0.01).cpu()
            lora[module + ".lora_B.weight"] = (torch.randn(out_f, rank, generator=g, device=dev) * 0.01).cpu()
    save_file(lora, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": TARGETS,
                "base_model_name_or_path": str(base),
                "lora_dropout": 0.0,
                "bias": "none",
                "use_rslora": False,
                "use_dora": False,
                "fan_in_fan_out": False,
                "inference_mode": True,
            },
            indent=2,
        )
    )
    return base, adapter


# ---------------------------------------------------------------------------------------------- steps


def step_copy(base: Path, out: Path, device: str) -> None:
    shutil.copytree(base, out)


def step_merge(base: Path, out: Path, device: str, adapter: Path) -> None:
    from adapterhub.formats import read_adapter
    from adapterhub.ops import merge_checkpoint

    merge_checkpoint(base, [(read_adapter(adapter, load=True), 1.0)], out, device=device)


def step_peft(base: Path, out: Path, device: str, adapter: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map=device)
    model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.save_pretrained(out, max_shard_size="500MB")


def run_step(args: argparse.Namespace) -> None:
    """Child process: import what the step needs, then run it ``--inner`` times; print a JSON line.

    Run 1 is "cold": it starts a few seconds after the previous step freed its memory (see `measure`).
    Runs 2.. are "warm": each reuses the memory the run before freed (output deleted and synced, untimed).
    """
    t_proc = time.perf_counter()
    base, out = Path(args.base), Path(args.out)
    if args.step in ("merge", "peft"):
        import torch  # noqa: F401  (imports are not part of the timed operation)

        if args.step == "peft":
            import peft  # noqa: F401
            import transformers  # noqa: F401
        else:
            import adapterhub.ops  # noqa: F401
    fn = {"copy": step_copy, "merge": step_merge, "peft": step_peft}[args.step]
    kwargs = {} if args.step == "copy" else {"adapter": Path(args.adapter)}
    runs = []
    for _ in range(args.inner):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        t0 = time.perf_counter()
        fn(base, out, args.device, **kwargs)
        runs.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {"step": args.step, "runs": runs, "process": time.perf_counter() - t_proc, "peak_rss": peak_rss()}
        )
    )


def peak_rss() -> int:
    """This process's peak resident set in bytes (VmHWM: unlike ru_maxrss it does not inherit the parent's)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _warm(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(64 << 20):
                    pass


def measure(step: str, base: Path, adapter: Path, work: Path, device: str, inner: int, settle: float) -> dict:
    """Run one step in a fresh process, after the page cache holds the base and freed memory has settled.

    ``settle`` seconds of quiet first: on VMs with free page reporting (Firecracker here) memory freed a
    moment ago is cheap to reuse and memory freed seconds ago is not, so without it whichever step runs
    right after another step's output was deleted gets an unfair head start.
    """
    out = work / f"out-{step}"
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    _warm(base)
    time.sleep(settle)
    cmd = [
        sys.executable,
        __file__,
        "--step",
        step,
        "--base",
        str(base),
        "--out",
        str(out),
        "--adapter",
        str(adapter),
        "--device",
        device,
        "--inner",
        str(inner),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    )
    if proc.returncode != 0:
        raise SystemExit(f"step {step} failed:\n{proc.stderr[-3000:]}")
    res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("{")][-1])
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, nargs="+", default=[1.0], help="checkpoint size(s) in GB")
    ap.add_argument("--shard-mb", type=int, default=500)
    ap.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="small",
        help="small: hidden 2048 (default); 8b: Llama-3-8B-shaped (hidden 4096, 32 layers = 16 GB)",
    )
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument(
        "--repeat", type=int, default=5, help="runs of copy and merge in their process (1 cold + warm)"
    )
    ap.add_argument(
        "--settle", type=float, default=4.0, help="seconds of quiet before each step (see measure)"
    )
    ap.add_argument("--inner", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help="where to build (default: a temporary folder, removed after)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--build", help=argparse.SUPPRESS)
    ap.add_argument("--base", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    args = ap.parse_args()
    set_shape(args.shape)
    if args.step:
        run_step(args)
        return
    if args.build:  # child: build here, so the parent never holds tensors (its RSS would leak into children)
        build(Path(args.build), args.size_gb[0], args.shard_mb, args.rank)
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="adapterhub-bench-"))
    print(
        f"# adapterhub merge bench: shape={args.shape}, device={args.device}, rank={args.rank}, cpus={os.cpu_count()}, "
        f"load average {os.getloadavg()[0]:.2f}, work={root}"
    )
    try:
        for size in args.size_gb:
            work = root / f"size-{size:g}gb"
            shutil.rmtree(work, ignore_errors=True)
            t = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--build",
                    str(work),
                    "--size-gb",
                    str(size),
                    "--shard-mb",
                    str(args.shard_mb),
                    "--rank",
                    str(args.rank),
                    "--shape",
                    args.shape,
                ],
                check=True,
            )
            base, adapter = work / "base", work / "adapter"
            nbytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
            print(
                f"\n## {nbytes / 1e9:.2f} GB bf16, {layers_for(size)} layers, "
                f"{len(list(base.glob('*.safetensors')))} shards (built in {time.perf_counter() - t:.1f} s)"
            )
            rows = {}
            for step in ["copy", "merge"] + ([] if args.skip_peft else ["peft"]):
                r = measure(
                    step, base, adapter, work, args.device, 1 if step == "peft" else args.repeat, args.settle
                )
                warm = r["runs"][1:]
                rows[step] = {
                    "cold": r["runs"][0],
                    "warm": statistics.median(warm) if warm else None,
                    "all": [round(x, 2) for x in r["runs"]],
                    "peak_rss": r["peak_rss"],
                }
            c = rows["copy"]
            print(
                f"{'step':<6} {'cold s':>7} {'vs copy':>8} {'warm s':>7} {'vs copy':>8} {'peak RSS MB':>12}  runs (s)"
            )
            for step, r in rows.items():
                warm = (
                    f"{r['warm']:7.2f} {r['warm'] / c['warm']:7.2f}x"
                    if r["warm"] and c["warm"]
                    else f"{'-':>7} {'-':>8}"
                )
                print(
                    f"{step:<6} {r['cold']:7.2f} {r['cold'] / c['cold']:7.2f}x {warm} {r['peak_rss'] / 1e6:12.0f}  {r['all']}"
                )
            if "peft" in rows:
                m, p = rows["merge"], rows["peft"]
                print(
                    f"merge vs peft (cold): {p['cold'] / m['cold']:.1f}x faster, "
                    f"peak RSS {m['peak_rss'] / p['peak_rss']:.2f} of PEFT's"
                )
            shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
