"""What every forward of one runtime applies: the active spec, the open ``rows()`` blocks and the merge.

`Applied` keeps `RuntimeState.sel` (what the layers read) in step with them: the innermost open rows()
block wins, else the active spec; nothing while a spec is merged into the weights (the layers are out of
the forwards then, `Layers.suspend`). A new selection of the same structure as the current one is copied
into it in place (`Selection.refill`), so a compiled graph keeps running unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from ..errors import InvalidOptionError
from ._parts import Merged
from ._residency import Residency
from ._select import RuntimeState

if TYPE_CHECKING:
    import torch

#: one row's normalized spec: ``{name: weight}``, or None for the base
Spec = dict[str, float] | None


class Applied:
    """The active spec, the open rows() blocks (innermost last) and the merged spec of one runtime."""

    def __init__(self, residency: Residency, state: RuntimeState, device: torch.device) -> None:
        self.residency = residency
        self.state = state
        self.device = device
        self.active: Spec = None
        self.rows_stack: list[list[Spec]] = []
        self.merged: Merged | None = None

    def refuse_merged(self, then: str) -> None:
        """Raise while something is merged: ``... call rt.unmerge() {then}``."""
        if self.merged is not None:
            raise InvalidOptionError(
                f"{self.merged.spec} is merged into the weights; call rt.unmerge() {then}"
            )

    def reselect(self) -> None:
        """Make the current selection follow the innermost open rows() block, else the active spec."""
        if self.merged is not None:
            self.state.sel = None
            return
        specs = self.rows_stack[-1] if self.rows_stack else None
        sel = self.residency.select([self.active] if specs is None else specs, specs is not None, self.device)
        cur = self.state.sel
        if sel is not None and cur is not None and cur.same_structure(sel):
            cur.refill(sel)  # in place, so a compiled graph keeps running unchanged
        else:
            self.state.sel = sel

    def activate(self, norm: Spec) -> None:
        self.residency.slots(norm)  # check combinability before changing anything
        if self.merged is not None and norm != self.merged.spec:
            self.refuse_merged("before activating something else")
        self.active = norm
        if self.merged is None and not self.rows_stack:
            self.reselect()

    @contextlib.contextmanager
    def rows(self, normalized: list[Spec], live: Callable[[], bool]) -> Iterator[None]:
        """Apply ``normalized`` (one spec per row) inside the block (``live``: the runtime is attached)."""
        self.refuse_merged("before using per-row adapters")
        if not normalized:
            raise InvalidOptionError("rows() needs one spec per row of the batch; got none")
        sel = self.residency.select(normalized, True, self.device)
        self.rows_stack.append(normalized)
        prev = self.state.sel
        self.state.sel = sel
        try:
            yield
        finally:
            self.rows_stack.pop()
            self.state.sel = prev
            if live():
                self.reselect()

    def in_use(self, name: str) -> str | None:
        """Why ``name`` cannot be unloaded now (merged, active, or in an open rows() block), or None."""
        if self.merged is not None and name in self.merged.spec:
            return f"{name} is merged into the weights; call rt.unmerge() first"
        if self.active is not None and name in self.active:
            return f"{name} is active; call rt.activate() with something else first"
        if any(spec and name in spec for specs in self.rows_stack for spec in specs):
            return f"{name} is used by an open rt.rows() block; leave it first"
        return None
