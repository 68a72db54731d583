"""adapterhub.ops.combine against PEFT (the reference) and against dense linear algebra.

Tiny random models built from configs (no downloads); adapters made with PEFT's get_peft_model with
random lora_B so every delta is nonzero.

Where PEFT's definitions differ from ours (documented in the assertions below):
- PEFT's ``linear`` / ``ties`` / ... (without ``_svd``) combine A's and B's separately (cross terms);
  only ``cat`` and the ``*_svd`` variants are weighted sums of deltas, so those are what we compare to.
- PEFT's combined adapter inherits ``use_rslora`` from the first input while setting ``r = lora_alpha``,
  so with an rslora adapter first its result is scaled by ``sqrt(r)``; our inputs put a plain one first.
- PEFT draws DARE masks from the global generator after its own new-adapter initialisation has consumed
  random numbers; the test reseeds right before the first mask, and our ``seed`` seeds a generator that
  draws the same masks in the same order (module by module in model order, adapter by adapter).
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from adapterhub.errors import (  # noqa: E402
    IncompatibleAdapterError,
    InvalidAdapterError,
    UnknownMethodError,
)
from adapterhub.formats import read_adapter, write_adapter  # noqa: E402
from adapterhub.lora import LoraModule, LoraWeights  # noqa: E402
from adapterhub.ops.combine import (  # noqa: E402
    COMBINE_METHODS,
    AdapterExpr,
    combine,
    combine_methods,
    extract,
    resize,
)
from adapterhub.ops.registry import Registry  # noqa: E402

torch.set_num_threads(2)

WEIGHTS = [0.7, -0.4, 1.3]


def _llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
    )


def make_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(_llama_config()).eval()


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make_adapter(dest: Path, seed: int, model_factory=make_base, **lora: object) -> Path:
    model = get_peft_model(model_factory(), LoraConfig(**lora))
    _randomize(model, seed)
    model.save_pretrained(str(dest), save_embedding_layers=False)
    return dest


ADAPTERS = {
    # plain, q and v
    "a1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    # rslora, another rank, another target set, an embedding
    "a2": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "down_proj", "embed_tokens"]),
    # rank and alpha patterns
    "a3": dict(
        r=6,
        lora_alpha=12,
        target_modules=["v_proj", "o_proj"],
        rank_pattern={"o_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
}

# q and v only, so that module order in the file and in the model agree (DARE's RNG stream)
DENSE_ADAPTERS = {
    "d1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "d2": dict(r=8, lora_alpha=16, use_rslora=True, target_modules=["q_proj"]),
    "d3": dict(r=6, lora_alpha=12, target_modules=["v_proj"], alpha_pattern={"v_proj": 3}),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    specs = {**ADAPTERS, **DENSE_ADAPTERS}
    return {
        name: make_adapter(root / name, seed, **spec) for seed, (name, spec) in enumerate(specs.items(), 1)
    }


@pytest.fixture(scope="module")
def loaded(folders: dict[str, Path]) -> dict[str, LoraWeights]:
    return {name: read_adapter(path, load=True) for name, path in folders.items()}


def peft_model_with(folders: dict[str, Path], names: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(make_base(), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    return model


def peft_deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """PEFT's own delta per base weight key (its get_delta_weight, scale included)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            key = name.removeprefix("base_model.model.") + ".weight"
            out[key] = module.get_delta_weight(adapter).detach().double()
    return out


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    model = peft_model_with(folders, ["a1", "a2", "a3"])
    return {name: peft_deltas(model, name) for name in ("a1", "a2", "a3")}


def dense_sum(reference: dict[str, dict[str, torch.Tensor]], names: list[str], weights: list[float]):
    total: dict[str, torch.Tensor] = {}
    for name, w in zip(names, weights, strict=True):
        for key, d in reference[name].items():
            total[key] = total.get(key, torch.zeros_like(d)) + w * d
    return total


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm())


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 2, 90]])


# ------------------------------------------------------------------------------------------- linear


