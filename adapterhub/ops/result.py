"""What `combine`, `resize` and `extract` return, and what they share to build it.

`CombineResult`; `Progress`, the type of their progress callback; `resolve_device`, where the work runs;
`_build_module`, which packs a delta's factors ``(B, A)`` into a `LoraModule` of scale 1
(``alpha = rank``) in the module-weight layout, on the CPU.

Torch is imported only when a function runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..lora import LoraModule, LoraWeights, ModuleKind

if TYPE_CHECKING:
    import torch

Progress = Callable[[int, int], None]

_DTYPE_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


@dataclass(frozen=True)
class CombineResult:
    """What `combine`, `resize` and `extract` return.

    ``error`` and ``module_errors`` are relative Frobenius errors ``||result - exact|| / ||exact||``
    against the exact weighted sum of the input deltas (for `extract`: against ``W_ft - W_base``), overall
    and per module key; rounding the factors to the output dtype is not counted.
    """

    weights: LoraWeights
    method: str
    error: float
    module_errors: Mapping[str, float]
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        """The rank of each module of the new adapter."""
        return {k: m.rank for k, m in self.weights.modules.items()}


def resolve_device(device: object = "auto") -> torch.device:
    """``"auto"``: the first CUDA device when there is one, else the CPU."""
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)  # type: ignore[call-overload]


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(str(dtype).removeprefix("torch."), str(dtype).removeprefix("torch.").upper())


def _build_module(
    key: str,
    template: LoraModule,
    kind: ModuleKind,
    b: torch.Tensor,
    a: torch.Tensor,
    dtype: torch.dtype,
    *,
    bias: torch.Tensor | None = None,
    magnitude: torch.Tensor | None = None,
) -> LoraModule:
    rank = int(a.shape[0])
    kernel = template.kernel_size
    a_out = a.reshape(rank, template.in_features, *kernel).to(device="cpu", dtype=dtype).contiguous()
    b_out = (
        b.reshape(template.out_features, rank, *([1] * len(kernel)))
        .to(device="cpu", dtype=dtype)
        .contiguous()
    )
    return LoraModule(
        key=key,
        kind=kind,
        rank=rank,
        alpha=float(rank),
        scale=1.0,
        a_shape=tuple(a_out.shape),
        b_shape=tuple(b_out.shape),
        dtype=_dtype_name(dtype),
        A=a_out,
        B=b_out,
        bias=bias,
        bias_shape=tuple(bias.shape) if bias is not None else None,
        magnitude=magnitude,
        magnitude_shape=tuple(magnitude.shape) if magnitude is not None else None,
    )
