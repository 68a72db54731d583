"""How a batch's low-rank term is computed for linear layers: one small interface, chosen once per selection.

As vLLM's ``PunicaWrapperBase``: `LoraTerm` has ``shrink`` (``h = x @ lora_A.T``), ``expand``
(``y += h @ lora_B.T``) and ``add_lora_linear`` (both), each written out as a plain loop under
"Semantics:". `term_for` picks the implementation when the selection is made (`build_selection`,
`table.RowTable`), so a forward never decides again:

- `Concat`: one combination for every row (``activate``): the selection's ``K`` slots concatenated along
  the rank, the coefficients folded into ``lora_B``: two GEMMs.
- `Masked`: rows with their own combinations (``rows``): the same concatenated factors with each row's
  columns of ``h`` scaled by its coefficients; rows of ``LONG_ROWS`` tokens or more over more adapters than
  any row uses take `PerRow` instead (two batched GEMMs, each row with only its own factors).
- `Table`: a `table.RowTable`'s fixed buffers read by `_rowkernel` (one implementation per backend there:
  torch, and Triton on CUDA), for decode steps captured in a CUDA graph.

The factors a term reads are gathered per layer and selection once (`Layer.gathered`,
`Layer.row_factors`); the fused forward of plain ``nn.Linear`` modules (`_linear`) keeps the result of the
first call as a `_linear.CallPlan` and shares ``shrink`` among siblings that see the same input.
Variants (`_variants`) apply after the term, in `Layer.finish`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InvalidOptionError
from ._layers import Layer, inplace_ok
from ._rowkernel import _torch, apply_gathered, gather, kernel_for, rows_term
from ._select import Selection

#: tokens per row from which rows over several adapters take the per-row batched GEMMs (below it, the
#: concatenated factors of all the batch's adapters with a per-row mask cost less)
LONG_ROWS = 8


class LoraTerm:
    """The low-rank term of a linear layer (``x`` ``(tokens, in)`` in the banks' dtype; ``out``
    ``(tokens, out)``). Semantics of every implementation::

        for t in range(tokens):
            row = t // (tokens // n)
            for slot, c in zip(row_slots[row], row_coef[row]):
                out[t] += c * (x[t] @ lora_A[slot].T) @ lora_B[slot]      # lora_B holds s * B.T
    """

    #: the shrink is batched per row (``h`` ``(n, tokens/n, M*r)``), else flat (``(tokens, K*r)``)
    per_row = False

    def pick(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int) -> LoraTerm:
        """The implementation for this input (only `Masked` looks at it)."""
        return self

    def shrink(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int, compiling: bool) -> torch.Tensor:
        raise NotImplementedError

    def expand(
        self, layer: Layer, sel: Selection, h: torch.Tensor, out: torch.Tensor, n: int, compiling: bool
    ) -> torch.Tensor:
        raise NotImplementedError

    def add_lora_linear(
        self,
        layer: Layer,
        sel: Selection,
        x: torch.Tensor,
        out: torch.Tensor,
        n: int,
        compiling: bool,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``out + term`` (in place where it can be); ``h``: the shrink when a `_linear.Family` made it."""
        if h is None:
            h = self.shrink(layer, sel, x, n, compiling)
        return self.expand(layer, sel, h, out, n, compiling)


class Concat(LoraTerm):
    """Concatenated factors of the selection's ``K`` slots. Semantics::

    A_cat = cat(lora_A[slot] for slot in slots)                   # (K*r, in)
    B_cat = cat(w_k * lora_B[slot_k] for k)                       # (K*r, out), folded when rows are alike
    h = x @ A_cat.T;  h[row] *= mask[row]   (rows given only)     # mask: each row's w_k per column
    out += h @ B_cat
    """

    def shrink(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int, compiling: bool) -> torch.Tensor:
        lora_a = layer.gathered(sel, compiling)[0]
        assert lora_a is not None
        h = torch.mm(x, lora_a.T)
        if sel.rows is None:
            return h
        if compiling:
            mask = sel.coef_for(n).repeat_interleave(layer.rank, dim=1).to(h.dtype)
            return (h.view(n, -1, h.shape[-1]) * mask.unsqueeze(1)).view(h.shape)
        return scale_rows(h, n, sel.mask_for(n, layer.rank, h.dtype))

    def expand(
        self, layer: Layer, sel: Selection, h: torch.Tensor, out: torch.Tensor, n: int, compiling: bool
    ) -> torch.Tensor:
        lora_b = layer.gathered(sel, compiling)[1]
        if layer.plain(sel) and inplace_ok(out, h):
            out.view(-1, layer.out_f).addmm_(h, lora_b)
            return out
        return layer.finish(sel, out, (h @ lora_b).view(*out.shape), n)


