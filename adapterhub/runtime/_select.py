"""What the layer hooks apply in one forward pass: a `Selection` of resident slots and coefficients.

A selection names ``K`` slots of the resident set (``idx``) and a coefficient matrix ``coef`` of shape
``(R, K)``: ``R == 1`` applies the same combination to every row (`Runtime.activate`), ``R`` = the
number of rows gives each row its own (`Runtime.rows`). Every layer computes, for the ``K`` slots at
once, ``x @ A_cat.T`` -> times the per-row coefficients -> ``@ B_cat`` (two GEMMs), so the cost does not
grow with a Python loop over adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class RuntimeState:
    """What every layer of one runtime reads: the current selection and a re-entrancy flag."""

    def __init__(self) -> None:
        self.sel: Selection | None = None
        self.passthrough = False  # set while a replacement recomputes a module (its own hook must not fire)
        #: (parent module name, input width, dtype, device) -> the `_linear.Family` of fused linears
        #: that may share ``x @ lora_A.T``
        self.families: dict[tuple[Any, ...], Any] = {}
        #: bumped whenever a layer comes or goes or its banks are reallocated (`table.RowTable.current`)
        self.layout = 0


@dataclass(eq=False)
class Selection:
    """Slots and coefficients for the hooks (private to the runtime package)."""

    slots: tuple[int, ...]
    coef: torch.Tensor  # (R, K) float32 on the runtime's device
    idx: torch.Tensor  # (K,) long on the runtime's device
    rows: int | None  # None: one combination for every row
    unit: bool  # a single slot with coefficient exactly 1 (nothing to scale)
    dora: bool  # some slot carries DoRA magnitudes
    #: slot -> the rows it covers (None: every row), for slots that replace whole weights
    replace: dict[int, list[int] | None] = field(default_factory=dict)
    #: per row, the slots it uses (padded with slot 0 at weight 0) and their weights: ``(R, M)`` each,
    #: ``M`` the most slots any row combines; for the per-row batched GEMMs of long rows
    row_slots: torch.Tensor | None = None
    row_coef: torch.Tensor | None = None
    version: int = 0
    #: rows given to `Runtime.rows` that all asked for the same thing: applied like ``activate`` (no
    #: per-row mask), the batch still has to have a multiple of this many rows
    same_rows: int | None = None
    #: a `table.RowTable`'s: ``row_slots`` / ``row_coef`` are fixed buffers read by `_rowkernel`
    table: bool = False
    #: ``len(slots)``, kept apart so a compiled graph guards on the count, not on which slots
    k: int = -1
    #: the `_term.LoraTerm` linear layers compute this selection's term with, chosen once by
    #: `_term.term_for` when the selection is made (`Runtime`, `table.RowTable`)
    term: Any = field(default=None, repr=False)
    _expanded: dict[tuple[Any, ...], object] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.k = len(self.slots)

    def same_structure(self, other: Selection) -> bool:
        """Whether ``other`` can be copied into this one in place (`refill`): both one combination for
        every row, no replacements, the same number of slots, unit-ness and DoRA."""
        return (
            self.rows is None
            and other.rows is None
            and not self.replace
            and not other.replace
            and not self.table
            and (self.k, self.unit, self.dora) == (other.k, other.unit, other.dora)
        )

    def refill(self, other: Selection) -> None:
        """Take ``other``'s slots and coefficients in place (a compiled graph keeps reading the same
        tensors); every layer's cache of this selection is dropped by the version bump."""
        self.idx.copy_(other.idx)
        self.coef.copy_(other.coef)
        self.slots = other.slots
        self.version += 1
        self._expanded.clear()

    def check_rows(self, n: int) -> None:
        """Raise when a batch of ``n`` rows does not fit the row specs this selection was made from."""
        specs = self.rows if self.rows is not None else self.same_rows
        if specs is not None and n % specs:
            from ..errors import InvalidOptionError

            raise InvalidOptionError(
                f"the batch has {n} rows but rt.rows() was given {specs} row specs; give one spec per "
                "row of the batch"
            )

    def coef_for(self, n: int) -> torch.Tensor:
        """Coefficients for a batch of ``n`` rows: ``(1, K)`` when uniform, else ``(n, K)``.

        ``n`` may be a multiple of the rows given (``generate`` with ``num_return_sequences`` or beams
        repeats each row in place), and each row's coefficients are repeated likewise.
        """
        if self.rows is None or n == self.rows:
            return self.coef
        key = (n, -1)
        hit = self._expanded.get(key)
        if hit is None:
            self.check_rows(n)
            hit = self.coef.repeat_interleave(n // self.rows, dim=0)
            self._expanded[key] = hit
        return hit  # type: ignore[return-value]

    def rows_of(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(row_slots, row_coef)`` for a batch of ``n`` rows (each row's copies repeat it)."""
        assert self.row_slots is not None and self.row_coef is not None and self.rows is not None
        if n == self.rows:
            return self.row_slots, self.row_coef
        key = (n, -3)
        hit = self._expanded.get(key)
        if hit is None:
            self.coef_for(n)  # checks that n is a multiple of the rows
            m = n // self.rows
            hit = (self.row_slots.repeat_interleave(m, dim=0), self.row_coef.repeat_interleave(m, dim=0))
            self._expanded[key] = hit
        return hit  # type: ignore[return-value]

    def mask_for(self, n: int, r: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-row column scales ``(n or 1, K * r)`` for a layer of padded rank ``r``, in ``dtype``."""
        key = (n, r, dtype)
        hit = self._expanded.get(key)
        if hit is None:
            hit = self.coef_for(n).repeat_interleave(r, dim=1).to(dtype)
            self._expanded[key] = hit
        return hit  # type: ignore[return-value]

    def rows_for(self, slot: int, n: int, device: torch.device) -> torch.Tensor | None:
        """Indices of the batch rows that ``slot`` covers (None: all of them)."""
        rows = self.replace.get(slot)
        if rows is None:
            return None
        key = (n, -2 - slot)
        hit = self._expanded.get(key)
        if hit is None:
            import torch

            assert self.rows is not None
            m = n // self.rows
            hit = torch.tensor([i * m + j for i in rows for j in range(m)], dtype=torch.long, device=device)
            self._expanded[key] = hit
        return hit  # type: ignore[return-value]


def build_selection(
    per_row: list[dict[int, float]],
    rows: int | None,
    *,
    dora: set[int],
    replaces: set[int],
    device: torch.device,
) -> Selection | None:
    """A selection from per-row ``{slot: weight}`` (one entry and ``rows=None`` for every row alike);
    None when no row uses any slot. ``dora`` / ``replaces``: the slots with DoRA or replacements."""
    import torch

    order: list[int] = list(dict.fromkeys(s for r in per_row for s in r))
    if not order:
        return None
    same_rows = None
    if rows is not None and all(r == per_row[0] for r in per_row):
        # every row asks for the same: no mask, no per-row gathers (the batch still has to fit)
        per_row, same_rows, rows = per_row[:1], rows, None
    pos = {s: i for i, s in enumerate(order)}
    coef = torch.zeros(len(per_row), len(order), dtype=torch.float32)
    for i, r in enumerate(per_row):
        for s, w in r.items():
            coef[i, pos[s]] = w
    replace: dict[int, list[int] | None] = {}
    for s in order:
        if s in replaces:
            replace[s] = None if rows is None else [i for i, r in enumerate(per_row) if s in r]
    row_slots = row_coef = None
    if rows is not None:
        width = max(1, max(len(r) for r in per_row))
        rs = torch.zeros(len(per_row), width, dtype=torch.long)
        rc = torch.zeros(len(per_row), width, dtype=torch.float32)
        for i, r in enumerate(per_row):
            for j, (s, w) in enumerate(r.items()):
                rs[i, j], rc[i, j] = s, w
        row_slots, row_coef = _to(rs, device), _to(rc, device)
    return Selection(
        slots=tuple(order),
        coef=_to(coef, device),
        idx=_to(torch.tensor(order, dtype=torch.long), device),
        rows=rows,
        unit=rows is None and len(order) == 1 and float(coef[0, 0]) == 1.0,
        dora=any(s in dora for s in order),
        replace=replace,
        row_slots=row_slots,
        row_coef=row_coef,
        same_rows=same_rows,
    )


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without waiting for the GPU: a pageable host-to-device copy synchronizes
    the stream, a pinned one does not (the caching host allocator keeps the buffer until it is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
