"""Benchmark adapterhub.runtime against PEFT and the base model, in the same run.

    python bench/runtime.py            # auto: the 1B-class shape (bf16) on CUDA, a small fp32 one on CPU
    python bench/runtime.py --small    # the small shape wherever it runs

Cases (each printed with its ratio to the base model and to PEFT where PEFT does the same thing):
- prefill forward, 32 rows x 128 tokens: base, one adapter, and a mixed batch whose rows cycle over
  1 / 8 / 32 / 128 resident adapters (rank 16 on all seven projections). The batch has 32 rows, so it
  holds min(N, 32) distinct adapters; with 128 resident the rows pick among 128.
- decode step, 64 rows x 1 token on a 64-token KV cache, rows over 32 adapters;
- switching (`activate`) with N resident, against PEFT's `set_adapter`;
- one-row decode latency merged vs unmerged vs base; merge and unmerge times;
- loading one adapter from a PEFT folder onto the device vs reading the file and copying its tensors.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapterhub.lora import LoraModule, LoraWeights  # noqa: E402
from adapterhub.runtime import attach  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def shapes(small: bool) -> dict[str, Any]:
    if small:
        return dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=2048,
        )
    return dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
    )


def build_model(small: bool, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=512, **shapes(small))
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval()


def random_adapter(model: Any, seed: int, rank: int, device: torch.device) -> LoraWeights:
    g = torch.Generator(device=device).manual_seed(seed)
    mods: dict[str, LoraModule] = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] not in PROJ:
            continue
        out_f, in_f = mod.weight.shape
        a = torch.randn(rank, in_f, generator=g, device=device) / in_f**0.5
        b = torch.randn(out_f, rank, generator=g, device=device) * 0.02
        key = name + ".weight"
        mods[key] = LoraModule(
            key=key,
            kind="linear",
            rank=rank,
            alpha=2.0 * rank,
            scale=2.0,
            a_shape=(rank, in_f),
            b_shape=(out_f, rank),
            A=a,
            B=b,
        )
    return LoraWeights(modules=mods, format="peft", config={"r": rank, "lora_alpha": 2 * rank})


class Timer:
    def __init__(self, device: torch.device, reps: int) -> None:
        self.device = device
        self.reps = reps

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def interleaved(self, cases: dict[str, Callable[[], Any]], warmup: int = 1) -> dict[str, float]:
        """Run every case once per round, ``reps`` rounds; per case as in `__call__`."""
        times: dict[str, list[float]] = {k: [] for k in cases}
        with torch.no_grad():
            for fn in cases.values():
                for _ in range(warmup):
                    fn()
            self.sync()
            for _ in range(self.reps):
                for k, fn in cases.items():
                    t0 = time.perf_counter()
                    fn()
                    self.sync()
                    times[k].append(time.perf_counter() - t0)
        pick = statistics.median if self.device.type == "cuda" else min
        return {k: pick(v) for k, v in times.items()}

    def __call__(self, fn: Callable[[], Any], reps: int | None = None, warmup: int = 2) -> float:
        """Seconds of ``fn``: the median on a GPU, the minimum on a CPU (shared cores are noisy)."""
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            self.sync()
            times = []
            for _ in range(reps or self.reps):
                t0 = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - t0)
        return statistics.median(times) if self.device.type == "cuda" else min(times)


def peft_from(base: Any, adapters: list[LoraWeights], rank: int) -> Any:
    """A PEFT model over a copy of ``base`` holding the same factors as ``adapters`` (a0, a1, ...)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJ, init_lora_weights=False)
    pm = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, len(adapters)):
        pm.add_adapter(f"a{i}", cfg)
    modules = dict(pm.named_modules())
    with torch.no_grad():
        for i, w in enumerate(adapters):
            for key, m in w.modules.items():
                layer = modules["base_model.model." + key[: -len(".weight")]]
                layer.lora_A[f"a{i}"].weight.copy_(m.A)
                layer.lora_B[f"a{i}"].weight.copy_(m.B)
    pm.eval()
    return pm


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f} ms"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="the small shape even on CUDA")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    small = args.small or not cuda
    dtype = torch.bfloat16 if (cuda and not small) else torch.float32
    reps = args.reps or (10 if cuda else 5)
    t = Timer(device, reps)
    rank = 16
    rows, seq = 32, 128
    counts = [1, 8, 32, 128]
    peft_counts = [] if args.no_peft else [1, 8, 32]

    lines: list[str] = []

    def say(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    name = torch.cuda.get_device_name(0) if cuda else (platform.processor() or platform.machine())
    say(f"# adapterhub.runtime bench on {name} ({os.cpu_count()} CPUs), torch {torch.__version__}")
    sh = shapes(small)
    say(
        f"model: Llama {sh['num_hidden_layers']} layers, hidden {sh['hidden_size']}, intermediate "
        f"{sh['intermediate_size']}, {dtype}; rank {rank} on all seven projections; {rows} rows x {seq} tokens"
    )
    model = build_model(small, device, dtype)
    adapters = [random_adapter(model, i + 1, rank, device) for i in range(max(counts))]
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, sh["vocab_size"], (rows, seq), generator=g, device=device)

    def fwd(m: Any, x: Any = ids, **kw: Any) -> Callable[[], Any]:
        return lambda: m(x, use_cache=False, **kw).logits

    say(f"\n## prefill forward {rows}x{seq} (our cases interleaved round by round, so they share the noise)")
    plain_t = t(fwd(model))
    spare = copy.deepcopy(model) if peft_counts else None  # PEFT wraps its own copy
    rt = attach(model)
    for i, w in enumerate(adapters):
        rt.load(w, name=f"a{i}", sha256=f"bench-{i}")  # content keys given: hashing is timed below

    def with_spec(spec: Any) -> Callable[[], Any]:
        def run() -> Any:
            rt.activate(spec)
            return model(ids, use_cache=False).logits

        return run

    def with_rows(names: list[str]) -> Callable[[], Any]:
        def run() -> Any:
            with rt.rows(names):  # a new batch composition every call: the gathers are timed too
                return model(ids, use_cache=False).logits

        return run

    cases: dict[str, Callable[[], Any]] = {"base": with_spec(None), "one": with_spec("a0")}
    for n in counts:
        cases[f"mixed{n}"] = with_rows([f"a{i % n}" for i in range(rows)])
    res = t.interleaved(cases)
    rt.activate(None)
    base_t = res["base"]
    say(f"base, runtime attached        {fmt(base_t)}   1.00x base")
    peft: Any = None
    one_t = res["one"]
    line = f"one adapter                   {fmt(one_t)}   {one_t / base_t:.2f}x base"
    if peft_counts:
        peft = peft_from(spare, adapters[: max(peft_counts)], rank)
        peft.set_adapter("a0")
        with torch.no_grad():
            rt.activate("a0")
            ours = model(ids[:2], use_cache=False).logits.float()
            rt.activate(None)
            theirs = peft(ids[:2], use_cache=False).logits.float()
        say(
            f"(check: |ours - PEFT| max {float((ours - theirs).abs().max()):.2e} on logits of scale "
            f"{float(theirs.abs().max()):.1f})"
        )
        p_one = t(fwd(peft))
        line += f"   PEFT {fmt(p_one)} ({p_one / base_t:.2f}x base, {p_one / one_t:.1f}x ours)"
    say(line)
    for n in counts:
        names = [f"a{i % n}" for i in range(rows)]
        mixed = res[f"mixed{n}"]
        line = (
            f"mixed, {n:3d} resident ({min(n, rows):2d} in batch) {fmt(mixed)}   {mixed / base_t:.2f}x base"
        )
        if n in peft_counts:
            pm = t(fwd(peft, adapter_names=names), reps=max(2, reps // 3), warmup=1)
            line += f"   PEFT {fmt(pm)} ({pm / base_t:.1f}x base, {pm / mixed:.1f}x ours)"
        say(line)
    flat = max(res[f"mixed{n}"] for n in counts) / min(res[f"mixed{n}"] for n in counts)
    say(f"mixed batch, slowest / fastest over 1..{max(counts)} adapters: {flat:.2f}x")

    # decode step: 64 rows x 1 token over a 64-token cache
    say("\n## decode step 64 rows x 1 token (KV cache of 64 tokens), rows over 32 adapters")
    from transformers import DynamicCache

    drow, ctx = 64, 64
    dids = torch.randint(0, sh["vocab_size"], (drow, ctx + 1), generator=g, device=device)
    names32 = [f"a{i % 32}" for i in range(drow)]

    def decode_case(m: Any, **kw: Any) -> float:
        cache = DynamicCache()
        with torch.no_grad():
            m(dids[:, :ctx], past_key_values=cache, use_cache=True, **kw)

        def step() -> None:
            m(dids[:, ctx:], past_key_values=cache, use_cache=True, **kw)
            cache.crop(-1)

        return t(step, reps=reps * 3)

    d_base = decode_case(model)
    with rt.rows(names32):
        d_mixed = decode_case(model)
    line = f"base {fmt(d_base)}   mixed 32 {fmt(d_mixed)} ({d_mixed / d_base:.2f}x base)"
    if peft is not None:
        d_peft = decode_case(peft, adapter_names=names32)
        line += f"   PEFT {fmt(d_peft)} ({d_peft / d_base:.1f}x base, {d_peft / d_mixed:.1f}x ours)"
    say(line)

    # switching
    say("\n## switching: activate(name) with N resident (median of 200)")
    for n in counts:
        seq_names = [f"a{i % n}" for i in range(200)]

        def switch_all(seq_names: list[str] = seq_names) -> None:
            for s in seq_names:
                rt.activate(s)

        sw = t(switch_all, reps=3, warmup=1) / len(seq_names)
        line = f"N={n:3d}: {sw * 1e6:8.1f} us"
        if peft is not None and n in peft_counts:

            def peft_switch(seq_names: list[str] = seq_names) -> None:
                for s in seq_names[:20]:
                    peft.set_adapter(s)

            ps = t(peft_switch, reps=2, warmup=1) / 20
            line += f"   PEFT set_adapter {ps * 1e3:8.3f} ms ({ps / sw:.0f}x ours)"
        say(line)
    rt.activate(None)
    if peft is not None:
        del peft
        if cuda:
            torch.cuda.empty_cache()

    # merged vs unmerged, one row decoding
    say(
        "\n## per-token latency, 1 row x 1 token (KV cache of 64 tokens; base / unmerged / merged interleaved)"
    )
    one = dids[:1]
    cache = DynamicCache()
    with torch.no_grad():
        model(one[:, :ctx], past_key_values=cache, use_cache=True)

    cpu_time: list[float] = []  # the process's CPU time of each step (on the CPU: robust to other load)

    def step() -> float:
        t.sync()
        t0, c0 = time.perf_counter(), time.process_time()
        model(one[:, ctx:], past_key_values=cache, use_cache=True)
        t.sync()
        dt = time.perf_counter() - t0
        cpu_time.append(time.process_time() - c0)
        cache.crop(-1)
        return dt

    lat: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    cpu: dict[str, list[float]] = {"base": [], "unmerged": [], "merged": []}
    merge_times: list[float] = []
    unmerge_times: list[float] = []
    with torch.no_grad():
        for rnd in range(reps * 3):
            rt.activate(None)
            b = [step() for _ in range(5)]
            rt.activate("a0")
            u = [step() for _ in range(5)]
            t0 = time.perf_counter()
            rt.merge()
            t.sync()
            merge_times.append(time.perf_counter() - t0)
            m = [step() for _ in range(5)]
            t0 = time.perf_counter()
            rt.unmerge()
            t.sync()
            unmerge_times.append(time.perf_counter() - t0)
            if rnd:  # the first round warms up
                lat["base"] += b
                lat["unmerged"] += u
                lat["merged"] += m
                cpu["base"] += cpu_time[-15:-10]
                cpu["unmerged"] += cpu_time[-10:-5]
                cpu["merged"] += cpu_time[-5:]
    pick = statistics.median if cuda else min
    b1, u1, m1 = (pick(lat[k]) for k in ("base", "unmerged", "merged"))
    say(f"base {fmt(b1)}   unmerged {fmt(u1)} ({u1 / b1:.2f}x)   merged {fmt(m1)} ({m1 / b1:.2f}x)")
    if not cuda:  # wall time on a shared CPU box follows the other processes; CPU time follows our work
        b2, u2, m2 = (statistics.median(cpu[k]) for k in ("base", "unmerged", "merged"))
        say(
            f"(CPU time, median: base {fmt(b2)}   unmerged {fmt(u2)} ({u2 / b2:.2f}x)   merged {fmt(m2)} "
            f"({m2 / b2:.2f}x))"
        )
    say(
        f"merge {statistics.median(merge_times) * 1e3:.1f} ms, unmerge {statistics.median(unmerge_times) * 1e3:.1f} ms "
        "(all seven projections of every layer; fp32 fold, rounded once; unmerge copies the originals back)"
    )
    rt.activate(None)

    # load from a PEFT folder
    say("\n## load one adapter from a PEFT folder onto the device")
    from safetensors import safe_open

    from adapterhub.formats import read_adapter, write_adapter

    with tempfile.TemporaryDirectory() as tmp:
        cpu_w = LoraWeights(
            modules={
                k: m.with_tensors(A=m.A.cpu(), B=m.B.cpu())  # type: ignore[union-attr]
                for k, m in adapters[0].modules.items()
            },
            format="peft",
            config={},
        )
        folder = write_adapter(cpu_w, Path(tmp) / "ad")
        st = folder / "adapter_model.safetensors"
        size = st.stat().st_size

        def raw() -> None:
            with safe_open(str(st), framework="pt") as f:
                ts = [f.get_tensor(k).to(device, dtype) for k in f.keys()]  # noqa: SIM118
            t.sync()
            del ts

        raw_s = t(raw, reps=5, warmup=1)
        for r in rt.resident:
            if r.name != "a0":
                rt.unload(r.name)

        def load() -> None:
            rt.load(folder, name="disk")
            t.sync()
            rt.unload("disk")

        load_s = t(load, reps=5, warmup=1)

        def load_known() -> None:  # what Hub.attach does: the store's sha256 is the content key
            rt.load(read_adapter(folder, load=True, check_values=False), name="store", sha256="store-key")
            t.sync()
            rt.unload("store")

        known_s = t(load_known, reps=5, warmup=1)
        say(
            f"file {size / 1e6:.1f} MB: read + copy to device {fmt(raw_s)}; rt.load(path) (read, check, "
            f"sha256, place) {fmt(load_s)} ({load_s / raw_s:.2f}x); with the store's sha256 (Hub.attach) "
            f"{fmt(known_s)} ({known_s / raw_s:.2f}x)"
        )
    rt.detach()
    plain_again = t(fwd(model))
    say(
        f"\n(base with no runtime attached: {fmt(min(plain_t, plain_again))}, before attach and after detach)"
    )
    out = os.environ.get("BENCH_OUT")
    if out:
        Path(out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
