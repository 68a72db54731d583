"""Serving throughput: the inference scheduler (`adapterhub.server.inference`) over 64 concurrent requests
spread over 1, 8, 32 and 128 distinct adapters, against the base alone through the same scheduler and a
PEFT baseline in the same run (requests grouped by adapter, one ``set_adapter`` + ``generate`` batch per
adapter, the way a PEFT-based server works). Also time to first token (p50 / p99) and cold adapter load.

A random Llama (a word-level tokenizer of its vocabulary) and random rank-16 PEFT adapters on all seven
projections, written as PEFT folders and read back through the server's own loading path. No database:
it runs where only torch, transformers and peft are (a GPU box).

    python bench/serve.py                                  # this CPU, a small model
    python bench/serve.py --device cuda --dtype bfloat16 --preset 1b
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

PRESETS = {
    "cpu": dict(hidden=256, inter=688, layers=4, heads=8, kv=4, vocab=4096),
    "1b": dict(hidden=2048, inter=8192, layers=16, heads=32, kv=8, vocab=32000),
}
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_model(p: dict[str, int], device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(p["vocab"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="w0")
    cfg = LlamaConfig(
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["inter"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv"],
        max_position_embeddings=4096,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    model.generation_config.eos_token_id = None
    return model, tok


def write_adapters(model: Any, root: Path, n: int, rank: int) -> list[Path]:
    """``n`` PEFT folders: random A, small random B, rank ``rank`` on every projection."""
    from safetensors.torch import save_file

    shapes = {}
    for name, mod in model.named_modules():
        if name.split(".")[-1] in PROJ:
            shapes[name] = (mod.in_features, mod.out_features)
    out = []
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(1)
    for i in range(n):
        d = root / f"ad{i}"
        d.mkdir(parents=True)
        tensors = {}
        for name, (fin, fout) in shapes.items():
            a = torch.randn(rank, fin, generator=g, device=dev) / fin**0.5
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(fout, rank, generator=g, device=dev) * 0.01
            )
        save_file(
            {k: v.to(torch.bfloat16).cpu() for k, v in tensors.items()}, str(d / "adapter_model.safetensors")
        )
        (d / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "task_type": "CAUSAL_LM",
                    "r": rank,
                    "lora_alpha": 2 * rank,
                    "target_modules": list(PROJ),
                    "bias": "none",
                    "fan_in_fan_out": False,
                    "use_rslora": False,
                    "base_model_name_or_path": "bench",
                }
            )
        )
        out.append(d)
    return out


class FolderHub:
    """What the adapter pool reads through: a name -> its PEFT folder."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def adapter_files(self, name: str) -> Path:
        return self.folders[name]


