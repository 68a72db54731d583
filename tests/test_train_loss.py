"""The chunked causal-LM loss of `adapterhub.runtime.loss` against the model's own ``labels=`` loss."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.models import tiny_gpt2, tiny_llama

from adapterhub.runtime import attach
from adapterhub.runtime.loss import causal_lm_loss, supported

DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[2, :5] = -100  # a prompt with no loss
    return ids, mask, labels


@pytest.mark.parametrize("chunk", [1, 4, None])
def test_equals_the_models_loss_and_gradients(chunk: int | None) -> None:
    model = tiny_llama(vocab_size=97).to(DEVICE)
    ad = attach(model).create("t", rank=4, alpha=8, targets=["q_proj", "v_proj", "lm_head"], seed=0)
    with torch.no_grad():
        for p in ad.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 0.05)
    ids, mask, labels = (t.to(DEVICE) for t in _batch(97))
    assert supported(model)
    grads = []
    losses = []
    for fn in ("model", "chunked"):
        if fn == "model":
            loss = model(
                input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(17)
            ).loss
        else:
            loss = causal_lm_loss(
                model, ids, labels, attention_mask=mask, num_items=torch.tensor(17), chunk=chunk
            )
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in ad.parameters()])
        for p in ad.parameters():
            p.grad = None
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=1e-6)
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(
            a, b, atol=1e-5 if DEVICE != "cpu" else 1e-6, rtol=1e-4 if DEVICE != "cpu" else 1e-5
        )


def test_default_count_is_the_label_tokens() -> None:
    model = tiny_llama(vocab_size=97)
    ids, mask, labels = _batch(97)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        got = causal_lm_loss(model, ids, labels, attention_mask=mask)
    assert torch.allclose(want, got, atol=1e-6)


def test_other_heads_take_the_models_own_loss() -> None:
    model = tiny_gpt2()
    assert not supported(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, labels=ids).loss, causal_lm_loss(model, ids, ids))


def test_saves_less_for_backward_than_the_whole_logits() -> None:
    """The point of it: the batch's fp32 logits are not what autograd keeps."""
    model = tiny_llama(vocab_size=4096)
    attach(model).create("t", rank=4, targets=["q_proj", "v_proj"], seed=0)
    ids = torch.randint(0, 4096, (4, 64), generator=torch.Generator().manual_seed(0))

    def saved(fn: object) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()  # type: ignore[operator]
        return sum(seen.values())

    whole = saved(lambda: model(input_ids=ids, labels=ids).loss)
    chunked = saved(lambda: causal_lm_loss(model, ids, ids, chunk=32))
    logits = 4 * 64 * 4096 * 4
    assert whole - chunked > logits  # at least the fp32 logits are gone


def test_packed_rows_with_position_ids_and_use_cache_given() -> None:
    """The training loop passes packed rows' position ids and ``use_cache=False`` itself."""
    model = tiny_llama(vocab_size=97)
    ids, _, labels = _batch(97)
    pos = torch.cat([torch.arange(5), torch.arange(6)]).repeat(3, 1)
    labels[:, 5] = -100  # no loss across the boundary
    with torch.no_grad():
        want = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False).loss
        got = causal_lm_loss(model, ids, labels, position_ids=pos, use_cache=False)
    assert torch.allclose(want, got, atol=1e-6)
