"""Trainable adapters (`Runtime.create` / `freeze` / `save`), `hub.train` and `adapterhub train`.

PEFT is the oracle on tiny random Llamas (step 0, gradients, saved adapters); the data path runs on the
real SmolLM2 (imported once for this file), with training runs of a few steps.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.cli import Cli
from helpers.models import save_model, tiny_llama

from adapterhub import Hub, InvalidOptionError
from adapterhub.runtime import attach
from adapterhub.services.running import attach as hub_attach

pytestmark = pytest.mark.xdist_group("smollm2")

X = torch.tensor([[1, 5, 9, 2, 33, 7, 12, 40], [3, 3, 18, 60, 2, 9, 14, 1]])


def _peft(model: Any, sd: dict[str, torch.Tensor], **cfg: Any) -> Any:
    """PEFT on a copy of ``model`` with its LoRA factors set to ``sd`` (names as `named_parameters`)."""
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(copy.deepcopy(model), LoraConfig(**cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(sd[n.replace("base_model.model.", "").replace(".default", "")])
    return pm


def _nudge(ad: Any, seed: int = 3) -> None:
    """B starts at zero (so A's gradient would be zero): give every factor values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ad.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_step0_equals_base_and_only_factors_train(init: str) -> None:
    model = tiny_llama(0)
    with torch.no_grad():
        base = model(input_ids=X).logits
    rt = attach(model)
    ad = rt.create("t", rank=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], init=init, seed=1)
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in ad.parameters())
    with torch.no_grad():
        assert torch.equal(model(input_ids=X).logits, base)
    a = dict(ad.named_parameters())["model.layers.0.self_attn.q_proj.lora_A.weight"]
    if init == "gaussian":
        assert 0.5 / 4 < float(a.std()) < 1.5 / 4
    else:  # kaiming_uniform_(a=sqrt(5)): bound 1/sqrt(in)
        assert float(a.abs().max()) <= 1 / 32**0.5 + 1e-6
    emb = dict(ad.named_parameters())
    assert not emb["model.embed_tokens.lora_embedding_A"].any()
    assert emb["model.embed_tokens.lora_embedding_B"].std() > 0.5
    rt.detach()
    assert all(p.requires_grad for p in model.parameters())  # given back as they were


def test_gradients_equal_peft() -> None:
    model = tiny_llama(0)
    rt = attach(model)
    targets = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
    ad = rt.create("t", rank=4, alpha=8, targets=targets, seed=1)
    _nudge(ad)
    sd = dict(ad.named_parameters())
    pm = _peft(
        tiny_llama(0), {k: v.detach() for k, v in sd.items()}, r=4, lora_alpha=8, target_modules=targets
    )
    model(input_ids=X, labels=X).loss.backward()
    pm(input_ids=X, labels=X).loss.backward()
    for n, p in pm.named_parameters():
        if "lora_" in n:
            mine = sd[n.replace("base_model.model.", "").replace(".default", "")].grad
            assert mine is not None and torch.allclose(mine, p.grad, atol=1e-5, rtol=0), n


def test_rslora_gradients_equal_peft() -> None:
    model = tiny_llama(0)
    rt = attach(model)
    ad = rt.create("t", rank=8, alpha=4, targets="all-linear", rslora=True, seed=2)
    _nudge(ad)
    assert len(ad.targets) == 14  # 7 projections x 2 layers, never lm_head
    sd = dict(ad.named_parameters())
    pm = _peft(
        tiny_llama(0),
        {k: v.detach() for k, v in sd.items()},
        r=8,
        lora_alpha=4,
        use_rslora=True,
        target_modules="all-linear",
    )
    with torch.no_grad():
        assert torch.allclose(model(input_ids=X).logits, pm(input_ids=X).logits, atol=1e-5)
    model(input_ids=X, labels=X).loss.backward()
    pm(input_ids=X, labels=X).loss.backward()
    for n, p in pm.named_parameters():
        if "lora_" in n:
            assert torch.allclose(
                sd[n.replace("base_model.model.", "").replace(".default", "")].grad, p.grad, atol=1e-5, rtol=0
            )


def _train(model: Any, ad: Any, steps: int, *, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 64, (4, 12), generator=g)
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    model.eval()
    return losses


def test_training_lowers_the_loss_deterministically_and_leaves_the_base_alone(tmp_path: Path) -> None:
    runs = []
    for _ in range(2):
        model = tiny_llama(0)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        rt = attach(model)
        ad = rt.create("t", rank=4, alpha=8, targets="all-linear", seed=7)
        losses = _train(model, ad, 12)
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
        runs.append(losses)
        rt.save("t", path=tmp_path / f"t{len(runs)}")  # a save never overwrites
        rt.detach()
    assert runs[0] == runs[1]
    assert runs[0][-1] < runs[0][0] - 0.2


