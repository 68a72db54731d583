"""The decode step under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs) with a static KV cache,
against the same step in eager mode: base, one adapter (``activate``) and 64 rows over 32 adapters
(``rt.rows``), the 1B-class shape of `runtime.py`. What a user gets from transformers' static cache and
torch.compile with adapters attached; it says how much of the eager ratio is the host's launches.

    python bench/decode_compiled.py        # CUDA only (inductor's CPU compile of 16 layers takes long)
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from runtime import Timer, build_model, random_adapter  # noqa: E402

from adapterhub.runtime import attach  # noqa: E402


def main() -> None:
    from transformers import StaticCache

    dev = torch.device("cuda")
    model = build_model(False, dev, torch.bfloat16)
    rt = attach(model)
    for i in range(32):
        rt.load(random_adapter(model, i + 1, 16, dev), name=f"a{i}")
    g = torch.Generator(device=dev).manual_seed(0)
    rows, ctx = 64, 64
    ids = torch.randint(0, 32000, (rows, ctx + 1), generator=g, device=dev)
    names32 = [f"a{i % 32}" for i in range(rows)]
    try:
        cache = StaticCache(config=model.config, max_cache_len=256)
    except TypeError:  # transformers 4.x wants the batch size, device and dtype up front
        cache = StaticCache(model.config, rows, 256, device=dev, dtype=torch.bfloat16)
    tok = ids[:, ctx:].clone()

    def prefill() -> None:
        cache.reset()
        model(input_ids=ids[:, :ctx], past_key_values=cache, use_cache=True)

    def step() -> Any:  # the cache's own length gives the position (each call writes one column)
        return model(input_ids=tok, past_key_values=cache, use_cache=True).logits

    median = Timer(dev, 20)  # the median of 20 timed calls after warm-up, as runtime.py times

    print(
        f"# decode step {rows} x 1 on a {ctx}-token static cache, {torch.cuda.get_device_name(0)}, "
        f"torch {torch.__version__}"
    )
    res: dict[str, tuple[float, float]] = {}
    cases: list[tuple[str, Any, Any]] = [
        ("base", None, None),
        ("one adapter", "a0", None),
        ("64 rows over 32 adapters", None, names32),
    ]
    with torch.no_grad():
        for label, active, spec in cases:
            rt.activate(active)
            with rt.rows(spec) if spec else contextlib.nullcontext():
                prefill()
                ref = step().float()
                prefill()
                eager = median(step)
                torch._dynamo.reset()
                compiled = torch.compile(step, mode="reduce-overhead")
                t0 = time.perf_counter()
                for _ in range(3):
                    compiled()
                torch.cuda.synchronize()
                took = time.perf_counter() - t0
                prefill()
                err = (compiled().float() - ref).abs().max().item()
                graphed = median(compiled)
            rt.activate(None)
            res[label] = (eager, graphed)
            print(
                f"{label:26s} eager {eager * 1e3:7.2f} ms   compiled {graphed * 1e3:6.2f} ms   "
                f"(compile {took:.0f} s; |compiled - eager| {err:.2g} on logits of scale "
                f"{ref.abs().max().item():.1f})",
                flush=True,
            )
    be, bc = res["base"]
    for label, (e, c) in res.items():
        print(
            f"{label:26s} x base: eager {e / be:.2f}   compiled {c / bc:.2f}   compiled / eager {c / e:.2f}"
        )
    rt.detach()


if __name__ == "__main__":
    main()
