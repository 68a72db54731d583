"""The fused linear path of the runtime (low-rank term first, base GEMM onto it; siblings share x @ A.T)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from helpers.models import make_adapter, tiny_llama  # noqa: E402
from torch import nn  # noqa: E402

from adapterhub.errors import InvalidOptionError  # noqa: E402
from adapterhub.lora import LoraModule, LoraWeights  # noqa: E402
from adapterhub.runtime import attach  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _ids(batch: int, seq: int, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (batch, seq), generator=g)


def _out(model: Any, x: Any) -> Any:
    with torch.no_grad():
        return model(x).logits


def _close(a: Any, b: Any, atol: float = 1e-5) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= atol


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    llama = tiny_llama()
    root = tmp_path_factory.mktemp("fused")
    specs = {
        "a": dict(seed=11, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]),
        "b": dict(seed=12, r=8, lora_alpha=4, target_modules=LLAMA_ALL),
        "c": dict(seed=13, r=2, lora_alpha=2, target_modules=["gate_proj", "up_proj", "o_proj"]),
        "d": dict(seed=14, r=6, lora_alpha=6, target_modules=LLAMA_ALL, rank_pattern={"k_proj": 2}),
    }
    return llama, {n: make_adapter(llama, root / n, **kw) for n, kw in specs.items()}


def test_linears_take_the_fused_forward_and_detach_removes_it(setup: tuple[Any, dict[str, Path]]) -> None:
    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(paths["b"])
    attn = model.model.layers[0].self_attn
    assert "forward" in attn.q_proj.__dict__ and not attn.q_proj._forward_hooks
    fam = rt._layers["model.layers.0.self_attn.q_proj"].family
    assert fam is not None and len(fam.members) == 4  # q, k, v, o: same parent, same input width
    rt.activate("b")
    _out(model, _ids(2, 5))
    # o_proj sees the attention output, not the hidden states q, k, v share: it left the family
    assert {m.name.rsplit(".", 1)[-1] for m in fam.members} == {"q_proj", "k_proj", "v_proj"}
    assert fam._pending is None and fam._x is None  # no activation held after the forward
    rt.detach()
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("seq", [1, 3, 12])  # decode-like rows (masked), short rows, long rows (per row)
def test_mixed_rows_equal_single_runs_and_peft(setup: tuple[Any, dict[str, Path]], seq: int) -> None:
    from peft import PeftModel

    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    for n in "abcd":
        rt.load(paths[n])
    rows: list[Any] = ["a", "b", None, "c", {"a": 0.5, "d": -1.5}, "d", "b"]
    x = _ids(len(rows), seq)
    with rt.rows(rows):
        mixed = _out(model, x)
        again = _out(model, x)  # the cached gathers and masks of the selection
    _close(mixed, again, 0.0)
    for i, spec in enumerate(rows):
        rt.activate(spec)
        _close(mixed[i : i + 1], _out(model, x[i : i + 1]))
    rt.activate(None)
    pm = PeftModel.from_pretrained(copy.deepcopy(llama), paths["a"], adapter_name="a")
    for n in "bcd":
        pm.load_adapter(paths[n], adapter_name=n)
    pm.eval()
    keep = [i for i, r in enumerate(rows) if not isinstance(r, dict)]
    with torch.no_grad():
        theirs = pm(x[keep], adapter_names=[rows[i] or "__base__" for i in keep]).logits
    _close(mixed[keep], theirs)
    rt.detach()


def test_plans_follow_the_selection_the_banks_the_shape_and_grad_mode(
    setup: tuple[Any, dict[str, Path]],
) -> None:
    """A layer's `CallPlan` (its work for one selection and input shape, made on the first call) is never
    used for another selection, other bank contents, another shape or with gradients on."""
    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(paths["b"])
    rt.load(paths["d"])
    x = _ids(3, 5)
    with rt.rows(["b", "d", None]):
        first = _out(model, x)
        layers = [layer for layer in rt._layers.values() if layer.forward is not None]
        assert layers and all(layer.plan is not None for layer in layers)
        _close(_out(model, x), first, 0.0)  # through the plans
        short = _out(model, x[:, :2])  # another shape: new plans
        _close(short, _out(model, x[:, :2]), 0.0)
        with torch.enable_grad():  # gradients on: the general path, same numbers
            _close(model(x).logits.detach(), first)
    rt.activate("b")
    _close(_out(model, x)[:1], first[:1])
    _close(_out(model, x)[:1], first[:1])
    rt.load(paths["c"], name="b")  # new content under the active name: the plans are dropped
    fresh = attach(copy.deepcopy(llama).eval())
    fresh.load(paths["c"], name="b")
    fresh.activate("b")
    _close(_out(model, x), _out(fresh.model, x))  # (banks padded to d's rank here: rounding only)
    fresh.detach()
    rt.detach()
    assert all(layer.plan is None for layer in layers)


def test_a_sibling_that_joins_later_shares_h_and_no_activation_is_held(
    setup: tuple[Any, dict[str, Path]], tmp_path: Path
) -> None:
    """q's plan was made while it had no siblings; when k and v join its family, q shares ``h`` with
    them (its plan is dropped), so nothing is left pending after a forward."""
    llama, _ = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(make_adapter(llama, tmp_path / "q", seed=21, r=4, target_modules=["q_proj"]), name="q")
    x = _ids(2, 3)
    rt.activate("q")
    _out(model, x)
    _out(model, x)  # through q's plan
    rt.load(
        make_adapter(llama, tmp_path / "kv", seed=22, r=4, target_modules=["k_proj", "v_proj"]), name="kv"
    )
    fam = rt._layers[next(n for n in rt._layers if n.endswith("layers.0.self_attn.q_proj"))].family
    assert fam is not None and len(fam.members) == 3
    alone = _out(model, x)  # the same selection ("q" is still active): q's old plan must not be used
    assert fam._pending is None and fam._x is None
    rt.activate({"q": 1.0, "kv": 1.0})
    ours = _out(model, x)
    _out(model, x)
    assert fam._pending is None
    fresh = attach(copy.deepcopy(llama).eval())
    fresh.load(tmp_path / "q", name="q")
    fresh.load(tmp_path / "kv", name="kv")
    fresh.activate("q")
    _close(alone, _out(fresh.model, x))
    fresh.activate({"q": 1.0, "kv": 1.0})
    _close(ours, _out(fresh.model, x))
    fresh.detach()
    rt.detach()


def test_same_spec_on_every_row_is_activate(setup: tuple[Any, dict[str, Path]]) -> None:
    llama, paths = setup
    model = copy.deepcopy(llama).eval()
    rt = attach(model)
    rt.load(paths["b"])
    x = _ids(4, 6)
    with rt.rows(["b"] * 4):
        assert rt._state.sel is not None and rt._state.sel.rows is None and rt._state.sel.unit
        rows = _out(model, x)
    rt.activate("b")
    _close(rows, _out(model, x), 0.0)
    rt.activate(None)
    with rt.rows(["b"] * 3), pytest.raises(InvalidOptionError, match="one spec per row"):
        _out(model, x)
    with rt.rows(["b"] * 2):  # a multiple: generate with beams repeats each row
        _close(_out(model, x), rows, 0.0)
    rt.detach()


class _Siblings(nn.Module):
    """Two linears under one parent with the same input width, fed different inputs (cross attention)
    or the same input mutated in place between them; one with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 6, bias=True)
        self.b = nn.Linear(8, 5, bias=False)

    def forward(self, x: Any, y: Any = None, mutate: bool = False) -> Any:
        ya = self.a(x)
        if mutate:
            x.mul_(2.0)
        yb = self.b(x if y is None else y)
        return ya, yb