def test_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path: Path) -> None:
    from peft import PeftModel

    model = tiny_llama(0)
    rt = attach(model)
    ad = rt.create("t", rank=4, alpha=16, targets=["q_proj", "v_proj", "gate_proj", "embed_tokens"], seed=1)
    _train(model, ad, 4)
    out = rt.save("t", path=tmp_path / "t")
    assert sorted(p.name for p in Path(out).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    from safetensors import safe_open

    with safe_open(str(Path(out) / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_" in k for k in keys)  # factors only: no embedding or other full weights
    with torch.no_grad():
        mine = model(input_ids=X).logits
        pm = PeftModel.from_pretrained(tiny_llama(0), str(out)).eval()
        assert torch.allclose(mine, pm(input_ids=X).logits, atol=1e-5)
    rt.detach()


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing(reentrant: bool) -> None:
    model = tiny_llama(0)
    rt = attach(model)
    ad = rt.create("t", rank=4, targets=["q_proj", "v_proj"], seed=1)
    _nudge(ad)
    model(input_ids=X, labels=X).loss.backward()
    plain = [p.grad.clone() for p in ad.parameters()]
    for p in ad.parameters():
        p.grad = None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    model(input_ids=X, labels=X).loss.backward()  # no "element 0 of tensors does not require grad"
    for a, p in zip(plain, ad.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-6)
    rt.detach()


def test_a_trained_adapter_is_used_like_a_loaded_one(tmp_path: Path) -> None:
    model = tiny_llama(0)
    rt = attach(model)
    ad = rt.create("t", rank=4, targets=["q_proj", "v_proj"], seed=1)
    _train(model, ad, 3)
    with torch.no_grad():
        trained = model(input_ids=X).logits
        rt.activate("t")  # freezes it into the resident set
        assert not ad.trainable and rt.training is None
        assert [r.name for r in rt.resident] == ["t"]
        assert torch.allclose(model(input_ids=X).logits, trained, atol=1e-6)
        rt.activate(None)
        with rt.rows(["t", None]):
            rows = model(input_ids=X).logits
        base = model(input_ids=X).logits
        assert torch.allclose(rows[0], trained[0], atol=1e-6) and torch.equal(rows[1], base[1])
        rt.merge("t")
        assert torch.allclose(model(input_ids=X).logits, trained, atol=1e-5)
        rt.unmerge()
        ad2 = rt.create("u", rank=2, targets=["o_proj"], seed=2)  # a second one, next to the first
        _nudge(ad2)
        rt.activate({"t": 0.5, "u": 0.5})
        rt.merge()
        merged = model(input_ids=X).logits
        rt.unmerge()
        assert torch.allclose(model(input_ids=X).logits, merged, atol=1e-5)
    rt.detach()


def test_create_refusals() -> None:
    model = tiny_llama(0)
    rt = attach(model)
    with pytest.raises(InvalidOptionError, match="match no module"):
        rt.create("t", targets=["nope"])
    with pytest.raises(InvalidOptionError, match="unknown init"):
        rt.create("t", init="xavier")
    with pytest.raises(InvalidOptionError, match="rank"):
        rt.create("t", rank=0)
    rt.create("t", seed=0)
    with pytest.raises(InvalidOptionError, match="being trained"):
        rt.create("u", seed=0)
    with pytest.raises(InvalidOptionError, match="in use"):
        rt.create("t", seed=0)
    with pytest.raises(InvalidOptionError, match="give path="):
        rt.save("t")
    with pytest.raises(InvalidOptionError, match="being trained"):
        rt.load(rt.save("t", path=Path(tempfile.mkdtemp()) / "t"), name="t")
    rt.detach()


def test_hub_attached_save_catalogs_with_lineage(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    hub = Hub(tmp_path / "home")
    folder = save_model(tiny_llama(0), tmp_path / "tiny")
    hub.add_base(folder, name="tiny")
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    rt = hub.attach(model)
    ad = rt.create("t", rank=4, targets=["q_proj", "v_proj"], seed=5)
    losses = _train(model, ad, 3)
    ad.lineage.update(steps=3, loss=losses[-1], data_sha256="ab" * 32)
    info = rt.save("t", tags=["style"], description="made in a test")
    rt.detach()
    assert info.name == "t" and info.tags == ("style",) and info.base_model == "tiny"
    (parent,) = info.parents
    assert parent.name == "tiny" and parent.method == "train"
    assert parent.params["base_fingerprint"] == hub.base_info("tiny").fingerprint
    assert parent.params["steps"] == 3 and parent.params["seed"] == 5 and parent.params["loss"] == losses[-1]
    assert hub.validate("t", base="tiny").ok
    res = hub.merge("tiny", ["t"], out=tmp_path / "merged")
    assert res.tensors_changed == 4
    hub.combine([("t", 0.5)], name="t-half", method="linear")
    assert hub.adapter_info("t-half").parents[0].name == "t"
    hub.close()


def test_hub_attached_runtime_resolves_names_without_catalog_writes(tmp_path: Path) -> None:
    hub = Hub(tmp_path / "home")
    model = tiny_llama(0)
    rt = hub_attach(hub.library, model)
    rt.create("t", seed=0)
    rt.detach()  # nothing saved: nothing cataloged
    assert hub.list_adapters() == []
    hub.close()


# ------------------------------------------------------------------ the data path on the real SmolLM2
@pytest.fixture(scope="session")
def smol_home(tmp_path_factory: pytest.TempPathFactory, smollm2_checkpoint: Path) -> Iterator[Hub]:
    """A home with the shared SmolLM2 checkpoint (conftest) registered as base 'smollm2'."""
    hub = Hub(tmp_path_factory.mktemp("smoltrain") / "home")
    hub.add_base(smollm2_checkpoint, name="smollm2")
    yield hub
    hub.close()


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


PAIRS = [("Hi?", "Arr!"), ("Sky?", "Blue, arr!"), ("Sea?", "Wet, arr!")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "holds no training examples"),
        (['{"text": "a"}', "{not json"], "line 2: not valid JSON"),
        ([{"text": "a"}, {"txt": "b"}], "line 2: unknown keys txt"),
        ([{"prompt": "a", "completion": "b", "extra": 1}], "line 1: unknown keys extra"),
        ([{"text": "a"}, {"prompt": "q", "completion": "a"}], "line 2: a 'prompt' row in a file of 'text'"),
        ([{"messages": [{"role": "user", "content": "q"}]}], "line 1: no assistant message"),
        ([{"text": "short"}, {"text": "word " * 200}], "line 2: .* tokens, over --max-length 64"),
    ],
)
def test_bad_data_is_one_line_before_training(
    smol_home: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str], rows: list[Any], message: str
) -> None:
    data = _jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InvalidOptionError, match=message):
        smol_home.train("smollm2", data, name="x", max_length=64, steps=1)
    cli = Cli(smol_home.home, capsys)
    cli("train", "smollm2", "--data", str(data), "--name", "x", "--max-length", "64", code=1)
    assert cli.err.startswith("error: ") and cli.err.count("\n") == 1
    assert not smol_home.library.exists("x")