def test_linear_exact_loads_in_peft_and_matches_weighted_forward(loaded, reference, tmp_path):
    pairs = [(loaded[n], w) for n, w in zip(["a1", "a2", "a3"], WEIGHTS, strict=True)]
    result = combine(pairs)
    assert result.method == "linear"
    assert result.error == 0.0
    exact = dense_sum(reference, ["a1", "a2", "a3"], WEIGHTS)
    assert set(result.weights.modules) == set(exact)
    for key, d in exact.items():
        m = result.weights[key]
        assert rel(m.delta(torch.float64), d) < 1e-6, key
        assert m.scale == 1.0 and m.alpha == m.rank
    q0 = "model.layers.0.self_attn.q_proj.weight"
    assert result.weights[q0].rank == 4 + 8  # ranks add up
    assert result.weights.config["use_rslora"] is False
    assert result.weights.base_model == loaded["a1"].base_model

    out = write_adapter(result.weights, tmp_path / "combined")
    combined = PeftModel.from_pretrained(make_base(), str(out)).eval()
    # reference forward: base weights + the weighted PEFT deltas, applied together
    base = make_base()
    state = base.state_dict()
    for key, d in exact.items():
        state[key] = state[key] + d.to(state[key].dtype)
    base.load_state_dict(state)
    torch.testing.assert_close(logits_of(combined, IDS), logits_of(base, IDS), rtol=1e-4, atol=1e-5)


def test_cat_matches_peft_cat(folders, loaded):
    model = peft_model_with(folders, ["a1", "a2", "a3"])
    model.add_weighted_adapter(["a1", "a2", "a3"], WEIGHTS, "cat", combination_type="cat")
    theirs = peft_deltas(model, "cat")
    ours = combine([(loaded[n], w) for n, w in zip(["a1", "a2", "a3"], WEIGHTS, strict=True)], method="cat")
    assert set(theirs) == set(ours.weights.modules)
    for key, d in theirs.items():
        assert rel(ours.weights[key].delta(torch.float64), d) < 1e-6, key


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_linear_rank_is_the_optimal_truncation(loaded, reference, rank):
    names = ["a1", "a2", "a3"]
    result = combine([(loaded[n], w) for n, w in zip(names, WEIGHTS, strict=True)], rank=rank)
    exact = dense_sum(reference, names, WEIGHTS)
    err_sq = norm_sq = 0.0
    for key, d in exact.items():
        s = torch.linalg.svdvals(d)
        optimal = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
        m = result.weights[key]
        assert m.rank == rank
        assert result.module_errors[key] == pytest.approx(optimal, rel=1e-6, abs=1e-6), key
        assert rel(m.delta(torch.float64), d) == pytest.approx(optimal, rel=1e-4, abs=1e-6), key
        # singular values split evenly: ||B||_F == ||A||_F
        assert float(m.B.norm()) == pytest.approx(float(m.A.norm()), rel=1e-4)
        err_sq += float(s[rank:].square().sum())
        norm_sq += float(s.square().sum())
    assert result.error == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-6)


def test_svd_matches_peft_svd(folders, loaded):
    names = ["a1", "a2", "a3"]
    model = peft_model_with(folders, names)
    model.add_weighted_adapter(names, WEIGHTS, "svd", combination_type="svd", svd_rank=3)
    theirs = peft_deltas(model, "svd")
    ours = combine([(loaded[n], w) for n, w in zip(names, WEIGHTS, strict=True)], method="svd", rank=3)
    for key, d in theirs.items():
        assert rel(ours.weights[key].delta(torch.float64), d) < 1e-4, key


def test_auto_rank_keeps_the_energy_with_smallest_rank(loaded, reference, tmp_path):
    names = ["a1", "a2", "a3"]
    keep = 0.9
    result = combine([(loaded[n], w) for n, w in zip(names, WEIGHTS, strict=True)], rank="auto", keep=keep)
    exact = dense_sum(reference, names, WEIGHTS)
    for key, d in exact.items():
        energy = torch.linalg.svdvals(d).square()
        cum = energy.cumsum(0) / energy.sum()
        expected = int((cum < keep).sum()) + 1
        assert result.weights[key].rank == expected, key
        assert 1 - result.module_errors[key] ** 2 >= keep - 1e-9
    assert len(set(result.ranks.values())) > 1  # ranks differ per module
    out = write_adapter(result.weights, tmp_path / "auto")
    loaded_peft = PeftModel.from_pretrained(make_base(), str(out), adapter_name="auto")
    assert loaded_peft.peft_config["auto"].rank_pattern
    for key, d in peft_deltas(loaded_peft, "auto").items():
        assert rel(d, result.weights[key].delta(torch.float64)) < 1e-5, key


