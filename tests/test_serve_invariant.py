"""Batch invariance (the engine's default off CUDA graphs, `invariant`): a greedy request's tokens are the
same alone and in a batch of 16 mixed requests (other adapters, a combination, base rows, other lengths),
in fp32 and bf16; driven step by step on the calling thread as tests/test_serve_graphs.py does."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest
from test_serve_graphs import LLAMA_ALL, _Folders, _Tok

from adapterhub.runtime import attach
from adapterhub.server.inference.engine import Engine, Job, Sampling
from adapterhub.server.inference.metrics import Metrics
from adapterhub.server.inference.pool import AdapterPool, Entry

torch = pytest.importorskip("torch")
DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    from helpers.models import make_adapter, tiny_llama

    llama = tiny_llama()
    root = tmp_path_factory.mktemp("invariant")
    specs = {
        "a": dict(seed=61, r=4, lora_alpha=8, target_modules=LLAMA_ALL),
        "b": dict(seed=62, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    return llama, {n: make_adapter(llama, root / n, **kw) for n, kw in specs.items()}


def _serve(
    llama: Any,
    folders: dict[str, Path],
    dtype: Any,
    requests: list[tuple[list[int], str | None]],
    together: bool,
    invariant: bool | None,
    rows: bool = True,
    graphs: bool = False,
) -> list[list[int]]:
    """``llama`` copied to ``dtype`` (None: as it is, a quantized base)."""
    model = (copy.deepcopy(llama).to(DEVICE, dtype) if dtype is not None else llama).eval()
    model.generation_config.eos_token_id = None
    rt = attach(model)
    metrics = Metrics()
    pool = AdapterPool(_Folders(folders), rt, "tiny", budget=None, metrics=metrics)
    engine = Engine(model, _Tok(), pool, metrics, max_batch=16, graphs=graphs, batch_invariant=invariant)
    assert (engine.rows is not None) == (invariant is not False and rows)  # batched steps, not alone
    assert engine.rows is None or engine.rows.static == graphs
    entries = {n: Entry(n, f"sha-{n}", False, 0) for n in folders}
    out: list[list[int]] = []
    groups = [requests] if together else [[r] for r in requests]
    # every adapter resident first: a row's numbers depend on the banks' padded rank (the highest rank
    # resident), which is not what this test varies
    groups = [[([3, 4, 5], "+".join(folders))], *groups]
    for group in groups:
        done: set[int] = set()
        jobs = []
        for prompt, name in group:
            terms = name.split("+") if name else []
            for t in terms:
                pool.request(entries[t])
            k = len(jobs)
            jobs.append(
                Job(
                    prompt,
                    Sampling(max_tokens=12, temperature=0.0),
                    {f"sha-{t}": (0.7 if i else 0.6) for i, t in enumerate(terms)} or None,
                    lambda ev, k=k, done=done: done.add(k) if ev[0] == "done" else None,
                )
            )
            engine._waiting.append(jobs[-1])
        deadline = time.time() + 120
        while len(done) < len(jobs) and time.time() < deadline:
            engine._step([])
            time.sleep(0.001)
        assert len(done) == len(jobs)
        out += [j.generated for j in jobs]
    if DEVICE == "cuda" and engine.rows is not None and graphs:
        assert engine.rows.capture and engine.rows.captures >= 1
    out = out[1:]
    rt.detach()
    return out


@pytest.mark.parametrize(
    ("dtype", "graphs"), [("float32", False), ("bfloat16", False), ("float32", True), ("bfloat16", True)]
)
def test_greedy_tokens_alone_equal_a_batch_of_16(
    setup: tuple[Any, dict[str, Path]], dtype: str, graphs: bool
) -> None:
    """``graphs``: the steps a GPU captures in CUDA graphs (fixed inputs, whole powers of two of attention
    blocks), here run eagerly: the same tokens as the dynamic steps."""
    llama, folders = setup
    g = torch.Generator().manual_seed(5)
    vocab = llama.config.vocab_size
    requests = [
        (torch.randint(3, vocab, (int(n),), generator=g).tolist(), [None, "a", "b", "a+b"][i % 4])
        for i, n in enumerate(torch.randint(2, 30, (16,), generator=g))
    ]
    dt = getattr(torch, dtype)
    alone = _serve(llama, folders, dt, requests, together=False, invariant=None, graphs=graphs)  # the default
    batch = _serve(llama, folders, dt, requests, together=True, invariant=None, graphs=graphs)
    assert alone == batch
    if graphs:  # the same numbers as the dynamic steps
        assert alone == _serve(llama, folders, dt, requests, together=False, invariant=None)
    elif dtype == "float32":  # the same tokens as the batching engine gives a request that runs by itself
        fast = _serve(llama, folders, dt, requests[:4], together=False, invariant=False)
        assert fast == alone[:4]


def test_an_emptied_batch_is_cleared() -> None:
    from adapterhub.server.inference.engine import _Batch

    b = _Batch()
    b.jobs, b.pos = [object()], torch.zeros(1, dtype=torch.long)  # type: ignore[list-item]
    b.keep([])
    assert b.jobs == [] and b.cache is None and b.mask is None and b.pos is None and b.last is None


def test_a_prefill_table_follows_its_adapter_when_it_is_loaded_again(
    setup: tuple[Any, dict[str, Path]], tmp_path: Path
) -> None:
    """The one-row table a prefill reads ``x`` through is kept per combination; once ``x`` is unloaded,
    its slot reused by another adapter and ``x`` loaded again elsewhere, the prefill still applies ``x``,
    to the bit (the banks' padded rank unchanged: a higher rank pads every factor and may round apart)."""
    from helpers.models import make_adapter

    from adapterhub.server.inference.invariant import RowsDecoder

    llama, folders = setup
    other = make_adapter(llama, tmp_path / "c", seed=63, r=4, lora_alpha=8, target_modules=LLAMA_ALL)
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    dec = RowsDecoder(model, rt, "past_key_values", max_batch=4, pad=0)
    ids = torch.tensor([[5, 9, 13, 2, 7]])

    def through(ctx: Any) -> torch.Tensor:
        with torch.no_grad(), ctx:
            return model(input_ids=ids).logits

    rt.load(folders["a"], name="x")
    want = through(rt.rows(["x"]))
    first = through(dec.alone({"x": 1.0}))
    assert torch.allclose(first, want, atol=1e-5)
    rt.unload("x")
    rt.load(other, name="y")  # takes the freed slot
    rt.load(folders["a"], name="x")
    assert torch.equal(through(dec.alone({"x": 1.0})), first)
    assert not torch.allclose(through(dec.alone({"y": 1.0})), want, atol=1e-3)
    rt.detach()


def test_a_model_the_steps_do_not_cover_runs_each_request_alone(
    setup: tuple[Any, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from adapterhub.server.inference import invariant

    llama, folders = setup
    monkeypatch.setattr(invariant, "supported", lambda model: "not covered here")
    g = torch.Generator().manual_seed(7)
    requests = [
        (
            torch.randint(3, llama.config.vocab_size, (3 + 4 * i,), generator=g).tolist(),
            [None, "a", "b"][i % 3],
        )
        for i in range(6)
    ]
    alone = _serve(llama, folders, torch.bfloat16, requests, together=False, invariant=None, rows=False)
    assert (
        _serve(llama, folders, torch.bfloat16, requests, together=True, invariant=None, rows=False) == alone
    )


@pytest.mark.parametrize("bits", [4, 8])
def test_a_quantized_base_alone_equals_a_batch(bits: int, tmp_path: Path) -> None:
    """bitsandbytes layers under batch invariance: NF4 (bf16 compute) in the batched steps, whose floor is
    measured on the 4-bit layers themselves (their kernels' choices per row count); LLM.int8, whose
    outlier columns depend on every row of a batch, by running each request alone."""
    pytest.importorskip("bitsandbytes")
    from helpers.models import make_adapter, tiny_llama
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' CPU kernels want 4-bit blocks of 64 inputs: a wider model than `setup`'s
    llama = tiny_llama(0, hidden_size=64, intermediate_size=128, vocab_size=96).eval()
    llama.save_pretrained(tmp_path / "base")
    folders = {
        "a": make_adapter(llama, tmp_path / "a", seed=71, r=4, lora_alpha=8, target_modules=LLAMA_ALL),
        "b": make_adapter(
            llama, tmp_path / "b", seed=72, r=8, target_modules=["q_proj", "v_proj", "down_proj"]
        ),
    }
    cfg = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )

    def base() -> Any:
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=cfg, device_map=DEVICE
        )

    g = torch.Generator().manual_seed(11)
    requests = [
        (
            torch.randint(3, llama.config.vocab_size, (int(n),), generator=g).tolist(),
            [None, "a", "b", "a+b"][i % 4],
        )
        for i, n in enumerate(torch.randint(2, 30, (16,), generator=g))
    ]
    rows = bits == 4  # LLM.int8 is not covered: each request runs alone
    alone = _serve(base(), folders, None, requests, together=False, invariant=None, rows=rows)
    assert _serve(base(), folders, None, requests, together=True, invariant=None, rows=rows) == alone
