"""The causal language-modelling loss without the batch's whole logits in memory.

A causal LM's training peak is often its logits, not its weights or adapter: 4 rows x 512 tokens over a
128,256-token vocabulary are 1 GiB in fp32, held again as the softmax's gradient. ``causal_lm_loss``
computes the same loss as ``model(..., labels=labels).loss`` (transformers' ``ForCausalLMLoss``: the
head's logits upcast to fp32, cross-entropy summed over the label tokens, divided by ``num_items`` or
their count) from the decoder's hidden states:

    loss = sum over label positions t of -log_softmax(head(h[t-1]).float())[labels[t]] / num_items

- only the positions that have a label go through the head (prompt tokens and padding cost nothing);
- when they are more than one chunk of ``chunk`` rows (by default 256 MiB of fp32 logits), each chunk
  runs under activation checkpointing, so one chunk's logits live at a time, in the forward and again in
  the backward (the head is computed twice: time traded for memory only where the logits are large).

Models whose head does more than a linear map (logit soft-capping, logit scales), whose layout is not
``base_model`` + output embeddings, or that FSDP wraps at the root (its hooks gather the root's shards
around ``model.forward`` only) take the model's own loss instead (``supported`` says which).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["causal_lm_loss", "supported"]

#: families whose logits are exactly ``lm_head(final hidden state)`` (checked against their forward)
_PLAIN_HEAD = {"llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe", "olmo2"}
#: logits in fp32 per chunk: 8192 positions x a 128K vocabulary = 4 GiB would defeat the purpose
_CHUNK_BYTES = 256 * 2**20


def supported(model: Any) -> bool:
    """Whether ``causal_lm_loss`` computes this model's loss itself (else it asks the model)."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in _PLAIN_HEAD:
        return False
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return False
    if _fsdp_root(model):
        return False
    prefix = getattr(model, "base_model_prefix", "")
    return bool(prefix) and hasattr(model, prefix) and model.get_output_embeddings() is not None


def _fsdp_root(model: Any) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(model, FSDPModule)


def _chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def causal_lm_loss(
    model: Any,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    chunk: int | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``model(input_ids, attention_mask, labels=labels, num_items_in_batch=num_items).loss``, computed
    chunk by chunk (see the module docstring). ``labels`` are unshifted, -100 where no loss is taken."""
    if not supported(model):
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            labels=labels,
            num_items_in_batch=num_items,
            **kwargs,
        )
        return out.loss
    body = getattr(model, model.base_model_prefix)
    head = model.get_output_embeddings()
    kwargs.setdefault("use_cache", False)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs)[0]
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != -100
    picked, wanted = hidden[:, :-1][keep], targets[keep]
    if num_items is None:
        num_items = wanted.numel()
    if chunk is None:
        # the vocabulary from the config: a quantized head's weight is packed (nf4-all), or absent when tied
        chunk = max(1, _CHUNK_BYTES // (4 * max(1, int(model.config.vocab_size))))
    total = hidden.new_zeros((), dtype=torch.float32)
    # one chunk: nothing to gain from recomputing the head in the backward (it only costs time)
    recompute = picked.shape[0] > chunk and torch.is_grad_enabled() and picked.requires_grad
    for at in range(0, picked.shape[0], chunk):
        h, t = picked[at : at + chunk], wanted[at : at + chunk]
        if recompute:
            total = total + checkpoint(_chunk_loss, head, h, t, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, t)
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items
