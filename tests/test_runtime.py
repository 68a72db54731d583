"""adapterhub.runtime against PEFT on tiny random models (fp32, CPU)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers.models import make_adapter, tiny_bert, tiny_convnet, tiny_gpt2, tiny_llama  # noqa: E402

from adapterhub.errors import (  # noqa: E402
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidOptionError,
)
from adapterhub.formats import read_adapter  # noqa: E402
from adapterhub.runtime import ResidentAdapter, Runtime, attach  # noqa: E402

DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")  # "cuda" runs the same checks on a GPU
if DEVICE.startswith("cuda"):  # exact fp32 comparisons: no TF32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
ATOL = 1e-5

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _peft(base: Any, paths: dict[str, Path]) -> Any:
    from peft import PeftModel

    items = list(paths.items())
    pm = PeftModel.from_pretrained(copy.deepcopy(base), items[0][1], adapter_name=items[0][0])
    for name, path in items[1:]:
        pm.load_adapter(path, adapter_name=name)
    return pm.to(DEVICE).eval()


def _ids(batch: int = 4, seq: int = 7, vocab: int = 64, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(DEVICE)


def _out(model: Any, x: Any) -> Any:
    with torch.no_grad():
        y = model(x)
    return y if isinstance(y, torch.Tensor) else y.logits


def _close(a: Any, b: Any, atol: float = ATOL) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= atol, f"max abs difference {err}"


def _state(model: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bitwise(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _no_hooks(model: Any) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# --------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny_llama().to(DEVICE)


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory, llama: Any) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama_adapters")
    cpu = copy.deepcopy(llama).cpu()
    specs: dict[str, dict[str, Any]] = {
        "a": dict(seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(seed=2, r=8, lora_alpha=4, target_modules=LLAMA_ALL),
        "c": dict(seed=3, r=2, lora_alpha=2, target_modules=["o_proj", "down_proj"]),
        "rs": dict(
            seed=4,
            r=8,
            lora_alpha=16,
            target_modules=LLAMA_ALL,
            use_rslora=True,
            rank_pattern={"down_proj": 4, "q_proj": 2},
            alpha_pattern={"v_proj": 3},
        ),
        "bias": dict(seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"], lora_bias=True),
        "dora": dict(
            seed=6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True
        ),
        "emb": dict(seed=7, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
    }
    return {n: make_adapter(cpu, root / n, **kw) for n, kw in specs.items()}


@pytest.fixture
def rt(llama: Any) -> Any:
    model = copy.deepcopy(llama)
    runtime = attach(model)
    yield runtime
    runtime.detach()


# --------------------------------------------------------------------------------------- against PEFT


@pytest.mark.parametrize("name", ["a", "b", "rs", "bias", "dora", "emb"])
def test_llama_kinds_match_peft(llama: Any, llama_adapters: dict[str, Path], rt: Runtime, name: str) -> None:
    x = _ids()
    info = rt.load(llama_adapters[name])
    assert isinstance(info, ResidentAdapter) and info.name == name and len(info.sha256) == 64
    base = _out(rt.model, x)
    _close(base, _out(llama, x), 0.0)  # loaded but not active: the base model
    rt.activate(name)
    ours = _out(rt.model, x)
    theirs = _out(_peft(llama, {name: llama_adapters[name]}), x)
    assert (ours - base).abs().max() > 1e-3  # the adapter changes something
    _close(ours, theirs)


def test_gpt2_conv1d_and_embedding_match_peft(tmp_path: Path) -> None:
    base = tiny_gpt2().to(DEVICE)
    plain = make_adapter(
        base.cpu(), tmp_path / "g", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    )
    emb = make_adapter(
        base.cpu(), tmp_path / "e", seed=3, target_modules=["wte", "c_proj"], fan_in_fan_out=True
    )
    dora = make_adapter(
        base.cpu(), tmp_path / "d", seed=4, target_modules=["c_attn", "c_proj"], use_dora=True
    )
    base = base.to(DEVICE)
    x = _ids()
    rt = attach(copy.deepcopy(base))
    for name, path in {"g": plain, "e": emb, "d": dora}.items():
        rt.load(path, name=name)
        rt.activate(name)
        _close(_out(rt.model, x), _out(_peft(base, {name: path}), x))
    rt.detach()


def test_conv2d_matches_peft(tmp_path: Path) -> None:
    base = tiny_convnet().to(DEVICE)
    path = make_adapter(base.cpu(), tmp_path / "conv", target_modules=["conv_in", "mid", "conv_out"])
    dpath = make_adapter(
        base.cpu(), tmp_path / "dconv", seed=5, target_modules=["conv_in", "conv_out"], use_dora=True
    )
    base = base.to(DEVICE)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    rt = attach(copy.deepcopy(base))
    rt.load(path, name="conv")
    rt.load(dpath, name="dconv")
    rt.activate("conv")
    _close(_out(rt.model, x), _out(_peft(base, {"conv": path}), x))
    rt.activate("dconv")
    _close(_out(rt.model, x), _out(_peft(base, {"dconv": dpath}), x))
    rows = ["conv", None, "dconv"]
    with rt.rows(rows):
        mixed = _out(rt.model, x)
    for i, spec in enumerate(rows):
        rt.activate(spec)
        _close(mixed[i : i + 1], _out(rt.model, x[i : i + 1]))
    peft = _peft(base, {"conv": path})  # PEFT refuses adapter_names with DoRA
    with torch.no_grad():
        _close(mixed[:2], peft(x[:2], adapter_names=["conv", "__base__"]))
    rt.detach()


def test_modules_to_save_matches_peft(tmp_path: Path) -> None:
    base = tiny_bert().to(DEVICE)
    p1 = make_adapter(
        base.cpu(), tmp_path / "m1", target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    p2 = make_adapter(
        base.cpu(), tmp_path / "m2", seed=9, target_modules=["query"], modules_to_save=["classifier"]
    )
    base = base.to(DEVICE)
    w = read_adapter(p1)
    assert w.replacement_shapes  # classifier.weight / classifier.bias
    x = _ids(vocab=64)
    rt = attach(copy.deepcopy(base))
    rt.load(p1, name="m1")
    rt.load(p2, name="m2")
    rt.activate("m1")
    _close(_out(rt.model, x), _out(_peft(base, {"m1": p1}), x))
    rt.activate(None)
    with rt.rows(["m2", "m1", None, "m2"]):
        mixed = _out(rt.model, x)
    peft = _peft(base, {"m1": p1, "m2": p2})
    with torch.no_grad():
        _close(mixed, peft(x, adapter_names=["m2", "m1", "__base__", "m2"]).logits)
    with pytest.raises(IncompatibleAdapterError, match="modules_to_save"):
        rt.activate({"m1": 0.5, "m2": 0.5})
    before = _state(rt.model)
    rt.merge("m1")
    _close(_out(rt.model, x), _out(_peft(base, {"m1": p1}), x))
    rt.unmerge()
    _bitwise(_state(rt.model), before)
    rt.detach()


# --------------------------------------------------------------------------------------- mixed batches


@pytest.mark.parametrize("seq", [3, 12])  # short rows: concatenated factors + mask; long: per-row GEMMs
def test_rows_equal_single_runs_and_peft(
    llama: Any, llama_adapters: dict[str, Path], rt: Runtime, seq: int
) -> None:
    names = ["a", "b", "dora", "emb", "bias"]
    for n in names:
        rt.load(llama_adapters[n])
    x = _ids(batch=6, seq=seq)
    rows = ["a", "b", None, "dora", "emb", "bias"]
    with rt.rows(rows):
        mixed = _out(rt.model, x)
    for i, spec in enumerate(rows):
        rt.activate(spec)
        _close(mixed[i : i + 1], _out(rt.model, x[i : i + 1]))
    rt.activate(None)
    # PEFT refuses adapter_names when any loaded adapter is DoRA: compare the other rows
    keep = [i for i, r in enumerate(rows) if r != "dora"]
    peft = _peft(llama, {n: llama_adapters[n] for n in names if n != "dora"})
    with torch.no_grad():
        theirs = peft(x[keep], adapter_names=[rows[i] or "__base__" for i in keep]).logits
    _close(mixed[keep], theirs)


def test_rows_with_combinations_and_generate(
    llama: Any, llama_adapters: dict[str, Path], rt: Runtime
) -> None:
    for n in ("a", "b", "c"):
        rt.load(llama_adapters[n])
    combo = {"a": 0.7, "b": -0.3}
    rows: list[Any] = ["a", combo, None, "c"]
    x = _ids(batch=4, seq=9)
    with rt.rows(rows):
        mixed = _out(rt.model, x)
        gen = rt.model.generate(x, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    assert rt.active is None
    for i, spec in enumerate(rows):
        rt.activate(spec)
        _close(mixed[i : i + 1], _out(rt.model, x[i : i + 1]))
        alone = rt.model.generate(
            x[i : i + 1], max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert torch.equal(gen[i : i + 1], alone)
    # beams repeat each row: the specs follow
    rt.activate(None)
    with rt.rows(["a", "c"]):
        beams = rt.model.generate(
            x[:2], max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0
        )
    for i, spec in enumerate(["a", "c"]):
        rt.activate(spec)
        one = rt.model.generate(
            x[i : i + 1], max_new_tokens=4, min_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0
        )
        assert torch.equal(beams[i : i + 1], one)
    with rt.rows(["a", "b", "c"]), pytest.raises(InvalidOptionError, match="one spec per row"):
        _out(rt.model, x)


# --------------------------------------------------------------------------------------- combination, merge


def test_combination_equals_merge_and_peft(
    tmp_path: Path, llama: Any, llama_adapters: dict[str, Path], rt: Runtime
) -> None:
    from helpers.models import peft_model, save_model

    for n in ("a", "b", "rs"):
        rt.load(llama_adapters[n])
    combo = {"a": 0.7, "b": -0.3, "rs": 1.25}
    x = _ids()
    rt.activate(combo)
    active = _out(rt.model, x)
    before = _state(rt.model)
    rt.merge(combo)
    assert rt.merged == combo
    merged = _out(rt.model, x)
    _close(active, merged, 1e-4)
    rt.activate(combo)  # the merged spec: a no-op, never applied twice
    _close(_out(rt.model, x), merged, 0.0)
    with pytest.raises(InvalidOptionError, match="unmerge"):
        rt.activate("a")
    with pytest.raises(InvalidOptionError, match="unmerge"):
        rt.unload("a")
    rt.unmerge()
    _bitwise(_state(rt.model), before)
    _close(_out(rt.model, x), active, 0.0)  # still active through the hooks
    # PEFT, each adapter's scaling multiplied by its weight
    folder = save_model(llama.cpu(), tmp_path / "base")
    llama.to(DEVICE)
    pm = peft_model(folder, [(llama_adapters[n], w) for n, w in combo.items()]).to(DEVICE)
    _close(active, _out(pm, x), 1e-4)


def test_merge_dora_bias_and_unmerge_exact(llama: Any, llama_adapters: dict[str, Path], rt: Runtime) -> None:
    x = _ids()
    for n in ("dora", "bias", "emb"):
        rt.load(llama_adapters[n])
    before = _state(rt.model)
    for n in ("dora", "emb"):
        rt.activate(n)
        live = _out(rt.model, x)
        rt.merge()
        _close(_out(rt.model, x), live, 1e-4)
        rt.unmerge()
        _bitwise(_state(rt.model), before)
    rt.activate("bias")  # lora_bias on layers that have no bias: refused, nothing changed
    with pytest.raises(IncompatibleAdapterError, match="no bias"):
        rt.merge()
    _bitwise(_state(rt.model), before)


def test_merge_bf16_rounds_once(llama_adapters: dict[str, Path]) -> None:
    model = tiny_llama(dtype=torch.bfloat16).to(DEVICE)
    orig = _state(model)
    rt = attach(model)
    rt.load(llama_adapters["b"], name="b")
    rt.load(llama_adapters["c"], name="c")
    combo = {"b": 0.5, "c": 2.0}
    rt.merge(combo)
    wb, wc = read_adapter(llama_adapters["b"], load=True), read_adapter(llama_adapters["c"], load=True)
    key = "model.layers.1.self_attn.o_proj.weight"
    want = orig[key].float()
    for w, weights in ((0.5, wb), (2.0, wc)):
        m = weights[key]
        # resident factors are bf16 (the layer's dtype): the expected sum uses the same rounding
        a = m.A.to(torch.bfloat16).float()
        b = (m.scale * m.B.float()).to(torch.bfloat16).float()
        want = want + w * (b.to(want.device) @ a.to(want.device))
    assert torch.equal(model.state_dict()[key], want.to(torch.bfloat16))
    rt.unmerge()
    _bitwise(_state(model), orig)
    rt.detach()


# --------------------------------------------------------------------------------------- lifecycle


def test_detach_restores_exactly(llama: Any, llama_adapters: dict[str, Path]) -> None:
    model = copy.deepcopy(llama)
    modules = dict(model.named_modules())
    params = {k: id(p) for k, p in model.named_parameters()}
    before = _state(model)
    rt = attach(model)
    with pytest.raises(InvalidOptionError, match="already attached"):
        attach(model)
    for n in ("b", "dora", "emb"):
        rt.load(llama_adapters[n])
    rt.activate("b")
    rt.merge()
    rt.detach()
    assert _no_hooks(model)
    assert dict(model.named_modules()) == modules
    assert {k: id(p) for k, p in model.named_parameters()} == params
    _bitwise(_state(model), before)
    _close(_out(model, _ids()), _out(llama, _ids()), 0.0)
    with pytest.raises(InvalidOptionError, match="detached"):
        rt.activate(None)
    attach(model).detach()  # may attach again


def test_content_keys_and_stale_names(llama: Any, llama_adapters: dict[str, Path], rt: Runtime) -> None:
    x = _ids()
    rt.load(llama_adapters["a"], name="x")
    rt.load(llama_adapters["a"], name="twin")  # same content: shared
    res = {r.name: r for r in rt.resident}
    assert res["x"].sha256 == res["twin"].sha256 and len(rt._contents) == 1
    rt.activate("x")
    first = _out(rt.model, x)
    rt.load(llama_adapters["b"], name="x")  # a new version under the old name
    assert {r.name: r for r in rt.resident}["x"].sha256 != res["x"].sha256
    now = _out(rt.model, x)  # the active name follows the new content at once
    rt2 = attach(copy.deepcopy(llama))
    rt2.load(llama_adapters["b"], name="b")
    rt2.activate("b")
    _close(now, _out(rt2.model, x), 0.0)
    rt2.detach()
    rt.activate("twin")
    # the old content still serves under "twin" (b's larger rank pads the banks: a GEMM of other
    # widths, so equal up to rounding, not bit for bit)
    _close(_out(rt.model, x), first)
    rt.activate(None)
    rt.unload("twin")
    rt.unload("x")
    assert rt.resident == [] and _no_hooks(rt.model)
    # the same content from LoraWeights has the same key as from the folder
    w = read_adapter(llama_adapters["a"], load=True)
    assert rt.load(w, name="w").sha256 == res["x"].sha256


def test_errors(tmp_path: Path, llama: Any, llama_adapters: dict[str, Path], rt: Runtime) -> None:
    rt.load(llama_adapters["a"])
    with pytest.raises(AdapterNotFoundError, match="not-there.*resident") as err:
        rt.activate("not-there")
    assert isinstance(err.value, LookupError)
    with pytest.raises(AdapterNotFoundError):
        rt.activate({"a": 1.0, "nope": 0.5})
    with pytest.raises(AdapterNotFoundError):
        rt.unload("nope")
    with pytest.raises(AdapterNotFoundError), rt.rows(["a", "nope"]):
        pass
    rt.activate("a")
    with pytest.raises(InvalidOptionError, match="active"):
        rt.unload("a")
    rt.activate(None)
    # an adapter for a wider model: refused with the report, nothing resident or hooked
    wide = tiny_llama(hidden_size=64, intermediate_size=96)
    wpath = make_adapter(wide, tmp_path / "wide", target_modules=["q_proj"])
    before = len(rt.resident)
    with pytest.raises(IncompatibleAdapterError, match="nothing was loaded") as err:
        rt.load(wpath)
    report = err.value.report
    assert report is not None and not report.ok and any(c.check == "base.shape" for c in report.errors)
    assert len(rt.resident) == before and "wide" not in {r.name for r in rt.resident}
    # an adapter that targets nothing this model has: refused loudly
    gpath = make_adapter(tiny_gpt2(), tmp_path / "gpt2", target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(IncompatibleAdapterError, match="matches no tensor"):
        rt.load(gpath)
    dora = rt.load(llama_adapters["dora"])
    with pytest.raises(IncompatibleAdapterError, match="DoRA"):
        rt.activate({dora.name: 0.5})
    with pytest.raises(InvalidOptionError, match="name="):
        rt.load(read_adapter(llama_adapters["a"], load=True))
    with pytest.raises(InvalidOptionError, match="nothing to merge"):
        rt.merge(None)


def test_tied_embedding_merge_refused(tmp_path: Path) -> None:
    base = tiny_llama(tie=True)
    path = make_adapter(base, tmp_path / "t", target_modules=["embed_tokens"])
    rt = attach(copy.deepcopy(base).to(DEVICE))
    rt.load(path, name="t")
    rt.activate("t")
    x = _ids()
    _close(_out(rt.model, x), _out(_peft(base.to(DEVICE), {"t": path}), x))
    with pytest.raises(IncompatibleAdapterError, match="tied"):
        rt.merge()
    rt.detach()


def test_switching_reuses_selection(llama_adapters: dict[str, Path], rt: Runtime) -> None:
    for n in ("a", "b", "c"):
        rt.load(llama_adapters[n])
    rt.activate("a")
    sel = rt._state.sel
    rt.activate("c")
    assert rt._state.sel is sel and sel.slots == (rt._contents[rt._names["c"]].slot,)
    rt.activate({"a": 0.5, "b": 0.5})
    sel2 = rt._state.sel
    rt.activate({"b": 0.1, "c": 2.0})
    assert rt._state.sel is sel2


def test_compile_no_recompile_on_switch(llama: Any, llama_adapters: dict[str, Path], rt: Runtime) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    for n in ("a", "b", "c"):
        rt.load(llama_adapters[n])
    counter = CompileCounter()
    compiled = torch.compile(rt.model, backend=counter)
    x = _ids()
    outs = {}
    for n in ("a", "b", "c", "a"):
        rt.activate(n)
        outs[n] = _out(compiled, x)
        rt.model.eval()
        _close(outs[n], _out(rt.model, x), 1e-5)
    assert counter.frame_count == 1, counter.frame_count
    torch._dynamo.reset()


def test_works_without_database_libraries(llama_adapters: dict[str, Path]) -> None:
    """A GPU box has torch, safetensors and transformers only: read, load, activate, merge, detach."""
    code = (
        "import sys\n"
        "for m in ('sqlalchemy', 'alembic', 'jsonschema'): sys.modules[m] = None\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from adapterhub.runtime import attach\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,\n"
        "    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()\n"
        "rt = attach(model)\n"
        "rt.load(sys.argv[1], name='a')\n"
        "rt.activate('a'); rt.merge(); rt.unmerge(); rt.detach()\n"
        "bad = [m for m in sys.modules if m.startswith(('adapterhub.catalog', 'adapterhub.store', 'adapterhub.hub'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code, str(llama_adapters["a"])], check=True)


def test_public_surface() -> None:
    import adapterhub.runtime as r

    assert r.__all__ == sorted(r.__all__)
    assert {n for n in dir(r) if not n.startswith("_") and n not in {"annotations", "runtime"}} >= set(
        r.__all__
    )


def test_many_resident_grow_the_banks(llama_adapters: dict[str, Path], rt: Runtime) -> None:
    import dataclasses

    rt.load(llama_adapters["a"])
    base = read_adapter(llama_adapters["a"], load=True)
    n = 11  # more than the first bank capacity (8 slots)
    for i in range(n):
        mods = {k: dataclasses.replace(m, scale=m.scale * (i + 2)) for k, m in base.modules.items()}
        rt.load(dataclasses.replace(base, modules=mods), name=f"s{i}")
    assert len({r.sha256 for r in rt.resident}) == n + 1
    x = _ids(batch=3, seq=10)
    with rt.rows(["s10", None, "s3"]):
        mixed = _out(rt.model, x)
    for row, w in ((0, 12.0), (2, 5.0)):
        rt.activate({"a": w})
        _close(mixed[row : row + 1], _out(rt.model, x[row : row + 1]), 1e-4)
    rt.activate(None)
    # a base row adds nothing: bit-exact against the base model on the same batch (not against a
    # batch of one: CPU and GPU GEMM kernels both pick their blocking by the batch size)
    _close(mixed[1:2], _out(rt.model, x)[1:2], 0.0)


def test_merged_layers_leave_the_forward_and_come_back(
    llama: Any, llama_adapters: dict[str, Path], rt: Runtime
) -> None:
    """While merged, no adapted module keeps a hook or a fused forward (the base's own forwards run, at
    its speed); unmerge puts them back and the spec is served through them again."""
    model = rt.model
    x = _ids()
    rt.load(llama_adapters["b"])
    rt.load(llama_adapters["emb"])  # an embedding (hooked) and linears (fused forwards)
    rt.activate("emb")
    live = _out(model, x)
    rt.merge()
    assert _no_hooks(model) and all("forward" not in m.__dict__ for m in model.modules())
    _close(_out(model, x), live, 1e-4)
    rt.load(llama_adapters["c"])  # loaded while merged: its layers wait outside the forwards too
    assert _no_hooks(model)
    rt.unmerge()
    assert not _no_hooks(model) and "forward" in model.model.layers[0].self_attn.q_proj.__dict__
    _close(_out(model, x), live, 1e-5)
    rt.activate("b")
    _out(model, x)
    # families outlive the merge: q, k, v still share one shrink, o (another input) stays out
    fam = rt._layers["model.layers.0.self_attn.q_proj"].family
    assert fam is not None and len(fam.members) == 3
    assert rt._layers["model.layers.0.self_attn.o_proj"].family is None
    rt.activate("c")
    fresh = attach(copy.deepcopy(llama))
    fresh.load(llama_adapters["c"])
    fresh.activate("c")
    _close(_out(model, x), _out(fresh.model, x))
    fresh.detach()


def test_residency_slots_lru_budget_and_the_term_each_selection_takes(
    llama_adapters: dict[str, Path], rt: Runtime
) -> None:
    from adapterhub.runtime import RowTable
    from adapterhub.runtime._term import CONCAT, MASKED, Table

    res = rt.residency
    for n in ("a", "b", "c"):
        rt.load(llama_adapters[n])
    key = {r.name: r.sha256 for r in rt.resident}
    assert res.lru() == [key["a"], key["b"], key["c"]]
    rt.activate("a")  # a selection marks what it uses as just used
    assert res.lru() == [key["b"], key["c"], key["a"]] and rt._state.sel is not None
    assert rt._state.sel.term is CONCAT
    with rt.rows(["b", None]):
        assert rt._state.sel.term is MASKED and res.lru()[-1] == key["b"]
    assert res.lru() == [key["c"], key["b"], key["a"]]  # leaving the block selects the active "a" again
    table = RowTable(rt, rows=2)
    table.set(["a", "c"])
    with table.applied():
        assert isinstance(rt._state.sel.term, Table)
    size = {r.name: r.bytes for r in rt.resident}
    assert res.victims(10**9) == []  # no budget: nothing to evict
    res.budget = res.used_bytes
    assert res.victims(0) == []
    assert res.victims(1) == [key["c"]]  # the least recently used first
    assert res.victims(size["c"] + 1) == [key["c"], key["b"]]
    assert res.victims(1, pinned={key["c"]}) == [key["b"]]
    assert res.victims(res.used_bytes + 1) is None  # cannot fit even with everything gone
    rt.activate(None)
    rt.unload("c")
    assert res.lru() == [key["b"], key["a"]] and key["c"] not in res.contents