# ------------------------------------------------------------------------------ pruning methods


def _reseed_before_first_mask(monkeypatch, seed: int) -> None:
    """Reseed torch's global generator right before PEFT draws its first DARE mask."""
    import peft.tuners.lora.model as lora_model

    state = {"seeded": False}
    for name in ("dare_linear", "dare_ties"):
        original = getattr(lora_model, name)

        def wrapper(*args, _original=original, **kwargs):
            if not state["seeded"]:
                torch.manual_seed(seed)
                state["seeded"] = True
            return _original(*args, **kwargs)

        monkeypatch.setattr(lora_model, name, wrapper)


@pytest.mark.parametrize(
    ("method", "majority_sign"),
    [
        ("ties", "total"),
        ("ties", "frequency"),
        ("magnitude_prune", "total"),
        ("dare_linear", "total"),
        ("dare_ties", "total"),
        ("dare_ties", "frequency"),
    ],
)
def test_pruning_methods_match_peft_svd_variants(folders, loaded, monkeypatch, method, majority_sign):
    names, weights, rank, density, seed = ["d1", "d2", "d3"], [0.8, -0.5, 1.1], 5, 0.4, 1234
    model = peft_model_with(folders, names)
    _reseed_before_first_mask(monkeypatch, seed)
    model.add_weighted_adapter(
        names,
        weights,
        "merged",
        combination_type=f"{method}_svd",
        svd_rank=rank,
        density=density,
        majority_sign_method=majority_sign,
    )
    theirs = peft_deltas(model, "merged")
    ours = combine(
        [(loaded[n], w) for n, w in zip(names, weights, strict=True)],
        method=method,
        rank=rank,
        density=density,
        majority_sign=majority_sign,
        seed=seed,
        device="cpu",
    )
    assert set(theirs) == set(ours.weights.modules)
    for key, d in theirs.items():
        m = ours.weights[key]
        assert m.rank == rank
        assert rel(m.delta(torch.float64), d) < 1e-4, (key, method)
    assert ours.params["density"] == density
    assert ours.error > 0


def test_dare_seed_none_uses_global_generator(loaded):
    pairs = [(loaded["d1"], 1.0), (loaded["d3"], 0.5)]
    torch.manual_seed(7)
    first = combine(pairs, method="dare_linear", rank=3, density=0.5, device="cpu")
    torch.manual_seed(7)
    again = combine(pairs, method="dare_linear", rank=3, density=0.5, device="cpu")
    seeded = combine(pairs, method="dare_linear", rank=3, density=0.5, seed=7, device="cpu")
    for key in first.weights.modules:
        torch.testing.assert_close(first.weights[key].delta(), again.weights[key].delta())
        torch.testing.assert_close(first.weights[key].delta(), seeded.weights[key].delta())


def test_density_one_ties_without_conflicts_is_linear(loaded):
    # one adapter, density 1: TIES changes nothing, so the result is the optimal rank-R truncation
    lin = combine([(loaded["d1"], 1.0)], rank=2)
    ties = combine([(loaded["d1"], 1.0)], method="ties", rank=2, density=1.0)
    for key in lin.weights.modules:
        assert rel(ties.weights[key].delta(torch.float64), lin.weights[key].delta(torch.float64)) < 1e-4
        assert ties.module_errors[key] == pytest.approx(lin.module_errors[key], rel=1e-3)


def test_pruning_methods_need_rank_and_density(loaded):
    pairs = [(loaded["d1"], 1.0), (loaded["d3"], 1.0)]
    with pytest.raises(ValueError, match="needs rank="):
        combine(pairs, method="ties", density=0.5)
    with pytest.raises(ValueError, match="needs density="):
        combine(pairs, method="dare_ties", rank=4)
    with pytest.raises(ValueError, match="majority_sign"):
        combine(pairs, method="ties", rank=4, density=0.5, majority_sign="most")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="keeps every input rank"):
        combine(pairs, method="cat", rank=4)
    with pytest.raises(ValueError, match="keep"):
        combine(pairs, rank="auto", keep=1.5)
    with pytest.raises(ValueError, match="rank must be"):
        combine(pairs, rank=0)


# ------------------------------------------------------------------------------------ refusals


