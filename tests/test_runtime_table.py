"""Row tables: per-row adapters through fixed buffers (the CUDA-graph decode path) equal `rt.rows`."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers.models import make_adapter, tiny_gpt2, tiny_llama  # noqa: E402

from adapterhub.errors import IncompatibleAdapterError, InvalidOptionError  # noqa: E402
from adapterhub.runtime import RowTable, attach  # noqa: E402
from adapterhub.runtime._rowkernel import _torch, _triton, rows_term  # noqa: E402

DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _naive(x: Any, first: Any, second: Any, slots: Any, coef: Any, out: Any) -> Any:
    n = slots.shape[0]
    per = x.shape[0] // n
    ref = out.double().clone()
    for t in range(x.shape[0]):
        for m in range(slots.shape[1]):
            s = int(slots[t // per, m])
            if s >= 0:
                h = first[s].double() @ x[t].double()
                ref[t] += float(coef[t // per, m]) * (second[s].double().T @ h)
    return ref


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 1, 1, 16, 48, 40), (4, 3, 2, 8, 33, 70), (6, 1, 3, 5, 64, 64)])
def test_the_row_kernel_adds_each_rows_own_term(dtype: str, shape: tuple[int, ...]) -> None:
    n, per, m, r, n_in, n_out = shape
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(n * per, n_in, generator=g).to(DEVICE, dt)
    first = torch.randn(7, r, n_in, generator=g).to(DEVICE, dt)
    second = torch.randn(7, r, n_out, generator=g).to(DEVICE, dt)
    slots = torch.randint(-1, 7, (n, m), generator=g)
    slots[0] = -1  # a base row
    slots, coef = slots.to(DEVICE), torch.randn(n, m, generator=g).to(DEVICE)
    out0 = torch.randn(n * per, n_out, generator=g).to(DEVICE, dt)
    ref = _naive(x.cpu(), first.cpu(), second.cpu(), slots.cpu(), coef.cpu(), out0.cpu())
    runs = {"torch": _torch}
    if DEVICE == "cuda" and _triton() is not None:
        runs["triton"] = _triton()
    for label, fn in runs.items():
        out = out0.clone()
        fn(x, first, second, slots, coef, out)
        err = (out.cpu().double() - ref).abs().max().item()
        tol = 1e-4 if dt == torch.float32 else ref.abs().max().item() / 64  # one rounding of the sum
        assert err <= tol, (label, err)
        assert torch.equal(out[:per], out0[:per]), label  # rows without a slot stay bit for bit
    out = out0.clone()
    rows_term(x, first, second, slots, coef, out)  # the dispatcher picks one of the above
    assert (out.cpu().double() - ref).abs().max().item() <= (
        1e-4 if dt == torch.float32 else ref.abs().max().item() / 64
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_rows_term_does_not_depend_on_the_other_rows_or_their_slots(dtype: str) -> None:
    """What the batch-invariant decode steps rely on: a row's term is the same to the bit alone (one slot
    column) and among other rows that use more slots (its own padded with empty ones)."""
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(3)
    n_in, n_out, r = 96, 200, 8
    first = torch.randn(6, r, n_in, generator=g).to(DEVICE, dt)
    second = torch.randn(6, r, n_out, generator=g).to(DEVICE, dt)
    x = torch.randn(16, n_in, generator=g).to(DEVICE, dt)
    out0 = torch.randn(16, n_out, generator=g).to(DEVICE, dt)
    runs = {"torch": _torch}
    if DEVICE == "cuda" and _triton() is not None:
        runs["triton"] = _triton()
    for label, fn in runs.items():
        alone = out0[:1].clone()
        fn(
            x[:1],
            first,
            second,
            torch.tensor([[2]], device=DEVICE),
            torch.tensor([[0.7]], device=DEVICE),
            alone,
        )
        slots = torch.randint(0, 6, (16, 4), generator=g)
        slots[0] = torch.tensor([2, -1, -1, -1])
        coef = torch.randn(16, 4, generator=g)
        coef[0, 0] = 0.7
        batch = out0.clone()
        fn(x, first, second, slots.to(DEVICE), coef.to(DEVICE), batch)
        assert torch.equal(batch[:1], alone), label


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    llama = tiny_llama()
    root = tmp_path_factory.mktemp("table")
    specs = {
        "a": dict(seed=21, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        "b": dict(seed=22, r=8, lora_alpha=4, target_modules=LLAMA_ALL),
        "c": dict(seed=23, r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj", "o_proj"]),
    }
    return llama, {n: make_adapter(llama, root / n, **kw) for n, kw in specs.items()}


def _decode(model: Any, ids: Any, run: Any) -> Any:
    """Prefill ``ids[:, :-1]`` eagerly with the base, then one decode step under ``run``."""
    with torch.no_grad():
        out = model(ids[:, :-1], use_cache=True)
        with run():
            return model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits


def test_a_table_decode_step_equals_rt_rows(setup: tuple[Any, dict[str, Path]]) -> None:
    llama, paths = setup
    model = copy.deepcopy(llama).to(DEVICE).eval()
    rt = attach(model)
    for n, p in paths.items():
        rt.load(p, name=n)
    specs: list[Any] = ["a", "b", None, "c", {"a": 0.7, "b": -0.3}, "b"]
    ids = torch.randint(0, 64, (len(specs), 6), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    ref = _decode(model, ids, lambda: rt.rows(specs))
    base = _decode(model, ids, lambda: rt.rows([None] * len(specs)))
    table = RowTable(rt, rows=len(specs), width=2)
    table.set(specs)
    got = _decode(model, ids, table.applied)
    assert (got - ref).abs().max().item() <= 1e-5
    assert torch.equal(got[2], base[2])  # the base row, bit for bit
    # another mix into the same buffers: the same table (and a graph captured under it) follows
    table.set(["c", None, "a"])
    got = _decode(model, ids, table.applied)
    ref = _decode(model, ids, lambda: rt.rows(["c", None, "a", None, None, None]))
    assert (got - ref).abs().max().item() <= 1e-5
    assert rt._state.sel is None or not rt._state.sel.table  # the block put the selection back
    rt.detach()


def test_a_table_refuses_what_it_cannot_serve(setup: tuple[Any, dict[str, Path]], tmp_path: Path) -> None:
    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(paths["a"], name="a")
    rt.load(paths["c"], name="c")
    dora = make_adapter(llama, tmp_path / "dora", seed=31, r=4, target_modules=["q_proj"], use_dora=True)
    rt.load(dora, name="dora")
    table = RowTable(rt, rows=2)
    table.set(["a", None])
    before = table.slots.clone()
    with pytest.raises(IncompatibleAdapterError, match="DoRA"):
        table.set(["dora", "a"])
    with pytest.raises(InvalidOptionError, match="combines 2"):
        table.set([{"a": 0.5, "c": 0.5}])  # a table of width 1
    with pytest.raises(InvalidOptionError, match="3 specs"):
        table.set(["a", "a", "a"])
    assert torch.equal(table.slots, before)  # nothing changed
    assert table.current
    rt.load(paths["b"], name="b")  # new modules, a higher rank: new banks
    assert not table.current
    with pytest.raises(InvalidOptionError, match="banks changed"):
        table.set(["b"])
    RowTable(rt, rows=2).set(["b", "a"])
    rt.detach()


def test_gpt2_conv1d_layers_take_the_table_too(tmp_path: Path) -> None:
    gpt2 = tiny_gpt2()
    path = make_adapter(gpt2, tmp_path / "g", seed=41, r=4, target_modules=["c_attn", "c_proj"])
    model = copy.deepcopy(gpt2).eval()
    rt = attach(model)
    rt.load(path, name="g")
    ids = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    ref = _decode(model, ids, lambda: rt.rows(["g", None, "g"]))
    table = RowTable(rt, rows=3)
    table.set(["g", None, "g"])
    got = _decode(model, ids, table.applied)
    assert (got - ref).abs().max().item() <= 1e-5
    rt.detach()


def test_an_unused_resident_adapter_on_another_layer_kind_does_not_stop_a_table(
    setup: tuple[Any, dict[str, Path]], tmp_path: Path
) -> None:
    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(paths["a"], name="a")
    emb = make_adapter(llama, tmp_path / "emb", seed=61, r=4, target_modules=["embed_tokens", "q_proj"])
    rt.load(emb, name="emb")  # an embedding layer is hooked now; no table row may use it
    table = RowTable(rt, rows=2)
    assert any(layer.kind == "embedding" and layer.lora_A is not None for layer in rt._layers.values())
    with pytest.raises(IncompatibleAdapterError, match="serves plain LoRA only"):
        table.set(["emb", None])
    table.set(["a", None])
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    got = _decode(model, ids, table.applied)
    ref = _decode(model, ids, lambda: rt.rows(["a", None]))
    assert (got - ref).abs().max().item() <= 1e-5
    rt.detach()
