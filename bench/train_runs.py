"""The ``--trainers`` half of bench/train.py: whole runs of `hub.train` and of PEFT + transformers'
``Trainer``, one process a case (see bench/train.py's docstring)."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parent.parent
RANDOM = dict(
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    vocab_size=32000,
)


def _prepare(work: Path) -> dict[str, Path]:
    """Checkpoint folders (SmolLM2 from its GGUF, a random ~0.5 GB Llama with SmolLM2's tokenizer) and the data."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import smollm2_gguf

    from adapterhub import Hub

    out: dict[str, Path] = {}
    gguf = smollm2_gguf()
    with Hub(work / "prep") as hub:
        if gguf is not None:
            out["smollm2"] = Path(hub.import_gguf(gguf, name="smollm2", dtype="float32").path or "")
    if "smollm2" in out:
        torch.manual_seed(0)
        model = LlamaForCausalLM(
            LlamaConfig(**RANDOM, max_position_embeddings=2048, tie_word_embeddings=False)
        )
        model.save_pretrained(str(work / "random"))
        AutoTokenizer.from_pretrained(str(out["smollm2"])).save_pretrained(str(work / "random"))
        out["llama-0.5g"] = work / "random"
    text = " ".join(["The sea is wide and the sky is blue; pirates sail for treasure."] * 12)
    (work / "data.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for _ in range(64)))
    return out


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _Wrap(model: Any, factors: list[Any]) -> Any:
    """A module whose parameters are the factors (for the Trainer's optimizer and clipping)."""
    from torch import nn

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model, self.factors = model, nn.ParameterList(factors)

        def forward(self, **kw: Any) -> Any:
            return self.model(**kw)

    return Wrap()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(case["threads"])
    from adapterhub import Hub

    hub = Hub(Path(case["work"]) / f"home-{case['who']}-{case['quant']}-{os.getpid()}")
    hub.add_base(case["base"], name="b")
    quant = case["quant"] if case["quant"] != "full" else None
    stamps: list[float] = []
    weights: list[float] = []
    opts = dict(
        rank=16,
        alpha=32,
        targets=PROJ,
        steps=case["steps"],
        batch_size=4,
        lr=2e-4,
        max_length=256,
        seed=0,
        group_by_length=False,
        quantize=quant,
    )
    if case["who"] == "adapterhub":
        hub.train(
            "b",
            case["data"],
            name="x",
            device="cpu",
            on_step=lambda *a: stamps.append(time.perf_counter()),
            **opts,
        )
        rss = _rss_mib()  # the peak of the run, before the model is loaded again for its footprint
        model, _ = hub.load_base(
            "b", device="cpu", quantize=quant, dtype="float32" if quant is None else "auto"
        )
        weights.append(model.get_memory_footprint() / 2**20)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, TrainerCallback, TrainingArguments

        from adapterhub.services.train_data import encode_rows, read_rows

        model, tok = hub.load_base(
            "b", device="cpu", quantize=quant, dtype="float32" if quant is None else "auto"
        )
        weights.append(model.get_memory_footprint() / 2**20)
        rows, kind, _ = read_rows(case["data"])
        enc = encode_rows(tok, rows, kind, max_length=256, path=Path(case["data"]))
        ds = [{"input_ids": i, "labels": lab} for i, lab in enc]

        def collate(b: list[dict[str, Any]]) -> dict[str, Any]:
            return {k: torch.tensor([r[k] for r in b]) for k in ("input_ids", "labels")}

        class Stamp(TrainerCallback):
            def on_step_end(self, *a: Any, **k: Any) -> None:
                stamps.append(time.perf_counter())

        if case["who"] == "hooks+Trainer":  # the runtime's adapters inside transformers' Trainer
            ad = hub.attach(model).create("x", rank=16, alpha=32, targets=PROJ, seed=0)
            pm = _Wrap(model, ad.parameters())
        else:
            pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=PROJ))
        args = TrainingArguments(
            output_dir=str(Path(case["work"]) / "out"),
            max_steps=case["steps"],
            per_device_train_batch_size=4,
            learning_rate=2e-4,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            optim="adamw_torch",
            weight_decay=0.0,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            remove_unused_columns=False,
        )
        Trainer(model=pm, args=args, train_dataset=ds, data_collator=collate, callbacks=[Stamp()]).train()
        rss = _rss_mib()
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][1:]
    hub.close()
    return {"step_s": statistics.median(steps), "peak_rss_mib": rss, "weights_mib": weights[0]}


