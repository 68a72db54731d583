"""``--packing`` (issue 23): examples packed whole into rows of ``--max-length`` tokens, each attending only
to itself with its positions restarting at 0, the loss on the same tokens as the unpacked run.

The oracle is the unpacked run itself: on a tiny random Llama in fp32, the loss and the gradients of a
packed batch equal the sum over its documents run one by one (eager and sdpa attention).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers.cli import Cli
from helpers.models import tiny_llama
from helpers.trainkit import jsonl, text_rows, tiny_base

from adapterhub import Hub
from adapterhub.runtime import attach
from adapterhub.services.train_data import collate, pack


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """``n`` (ids, labels) of 3 to 30 tokens; the first part of each is a prompt (labels -100)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(3, 30)
        ids = [rng.randrange(1, 64) for _ in range(length)]
        prompt = rng.randint(0, length - 2)
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def _counted(labels: list[int]) -> int:
    return sum(1 for x in labels[1:] if x != -100)


def test_pack_keeps_every_example_whole_within_max_length() -> None:
    ex = _examples(40)
    rows = pack(ex, 64)
    assert all(len(ids) <= 64 for ids, _, _ in rows)
    assert len(rows) < len(ex) / 2  # best fit decreasing fills the rows
    total = sum(len(i) for i, _ in ex)
    assert sum(len(r[0]) for r in rows) == total
    assert len(rows) == -(-total // 64) or len(rows) <= -(-total // 64) + 1
    # each row is its examples laid end to end: positions restart, the first label of each is not learned
    seen = []
    for ids, labels, positions in rows:
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
        for a, b in zip(starts, starts[1:], strict=False):
            assert positions[a:b] == list(range(b - a)) and labels[a] == -100
            seen.append((ids[a:b], labels[a + 1 : b]))
    assert sorted(seen) == sorted((i, lab[1:]) for i, lab in ex)
    assert sum(_counted(lab) for _, lab, _ in rows) == sum(_counted(lab) for _, lab in ex)
    assert pack(ex, 64) == rows  # deterministic


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_and_gradient_equal_the_unpacked_sum(attn: str) -> None:
    model = tiny_llama(3, attn_implementation=attn).float()
    rt = attach(model)
    ad = rt.create("p", rank=4, alpha=8, targets="all-linear", seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)  # B off zero: A gets a gradient too
    model.train()
    ex = _examples(9, seed=2)
    rows = pack(ex, 48)
    assert len(rows) >= 2 and any(len(r[0]) < 48 for r in rows)  # several rows, some padded
    n = sum(_counted(lab) for _, lab in ex)

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in ad.parameters()]
        for p in ad.parameters():
            p.grad = None
        return out

    packed = model(**collate(rows, 0), num_items_in_batch=torch.tensor(n), use_cache=False).loss
    packed.backward()
    g_packed = grads()
    unpacked = torch.zeros(())
    for e in ex:
        loss = model(**collate([e], 0), num_items_in_batch=torch.tensor(n), use_cache=False).loss
        loss.backward()
        unpacked = unpacked + loss.detach()
    g_unpacked = grads()
    torch.testing.assert_close(packed.detach(), unpacked, rtol=0, atol=1e-5)
    for a, b in zip(g_packed, g_unpacked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # without the position ids, documents would see each other: the check above is not vacuous
    plain = collate(rows, 0)
    plain["attention_mask"] = (plain.pop("position_ids") >= 0).long()
    leaked = model(**plain, num_items_in_batch=torch.tensor(n), use_cache=False).loss
    assert abs(float(leaked.detach()) - float(unpacked)) > 1e-3
    rt.detach()


def test_train_with_packing_end_to_end_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Hub(tmp_path / "home") as hub:
        hub.add_base(tiny_base(tmp_path / "tiny"), name="tiny")
        data = jsonl(tmp_path / "t.jsonl", text_rows(24))
        cli = Cli(hub.home, capsys)
        doc = cli.json(
            "train", "tiny", "--data", str(data), "--name", "packed", "--packing", "--max-length", "64",
            "--steps", "4", "--batch-size", "2", "--lr", "1e-2", "--eval-fraction", "0.2",
        )  # fmt: skip
        assert doc["steps"] == 4 and doc["tokens"] > 0 and doc["eval_losses"]
        # 19 training examples of 4-12 tokens fit in a few rows of 64: 4 steps of 2 rows are > 1 epoch
        assert doc["epochs"] > 1
        (parent,) = hub.adapter_info("packed").parents
        assert parent.params["packing"] is True
        assert hub.validate("packed", base="tiny").ok
