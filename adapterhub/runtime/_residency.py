"""The resident set of one runtime: slots, contents by key, the names bound to them, LRU order, a budget.

As vLLM's ``LoRAModelManager`` owns the slots and its worker manager decides what to evict, this object
owns the bookkeeping and `Runtime` owns the layers: a content (one adapter's factors, keyed by its
sha256) takes one slot index in every bank of every layer it adapts; any number of names bind to one
content; a content leaves (its slot freed) when the last name bound to it is unbound. Slots grow by
doubling (``grow`` widens every bank first), so an index once given stays valid.

The LRU order (oldest first) is bumped by `touch` whenever a selection names a content; `victims` says
which unpinned contents to unload, oldest first, to fit ``need`` more bytes under ``budget`` (the
runtime itself never evicts; a server's pool asks).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleAdapterError, InvalidOptionError, NotResidentError
from ._parts import Content
from ._select import Selection, build_selection
from ._term import term_for

if TYPE_CHECKING:
    import torch

    from .types import AdapterSpec


class Residency:
    """Slots, contents by content key, names, LRU and budget (see the module docstring)."""

    def __init__(self, cap: int, grow: Callable[[int], None], *, budget: int | None = None) -> None:
        self.cap = cap
        self.budget = budget
        self._grow = grow
        self._free: list[int] = list(range(cap - 1, -1, -1))
        self.contents: dict[str, Content] = {}  # content key -> content
        self.names: dict[str, str] = {}  # name -> content key, in load (bind) order
        self._lru: OrderedDict[str, None] = OrderedDict()  # content keys, least recently used first

    # ------------------------------------------------------------------------ slots

    def take_slot(self) -> int:
        """A free slot index, growing every bank (doubling) when none is left."""
        if not self._free:
            cap = self.cap * 2
            self._grow(cap)
            self._free = list(range(cap - 1, self.cap - 1, -1))
            self.cap = cap
        return self._free.pop()

    def give_slot(self, slot: int) -> None:
        """Return a slot taken for a content that was never added."""
        self._free.append(slot)

    # ------------------------------------------------------------------------ contents and names

    def add(self, content: Content) -> None:
        self.contents[content.sha256] = content
        self._lru[content.sha256] = None

    def bind(self, name: str, key: str) -> str | None:
        """Bind ``name`` to content ``key`` (moved to the end of the load order); the key it had before."""
        old = self.names.pop(name, None)
        self.names[name] = key
        self.touch([key])
        return old

    def unbind(self, name: str) -> str:
        return self.names.pop(name)

    def release(self, key: str) -> Content | None:
        """Drop content ``key`` when no name is bound to it any more (its slot is free again): the content
        dropped, or None while a name still uses it."""
        if key in self.names.values():
            return None
        content = self.contents.pop(key)
        self._lru.pop(key, None)
        self._free.append(content.slot)
        return content

    def content(self, name: str) -> Content:
        return self.contents[self.names[name]]

    def names_of(self, key: str) -> list[str]:
        """The names bound to content ``key``, in load order (unloading them all frees its slot)."""
        return [n for n, k in self.names.items() if k == key]

    def by_slot(self) -> dict[int, Content]:
        return {c.slot: c for c in self.contents.values()}

    def clear(self) -> None:
        self.contents.clear()
        self.names.clear()
        self._lru.clear()

    # ------------------------------------------------------------------------ specs and selections

    def normalize(
        self, spec: AdapterSpec, trained: Collection[str] = (), freeze: Callable[[str], Any] | None = None
    ) -> dict[str, float] | None:
        """``{name: weight}`` of a spec (None: the base), every name resident (a ``trained`` one is made
        resident by ``freeze`` first) and every weight finite."""
        if spec is None:
            return None
        if isinstance(spec, str):
            spec = {spec: 1.0}
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"an adapter spec is a name, None or a {{name: weight}} mapping, got {type(spec).__name__}"
            )
        out: dict[str, float] = {}
        for n, w in spec.items():
            if n not in self.names and n in trained and freeze is not None:
                freeze(str(n))  # using a trained adapter ends its training
            if n not in self.names:
                raise NotResidentError(str(n), tuple(self.names))
            wf = float(w)
            if not math.isfinite(wf):
                raise InvalidOptionError(f"weight of {n} must be a finite number, got {w!r}")
            out[n] = out.get(n, 0.0) + wf
        return out or None

    def slots(self, spec: dict[str, float] | None) -> dict[int, float]:
        """slot -> weight of a normalized spec; refuses what has no exact linear combination."""
        if not spec:
            return {}
        slots: dict[int, float] = {}
        for n, w in spec.items():
            c = self.content(n)
            slots[c.slot] = slots.get(c.slot, 0.0) + w
        for n in spec:
            c = self.content(n)
            if (c.dora or c.replaces) and (len(slots) > 1 or slots[c.slot] != 1.0):
                what = "DoRA magnitudes" if c.dora else "full replacement weights (modules_to_save)"
                raise IncompatibleAdapterError(
                    f"{n} carries {what}, which have no exact linear combination; use it alone with weight 1"
                )
        return {s: w for s, w in slots.items() if w != 0.0}

    def select(
        self, specs: Sequence[dict[str, float] | None], per_row: bool, device: torch.device
    ) -> Selection | None:
        """The selection of normalized specs: one for every row (``per_row`` False), else one per row;
        its term implementation chosen (`_term.term_for`) and its contents marked used."""
        by_slot = self.by_slot()
        sel = build_selection(
            [self.slots(s) for s in specs],
            len(specs) if per_row else None,
            dora={s for s, c in by_slot.items() if c.dora},
            replaces={s for s, c in by_slot.items() if c.replaces},
            device=device,
        )
        if sel is not None:
            sel.term = term_for(sel)
            self.touch(by_slot[s].sha256 for s in sel.slots)
        return sel

    # ------------------------------------------------------------------------ LRU and budget

    def touch(self, keys: Iterable[str]) -> None:
        """Mark contents as just used."""
        for key in keys:
            if key in self._lru:
                self._lru.move_to_end(key)

    @property
    def used_bytes(self) -> int:
        return sum(c.bytes for c in self.contents.values())

    def lru(self) -> list[str]:
        """Content keys, least recently used first."""
        return list(self._lru)

    def victims(self, need: int, pinned: Collection[str] = ()) -> list[str] | None:
        """Content keys to unload (oldest first, never a pinned one) so that ``need`` more bytes fit under
        the budget: ``[]`` when they fit already (or there is no budget), None when they cannot fit."""
        if self.budget is None:
            return []
        over = self.used_bytes + need - self.budget
        out: list[str] = []
        for key in self._lru:
            if over <= 0:
                break
            if key in pinned:
                continue
            out.append(key)
            over -= self.contents[key].bytes
        return out if over <= 0 else None
