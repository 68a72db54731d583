"""The serving scheduler's decode step (`adapterhub.server.inference.graphs.GraphDecoder`): 64 rows x 1
token over a static KV cache, replayed from a CUDA graph, for the base, one adapter and 32 adapters mixed
per row (the row kernel of `adapterhub.runtime.RowTable`); the same step run eagerly; and the dynamic
eager step of `rt.rows` for reference. Also where the GPU time of a step goes (the profiler's kernels).

    python bench/decode_graphs.py          # needs CUDA
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from runtime import Timer, build_model, random_adapter  # noqa: E402

from adapterhub.runtime import attach  # noqa: E402
from adapterhub.server.inference.graphs import GraphDecoder, StaticBatch  # noqa: E402


def main() -> None:
    dev = torch.device("cuda")
    model = build_model(False, dev, torch.bfloat16)
    rt = attach(model)
    for i in range(32):
        rt.load(random_adapter(model, i + 1, 16, dev), name=f"a{i}")
    rows, ctx = 64, 64
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(0, 32000, (rows, ctx), generator=g, device=dev)
    cases: dict[str, list[Any]] = {
        "base": [None] * rows,
        "one adapter": ["a0"] * rows,
        "64 rows over 32 adapters": [f"a{i % 32}" for i in range(rows)],
    }
    timer = Timer(dev, 20)
    print(
        f"# decode step {rows} x 1 after a {ctx}-token prompt, {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}"
    )
    kw = "cache" if "cache" in model.forward.__code__.co_varnames else "past_key_values"
    res: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for label, names in cases.items():
            specs = [{n: 1.0} if n else None for n in names]
            out = {
                "graph": static_step(model, rt, kw, ids, names, specs, timer, label, capture=True),
                "static eager": static_step(model, rt, kw, ids, names, specs, timer, label, capture=False),
                "dynamic eager": dynamic_step(model, rt, kw, ids, names, timer),
            }
            res[label] = out
            print(f"{label:26s} " + "   ".join(f"{k} {v * 1e3:7.2f} ms" for k, v in out.items()), flush=True)
    base = res["base"]
    for label, out in res.items():
        print(f"{label:26s} x base: " + "   ".join(f"{k} {v / base[k]:.2f}" for k, v in out.items()))
    rt.detach()


def static_step(
    model: Any,
    rt: Any,
    kw: str,
    ids: Any,
    names: list[Any],
    specs: list[Any],
    timer: Timer,
    label: str,
    *,
    capture: bool,
    profile: bool = True,
) -> float:
    """Seconds of `GraphDecoder.step` over ``ids`` prefilled with ``names`` per row."""
    from transformers import DynamicCache

    rows = ids.shape[0]
    dec = GraphDecoder(model, rt, kw, max_batch=rows, pad=0, capture=capture)
    batch = StaticBatch(dec)

    def fill() -> None:
        cache = DynamicCache(config=model.config)
        mask = torch.ones_like(ids)
        with rt.rows(names):
            model(input_ids=ids, attention_mask=mask, use_cache=True, **{kw: cache})
        batch.keep([])
        batch.join([None] * rows, cache, mask, mask.sum(1), ids[:, -1])

    fill()

    def step() -> Any:
        if batch.width + 1 >= dec.L:  # stay inside one capacity (one captured graph)
            fill()
        return dec.step(batch, specs)

    took = timer(step, warmup=3)
    if capture:
        assert dec.captures >= 1 and dec.capture, "the step was not captured"
        if profile:
            prof_kernels(label, step)
    return took


def dynamic_step(model: Any, rt: Any, kw: str, ids: Any, names: list[Any], timer: Timer) -> float:
    """Seconds of the dynamic eager step (a growing DynamicCache under ``rt.rows``)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    tok = ids[:, -1:]
    with rt.rows(names):
        model(input_ids=ids, use_cache=True, **{kw: cache})
        return timer(lambda: model(input_ids=tok, use_cache=True, **{kw: cache}), warmup=2)


def prof_kernels(label: str, step: Any) -> None:
    """GPU time of one replayed step by kernel (the top few and the row kernel's total)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    rows = [
        (e.key, e.device_time_total / 5, e.count // 5) for e in p.key_averages() if e.device_time_total > 0
    ]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    mine = sum(r[1] for r in rows if "lora_rows" in r[0])
    print(f"  [{label}] GPU time per step {total / 1e3:.2f} ms, row kernel {mine / 1e3:.2f} ms; top kernels:")
    for key, us, n in rows[:6]:
        print(f"    {us:8.1f} us  x{n:<4d} {key[:90]}")


if __name__ == "__main__":
    main()
