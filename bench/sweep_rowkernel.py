"""Tile sizes of the row kernel: the decode step over 32 adapters (bench/decode_graphs.py's), per setting
of ADAPTERHUB_ROWKERNEL, each in a fresh process.

    python bench/sweep_rowkernel.py 256,4,512 512,4,512 ...     # needs CUDA
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

ONE = """
import sys, torch
sys.path.insert(0, {here!r}); sys.path.insert(0, {root!r})
from runtime import Timer, build_model, random_adapter
from decode_graphs import static_step
from adapterhub.runtime import attach
dev = torch.device("cuda")
model = build_model(False, dev, torch.bfloat16)
rt = attach(model)
for i in range(32):
    rt.load(random_adapter(model, i + 1, 16, dev), name=f"a{{i}}")
ids = torch.randint(0, 32000, (64, 64), generator=torch.Generator(device=dev).manual_seed(0), device=dev)
kw = "cache" if "cache" in model.forward.__code__.co_varnames else "past_key_values"
with torch.no_grad():
    for label, names in (("base", [None] * 64), ("mixed 32", [f"a{{i % 32}}" for i in range(64)])):
        specs = [{{n: 1.0}} if n else None for n in names]
        t = static_step(model, rt, kw, ids, names, specs, Timer(dev, 20), label, capture=True, profile=False)
        print(f"  {{label}}: {{t * 1e3:.2f}} ms", flush=True)
"""


def main() -> None:
    for setting in sys.argv[1:]:
        print(f"ADAPTERHUB_ROWKERNEL={setting}", flush=True)
        env = dict(os.environ, ADAPTERHUB_ROWKERNEL=setting)
        code = ONE.format(here=str(HERE), root=str(HERE.parent))
        subprocess.run([sys.executable, "-c", code], env=env, check=False)


if __name__ == "__main__":
    main()