def run_round(
    engine: Any, pool: Any, prompts: list[list[int]], specs: list[Any], entries: list[Any], tokens: int
) -> dict[str, float]:
    from adapterhub.server.inference.engine import Job, Sampling

    left = [len(prompts)]
    done = threading.Event()
    first: dict[int, float] = {}
    lock = threading.Lock()

    def sink_for(i: int) -> Any:
        def sink(ev: tuple[str, Any]) -> None:
            if ev[0] == "text" and i not in first:
                first[i] = time.perf_counter()
            if ev[0] in ("done", "error"):
                if ev[0] == "error":
                    print("error:", ev[1], file=sys.stderr)
                with lock:
                    left[0] -= 1
                    if left[0] == 0:
                        done.set()

        return sink

    for e in entries:
        if e is not None:
            pool.request(e)
    t0 = time.perf_counter()
    for i, (p, s) in enumerate(zip(prompts, specs, strict=True)):
        engine.submit(Job(p, Sampling(max_tokens=tokens, temperature=0.0), s, sink_for(i)))
    done.wait()
    wall = time.perf_counter() - t0
    ttft = sorted(first.get(i, t0 + wall) - t0 for i in range(len(prompts)))
    return {
        "tok_s": len(prompts) * tokens / wall,
        "wall_s": wall,
        "ttft_p50_ms": 1e3 * statistics.median(ttft),
        "ttft_p99_ms": 1e3 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peft_round(pm: Any, prompts: list[list[int]], names: list[str | None], tokens: int, device: str) -> float:
    """Requests grouped by adapter: one set_adapter + generate per group, one group after another."""
    groups: dict[str | None, list[list[int]]] = {}
    for p, n in zip(prompts, names, strict=True):
        groups.setdefault(n, []).append(p)
    sync(device)
    t0 = time.perf_counter()
    for name, ps in groups.items():
        ids = torch.tensor(ps, device=device)
        if name is None:
            with pm.disable_adapter():
                pm.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=tokens,
                    min_new_tokens=tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
        else:
            pm.set_adapter(name)
            pm.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
            )
    sync(device)
    return len(prompts) * tokens / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", default="1,8,32,128")
    ap.add_argument(
        "--peft-max", type=int, default=128, help="skip the PEFT baseline above this many adapters"
    )
    ap.add_argument("--factor-dtype", default="model", choices=("model", "float32"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=1e9, help="skip PEFT cases once the run is this old")
    ap.add_argument(
        "--graphs",
        default="auto",
        choices=("auto", "static", "off", "both"),
        help="decode steps: static buffers + CUDA graphs where covered (auto), the dynamic eager batch "
        "(off), static buffers without graphs off a GPU (static), or auto and off in the same run",
    )
    ap.add_argument(
        "--batch-invariant",
        action="store_true",
        help="also run the batch-invariant decode steps (the server's default) and print "
        "their cost against the batching without that guarantee (both interleaved in one run)",
    )
    ap.add_argument(
        "--quantize", choices=("nf4",), help="an NF4 base (bitsandbytes, as bench/train_qlora.py builds it)"
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from adapterhub.runtime import attach
    from adapterhub.server.inference.engine import Engine
    from adapterhub.server.inference.metrics import Metrics
    from adapterhub.server.inference.pool import AdapterPool, Entry

    started = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    counts = [int(c) for c in args.adapters.split(",")]
    model, tok = make_model(PRESETS[args.preset], args.device, dtype)
    if args.quantize:
        from train_qlora import to_nf4

        to_nf4(model, args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    t = time.perf_counter()
    folders = write_adapters(model, tmp, max(counts), args.rank)
    print(f"wrote {len(folders)} adapters in {time.perf_counter() - t:.1f}s", file=sys.stderr)
    names = [f"ad{i}" for i in range(len(folders))]
    rt = attach(model, dtype=torch.float32 if args.factor_dtype == "float32" else None)
    metrics = Metrics()
    pool = AdapterPool(
        FolderHub(dict(zip(names, folders, strict=True))), rt, "bench", budget=None, metrics=metrics
    )
    g = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(1, PRESETS[args.preset]["vocab"], (args.prompt,), generator=g).tolist()
        for _ in range(args.requests)
    ]
    entry = {n: Entry(n, f"sha-{n}", False, 0) for n in names}
    results: dict[str, Any] = {"config": vars(args) | PRESETS[args.preset], "peft": {}}

    def plan(k: int) -> tuple[list[Any], list[Any], list[str | None]]:
        if k == 0:
            return [None] * args.requests, [], [None] * args.requests
        used = [names[i % k] for i in range(args.requests)]
        return [{entry[n].sha256: 1.0} for n in used], [entry[n] for n in used], list(used)

    modes: list[Any] = {"auto": [None], "static": [True], "off": [False], "both": [None, False]}[args.graphs]
    if args.batch_invariant:
        modes.append("invariant")
    engines: dict[str, Any] = {}
    for mode in modes:
        label = {False: "ours_eager", "invariant": "ours_invariant"}.get(mode, "ours")
        results.setdefault(label, {})
        engine = Engine(
            model,
            tok,
            pool,
            metrics,
            max_batch=args.requests,
            max_queue=100_000,
            prefill_tokens=1 << 20,
            graphs=None if mode == "invariant" else mode,  # invariant: captured steps on a GPU
            batch_invariant=mode == "invariant",
        )
        engine.eos = set()  # fixed-length answers, as PEFT's min_new_tokens
        static = engine.graphs is not None or (engine.rows is not None and engine.rows.static)
        results[f"{label}_static"] = static
        print(
            f"# {label}: decode steps {'static (CUDA graphs where on a GPU)' if static else 'dynamic'}",
            file=sys.stderr,
        )
        # warm up the model, then make every adapter resident once (cold loads measured here)
        run_round(engine, pool, prompts[:4], [None] * 4, [], 4)
        specs, ents, _ = plan(max(counts))
        t = time.perf_counter()
        for e in {e.name: e for e in ents}.values():
            pool.request(e)
        run_round(engine, pool, prompts, specs, ents, 2)
        if "cold_load_ms_mean" not in results:
            results["cold_load_ms_mean"] = 1e3 * metrics.load.total / max(1, metrics.load.n)
            results["cold_loads"] = metrics.load.n
            results["first_round_with_cold_loads_s"] = time.perf_counter() - t
        engines[label] = engine
    # rounds interleaved case by case and mode by mode, so that the modes share the noise of this machine;
    # the best of each case is kept
    paired: dict[str, list[float]] = {}  # per case, each round's tok/s of the first mode / the last
    for rep in range(args.rounds):
        for k in [0, *counts]:
            specs, ents, _ = plan(k)
            this: list[float] = []
            for label, engine in engines.items():
                run_round(engine, pool, prompts, specs, ents, 4)  # warm this batch shape
                r = run_round(engine, pool, prompts, specs, ents, args.tokens)
                this.append(r["tok_s"])
                if str(k) not in results[label] or r["tok_s"] > results[label][str(k)]["tok_s"]:
                    results[label][str(k)] = r
                print(
                    f"round {rep} {label} k={k}: {r['tok_s']:.0f} tok/s ttft p50 {r['ttft_p50_ms']:.0f} ms",
                    file=sys.stderr,
                )
            paired.setdefault(str(k), []).append(this[0] / this[-1])
    results["paired_ratio_median"] = {k: statistics.median(v) for k, v in paired.items()}
    for label, engine in engines.items():
        if engine.graphs is not None:
            results[f"{label}_captures"] = engine.graphs.captures
        engine.stop()
    rt.detach()
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=list(PROJ), init_lora_weights=False
    )
    pm = get_peft_model(model, cfg, adapter_name="ad0")
    loaded = 1
    pm.eval()
    with torch.no_grad():
        _, _, used = plan(0)
        pm.generate(
            torch.tensor(prompts[:2], device=args.device), max_new_tokens=2, do_sample=False, pad_token_id=0
        )
        results["peft"]["0"] = peft_round(pm, prompts, used, args.tokens, args.device)
        for k in counts:
            if k > args.peft_max or time.perf_counter() - started > args.budget_s:
                continue
            t = time.perf_counter()
            while loaded < min(k, args.requests):
                pm.add_adapter(f"ad{loaded}", cfg)
                loaded += 1
            _, _, used = plan(k)
            results["peft"][str(k)] = peft_round(pm, prompts, used, args.tokens, args.device)
            print(
                f"peft k={k}: {results['peft'][str(k)]:.0f} tok/s (adding adapters {time.perf_counter() - t:.1f}s)",
                file=sys.stderr,
            )
    for label in [m for m in ("ours", "ours_eager", "ours_invariant") if results.get(m)]:
        base = results[label]["0"]["tok_s"]
        how = "static + CUDA graphs" if results.get(f"{label}_static") else "dynamic, eager"
        how += ", batch-invariant" if label == "ours_invariant" else ", not batch-invariant"
        print(f"\n{label} (decode steps {how}):\n")
        print(
            "| distinct adapters | ours tok/s | x base-only | PEFT tok/s | x PEFT | TTFT p50 ms | TTFT p99 ms |"
        )
        print("|---|---|---|---|---|---|---|")
        for k in ["0", *map(str, counts)]:
            r = results[label][k]
            peft = results["peft"].get(k)
            shown = f"{peft:.0f}" if peft else "not run"
            ratio = f"{r['tok_s'] / peft:.1f}" if peft else "-"
            row = "base only" if k == "0" else k
            print(
                f"| {row} | {r['tok_s']:.0f} | {r['tok_s'] / base:.2f} | {shown} | {ratio} | "
                f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} |"
            )
    if results.get("ours_invariant"):
        fast = "ours_eager" if results.get("ours_eager") else "ours"
        print(
            f"\nbatch-invariant cost (tok/s of {fast} / tok/s batch-invariant):",
            ", ".join(
                f"{k} adapters {results[fast][k]['tok_s'] / results['ours_invariant'][k]['tok_s']:.2f}x"
                for k in ["0", *map(str, counts)]
            ),
        )
        print(
            "the same, median over rounds of each round's back-to-back ratio:",
            ", ".join(f"{k} adapters {v:.2f}x" for k, v in results["paired_ratio_median"].items()),
        )
    print(
        f"cold adapter load (read + place), mean of {results['cold_loads']}: {results['cold_load_ms_mean']:.1f} ms"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
