"""QLoRA training step on a Llama-3-8B-shaped model: adapterhub against PEFT (+ transformers ``Trainer``).

    python bench/train_qlora.py                    # the 8B shape on CUDA (bf16 and NF4), every case
    python bench/train_qlora.py --shape small      # a small shape (a smoke run; CPU works, NF4 included)

Every case runs in a process of its own, so that its peak memory is its own. One model per case: a random
Llama (the 8B shape: hidden 4096, 14336, 32 layers, 32/8 heads, vocab 128256) built in bf16 on the device,
its decoder's linear layers replaced by bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16
compute) for ``nf4``, as ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True)`` does (embeddings and the head stay bf16). Rank 16, alpha 32 on the
seven projections of every layer; batch 4 x 512 random tokens (labels = inputs); gradient checkpointing
(non-reentrant) on; AdamW (lr 1e-4) over the factors, clipping at 1.0. Cases:

- ``adapterhub``: ``attach(model).create(...)``: fp32 factors, the low-rank term in bf16 (the runtime's own
  autograd function), the loss as adapterhub's training loop takes it (`adapterhub.runtime.loss`: label
  positions only, the head in checkpointed chunks, so the batch's fp32 logits are never whole);
- ``peft``: ``get_peft_model`` (fp32 factors) stepped by the same loop under ``torch.autocast(bf16)``;
- ``peft+Trainer``: ``get_peft_model`` under ``transformers.Trainer`` (``bf16=True``, ``adamw_torch``,
  ``max_grad_norm=1.0``, the model's own gradient checkpointing), how PEFT is usually trained.

Step time: the median of the timed steps after two warm-up steps (synchronised). Peak: the device's
``max_memory_allocated`` over the whole case (weights included), and its part above the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from train import PROJ  # noqa: E402
from train import SHAPES as _TRAIN_SHAPES  # noqa: E402

#: bench/train.py's shapes at this bench's batch (4 x 512 on the GPU shapes), plus the 8B one
SHAPES = {
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rows=4,
        tokens=512,
    ),
    "1b": dict(_TRAIN_SHAPES["1b"], rows=4),
    "small": _TRAIN_SHAPES["small"],
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _memory(device: str) -> float:
    return torch.cuda.memory_allocated() / 2**20 if device == "cuda" else 0.0


def _peak(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0


def build(shape: dict[str, Any], quant: str, device: str) -> Any:
    """The random model in bf16 on ``device``; with ``nf4`` its decoder linears become ``Linear4bit``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        **{k: v for k, v in shape.items() if k not in ("rows", "tokens")},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_cache=False,
    )
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if quant == "nf4":
        to_nf4(model, device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def to_nf4(model: Any, device: str) -> Any:
    """Replace the decoder's linear layers by bitsandbytes ``Linear4bit`` (NF4, double quantization, bf16
    compute), quantizing their weights on ``device``, as ``BitsAndBytesConfig(load_in_4bit=True, ...)``
    loads them; embeddings and the head stay as they are."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    lin.in_features,
                    lin.out_features,
                    bias=False,
                    compute_dtype=torch.bfloat16,
                    compress_statistics=True,
                    quant_type="nf4",
                    device="meta",
                )
                q.weight = bnb.nn.Params4bit(
                    lin.weight.data.to(torch.bfloat16),
                    requires_grad=False,
                    compress_statistics=True,
                    quant_type="nf4",
                ).to(device)
                setattr(parent, name, q)
    if device == "cuda":
        torch.cuda.empty_cache()
    return model


def run_case(who: str, quant: str, shape_name: str, steps: int, device: str) -> dict[str, Any]:
    shape = SHAPES[shape_name]
    model = build(shape, quant, device)
    _sync(device)
    weights = _memory(device)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, shape["vocab_size"], (shape["rows"], shape["tokens"]), generator=g).to(device)
    times: list[float] = []
    losses: list[float] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if who == "peft+Trainer":
        losses, times = _trainer(model, batch, steps, device)
    else:
        if who == "adapterhub":
            from adapterhub.runtime import attach
            from adapterhub.runtime.loss import causal_lm_loss

            ad = attach(model).create("bench", rank=16, alpha=32, targets=PROJ, seed=0)
            params = list(ad.parameters())
            autocast = False
        else:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJ))
            params = [p for n, p in model.named_parameters() if "lora_" in n]
            autocast = device == "cuda"
        opt = torch.optim.AdamW(params, lr=1e-4)
        for i in range(steps + 2):
            _sync(device)
            t = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
                if who == "adapterhub":  # the loss as adapterhub's training loop computes it
                    loss = causal_lm_loss(model, batch, batch)
                else:
                    loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= 2:
                times.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
    peak = _peak(device)
    return {
        "who": who,
        "quant": quant,
        "step_ms": statistics.median(times) * 1e3,
        "weights_mib": weights,
        "peak_mib": peak,
        "peak_extra_mib": peak - weights,
        "first_loss": losses[0],
    }


def _trainer(model: Any, batch: torch.Tensor, steps: int, device: str) -> tuple[list[float], list[float]]:
    import tempfile

    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJ))
    stamps: list[float] = []
    losses: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a: Any, **k: Any) -> None:
            _sync(device)
            stamps.append(time.perf_counter())

    rows = [{"input_ids": r, "labels": r} for r in batch.cpu()] * (steps + 3)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="bench-qlora-"),
        max_steps=steps + 2,
        per_device_train_batch_size=batch.shape[0],
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        optim="adamw_torch",
        weight_decay=0.0,
        bf16=device == "cuda",
        use_cpu=device != "cuda",
        gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )

    def collate(b: list[dict[str, Any]]) -> dict[str, Any]:
        return {k: torch.stack([r[k] for r in b]) for k in ("input_ids", "labels")}

    _sync(device)
    stamps.append(time.perf_counter())
    trainer = Trainer(model=pm, args=args, train_dataset=rows, data_collator=collate, callbacks=[Stamp()])
    out = trainer.train()
    losses.append(float(out.training_loss))
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return losses, gaps[2:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--quant", default="bf16,nf4", help="comma list of bf16, nf4")
    ap.add_argument("--who", default="adapterhub,peft,peft+Trainer")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.case:
        who, quant = args.case.split("/")
        print("RESULT " + json.dumps(run_case(who, quant, args.shape, args.steps, device)), flush=True)
        return
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"# {args.shape} {SHAPES[args.shape]} on {name}; torch {torch.__version__}; {args.steps} timed steps"
    )
    results: list[dict[str, Any]] = []
    for quant in args.quant.split(","):
        for who in args.who.split(","):
            cmd = [sys.executable, __file__, "--shape", args.shape, "--steps", str(args.steps)]
            proc = subprocess.run(
                [*cmd, "--case", f"{who}/{quant}"], capture_output=True, text=True, timeout=900
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(f"{who}/{quant} failed:\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(line[-1][7:])
            results.append(r)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True
            )
    print("\n| quant | case | step ms | vs peft+Trainer | peak MiB | vs peft+Trainer | above weights MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ref = next((x for x in results if x["quant"] == r["quant"] and x["who"] == "peft+Trainer"), r)
        print(
            f"| {r['quant']} | {r['who']} | {r['step_ms']:.0f} | {ref['step_ms'] / r['step_ms']:.2f}x faster | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / max(ref['peak_mib'], 1e-9):.2f}x | {r['peak_extra_mib']:.0f} |"
        )
    for who in args.who.split(","):
        pair = {r["quant"]: r for r in results if r["who"] == who}
        if "bf16" in pair and "nf4" in pair and pair["bf16"]["peak_mib"]:
            print(f"{who}: NF4 peak / bf16 peak = {pair['nf4']['peak_mib'] / pair['bf16']['peak_mib']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
