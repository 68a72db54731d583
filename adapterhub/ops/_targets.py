"""What a merge computes for one base tensor: the low-rank terms, DoRA magnitude, replacement and bias.

`merge` builds these while it checks the adapters against the base (its ``_plan``); `_stream` reads them
while it writes the output shards. Kept apart so that neither of the two imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class _Lora:
    """One adapter's low-rank term on one tensor: ``coef * B @ A``, ``coef`` = sign * weight * scale.

    In the tensor's stored layout it is ``L @ R``: ``(coef * B) @ A``, or ``A.T @ (coef * B).T`` for a
    transposed (Conv1D) base. The scaled factors are built per tensor while it is merged, not up front.
    """

    a: torch.Tensor  # (r, cols or rows)
    b: torch.Tensor  # (out, r)
    coef: float
    transpose: bool = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transpose:
            return self.a.T, (self.coef * self.b).T
        return self.coef * self.b, self.a


@dataclass
class _Target:
    """A base tensor the merge changes, with everything that changes it."""

    name: str
    src: str  # base tensor its bytes come from (differs for an untied lm_head)
    rows: int
    cols: int
    pre: list[_Lora] = field(default_factory=list)  # plain LoRA terms before the DoRA one (adapter order)
    post: list[_Lora] = field(default_factory=list)
    dora: _Lora | None = None
    magnitude: torch.Tensor | None = None
    dora_columns: bool = False  # norm per column (Conv1D, embedding) rather than per row
    replacement: torch.Tensor | None = None  # (rows, cols)
    bias: torch.Tensor | None = None  # summed lora_B bias terms, for a 1-D bias target
    adapters: set[int] = field(default_factory=set)

    @property
    def is_identity(self) -> bool:
        return not (
            self.pre or self.post or self.dora or self.replacement is not None or self.bias is not None
        )
