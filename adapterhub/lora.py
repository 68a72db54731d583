"""The one in-memory model of an adapter: `LoraWeights`, a mapping from base weight key to `LoraModule`.

Every reader produces it and every writer consumes it; validation, merging and combining work on it
alone. Conventions, whatever the file format:

- Keys are the base checkpoint's own weight names (``model.layers.0.self_attn.q_proj.weight``) for
  PEFT adapters. kohya files lose the dots of module paths, so their keys are the kohya stems
  (``lora_unet_down_blocks_0_..._to_q``) until matched against a base's key list.
- ``B @ A`` (conv factors flattened) is the update in the layout of a ``torch.nn`` module weight:
  ``(out, in)`` for Linear, ``(out, in, kh, kw)`` for Conv, and ``(num_embeddings, dim)`` for
  Embedding (PEFT stores embedding factors transposed; readers and writers swap them).
  GPT-2 style Conv1D bases store their weight as ``(in, out)``: whoever applies the delta to such a
  base transposes it (see `adapterhub.ops`).
- ``scale`` is resolved per module (``alpha / r`` or ``alpha / sqrt(r)`` with rslora, after
  ``rank_pattern`` / ``alpha_pattern``), so ``delta = scale * B @ A``.
- Tensors are optional: metadata-only reads fill shapes and leave ``A``/``B`` as ``None``.

This module does not import torch at import time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

ModuleKind = Literal["linear", "embedding", "conv"]

PEFT_PREFIX = "base_model.model."


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """The factor PEFT multiplies ``B @ A`` by."""
    if rank <= 0:
        raise ValueError(f"rank must be positive, got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """PEFT's rule: the first pattern key (dict order) whose regex ``(.*\\.)?(KEY)$`` matches the module."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            if module == key or module.endswith("." + key):
                return key
    return None


def short_name(module: str) -> str:
    """The name people use for a target: ``q_proj`` for ``model.layers.0.self_attn.q_proj``.

    For kohya stems (no dots), the tokens after the last layer index: ``attn1_to_q``.
    """
    if "." in module:
        parts = module.split(".")
        # a trailing ModuleList index names the list too: "to_out.0"
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
    tokens = module.split("_")
    idx = [i for i, t in enumerate(tokens) if t.isdigit()]
    if idx:
        last = idx[-1]
        if last == len(tokens) - 1 and len(idx) > 1:
            last = idx[-2]
        if last < len(tokens) - 1:
            return "_".join(tokens[last + 1 :])
    return module


@dataclass
class LoraModule:
    """One adapted weight. ``A`` is ``(r, in[, kh, kw])``, ``B`` is ``(out, r[, 1, 1])``."""

    key: str
    kind: ModuleKind
    rank: int
    alpha: float
    scale: float
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    dtype: str = "F32"
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    bias: torch.Tensor | None = None  # lora_B bias (PEFT lora_bias)
    bias_shape: tuple[int, ...] | None = None
    magnitude: torch.Tensor | None = None  # DoRA magnitude vector: (out,), or (dim,) for an Embedding
    magnitude_shape: tuple[int, ...] | None = None

    @property
    def module(self) -> str:
        return self.key[: -len(".weight")] if self.key.endswith(".weight") else self.key

    @property
    def short_name(self) -> str:
        return short_name(self.module)

    @property
    def in_features(self) -> int:
        return int(self.a_shape[1])

    @property
    def out_features(self) -> int:
        return int(self.b_shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.a_shape[2:])

    @property
    def delta_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features, *self.kernel_size)

    @property
    def is_dora(self) -> bool:
        return self.magnitude_shape is not None

    @property
    def num_params(self) -> int:
        n = math.prod(self.a_shape) + math.prod(self.b_shape)
        if self.bias_shape:
            n += math.prod(self.bias_shape)
        if self.magnitude_shape:
            n += math.prod(self.magnitude_shape)
        return n

    def has_tensors(self) -> bool:
        return self.A is not None and self.B is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        """The loaded tensors by role: ``A``, ``B``, ``bias``, ``magnitude`` (those that are there)."""
        roles = {"A": self.A, "B": self.B, "bias": self.bias, "magnitude": self.magnitude}
        return {role: t for role, t in roles.items() if t is not None}

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scale * B @ A`` in module-weight layout (dense; for tests and small modules)."""
        if self.A is None or self.B is None:
            raise ValueError(f"{self.key}: tensors were not loaded")
        import torch

        dt = dtype or torch.float32
        a = self.A.to(dt).reshape(self.rank, -1)
        b = self.B.to(dt).reshape(self.B.shape[0], self.rank)
        return (self.scale * (b @ a)).reshape(self.delta_shape)

    def with_tensors(self, **changes: Any) -> LoraModule:
        return replace(self, **changes)


@dataclass
class LoraWeights(Mapping[str, LoraModule]):
    """An adapter: modules keyed by base weight key, plus what else the format carries."""

    modules: dict[str, LoraModule]
    format: str  # "peft" | "kohya"
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as read (extra keys kept)
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors __metadata__
    #: full weights that replace base weights outright: modules_to_save and saved embedding layers
    replacements: dict[str, Any] = field(default_factory=dict)  # key -> tensor or None (not loaded)
    replacement_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    base_model: str | None = None
    use_rslora: bool = False
    #: replacement key -> the tensor name it was stored under in the file
    source_names: dict[str, str] = field(default_factory=dict)
    #: tensors in the file that the format does not explain (reported by validation)
    unexplained: list[str] = field(default_factory=list)

    def __getitem__(self, key: str) -> LoraModule:
        return self.modules[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def dtype(self) -> str:
        dts = {m.dtype for m in self.modules.values()}
        return dts.pop() if len(dts) == 1 else ("mixed" if dts else "none")

    @property
    def num_params(self) -> int:
        n = sum(m.num_params for m in self.modules.values())
        n += sum(math.prod(s) for s in self.replacement_shapes.values())
        return n

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.short_name for m in self.modules.values()})

    @property
    def has_dora(self) -> bool:
        return any(m.is_dora for m in self.modules.values())
