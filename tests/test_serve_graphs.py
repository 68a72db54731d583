"""The scheduler's static decode path (`server/inference/graphs.py`: fixed KV buffers, row tables, CUDA
graphs on a GPU) gives the same tokens as its dynamic path, through joins, leaves, capacity growth and
mixes of adapters; driven step by step on the calling thread (no scheduler thread, no HTTP)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers.models import make_adapter, tiny_bert, tiny_llama  # noqa: E402

from adapterhub.runtime import attach  # noqa: E402
from adapterhub.server.inference.engine import Engine, Job, Sampling  # noqa: E402
from adapterhub.server.inference.graphs import GraphDecoder, StaticBatch  # noqa: E402
from adapterhub.server.inference.metrics import Metrics  # noqa: E402
from adapterhub.server.inference.pool import AdapterPool, Entry  # noqa: E402

DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Tok:
    """Token ids as text: ``decode`` joins them (the engine streams text, the test compares ids)."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


class _Folders:
    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def adapter_files(self, name: str) -> Path:
        return self.folders[name]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    llama = tiny_llama()
    root = tmp_path_factory.mktemp("graphs")
    specs = {
        "a": dict(seed=51, r=4, lora_alpha=8, target_modules=LLAMA_ALL),
        "b": dict(seed=52, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "c": dict(seed=53, r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj", "o_proj"]),
        "dora": dict(seed=54, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    }
    return llama, {n: make_adapter(llama, root / n, **kw) for n, kw in specs.items()}


def _run(
    llama: Any,
    folders: dict[str, Path],
    graphs: bool,
    waves: list[list[tuple[Any, ...]]],
    invariant: bool = False,
) -> Any:
    """Submit each wave after the previous one's first decode steps; return every job's tokens."""
    model = copy.deepcopy(llama).to(DEVICE).eval()
    model.generation_config.eos_token_id = None
    rt = attach(model)
    metrics = Metrics()
    pool = AdapterPool(_Folders(folders), rt, "tiny", budget=None, metrics=metrics)
    engine = Engine(model, _Tok(), pool, metrics, max_batch=8, graphs=graphs, batch_invariant=invariant)
    if invariant:
        assert engine.rows is not None and engine.rows.static == graphs
    else:
        assert isinstance(engine._batch, StaticBatch) == graphs
    entries = {n: Entry(n, f"sha-{n}", False, 0) for n in folders}
    jobs: list[Job] = []
    done: dict[int, list[int]] = {}
    for wave in waves:
        for prompt, spec, max_tokens in wave:
            names = {spec: 1.0} if isinstance(spec, str) else spec
            for n in names or {}:
                pool.request(entries[n])
            sha = {entries[n].sha256: w for n, w in names.items()} if names else None
            i = len(jobs)
            job = Job(
                prompt,
                Sampling(max_tokens=max_tokens, temperature=0.0),
                sha,
                lambda ev, i=i: done.__setitem__(i, []) if ev[0] == "done" else None,
            )
            jobs.append(job)
            engine._waiting.append(job)
        deadline = time.time() + 60
        while engine._waiting and time.time() < deadline:  # (the pool reads files on its own thread)
            engine._step([])
            time.sleep(0.002)
        for _ in range(3):
            engine._step([])
    deadline = time.time() + 120
    while len(done) < len(jobs) and time.time() < deadline:
        engine._step([])
    assert len(done) == len(jobs), "jobs did not finish"
    rt.detach()
    return [j.generated for j in jobs], engine


def _waves() -> list[list[tuple[Any, ...]]]:
    g = torch.Generator().manual_seed(9)

    def prompt(n: int) -> list[int]:
        return torch.randint(1, 64, (n,), generator=g).tolist()

    return [
        [
            (prompt(5), "a", 30),
            (prompt(9), None, 6),
            (prompt(3), "b", 40),
            (prompt(7), {"a": 0.7, "c": 0.3}, 12),
        ],
        [(prompt(21), "c", 25), (prompt(2), "a", 5)],  # longer than the batch's columns; a short one
        [(prompt(4), None, 20), (prompt(11), {"b": -0.5, "c": 1.0}, 18), (prompt(6), "b", 9)],
        [(prompt(5), "dora", 6), (prompt(3), "a", 4)],  # a table cannot take DoRA: rt.rows, eagerly
    ]


def test_static_decode_steps_equal_the_dynamic_ones(
    adapters: tuple[Any, dict[str, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    llama, folders = adapters
    moves: list[tuple[int, int]] = []
    move = GraphDecoder.move_cols

    def counted(self: GraphDecoder, rows: int, src: int, dst: int, count: int) -> None:
        moves.append((src, dst))
        move(self, rows, src, dst, count)

    monkeypatch.setattr(GraphDecoder, "move_cols", counted)
    eager: list[int] = []
    forward = GraphDecoder._forward

    def seen(self: GraphDecoder, step: Any, bucket: int, rows: Any = None) -> Any:
        eager.append(rows is not None)
        return forward(self, step, bucket, rows)

    monkeypatch.setattr(GraphDecoder, "_forward", seen)
    waves = _waves()
    dynamic, _ = _run(llama, folders, False, waves)
    static, engine = _run(llama, folders, True, waves)
    assert static == dynamic
    assert [len(t) for t in static] == [30, 6, 40, 12, 25, 5, 20, 18, 9, 6, 4]
    d = engine.graphs
    assert d is not None and d.L >= 32  # grew past the first capacity
    assert any(dst > src for src, dst in moves)  # a joining prompt longer than the batch's columns
    assert any(eager) and not all(eager)  # the DoRA batch stepped through rt.rows, the others not
    if DEVICE == "cuda":
        assert d.captures >= 1 and d.capture


def test_invariant_static_steps_equal_the_eager_ones(adapters: tuple[Any, dict[str, Path]]) -> None:
    """The batch-invariant steps a GPU captures (fixed inputs, whole powers of two of attention blocks)
    give the eager invariant steps' tokens through joins, leaves, capacity growth and a DoRA batch."""
    llama, folders = adapters
    llama = copy.deepcopy(llama)
    llama.config.max_position_embeddings = 512  # room past one block of keys (rotary has no table)
    waves = _waves()
    waves[1].append((list(range(3, 63)) * 2, "b", 20))  # past the first block of 128 columns
    eager, _ = _run(llama, folders, False, waves, invariant=True)
    static, engine = _run(llama, folders, True, waves, invariant=True)
    assert static == eager
    assert [len(t) for t in static] == [30, 6, 40, 12, 25, 5, 20, 20, 18, 9, 6, 4]
    d = engine.rows
    assert d is not None and d.cache.cap >= 256 and d._static
    if DEVICE == "cuda":
        assert d.captures >= 1 and d.capture


def test_models_the_static_path_does_not_cover_stay_dynamic() -> None:
    llama = tiny_llama()
    eager = copy.deepcopy(llama)
    eager.config._attn_implementation = "eager"
    assert "eager" in (GraphDecoder.supported(eager) or "")
    assert GraphDecoder.supported(llama) is None
    assert "causal LM" in (GraphDecoder.supported(tiny_bert()) or "")