def compare(*, steps: int, threads: int, out: str | None) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bases = _prepare(work)
        results: list[dict[str, Any]] = []
        print(
            f"# {steps} steps a run, batch 4 rows x 181 tokens, rank 16 on 7 projections, {threads} thread(s)"
        )
        print("| model | weights | case | step s | peak RSS MiB | weights MiB | step vs PEFT | RSS vs PEFT |")
        print("|---|---|---|---|---|---|---|---|")
        for model, base in bases.items():
            for quant in ("full", "nf4"):
                pair = {}
                for who in ("peft+Trainer", "adapterhub") + (("hooks+Trainer",) if quant == "full" else ()):
                    case = {
                        "who": who,
                        "quant": quant,
                        "base": str(base),
                        "data": str(work / "data.jsonl"),
                        "work": tmp,
                        "steps": steps,
                        "threads": threads,
                    }
                    proc = subprocess.run(
                        [sys.executable, __file__.replace("train_runs", "train"), "--case", json.dumps(case)],
                        env=env,
                        capture_output=True,
                        text=True,
                    )
                    if proc.returncode:
                        print(f"# {model} {quant} {who} failed: {proc.stderr.strip().splitlines()[-1:]}")
                        continue
                    pair[who] = r = json.loads(proc.stdout.strip().splitlines()[-1])
                    results.append({"model": model, "quant": quant, "who": who, **r})
                    ref = pair.get("peft+Trainer", r)
                    print(
                        f"| {model} | {quant} | {who} | {r['step_s']:.2f} | {r['peak_rss_mib']:.0f} | "
                        f"{r['weights_mib']:.0f} | {ref['step_s'] / r['step_s']:.2f}x faster | "
                        f"{r['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x |",
                        flush=True,
                    )
        if out:
            Path(out).write_text(json.dumps(results, indent=2))


# ------------------------------------------------------------------ --weights: NF4 weight memory
def _drift(ref: Any, model: Any, ids: Any) -> dict[str, float]:
    import torch

    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    pa, pb = a.log_softmax(-1), b.log_softmax(-1)
    return {
        "max_abs": float((a - b).abs().max()),
        "mean_abs": float((a - b).abs().mean()),
        "kl": float((pa.exp() * (pa - pb)).sum(-1).mean()),
        "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
    }


def weights(*, threads: int, base: str | None = None) -> None:
    """Weight memory (``get_memory_footprint``) of bf16, nf4, nf4-all and int8 bases, and each one's
    logits against bf16's on one 128-token text."""
    import torch

    from adapterhub import Hub

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        bases = {"smollm2": Path(base)} if base else _prepare(Path(tmp))
        text = " ".join(["The sea is wide and the sky is blue; pirates sail for treasure."] * 12)
        print("| model | weights | MiB | vs bf16 | logits max abs diff | mean abs | KL | top-1 agree |")
        print("|---|---|---|---|---|---|---|---|")
        for label, folder in bases.items():
            with Hub(Path(tmp) / f"home-{label}") as hub:
                hub.add_base(folder, name="b")
                ref, tok = hub.load_base("b", device="cpu", dtype="bfloat16")
                ids = tok(text, return_tensors="pt")["input_ids"][:, :128]
                full = ref.get_memory_footprint()
                print(f"| {label} | bf16 | {full / 2**20:.0f} | 1.00x | | | | |", flush=True)
                for q in ("nf4", "nf4-all", "int8"):
                    model, _ = hub.load_base("b", device="cpu", quantize=q)
                    d = _drift(ref, model, ids)
                    m = model.get_memory_footprint()
                    print(
                        f"| {label} | {q} | {m / 2**20:.0f} | {m / full:.3f}x | {d['max_abs']:.2f} | "
                        f"{d['mean_abs']:.3f} | {d['kl']:.4f} | {d['top1_agree']:.3f} |",
                        flush=True,
                    )
                    del model