def _fake(key: str, out: int, inn: int, r: int = 2, *, seed: int = 0, **extra: object) -> LoraWeights:
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, inn, generator=gen), torch.randn(out, r, generator=gen)
    m = LoraModule(key, "linear", r, float(r), 1.0, (r, inn), (out, r), "F32", a, b)
    return LoraWeights(
        {key: replace(m, **extra)}, "peft", config={"base_model_name_or_path": "x"}, base_model="x"
    )


def test_refuses_different_delta_shapes():
    key = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj\.weight.*\[8, 6\].*\[8, 4\]"):
        combine([(_fake(key, 8, 6), 1.0), (_fake(key, 8, 4), 1.0)])


def test_refuses_dora_on_the_same_key_twice():
    key = "model.layers.0.self_attn.q_proj.weight"
    mag = dict(magnitude=torch.ones(8), magnitude_shape=(8,))
    with pytest.raises(IncompatibleAdapterError, match=r"q_proj\.weight: DoRA"):
        combine([(_fake(key, 8, 6, **mag), 1.0), (_fake(key, 8, 6, seed=1, **mag), 1.0)])
    # a single DoRA adapter on a key is carried over with its magnitude
    result = combine([(_fake(key, 8, 6, **mag), 1.0), (_fake(key, 8, 6, seed=1), 0.5)])
    assert result.weights[key].is_dora


def test_refuses_modules_to_save_twice_and_carries_once(tmp_path, loaded):
    path = make_adapter(
        tmp_path / "mts", 11, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    mts = read_adapter(path, load=True)
    assert mts.replacements
    with pytest.raises(IncompatibleAdapterError, match="lm_head.*modules_to_save"):
        combine([(mts, 1.0), (read_adapter(path, load=True), 1.0)])
    result = combine([(mts, 1.0), (loaded["a1"], 0.5)])
    assert set(result.weights.replacements) == set(mts.replacements)
    out = write_adapter(result.weights, tmp_path / "out")
    model = PeftModel.from_pretrained(make_base(), str(out))
    head = dict(model.named_parameters())
    saved = next(v for k, v in head.items() if "lm_head" in k and "modules_to_save" in k)
    torch.testing.assert_close(saved.detach(), next(iter(mts.replacements.values())))


def test_refuses_unloaded_tensors_and_unknown_methods(folders, loaded):
    with pytest.raises(InvalidAdapterError, match="load=True"):
        combine([(read_adapter(folders["a1"]), 1.0)])
    with pytest.raises(UnknownMethodError, match="known methods: cat, dare_linear") as info:
        combine([(loaded["a1"], 1.0)], method="tiez")
    assert "ties" in info.value.known
    assert {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"} <= set(
        combine_methods()
    )


def test_registry_variants_are_configured_instances():
    assert COMBINE_METHODS.get("cat").compress is False  # type: ignore[attr-defined]
    assert COMBINE_METHODS.get("svd").compress is True  # type: ignore[attr-defined]
    assert type(COMBINE_METHODS.get("ties")) is type(COMBINE_METHODS.get("dare_ties"))
    reg: Registry[object] = Registry("thing")

    @reg.register("one", option=1)
    class Thing:
        def __init__(self, name: str, *, option: int) -> None:
            self.name, self.option = name, option

    assert reg.get("one").option == 1  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("one", option=2)(Thing)
    with pytest.raises(UnknownMethodError, match="known methods: one"):
        reg.get("two")


# ------------------------------------------------------------------ embeddings, convs, dtypes


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(40, 12)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(12, 6)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids)).sum(1) + self.conv(img).mean((2, 3))


def make_tiny() -> torch.nn.Module:
    torch.manual_seed(3)
    return Tiny().eval()


