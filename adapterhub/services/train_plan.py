"""The memory plan `train` prints before it starts (and all that ``--dry-run`` prints).

Counted from the base's config alone (the model is built on the meta device: no weight is read), per
part: the base weights at their quantization, the adapter's factors, their gradients, the optimizer's
states, and an estimate of the activations of one micro-batch. The byte counts per parameter follow
bitsandbytes: NF4 with double quantization is 4 bits a weight, one 8-bit absmax per 64 weights and one
fp32 absmax per 256 of those (4.127 bits, as in the QLoRA paper); int8 is a byte a weight and one fp32
scale per output row; layers bitsandbytes leaves alone (the output layer, embeddings, norms) stay in the
compute dtype, but for ``nf4-all``, where the embedding is NF4 with an fp32 absmax per 64 weights and the
output layer NF4 as the linears (a tied one shares the embedding's). AdamW keeps two fp32 states a factor, the 8-bit AdamW of bitsandbytes two bytes (and its
paged variant moves them to host memory under pressure).

Under FSDP (``shards`` = N processes) the weights, factors, gradients and optimizer states are each
process's 1/N, plus the whole weights of the two decoder layers FSDP holds gathered at a time (the one
running and the one prefetched).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidOptionError

__all__ = ["MemoryPlan", "QUANTIZE", "memory_plan"]

QUANTIZE = ("nf4", "nf4-all", "int8")
EMBEDDING_NF4_BYTES = 0.5 + 4 / 64  # bitsandbytes' EmbeddingNF4: an fp32 absmax per 64 weights
OPTIMIZERS = {"adamw": 8.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0}  # state bytes per trainable parameter
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes each part of a training run takes on ``device`` (activations: an estimate)."""

    base: int
    adapter: int
    gradients: int
    optimizer: int
    activations: int
    quantize: str | None
    device: str
    available: int | None  # bytes the device has free (None: unknown)
    trainable_params: int
    base_params: int
    shards: int = 1  # FSDP: the processes the weights are sharded over (the sizes are one process's)
    gathered: int = 0  # FSDP: bytes of the layers gathered whole at a time

    @property
    def total(self) -> int:
        return self.base + self.adapter + self.gradients + self.optimizer + self.activations + self.gathered

    @property
    def fits(self) -> bool | None:
        return None if self.available is None else self.total <= self.available

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "base",
            "adapter",
            "gradients",
            "optimizer",
            "activations",
            "quantize",
            "device",
            "available",
            "trainable_params",
            "base_params",
            "shards",
            "gathered",
        )
        return {**{k: getattr(self, k) for k in keys}, "total": self.total, "fits": self.fits}

    def lines(self) -> list[str]:
        q = self.quantize or "unquantized"
        per = f"; each process 1/{self.shards} (FSDP)" if self.shards > 1 else ""
        out = [
            f"base weights   {_size(self.base)}  ({self.base_params:,} parameters, {q}{per})",
            f"adapter        {_size(self.adapter)}  ({self.trainable_params:,} fp32 parameters{per})",
            f"gradients      {_size(self.gradients)}",
            f"optimizer      {_size(self.optimizer)}",
            f"activations    {_size(self.activations)}  (estimate, one micro-batch)",
        ]
        if self.shards > 1:
            out.append(f"gathered       {_size(self.gathered)}  (FSDP: two layers' weights whole at a time)")
        out.append(f"total          {_size(self.total)}" + (" per process" if self.shards > 1 else ""))
        if self.available is None:
            out.append(f"device {self.device}: free memory unknown")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"device {self.device}: {self.available / GB:.2f} GB free; this plan {verdict}")
        return out


def _size(n: int) -> str:
    return f"{n / GB:8.2f} GB" if n >= GB / 10 else f"{n / 1e6:8.2f} MB"


def _available(device: str) -> int | None:
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError, AssertionError):
        return None
    return None


def _dtype_bytes(config: Any, dtype: str | None) -> int:
    name = dtype or str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
    return 4 if "32" in name else 2


def memory_plan(
    config: Any,
    *,
    targets: Sequence[str] | str,
    rank: int,
    quantize: str | None = None,
    dtype: str | None = None,
    micro_batch: int = 1,
    max_length: int = 512,
    gradient_checkpointing: bool = False,
    optim: str = "adamw",
    device: str = "cpu",
    shards: int = 1,
) -> MemoryPlan:
    """The plan for a transformers ``config`` (``dtype``: the weights' dtype, ``None`` the config's;
    quantized bases compute in bf16; ``shards``: the FSDP processes, 1 for none)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ..runtime.train import select_targets

    if quantize is not None and quantize not in QUANTIZE:
        raise InvalidOptionError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE)}")
    if optim not in OPTIMIZERS:
        raise InvalidOptionError(f"unknown optimizer {optim!r}; choose one of {', '.join(OPTIMIZERS)}")
    with init_empty_weights():
        model: Any = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # a tied output layer is the embedding's matrix (counted once)
    wbytes = 2 if quantize else _dtype_bytes(config, dtype)
    out_emb = model.get_output_embeddings()
    base = 0.0
    seen: set[int] = set()
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = p.numel()
            linear = isinstance(mod, torch.nn.Linear) and p is mod.weight
            if quantize == "nf4-all" and isinstance(mod, torch.nn.Embedding):
                base += n * EMBEDDING_NF4_BYTES  # a tied output layer shares it (seen once)
            elif quantize and linear and (mod is not out_emb or quantize == "nf4-all"):
                base += n * NF4_BYTES if quantize.startswith("nf4") else n + 4 * mod.out_features
            else:
                base += n * wbytes
    trainable = 0
    for _, m, kind in select_targets(model, targets):
        t: Any = m
        if kind == "embedding":
            trainable += rank * (t.num_embeddings + t.embedding_dim)
        elif kind == "linear":
            trainable += rank * (t.in_features + t.out_features)
        else:
            trainable += rank * sum(int(d) for d in t.weight.shape)
    h = int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0))
    inter = int(getattr(config, "intermediate_size", 0) or 4 * h)
    layers = int(getattr(config, "num_hidden_layers", 0) or getattr(config, "n_layer", 0))
    vocab = int(getattr(config, "vocab_size", 0))
    tokens = micro_batch * max_length
    act = 2 if (quantize or wbytes == 2) else 4
    per_layer = tokens * (10 * h + 4 * inter) * act  # the inputs every matmul and norm keeps for backward
    if gradient_checkpointing:
        activations = layers * tokens * h * act + per_layer
    else:
        activations = layers * per_layer
    activations += 2 * tokens * vocab * 4  # fp32 logits for the loss, and their gradient
    gathered = 0
    if shards > 1:
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        layer = next((m for m in model.modules() if type(m).__name__ in blocks), None)
        per_layer_weights = sum(p.numel() for p in layer.parameters()) * wbytes if layer is not None else 0
        gathered = 2 * per_layer_weights

    def share(n: float) -> int:
        return int(math.ceil(n / shards))

    return MemoryPlan(
        base=share(base),
        adapter=share(4 * trainable),
        gradients=share(4 * trainable),
        optimizer=share(OPTIMIZERS[optim] * trainable),
        activations=int(activations),
        quantize=quantize,
        device=device,
        available=_available(device),
        trainable_params=trainable,
        base_params=len(seen) and sum(p.numel() for p in model.parameters()),
        shards=shards,
        gathered=int(gathered),
    )