def test_loss_masks(smol_home: Hub) -> None:
    from adapterhub.services.training import encode_rows

    _, tok = smol_home.load_base("smollm2", device="cpu")
    msgs = {"messages": [{"role": "user", "content": "Sky?"}, {"role": "assistant", "content": "Blue, arr!"}]}
    ((ids, labels),) = encode_rows(tok, [(1, msgs)], "messages", max_length=512, path=Path("d"))
    learned = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert learned.startswith("Blue, arr!<|im_end|>") and "Sky?" not in learned
    ((ids, labels),) = encode_rows(
        tok, [(1, {"prompt": "Q: Sky? A:", "completion": " Blue"})], "prompt", max_length=512, path=Path("d")
    )
    assert (
        tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100]) == " Blue" + tok.eos_token
    )


def test_train_cli_catalogs_with_lineage(
    smol_home: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": q + " ", "completion": a} for q, a in PAIRS])
    cli = Cli(smol_home.home, capsys)
    doc = json.loads(
        cli(
            "train",
            "smollm2",
            "--data",
            str(data),
            "--name",
            "tiny-pirate",
            "--steps",
            "4",
            "--lr",
            "5e-3",
            "--batch-size",
            "3",
            "--seed",
            "1",
            "--tag",
            "style",
            "--json",
        )
    )
    assert doc["steps"] == 4 and doc["last_loss"] < doc["first_loss"]
    assert 0 < doc["trainable_share"] < 0.01 and doc["tokens_per_second"] > 0
    info = smol_home.adapter_info("tiny-pirate")
    (parent,) = info.parents
    assert parent.name == "smollm2" and parent.method == "train"
    assert parent.params["data_sha256"] == doc["data_sha256"] and parent.params["steps"] == 4
    assert parent.params["base_fingerprint"] == smol_home.base_info("smollm2").fingerprint
    assert smol_home.validate("tiny-pirate", base="smollm2").ok
    assert info.tags == ("style",) and info.rank == 8


def test_interrupted_training_catalogs_nothing(smol_home: Hub, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "t.jsonl", [{"text": "Arr, matey."}])
    store = smol_home.home / "store"
    before = sorted(p.name for p in store.rglob("*") if p.is_file()) if store.exists() else []

    def stop(step: int, total: int, loss: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        smol_home.train("smollm2", data, name="cut", steps=3, on_step=stop)
    assert not smol_home.library.exists("cut")
    after = sorted(p.name for p in store.rglob("*") if p.is_file()) if store.exists() else []
    assert after == before


def test_unloaded_trained_adapter_is_gone_but_still_saves(tmp_path: Path) -> None:
    from adapterhub.errors import NotResidentError

    model = tiny_llama(0)
    rt = attach(model)
    rt.create("t", seed=0)
    rt.freeze("t")
    rt.unload("t")
    with pytest.raises(NotResidentError):
        rt.activate("t")
    assert (rt.save("t", path=tmp_path / "t") / "adapter_config.json").is_file()
    rt.detach()