def test_embedding_and_conv_against_peft(tmp_path):
    p1 = make_adapter(
        tmp_path / "t1", 21, model_factory=make_tiny, r=3, lora_alpha=6, target_modules=["emb", "conv", "fc"]
    )
    p2 = make_adapter(
        tmp_path / "t2",
        22,
        model_factory=make_tiny,
        r=5,
        lora_alpha=5,
        use_rslora=True,
        target_modules=["emb", "conv"],
    )
    w1, w2 = read_adapter(p1, load=True), read_adapter(p2, load=True)
    assert w1["conv.weight"].kind == "conv" and w1["emb.weight"].kind == "embedding"
    model = PeftModel.from_pretrained(make_tiny(), str(p1), adapter_name="t1")
    model.load_adapter(str(p2), adapter_name="t2")
    ref = {n: peft_deltas(model, n) for n in ("t1", "t2")}
    exact = dense_sum(ref, ["t1", "t2"], [0.6, -1.2])
    result = combine([(w1, 0.6), (w2, -1.2)])
    for key, d in exact.items():
        assert rel(result.weights[key].delta(torch.float64), d) < 1e-6, key
    assert result.weights["conv.weight"].A.shape == (8, 3, 3, 3)
    assert result.weights["conv.weight"].B.shape == (6, 8, 1, 1)
    # written, loaded by PEFT, same forward as the dense sum
    out = write_adapter(result.weights, tmp_path / "tiny_out")
    combined = PeftModel.from_pretrained(make_tiny(), str(out)).eval()
    plain = make_tiny()
    state = plain.state_dict()
    for key, d in exact.items():
        state[key] = state[key] + d.float()
    plain.load_state_dict(state)
    ids, img = torch.tensor([[1, 7, 39]]), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(combined(ids, img), plain(ids, img), rtol=1e-4, atol=1e-5)
    # compressed: optimal truncation per module, conv flattened to (out, in*k*k)
    small = combine([(w1, 0.6), (w2, -1.2)], rank=2)
    for key, d in exact.items():
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        assert small.module_errors[key] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-5), key
    # TIES on embedding and conv modules matches PEFT's ties_svd
    model.add_weighted_adapter(
        ["t1", "t2"], [0.6, -1.2], "ties", combination_type="ties_svd", svd_rank=2, density=0.5
    )
    ties = combine([(w1, 0.6), (w2, -1.2)], method="ties", rank=2, density=0.5)
    for key, d in peft_deltas(model, "ties").items():
        assert rel(ties.weights[key].delta(torch.float64), d) < 1e-4, key


def test_bf16_inputs_give_bf16_output():
    key = "m.weight"

    def bf16(w: LoraWeights) -> LoraWeights:
        m = w[key]
        return replace(w, modules={key: replace(m, A=m.A.bfloat16(), B=m.B.bfloat16(), dtype="BF16")})

    result = combine([(bf16(_fake(key, 8, 6)), 1.0), (bf16(_fake(key, 8, 6, seed=2)), 2.0)], rank=3)
    assert result.weights[key].A.dtype == torch.bfloat16
    assert result.weights[key].dtype == "BF16"


# --------------------------------------------------------------------------- resize and extract


def test_resize_is_the_optimal_rank_reduction(loaded, reference):
    result = resize(loaded["a2"], rank=3)
    assert result.method == "resize"
    for key, d in reference["a2"].items():
        s = torch.linalg.svdvals(d)
        optimal = float(s[3:].norm() / s.norm())
        assert result.module_errors[key] == pytest.approx(optimal, rel=1e-6, abs=1e-6)
        assert rel(result.weights[key].delta(torch.float64), d) == pytest.approx(optimal, rel=1e-4, abs=1e-6)
    # a module already below the target rank is kept exactly (padded with zeros)
    up = resize(loaded["a3"], rank=4)
    o = "model.layers.0.self_attn.o_proj.weight"
    assert up.weights[o].rank == 4 and up.module_errors[o] == 0.0
    assert rel(up.weights[o].delta(torch.float64), reference["a3"][o]) < 1e-6


