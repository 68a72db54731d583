"""The embeddings of a 4-bit base (``--quantize nf4-all``): `quantize_embeddings`.

transformers' bitsandbytes integration quantizes the linear layers only; the input embedding and the
output layer stay in bf16. On a model whose vocabulary is a large share of its weights (SmolLM2-135M: a
fifth) that leaves NF4 weights at 0.4x of bf16's. ``nf4-all`` loads the base as ``nf4`` does, then puts

- the input embedding into bitsandbytes' ``EmbeddingNF4`` (4-bit rows, dequantized as they are looked
  up; one fp32 absmax per 64 weights, no double quantization, since its lookup reads the absmax rows of
  the tokens asked for);
- an untied output layer into a ``Linear4bit`` (NF4 with double quantization, bf16 compute: the other
  linears' setting);
- a tied one (the output layer is the embedding's matrix) into `TiedLinear4bit`, which multiplies by the
  embedding's own 4-bit matrix, so the checkpoint's one copy stays one copy.

An adapter can attach to the untied output layer (a ``Linear4bit``) but not to a quantized embedding:
the runtime refuses such a target by name (load the base with ``nf4`` to adapt the embedding).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TiedLinear4bit", "for_training", "quantize_embeddings"]


def _bnb() -> Any:
    import logging

    # its CPU backend logs that it could not fetch optional kernels from the Hub (offline)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb

    return bnb


class TiedLinear4bit(nn.Module):
    """The output layer of a tied model whose embedding is 4-bit: ``x W^T`` with ``W`` the embedding's own
    ``Params4bit`` (bf16 compute, the result in the input's dtype)."""

    def __init__(self, weight: Any) -> None:
        super().__init__()
        self.weight = weight
        self.out_features, self.in_features = (int(d) for d in weight.quant_state.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return _bnb().matmul_4bit(x.to(torch.bfloat16), w, quant_state=w.quant_state).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tied to the embedding"


def quantize_embeddings(model: Any) -> None:
    """Quantize ``model``'s input embedding and output layer to NF4 in place (see the module's docstring).
    The model's linear layers are bitsandbytes' already (``load_base(quantize="nf4")``)."""
    bnb = _bnb()
    Params4bit: Any = bnb.nn.Params4bit  # noqa: N806 - the class's own name

    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb.weight
    w = emb.weight.data
    dtype = w.dtype if w.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    q = bnb.nn.EmbeddingNF4(emb.num_embeddings, emb.embedding_dim, dtype=dtype, device="meta")
    q.weight = Params4bit(
        w.to(dtype), requires_grad=False, compress_statistics=False, quant_type="nf4", module=q
    ).to(w.device)  # quantized here
    q.padding_idx = emb.padding_idx
    model.set_input_embeddings(q)
    if tied:
        model.set_output_embeddings(TiedLinear4bit(q.weight))
    elif head is not None and isinstance(head, torch.nn.Linear) and not isinstance(head, bnb.nn.Linear4bit):
        h = bnb.nn.Linear4bit(
            head.in_features,
            head.out_features,
            bias=head.bias is not None,
            compute_dtype=torch.bfloat16,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        hw = head.weight.data
        h.weight = Params4bit(
            hw.to(dtype), requires_grad=False, compress_statistics=True, quant_type="nf4", module=h
        ).to(hw.device)
        if head.bias is not None:
            h.bias = head.bias
        h.requires_grad_(False)
        model.set_output_embeddings(h)


def for_training(model: Any) -> None:
    """Keep ``model``'s bitsandbytes 4-bit linears differentiable on a CPU with AVX512-BF16: in eval mode
    without grad, ``Linear4bit`` repacks its weight once for a faster CPU kernel (``gemv_4bit``) that has
    no backward, and every later training step would then drop the gradient through the base weights
    (measured: the early layers' factor gradients 10x too small after one evaluation). Training turns
    that repacking off; ``run`` and ``serve`` keep it."""
    bnb = _bnb()
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
