"""The server's pool evicts by the runtime's own `Residency`: one LRU order (bumped by the runtime's
selections and by the pool's pins alike), one byte budget, the victims `Residency.victims` names and no
others, never a pinned content; driven on the calling thread (no scheduler thread, no HTTP)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers.models import make_adapter, tiny_llama  # noqa: E402
from test_serve_graphs import LLAMA_ALL, _Folders  # noqa: E402

from adapterhub.formats import read_adapter  # noqa: E402
from adapterhub.runtime import attach  # noqa: E402
from adapterhub.server.inference.metrics import Metrics  # noqa: E402
from adapterhub.server.inference.pool import AdapterPool, Entry  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path], dict[str, int]]:
    """A tiny llama, four adapters of distinct sizes, and each one's bytes of factors (fp32)."""
    llama = tiny_llama()
    root = tmp_path_factory.mktemp("residency")
    specs = {
        "a": dict(seed=71, r=4, lora_alpha=8, target_modules=LLAMA_ALL),
        "b": dict(seed=72, r=8, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "c": dict(seed=73, r=2, lora_alpha=2, target_modules=["gate_proj", "o_proj"]),
        "d": dict(seed=74, r=1, lora_alpha=2, target_modules=["q_proj"]),
    }
    folders = {n: make_adapter(llama, root / n, **kw) for n, kw in specs.items()}
    size = {}
    for n, p in folders.items():
        w = read_adapter(p, load=True)
        size[f"sha-{n}"] = 4 * sum(t.numel() for m in w.modules.values() for t in (m.A, m.B) if t is not None)
    return llama, folders, size


def _pool(llama: Any, folders: dict[str, Path]) -> tuple[Any, AdapterPool, list[int]]:
    rt = attach(copy.deepcopy(llama).eval())
    return rt, AdapterPool(_Folders(folders), rt, "tiny", budget=None, metrics=Metrics()), []


def _bring(pool: AdapterPool, closes: list[int], *names: str, give_up: float = 60.0) -> bool:
    """Request ``names`` and run the pool's installs (as the scheduler does) until they are resident."""
    for n in names:
        pool.request(Entry(n, f"sha-{n}", False, 0))
    shas = tuple(f"sha-{n}" for n in names)
    deadline = time.monotonic() + give_up
    while not pool.ready(shas):
        assert pool.problem(shas) is None
        pool.install(lambda: closes.append(1), [])
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def test_the_pool_evicts_the_runtimes_lru_victim_never_a_pinned_one_within_the_budget(
    setup: tuple[Any, dict[str, Path], dict[str, int]],
) -> None:
    llama, folders, size = setup
    rt, pool, closes = _pool(llama, folders)
    res = rt.residency
    assert pool.residency is res and pool.budget is None and res.budget is None
    for n in ("a", "b", "c"):  # one at a time: the load order is the LRU order
        assert _bring(pool, closes, n)
    assert res.lru() == ["sha-a", "sha-b", "sha-c"]
    assert {s: res.contents[s].bytes for s in res.lru()} == {s: size[s] for s in res.lru()}
    with rt.rows(["sha-a", None]):  # the runtime's selection marks a used ...
        pass
    pool.pin(("sha-b",))  # ... and so does a request the pool starts
    pool.unpin(("sha-b",))
    assert res.lru() == ["sha-c", "sha-a", "sha-b"]

    # the budget is the runtime's: full now, so d evicts exactly what the residency names (c, the oldest)
    res.budget = res.used_bytes
    assert pool.budget == res.budget
    expected = res.victims(size["sha-d"])
    assert expected == ["sha-c"]
    assert _bring(pool, closes, "d")
    assert res.lru() == ["sha-a", "sha-b", "sha-d"] and "sha-c" not in res.contents
    assert sorted(r.name for r in rt.resident) == ["sha-a", "sha-b", "sha-d"]
    assert pool.metrics.evictions == 1 and res.used_bytes <= res.budget
    assert list(pool.metrics.resident) == res.lru()
    assert {s: b for s, (_, b) in pool.metrics.resident.items()} == {s: size[s] for s in res.lru()}

    # a pinned content is skipped even when it is the least recently used one
    pool.pin(("sha-a",))
    with rt.rows(["sha-b", "sha-d"]):
        pass
    assert res.lru() == ["sha-a", "sha-b", "sha-d"]
    res.budget = res.used_bytes
    expected = res.victims(size["sha-c"], pinned={"sha-a"})
    assert expected == ["sha-b"] and res.victims(size["sha-c"]) == ["sha-a"]
    assert _bring(pool, closes, "c")
    assert res.lru() == ["sha-a", "sha-d", "sha-c"] and "sha-b" not in res.contents
    assert pool.metrics.evictions == 2 and res.used_bytes <= res.budget

    # nothing can make room while every resident content is pinned: b waits, nothing is evicted
    pool.pin(("sha-d", "sha-c"))
    assert res.victims(size["sha-b"], pinned={"sha-a", "sha-d", "sha-c"}) is None
    assert not _bring(pool, closes, "b", give_up=0.5)
    assert pool.metrics.evictions == 2 and res.lru() == ["sha-a", "sha-d", "sha-c"]
    assert pool.problem(("sha-b",)) is None  # waiting, not refused
    # once the requests end, b comes in and the residency's victims (oldest first) make its room
    pool.unpin(("sha-a", "sha-d", "sha-c"))
    expected = res.victims(size["sha-b"])
    assert expected is not None and expected[0] == "sha-a"
    assert _bring(pool, closes, "b")
    assert not set(expected) & set(res.contents) and res.lru()[-1] == "sha-b"
    assert pool.metrics.evictions == 2 + len(expected) and res.used_bytes <= res.budget
    assert list(pool.metrics.resident) == res.lru()
    rt.detach()


def test_evicting_a_content_unbinds_every_name_and_over_budget_content_is_refused_by_hash(
    setup: tuple[Any, dict[str, Path], dict[str, int]],
) -> None:
    llama, folders, size = setup
    rt, pool, closes = _pool(llama, {**folders, "alice/secret": folders["a"]})
    res = rt.residency
    assert _bring(pool, closes, "a")
    rt.load(folders["a"], name="alias", sha256="sha-a")  # the same content under a second name
    assert res.names_of("sha-a") == ["sha-a", "alias"] and len(res.contents) == 1
    assert pool.evict("sha-a", lambda: closes.append(1))
    assert res.contents == {} and res.names == {} and pool.metrics.evictions == 1
    assert pool.metrics.resident == {}

    res.budget = size["sha-d"]  # d fits alone; a never can: refused, naming the content, not its asker
    assert _bring(pool, closes, "d")
    pool.request(Entry("alice/secret", "sha-a", True, 0))
    deadline = time.monotonic() + 60
    while pool.problem(("sha-a",)) is None and time.monotonic() < deadline:
        pool.install(lambda: closes.append(1), [])
        time.sleep(0.002)
    why = str(pool.problem(("sha-a",)))
    assert "budget" in why and "sha256:sha-a" in why and "alice" not in why
    assert res.lru() == ["sha-d"] and pool.metrics.evictions == 1  # nothing evicted for it
    rt.detach()
