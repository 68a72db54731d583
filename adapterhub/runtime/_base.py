"""How a layer sees its module's base weight: one small strategy object per layout.

Only loading a DoRA adapter (its norms) and merging read or write the base weight; the forward never
does. Each strategy knows the weight's layout in the module (``torch.nn``'s ``(out, in[, k...])``, GPT-2
``Conv1D``'s ``(in, out)``, an embedding's ``(num, dim)``, a packed bitsandbytes weight):

- `dense` the fp32 weight in that layout (a quantized one dequantized);
- `from_flat` a delta computed as ``B @ A`` (``(out, in*k)``; for an embedding ``(num, dim)``) put in it;
- `norms` / `scale`: per output feature, DoRA's ``||W||`` and ``W * g``.
"""

from __future__ import annotations

from typing import Any

import torch


class DenseWeight:
    """A plain weight with the output features first: ``nn.Linear`` ``(out, in)``, ``nn.ConvNd``
    ``(out, in, k...)``."""

    #: why merging into this weight is refused (None: it can be merged)
    unmergeable: str | None = None

    def __init__(self, weight: torch.Tensor, shape: tuple[int, ...]) -> None:
        self.weight = weight
        self.shape = shape

    def dense(self, original: Any) -> torch.Tensor:
        """The fp32 weight (``original``: the unmerged copy of a live tensor while merged)."""
        return original(self.weight).detach().to(torch.float32)

    def from_flat(self, d: torch.Tensor) -> torch.Tensor:
        return d.reshape(self.shape)

    def norms(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(w.reshape(w.shape[0], -1), dim=1)

    def scale(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return w * g.view(-1, *(1,) * (w.dim() - 1))


class FeaturesLastWeight(DenseWeight):
    """A weight with the output features last: GPT-2 ``Conv1D`` ``(in, out)`` (``transposed``: a ``B @ A``
    delta is ``(out, in)``) and ``nn.Embedding`` ``(num, dim)`` (its delta is ``(num, dim)`` already)."""

    def __init__(self, weight: torch.Tensor, shape: tuple[int, ...], *, transposed: bool) -> None:
        super().__init__(weight, shape)
        self.transposed = transposed

    def from_flat(self, d: torch.Tensor) -> torch.Tensor:
        return d.T.contiguous() if self.transposed else d.reshape(self.shape)

    def norms(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(w, dim=0)

    def scale(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return w * g[None, :]


class QuantizedWeight(DenseWeight):
    """A bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` weight, packed: read dequantized (DoRA's norms),
    never written."""

    unmergeable = (
        "is quantized (bitsandbytes); a merge into a quantized base is refused: merge into the "
        "full-precision checkpoint instead (hub.merge on the full checkpoint), then quantize that"
    )

    def __init__(self, weight: torch.Tensor, shape: tuple[int, ...], state: Any) -> None:
        super().__init__(weight, shape)
        self.state = state  # an 8-bit layer's matmul state (its scales move there after a forward)

    def dense(self, original: Any) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w: Any = self.weight
        quant_state = getattr(w, "quant_state", None)
        if quant_state is not None:  # 4-bit
            return bnbf.dequantize_4bit(w.data, quant_state).to(torch.float32).reshape(self.shape)
        scb = w.SCB if w.SCB is not None else self.state.SCB  # 8-bit: int8 rows, absmax scales
        return w.data.to(torch.float32) * scb.to(torch.float32).view(-1, 1) / 127.0