def test_extract_recovers_a_low_rank_finetune(tmp_path):
    base = make_base()
    tuned = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(5)
    changed = [
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.embed_tokens.weight",
    ]
    with torch.no_grad():
        params = dict(tuned.named_parameters())
        for key in changed:
            p = params[key]
            p += 0.05 * torch.randn(p.shape[0], 3, generator=gen) @ torch.randn(3, p.shape[1], generator=gen)
    b_state, t_state = base.state_dict(), dict(tuned.state_dict())
    t_state["model.norm.weight"] = t_state["model.norm.weight"] + 0.1  # 1-D: skipped
    for svd in ("exact", "randomized"):
        result = extract(b_state, t_state, rank=3, svd=svd, device="cpu")
        assert set(result.weights.modules) == set(changed)
        assert result.error < 1e-5
        assert "model.norm.weight" in result.params["skipped"]
    assert result.weights["model.embed_tokens.weight"].kind == "embedding"
    auto = extract(b_state, t_state, rank="auto", keep=0.999, device="cpu")
    assert set(auto.ranks.values()) == {3}
    capped = extract(b_state, t_state, rank="auto", keep=0.999, max_rank=2, device="cpu")
    assert set(capped.ranks.values()) == {2} and capped.error > 0.01
    # the extracted adapter, loaded by PEFT on the base, reproduces the fine-tune
    out = write_adapter(result.weights, tmp_path / "extracted")
    model = PeftModel.from_pretrained(make_base(), str(out)).eval()
    torch.testing.assert_close(logits_of(model, IDS), logits_of(tuned.eval(), IDS), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------ sugar etc.


def test_adapter_expr_builds_weighted_pairs(loaded, reference):
    X = AdapterExpr.of
    a, b = loaded["a1"], loaded["a3"]
    expr = 0.7 * X(a) + 0.3 * X(b)
    assert [(x is a, w) for x, w in expr.pairs()][0] == (True, 0.7)
    assert [w for _, w in expr.pairs()] == [0.7, 0.3]
    assert [w for _, w in (-X(a)).pairs()] == [-1.0]
    assert [w for _, w in (X(a) - X(b) + X(a)).pairs()] == [2.0, -1.0]
    assert [w for _, w in sum([X("x"), X("y"), 2 * X("x")]).pairs()] == [3.0, 1.0]
    assert [w for _, w in (X("x") / 4).pairs()] == [0.25]
    assert "0.7 * <LoraWeights>" in repr(expr)
    result = combine(expr)
    exact = dense_sum(reference, ["a1", "a3"], [0.7, 0.3])
    for key, d in exact.items():
        assert rel(result.weights[key].delta(torch.float64), d) < 1e-6


def test_progress_is_reported(loaded):
    seen = []
    combine([(loaded["a1"], 1.0)], rank=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (len(loaded["a1"]), len(loaded["a1"]))


def test_ops_import_needs_only_torch_and_safetensors():
    code = (
        "import sys, adapterhub.ops.combine, adapterhub.ops.registry\n"
        "bad = [m for m in ('sqlalchemy', 'jsonschema', 'alembic', 'click', 'rich', 'peft', 'transformers') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_rank_deficient_stacks_are_handled(loaded, reference):
    # the same adapter twice: the stacked factors are rank deficient (QR fallback), the sum is exact
    a1 = loaded["a1"]
    result = combine([(a1, 0.5), (a1, 0.25), (a1, 0.25)], rank=4)
    for key, d in reference["a1"].items():
        assert result.module_errors[key] < 1e-6
        assert rel(result.weights[key].delta(torch.float64), d) < 1e-5, key
    # more stacked rank than rows: K = 3 * 12 > 8 outputs
    key = "m.weight"
    w = [_fake(key, 8, 40, r=12, seed=s) for s in range(3)]
    d = sum(x[key].delta(torch.float64) * c for x, c in zip(w, (1.0, -2.0, 0.5), strict=True))
    result = combine([(w[0], 1.0), (w[1], -2.0), (w[2], 0.5)], rank=5)
    s = torch.linalg.svdvals(d)
    assert result.module_errors[key] == pytest.approx(float(s[5:].norm() / s.norm()), rel=1e-6)
    assert rel(result.weights[key].delta(torch.float64), d) == pytest.approx(
        result.module_errors[key], rel=1e-4
    )


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_gram_truncation_used_on_gpus_matches_svd(shape):
    from adapterhub.ops.combine import _dense_truncate

    gen = torch.Generator().manual_seed(0)
    low = torch.randn(shape[0], 6, generator=gen) @ torch.randn(6, shape[1], generator=gen)
    for x in (torch.randn(*shape, generator=gen), low):
        for rank in (3, 10):
            b1, a1 = _dense_truncate(x, rank, 0.99, gram=False)
            b2, a2 = _dense_truncate(x, rank, 0.99, gram=True)
            assert rel(b2 @ a2, b1 @ a1) < 1e-5
            assert float(b2.norm()) == pytest.approx(float(a2.norm()), rel=1e-4)
        assert (
            _dense_truncate(x, "auto", 0.9, gram=True)[0].shape
            == _dense_truncate(x, "auto", 0.9, gram=False)[0].shape
        )
