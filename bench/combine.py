"""Benchmark: adapterhub's factored ``combine(method="linear", rank=R)`` vs PEFT's ``add_weighted_adapter``
with ``combination_type="svd"``, in the same process, on one transformer layer of a 7B-class model.

Three rank-16 adapters on q_proj, v_proj (4096 x 4096) and down_proj (4096 x 11008); weights 0.5, 0.3,
-0.2; target rank 16. Checks that the two products agree within 1e-4 (relative Frobenius), prints both
times, the ratio and a whole-model (32 layers) estimate.

    .venv/bin/python bench/combine.py            # full size (PEFT's side takes about a minute per module)
    .venv/bin/python bench/combine.py --small    # a quick smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from adapterhub.lora import LoraModule, LoraWeights
from adapterhub.ops.combine import combine

ADAPTER_RANK = 16
WEIGHTS = [0.5, 0.3, -0.2]


def shapes(small: bool) -> dict[str, tuple[int, int]]:
    h, i = (512, 1376) if small else (4096, 11008)
    return {
        "model.layers.0.self_attn.q_proj": (h, h),
        "model.layers.0.self_attn.v_proj": (h, h),
        "model.layers.0.mlp.down_proj": (h, i),  # (out, in)
    }


def make_adapters(mods: dict[str, tuple[int, int]], seed: int = 0) -> list[LoraWeights]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(3):
        alpha = 32.0 if k != 1 else 16.0
        modules = {}
        for name, (o, i) in mods.items():
            a = torch.randn(ADAPTER_RANK, i, generator=gen) / i**0.5
            b = torch.randn(o, ADAPTER_RANK, generator=gen) * 0.05
            key = name + ".weight"
            modules[key] = LoraModule(
                key,
                "linear",
                ADAPTER_RANK,
                alpha,
                alpha / ADAPTER_RANK,
                (ADAPTER_RANK, i),
                (o, ADAPTER_RANK),
                "F32",
                a,
                b,
            )
        out.append(LoraWeights(modules, "peft"))
    return out


class Layer(torch.nn.Module):
    """Just the three projections, named as in Llama, so PEFT targets them."""

    def __init__(self, mods: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([torch.nn.Module()])
        layer = self.model.layers[0]
        layer.self_attn = torch.nn.Module()
        layer.mlp = torch.nn.Module()
        for name, (o, i) in mods.items():
            parent, leaf = name.split(".")[-2:]
            setattr(getattr(layer, parent), leaf, torch.nn.Linear(i, o, bias=False, device="meta"))
        self.model.layers.to_empty(device="cpu")
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.02)


def peft_svd(mods: dict[str, tuple[int, int]], adapters: list[LoraWeights], rank: int) -> tuple[float, dict]:
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    config = dict(r=ADAPTER_RANK, target_modules=["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(
        Layer(mods),
        LoraConfig(lora_alpha=adapters[0].modules[next(iter(adapters[0]))].alpha, **config),
        adapter_name="a0",
    )
    for k, w in enumerate(adapters[1:], start=1):
        model.add_adapter(f"a{k}", LoraConfig(lora_alpha=next(iter(w.modules.values())).alpha, **config))
    layers = {
        n.removeprefix("base_model.model."): m for n, m in model.named_modules() if isinstance(m, LoraLayer)
    }
    with torch.no_grad():
        for k, w in enumerate(adapters):
            for key, m in w.modules.items():
                layer = layers[key.removesuffix(".weight")]
                layer.lora_A[f"a{k}"].weight.copy_(m.A)
                layer.lora_B[f"a{k}"].weight.copy_(m.B)
    names = [f"a{k}" for k in range(len(adapters))]
    t0 = time.perf_counter()
    model.add_weighted_adapter(names, WEIGHTS, "svd", combination_type="svd", svd_rank=rank)
    elapsed = time.perf_counter() - t0
    deltas = {n + ".weight": layer.get_delta_weight("svd").detach() for n, layer in layers.items()}
    return elapsed, deltas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="8x smaller layer, for a smoke run")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5, help="runs of adapterhub's side (median reported)")
    ap.add_argument("--layers", type=int, default=32, help="layers in the whole-model estimate")
    args = ap.parse_args()

    mods = shapes(args.small)
    adapters = make_adapters(mods)
    pairs = list(zip(adapters, WEIGHTS, strict=True))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; modules: "
        + ", ".join(f"{n.rsplit('.', 1)[-1]} {o}x{i}" for n, (o, i) in mods.items())
    )

    combine(pairs, method="linear", rank=args.rank, device="cpu")  # warm-up
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        result = combine(pairs, method="linear", rank=args.rank, device="cpu")
        times.append(time.perf_counter() - t0)
    ours = statistics.median(times)
    print(
        f"adapterhub combine(linear, rank={args.rank}): {ours * 1e3:.1f} ms (median of {args.repeat}), "
        f"relative error vs exact sum {result.error:.4f}"
    )

    theirs, peft_deltas = peft_svd(mods, adapters, args.rank)
    print(f"PEFT add_weighted_adapter(svd, svd_rank={args.rank}): {theirs:.2f} s")

    worst = 0.0
    for key, d in peft_deltas.items():
        mine = result.weights[key].delta(torch.float64)
        worst = max(worst, float((mine - d.double()).norm() / d.double().norm()))
    ok = worst <= 1e-4
    print(f"products agree: max relative difference {worst:.2e} ({'OK' if ok else 'FAIL'}, limit 1e-4)")
    print(f"speed-up: {theirs / ours:.0f}x")
    print(
        f"whole model ({args.layers} layers, these 3 modules each): adapterhub ~{ours * args.layers:.2f} s, "
        f"PEFT ~{theirs * args.layers / 60:.1f} min"
    )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