def _weights(model: _Siblings, seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for name in ("a", "b"):
        lin = getattr(model, name)
        out_f, in_f = lin.weight.shape
        mods[f"{name}.weight"] = LoraModule(
            key=f"{name}.weight",
            kind="linear",
            rank=3,
            alpha=6.0,
            scale=2.0,
            a_shape=(3, in_f),
            b_shape=(out_f, 3),
            A=torch.randn(3, in_f, generator=g),
            B=torch.randn(out_f, 3, generator=g),
        )
    return LoraWeights(modules=mods, format="peft", config={"r": 3, "lora_alpha": 6})


def _expected(model: _Siblings, w: LoraWeights, x: Any, y: Any, mutate: bool) -> tuple[Any, Any]:
    ma, mb = w.modules["a.weight"], w.modules["b.weight"]
    lin = nn.functional.linear  # the modules themselves are adapted now
    ya = lin(x, model.a.weight, model.a.bias) + 2.0 * (x @ ma.A.T) @ ma.B.T
    xb = x * 2.0 if mutate else (x if y is None else y)
    yb = lin(xb, model.b.weight) + 2.0 * (xb @ mb.A.T) @ mb.B.T
    return ya, yb


@pytest.mark.parametrize("case", ["same", "other", "mutated"])
def test_siblings_with_other_inputs_stay_exact(case: str) -> None:
    torch.manual_seed(0)
    model = _Siblings().eval()
    rt = attach(model)
    w = _weights(model, 1)
    rt.load(w, name="w", sha256="w")
    rt.activate("w")
    for _ in range(3):  # the family learns who shares its input; every call stays exact
        x = torch.randn(4, 8)
        y = torch.randn(4, 8) if case == "other" else None
        with torch.no_grad():
            want = _expected(model, w, x.clone(), y, case == "mutated")
            got = model(x, y, mutate=case == "mutated")
        _close(got[0], want[0])
        _close(got[1], want[1])
    fam = rt._layers["a"].family
    if case == "same":
        assert fam is not None and len(fam.members) == 2
    else:  # b saw another input (or one changed in place) than the a that computed for it
        assert rt._layers["b"].family is None
    rt.detach()


def test_load_refuses_non_finite_values_and_attaches_nothing(
    setup: tuple[Any, dict[str, Path]], tmp_path: Path
) -> None:
    """Values are checked where the tensors land (one kernel on a GPU), before anything is attached."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapterhub.errors import InvalidAdapterError
    from adapterhub.formats import read_adapter

    device = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")
    llama, paths = setup
    bad = tmp_path / "bad"
    shutil.copytree(paths["b"], bad)
    st = bad / "adapter_model.safetensors"
    tensors = load_file(st)
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, st)
    model = copy.deepcopy(llama).to(device).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rt = attach(model)
    with pytest.raises(InvalidAdapterError, match="NaN/Inf"):
        rt.load(bad)
    with pytest.raises(InvalidAdapterError, match="NaN/Inf"):
        rt.load(read_adapter(bad, load=True, check_values=False), name="w")
    assert rt.resident == [] and not rt._layers
    assert all("forward" not in m.__dict__ and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    r = rt.load(paths["b"])  # a sound one still loads, and its key is its content
    assert rt.load(paths["b"], name="again").sha256 == r.sha256
    rt.detach()
