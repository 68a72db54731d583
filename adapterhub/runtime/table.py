"""Per-row adapters in fixed device buffers, for decode steps captured in a CUDA graph.

``rt.rows(specs)`` builds a new selection (new index tensors, gathered factors) for every mix of adapters,
which a captured graph cannot follow. A `RowTable` is made once for a batch size and a number of slots
per row; ``set(specs)`` refills its two small buffers in place, and every adapted linear reads each row's
factors straight from the banks through them (`_rowkernel.rows_term`), so one captured step serves any
mix of resident adapters, the base (no slot) included::

    table = RowTable(rt, rows=64)
    table.set(["a", "b", None, {"a": 0.7, "b": 0.3}, ...])   # one spec per row; in place
    with table.applied():
        graph = capture(step)                                  # or run it eagerly, anywhere
    table.set([...]); graph.replay()                           # another mix, the same graph

A table serves plain LoRA on the linear kinds (``nn.Linear``, GPT-2 ``Conv1D``, bitsandbytes ``Linear4bit`` /
``Linear8bitLt``); ``set`` refuses adapters with DoRA
magnitudes, ``lora_bias``, ``modules_to_save`` replacements or other layer kinds (use `Runtime.rows`
for those). A graph captured under a table stays right while `current` is true: loading an adapter
that needs new banks (a new module, a higher rank, more slots) or removing a layer ends it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from ..errors import IncompatibleAdapterError, InvalidOptionError
from ._select import Selection
from ._term import table_term

if TYPE_CHECKING:
    from ._parts import Content
    from .runtime import AdapterSpec, Runtime


class RowTable:
    """``rows`` rows, each with up to ``width`` slots and their weights (see the module docstring)."""

    def __init__(self, rt: Runtime, rows: int, width: int = 1) -> None:
        rt._check_live()
        if rows < 1 or width < 1:
            raise InvalidOptionError(f"a row table needs rows >= 1 and width >= 1, got {rows} and {width}")
        self._rt = rt
        self.rows = rows
        self.width = width
        self._layout = rt._state.layout
        dev = rt._device
        self.slots = torch.full((rows, width), -1, dtype=torch.long, device=dev)
        self.coef = torch.zeros((rows, width), dtype=torch.float32, device=dev)
        empty = torch.zeros((1, 0), dtype=torch.float32, device=dev)
        self._sel = Selection(
            slots=(),
            coef=empty,
            idx=torch.zeros(0, dtype=torch.long, device=dev),
            rows=rows,
            unit=False,
            dora=False,
            row_slots=self.slots,
            row_coef=self.coef,
            table=True,
            term=table_term(dev),
        )

    @property
    def current(self) -> bool:
        """Whether the banks a captured step reads are still the ones it was captured with."""
        return not self._rt._detached and self._rt._state.layout == self._layout

    def set(self, specs: Sequence[AdapterSpec]) -> None:
        """Give row ``i`` ``specs[i]`` (a resident name, None, or ``{name: weight}``); rows past
        ``len(specs)`` get none. Nothing changes when a spec is refused.

        Raises:
            AdapterNotFoundError: a name is not resident.
            IncompatibleAdapterError: an adapter this table cannot serve (see the module docstring).
            InvalidOptionError: more specs than rows, a row with more adapters than ``width``, an
                adapter merged into the weights, or a table made before the banks last changed.
        """
        rt = self._check()
        rt._applied.refuse_merged("first")
        if len(specs) > self.rows:
            raise InvalidOptionError(f"{len(specs)} specs for a row table of {self.rows} rows")
        slots = torch.full((self.rows, self.width), -1, dtype=torch.long)
        coef = torch.zeros((self.rows, self.width), dtype=torch.float32)
        by_slot = {
            c.slot: (n, c) for n, sha in rt.residency.names.items() for c in [rt.residency.contents[sha]]
        }
        for i, spec in enumerate(specs):
            row = rt.residency.slots(rt._normalize(spec))
            if len(row) > self.width:
                raise InvalidOptionError(
                    f"row {i} combines {len(row)} adapters; this table holds {self.width}"
                )
            for j, (slot, w) in enumerate(row.items()):
                name, c = by_slot[slot]
                why = _unservable(c)
                if why:
                    raise IncompatibleAdapterError(
                        f"{name} {why}; a row table serves plain LoRA only (use rt.rows)"
                    )
                slots[i, j], coef[i, j] = slot, w
        self.slots.copy_(slots)
        self.coef.copy_(coef)
        self._sel.version += 1  # what a layer gathered for the old rows is stale

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Forwards inside the block apply the table's rows (the batch must have ``rows`` rows)."""
        rt = self._check()
        prev = rt._state.sel
        rt._state.sel = self._sel
        try:
            yield
        finally:
            rt._state.sel = prev

    def _check(self) -> Runtime:
        rt = self._rt
        rt._check_live()
        if not self.current:
            raise InvalidOptionError(
                "the runtime's banks changed since this row table was made; make a new one"
            )
        return rt


def _unservable(c: Content) -> str | None:
    if c.dora:
        return "carries DoRA magnitudes"
    if c.replaces:
        return "carries modules_to_save replacements"
    for layer in c.layers:
        if not layer.tabled:
            return f"adapts a {layer.kind} layer ({layer.name})"
        if c.slot in layer.extras:
            return "carries a lora_bias"
    return None