class PerRow(LoraTerm):
    """Each row with only its own slots' factors: two batched GEMMs. Semantics::

    A_row[i] = cat(lora_A[s] for s in row_slots[i])               # (n, M*r, in)
    B_row[i] = cat(row_coef[i, m] * lora_B[s_m] for m)            # (n, M*r, out)
    out[i] += (x[i] @ A_row[i].T) @ B_row[i]                      # x[i]: the row's tokens
    """

    per_row = True

    def shrink(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int, compiling: bool) -> torch.Tensor:
        lora_a = layer.row_factors(sel, n, compiling)[0]
        return torch.bmm(x.view(n, -1, layer.in_f), lora_a.transpose(1, 2))

    def expand(
        self, layer: Layer, sel: Selection, h: torch.Tensor, out: torch.Tensor, n: int, compiling: bool
    ) -> torch.Tensor:
        lora_b = layer.row_factors(sel, n, compiling)[1]
        if layer.plain(sel) and inplace_ok(out, h):
            out.view(n, -1, layer.out_f).baddbmm_(h, lora_b)
            return out
        return layer.finish(sel, out, torch.bmm(h, lora_b).view(*out.shape), n)


class Masked(Concat):
    """Rows with their own combinations: `Concat` with a per-row mask, or `PerRow` for long rows over
    more adapters than any row uses (`pick`)."""

    def pick(self, layer: Layer, sel: Selection, x: torch.Tensor, n: int) -> LoraTerm:
        assert sel.row_slots is not None
        if sel.k > sel.row_slots.shape[1] and x.numel() >= LONG_ROWS * n * layer.in_f:
            return PER_ROW
        return self

    def add_lora_linear(
        self,
        layer: Layer,
        sel: Selection,
        x: torch.Tensor,
        out: torch.Tensor,
        n: int,
        compiling: bool,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        term = self.pick(layer, sel, x, n)
        if term is self:
            return super().add_lora_linear(layer, sel, x, out, n, compiling, h)
        return term.add_lora_linear(layer, sel, x, out, n, compiling, h)


class Table(LoraTerm):
    """A `table.RowTable`'s rows, read straight from the banks by one implementation of
    `_rowkernel.rows_term` (torch's, or Triton's on CUDA: `table_term` picks it once). Semantics::

    for t: for m: if row_slots[row, m] >= 0:
        out[t] += row_coef[row, m] * (x[t] @ lora_A[slot].T) @ lora_B[slot]   (fp32, rounded once)
    """

    #: most bytes of gathered factors (all layers together) that torch's kernel keeps between steps
    KEEP_BYTES = 32 << 20

    def __init__(self, kernel: Any = rows_term) -> None:
        self.kernel = kernel
        #: with torch's kernel, per layer: its rows' gathered factors while neither the table's rows nor
        #: the layer's banks change (each decode step of a batch reads them again)
        self._kept: dict[int, tuple[Layer, int, int, Any, int]] = {}
        self._kept_bytes = 0

    def add_lora_linear(
        self,
        layer: Layer,
        sel: Selection,
        x: torch.Tensor,
        out: torch.Tensor,
        n: int,
        compiling: bool,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert layer.lora_A is not None and layer.lora_B is not None and sel.rows is not None
        if x.shape[0] % sel.rows or not out.is_contiguous():
            raise InvalidOptionError(f"the batch does not have the row table's {sel.rows} rows")
        assert sel.row_slots is not None and sel.row_coef is not None
        if self.kernel is not _torch:
            self.kernel(x, layer.lora_A, layer.lora_B, sel.row_slots, sel.row_coef, out.view(-1, layer.out_f))
            return out
        hit = self._kept.get(id(layer))
        if hit is not None and hit[0] is layer and hit[1:3] == (layer.version, sel.version):
            parts = hit[3]
        else:
            parts = gather(layer.lora_A, layer.lora_B, sel.row_slots, sel.row_coef)
            if hit is not None:
                self._kept_bytes -= hit[4]
                del self._kept[id(layer)]
            size = sum(a.numel() + s.numel() for a, s in parts) * 4
            if self._kept_bytes + size <= self.KEEP_BYTES:
                self._kept[id(layer)] = (layer, layer.version, sel.version, parts, size)
                self._kept_bytes += size
        apply_gathered(x, parts, out.view(-1, layer.out_f))
        return out


CONCAT = Concat()
PER_ROW = PerRow()
MASKED = Masked()


def term_for(sel: Selection) -> LoraTerm:
    """The implementation a selection uses, chosen once when it is made (a `table.RowTable`'s takes
    `table_term`)."""
    if sel.table:
        return Table()
    return CONCAT if sel.rows is None else MASKED


def table_term(device: torch.device) -> Table:
    """A row table's term for banks on ``device``, its kernel picked now (`_rowkernel.kernel_for`)."""
    return Table(kernel_for(device))


def scale_rows(h: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    """``h`` (n * tokens, C) times the per-row column scales ``mask`` (n, C), in place."""
    if h.shape[0] == n:
        return h.mul_(mask)
    return h.view(n, -1, h.shape[-1]).mul_(mask.unsqueeze(1)).view(h.shape)