# ------------------------------------------------------------------ --packing: tokens/s
def positions_per_token(lengths: list[int], *, max_length: int, seed: int = 0) -> dict[str, float]:
    """Positions the model computes per example token over one epoch (1.0: no padding), per batching;
    deterministic, so it says what the noisy tokens/s of a shared machine should show."""
    from adapterhub.services.train_data import batches, pack

    fake = [([0] * n, [0] * n) for n in lengths]
    packed = [len(r[0]) for r in pack(fake, max_length)]
    out = {}
    for label, rows, size, group in (
        ("padded, 8 rows a step", lengths, 8, False),
        ("length-grouped, 8 rows a step", lengths, 8, True),
        ("packing, 8 rows of 256 a step", packed, 8, True),
        ("packing, 2 rows of 256 a step", packed, 2, True),
    ):
        plan = batches(rows, size, -(-len(rows) // size), seed, group=group)
        computed = sum(len(b) * max(rows[i] for i in b) for b in plan)
        out[label] = computed / sum(rows[i] for b in plan for i in b)
    return out


def packing(*, rows_n: int, threads: int, out: str | None) -> None:
    """`hub.train` tokens/s (tokens of the examples, padding not counted) with plain batches (padded to
    their longest row), length-grouped batches and ``packing=True``, on rows of mixed length (about 4 to
    256 tokens, log-uniform), a random Llama of 4 layers x 768 (vocab 32000) with the tests' tiny
    tokenizer. Each run is one epoch over the same rows (the same tokens, in fewer and fuller rows when
    packed), the runs interleaved over rounds in one process, so they share the machine's noise."""
    import random

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapterhub import Hub

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.trainkit import CORPUS, tiny_tokenizer

    torch.set_num_threads(threads)
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = tiny_tokenizer()
        torch.manual_seed(0)
        LlamaForCausalLM(
            LlamaConfig(
                hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024,
            )
        ).save_pretrained(str(work / "small"))  # fmt: skip
        tok.save_pretrained(str(work / "small"))
        rows = []
        for _ in range(rows_n):
            n = int(2 ** rng.uniform(1, 7))  # 2 to 127 words: about 4 to 250 tokens
            text = [rng.choice(words) for _ in range(n)]
            while len(tok(" ".join(text))["input_ids"]) > 250:
                text.pop()
            rows.append({"text": " ".join(text)})
        data = work / "mixed.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        #: label -> (packing, group by length, rows a step)
        cases = {
            "padded, 8 rows a step": (False, False, 8),
            "length-grouped, 8 rows a step": (False, True, 8),
            "packing, 8 rows of 256 a step": (True, True, 8),
            "packing, 2 rows of 256 a step": (True, True, 2),
        }
        results: dict[str, list[float]] = {k: [] for k in cases}
        with Hub(work / "home") as hub:
            hub.add_base(work / "small", name="b")
            opts = dict(rank=16, alpha=32, targets=PROJ, epochs=1.0, max_length=256, seed=0)
            for r in range(3):
                for i, (label, (packed, group, size)) in enumerate(cases.items()):
                    res = hub.train(
                        "b",
                        data,
                        name=f"case{i}-{r}",
                        device="cpu",
                        packing=packed,
                        group_by_length=group,
                        batch_size=size,
                        **opts,
                    )
                    results[label].append(res.tokens_per_second)
                    print(f"# round {r} {label}: {res.tokens} tokens in {res.steps} steps, {res.seconds:.1f} s, "
                          f"{res.tokens_per_second:.0f} tokens/s", flush=True)  # fmt: skip
        lengths = sorted(len(tok(r["text"] + tok.eos_token)["input_ids"]) for r in rows)  # as encoded
        print(
            f"# {rows_n} rows, tokens: min {lengths[0]}, median {lengths[rows_n // 2]}, max {lengths[-1]}; "
            f"--max-length 256, one epoch a run, {threads} thread(s)"
        )
        ppt = positions_per_token(lengths, max_length=256)
        ref = statistics.median(results["length-grouped, 8 rows a step"])
        print("| batches | positions per token | tokens/s (median of 3) | vs length-grouped |")
        print("|---|---|---|---|")
        for label, v in results.items():
            m = statistics.median(v)
            print(f"| {label} | {ppt[label]:.2f} | {m:.0f} | {m / ref:.2f}x |")
        if out:
            Path(out).write_text(json.dumps(results, indent=2))
