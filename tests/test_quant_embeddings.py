"""``--quantize nf4-all`` (issue 23's NF4 weight goal): the input embedding (bitsandbytes' EmbeddingNF4)
and the output layer (Linear4bit, or the embedding's own 4-bit matrix when tied) quantized too; training,
``run`` and adapters still work, and a target on the quantized embedding is refused in one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.cli import Cli
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub, InvalidOptionError
from adapterhub.services.train_plan import memory_plan

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    root = tmp_path_factory.mktemp("qemb")
    h = Hub(root / "home")
    h.add_base(tiny_base(root / "tiny", hidden_size=64, intermediate_size=128), name="tiny")
    h.add_base(tiny_base(root / "tied", hidden_size=64, intermediate_size=128, tie=True), name="tied")
    yield h
    h.close()


@pytest.mark.parametrize("base", ["tiny", "tied"])
def test_nf4_all_quantizes_the_embeddings_and_stays_close_to_nf4(hub: Hub, base: str) -> None:
    from adapterhub.services.quantized import TiedLinear4bit

    nf4, _ = hub.load_base(base, device="cpu", quantize="nf4")
    full, _ = hub.load_base(base, device="cpu", quantize="nf4-all")
    emb, head = full.get_input_embeddings(), full.get_output_embeddings()
    assert isinstance(emb, bnb.nn.Embedding4bit) and emb.weight.quant_state.quant_type == "nf4"
    if base == "tied":
        assert isinstance(head, TiedLinear4bit) and head.weight is emb.weight  # one 4-bit copy
    else:
        assert isinstance(head, bnb.nn.Linear4bit)
    saved = nf4.get_memory_footprint() - full.get_memory_footprint()
    n = emb.num_embeddings * emb.embedding_dim
    # bf16 (2 bytes) -> 4 bits + an fp32 absmax per 64 for the embedding, and as much again when untied
    assert saved == pytest.approx(n * (2 - 0.5625) * (1 if base == "tied" else 2), rel=0.05)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3]])
    # the oracle: the nf4 model with its embedding and output matrices replaced by the dequantized ones
    deq = bnb.functional.dequantize_4bit(emb.weight.data, emb.weight.quant_state)
    torch.testing.assert_close(emb(ids), deq[ids].to(torch.bfloat16), rtol=0, atol=0)
    with torch.no_grad():
        nf4.get_input_embeddings().weight.copy_(deq)
        if base != "tied":
            hw = head.weight
            nf4.get_output_embeddings().weight.copy_(bnb.functional.dequantize_4bit(hw.data, hw.quant_state))
        assert nf4.get_input_embeddings().weight.data_ptr() != emb.weight.data_ptr()
        want, got = nf4(ids).logits.float(), full(ids).logits.float()
    torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))


def test_nf4_all_trains_from_the_cli_and_runs(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(8))
    cli = Cli(hub.home, capsys)
    doc = json.loads(
        cli(
            "train",
            "tied",
            "--data",
            str(data),
            "--name",
            "q-all",
            "--steps",
            "4",
            "--lr",
            "1e-2",
            "--quantize",
            "nf4-all",
            "--targets",
            "all-linear",
            "--packing",
            "--max-length",
            "64",
            "--json",
        )  # fmt: skip
    )
    assert doc["last_loss"] < doc["first_loss"]
    assert hub.adapter_info("q-all").parents[0].params["quantize"] == "nf4-all"
    assert hub.validate("q-all", base="tied").ok
    out = json.loads(
        cli(
            "run",
            "tied",
            "hello",
            "--adapter",
            "q-all",
            "--quantize",
            "nf4-all",
            "--device",
            "cpu",
            "--max-tokens",
            "3",
            "--json",
        )  # fmt: skip
    )
    assert out["text"] is not None


def test_an_adapter_on_the_quantized_embedding_is_refused_in_one_line(hub: Hub, tmp_path: Path) -> None:
    data = jsonl(tmp_path / "t.jsonl", text_rows(4))
    with pytest.raises(
        InvalidOptionError, match=r"embed_tokens is a EmbeddingNF4 \(a quantized embedding"
    ) as e:
        hub.train("tiny", data, name="emb", steps=1, quantize="nf4-all", targets=["embed_tokens"])
    assert "\n" not in str(e.value) and not hub.library.exists("emb")
    model, _ = hub.load_base("tied", device="cpu", quantize="nf4-all")
    rt = hub.attach(model)
    with pytest.raises(InvalidOptionError, match="lm_head is a TiedLinear4bit"):
        rt.create("head", targets=["lm_head"])
    rt.detach()


def test_the_plan_counts_nf4_all_embeddings() -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, dtype="bfloat16")  # fmt: skip
    full = memory_plan(cfg, targets="all-linear", rank=8, device="cpu")
    nf4 = memory_plan(cfg, targets="all-linear", rank=8, quantize="nf4", device="cpu")
    every = memory_plan(cfg, targets="all-linear", rank=8, quantize="nf4-all", device="cpu")
    assert 0.38 < nf4.base / full.base < 0.45  # SmolLM2's shape: the bf16 embedding is most of it
    assert every.base / full.base < 0.3


def test_an_evaluation_leaves_the_4bit_gradients_intact(hub: Hub) -> None:
    """bitsandbytes repacks a Linear4bit's weight for a CPU kernel without backward on the first forward
    in eval mode without grad (AVX512-BF16 CPUs); training turns that off, so an evaluation between two
    steps changes no gradient."""
    from adapterhub.services.quantized import for_training

    model, _ = hub.load_base("tiny", device="cpu", quantize="nf4")
    for_training(model)
    rt = hub.attach(model)
    ad = rt.create("g", rank=4, targets="all-linear", seed=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    ids = torch.tensor([[1, 5, 9, 40, 77, 3, 8, 2]])

    def grads() -> list[torch.Tensor]:
        model.train()
        model(ids, labels=ids).loss.backward()
        out = [p.grad.clone() for p in ad.parameters()]
        for p in ad.parameters():
            p.grad = None
        return out

    before = grads()
    model.eval()
    with torch.no_grad():
        model(ids)
    for a, b in zip(before, grads(), strict=True):
        torch.testing.assert_close(a, b)
    rt.detach()
