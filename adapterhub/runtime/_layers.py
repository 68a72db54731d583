"""One adapted module of a live model: the stacked factor banks of every resident adapter, and the base
class of the layer kinds (`_kinds`: linear, GPT-2 ``Conv1D``, quantized linear, embedding, convolution).

Each targeted module gets one `Layer` (made when the first resident adapter targets it, removed when the
last one leaves), which puts itself in the module's forward: a fused forward for a plain ``nn.Linear``
(`_linear`), a forward hook for every other module. It reads the runtime's current `Selection` and adds,
for the batch's ``K`` slots together, the term its kind's docstring writes out.

Banks: ``lora_A`` ``(cap, r, in[, k...])`` (an embedding's: the ``(cap, num, r)`` lookup table) and
``lora_B`` ``(cap, r, out)`` holding ``s * B.T`` (the scale folded in when the adapter is written).
Slots of a bank are padded with zeros to the largest rank resident on the layer, so one slot index
addresses every bank and switching never changes a shape. Variants (`_variants`: ``lora_bias``, DoRA,
``modules_to_save``) are strategy objects the layer holds only once an adapter needs them.

In eager mode the gathered factors of a selection are cached per layer, so decode steps under one
selection gather once; under ``torch.compile`` they are gathered in the graph.

The banks are plain inference buffers (scale folded in, no autograd). Trainable adapters
(``Runtime.create``) live in `adapterhub.runtime.train`, as hooks of their own holding ``A`` / ``B`` as
``nn.Parameter``; freezing one turns it into resident banks like any loaded adapter.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ._base import DenseWeight
from ._select import RuntimeState, Selection
from ._variants import Dora, LoraBias, ModulesToSave

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = [
    "LINEAR_KINDS",
    "Layer",
    "LayerKind",
    "RuntimeState",
    "inplace_ok",
    "layer_kind",
    "logical_shape",
    "quantized_kind",
    "unadaptable_note",
]

LayerKind = Literal["linear", "conv1d", "linear4bit", "linear8bit", "embedding", "conv", "replace"]


def conv1d_class() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` (weight stored ``(in, out)``), when transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional for the runtime
        return None
    return Conv1D


def quantized_kind(module: nn.Module) -> LayerKind | None:
    """``"linear4bit"`` / ``"linear8bit"`` for a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` (never
    imports bitsandbytes: a model holding its layers has imported it already)."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "linear4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "linear8bit"
    return None


#: 4-bit / 8-bit embeddings (bitsandbytes) and an output layer tied to one: no LoRA attaches to them
_QUANTIZED_EMBEDDINGS = ("Embedding4bit", "EmbeddingNF4", "EmbeddingFP4", "Embedding8bit", "TiedLinear4bit")


def unadaptable_note(module: nn.Module) -> str:
    """A hint for a target the runtime refuses because it is a quantized embedding, else ``""``."""
    if type(module).__name__ in _QUANTIZED_EMBEDDINGS:
        return " (a quantized embedding, as --quantize nf4-all loads it: load the base with nf4 to adapt it)"
    return ""


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Which LoRA math a module takes (``linear``, ``conv1d``, ``embedding``, ``conv``), or None when the
    runtime cannot adapt it (a quantized embedding among them). A bitsandbytes linear is ``linear`` here
    (its layer class is chosen by `quantized_kind`)."""
    if type(module).__name__ in _QUANTIZED_EMBEDDINGS:
        return None
    c1d = conv1d_class()
    if c1d is not None and isinstance(module, c1d):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    return None


#: the kinds that take a linear LoRA
LINEAR_KINDS: tuple[LayerKind, ...] = ("linear", "conv1d")


def logical_shape(module: nn.Module, weight: torch.Tensor) -> tuple[int, ...]:
    """The weight's shape in ``torch.nn`` layout: ``(out, in)`` also for a transposed ``Conv1D`` and for a
    quantized linear, whose packed weight has another shape."""
    if quantized_kind(module) is not None:
        m: Any = module
        return (int(m.out_features), int(m.in_features))
    if layer_kind(module) == "conv1d":
        return (int(weight.shape[1]), int(weight.shape[0]))
    return tuple(int(d) for d in weight.shape)


class Layer:
    """The banks of one adapted module and its place in the module's forward (subclassed per kind)."""

    #: the kind's name, for messages (`layer_kind`)
    kind: LayerKind = "replace"
    #: whether a plain module of this kind may take the fused forward (`_linear.install`)
    fusable = False
    #: whether a `table.RowTable` can serve adapters on this kind
    tabled = False

    def __init__(
        self, name: str, module: nn.Module, state: RuntimeState, *, cap: int, dtype: torch.dtype
    ) -> None:
        self.name = name
        self.module = module
        self.state = state
        self.cap = cap
        self.rank = 0
        weight = getattr(module, "weight", None)
        self.weight: torch.Tensor = weight if isinstance(weight, torch.Tensor) else next(module.parameters())
        self.weight_shape: tuple[int, ...] = tuple(self.weight.shape)  # in the module's own layout
        self.device = self.weight.device
        self.dtype = dtype
        self.in_f, self.out_f = self.features()
        #: how merging and DoRA see the base weight (`_base`; the kinds with another layout replace it)
        self.base = DenseWeight(self.weight, self.weight_shape)
        self.kernel: tuple[int, ...] = ()
        self.lora_A: torch.Tensor | None = None
        self.lora_B: torch.Tensor | None = None
        self.bias: LoraBias | None = None
        self.dora: Dora | None = None
        self.save = ModulesToSave()
        self.users: set[int] = set()  # slots that wrote anything here
        self.lora_slots: set[int] = set()  # slots with low-rank factors here
        self.extras: set[int] = set()  # slots with a lora_bias or DoRA magnitudes here
        self.version = 0
        self._cache: tuple[Any, ...] | None = None
        self._rcache: tuple[Any, ...] | None = None
        self.handle: RemovableHandle | None = None  # the forward hook, or
        self.forward: Any = None  # the module's fused forward (`_linear.install`)

    def features(self) -> tuple[int, int]:
        """``(in, out)`` of the module (``torch.nn`` layout of its weight)."""
        shape = logical_shape(self.module, self.weight)
        return int(shape[1]), int(shape[0])

    # ---------------------------------------------------------------------------- in the forward

    def engage(self) -> None:
        """Put the layer in the module's forward: a forward hook (`_linear.LinearLayer` gives plain
        ``nn.Linear`` modules a fused forward instead)."""
        self.handle = self.module.register_forward_hook(self, with_kwargs=True)

    def suspend(self) -> None:
        """Take the layer out of the module's forward (banks kept; `engage` puts it back)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.forward is not None:
            if self.module.__dict__.get("forward") is self.forward:
                del self.module.__dict__["forward"]
            self.forward = None

    def remove(self) -> None:
        self.state.layout += 1
        self.suspend()
        self.lora_A = self.lora_B = None
        self.bias = self.dora = None
        self.save = ModulesToSave()
        self._cache = self._rcache = None

    # ---------------------------------------------------------------------------- banks

    def bank_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of one slot of ``lora_A`` and ``lora_B`` at ``rank``."""
        return (rank, self.in_f, *self.kernel), (rank, self.out_f)

    def _alloc(self, rank: int) -> None:
        """Make the LoRA banks hold ``rank`` (growing the padded rank of what is there)."""
        if self.lora_A is not None and rank <= self.rank:
            return
        sa, sb = self.bank_shapes(rank)
        lora_a = torch.zeros((self.cap, *sa), dtype=self.dtype, device=self.device)
        lora_b = torch.zeros((self.cap, *sb), dtype=self.dtype, device=self.device)
        if self.lora_A is not None and self.lora_B is not None:
            old_a, old_b = self.bank_shapes(self.rank)
            lora_a[(slice(None), *(slice(0, d) for d in old_a))] = self.lora_A
            lora_b[:, : self.rank] = self.lora_B
        self.lora_A, self.lora_B, self.rank = lora_a, lora_b, rank
        self.state.layout += 1
        self._changed()

    def grow(self, cap: int) -> None:
        """Make room for ``cap`` slots (new slots are zero, so they add nothing)."""
        if cap <= self.cap:
            return

        def more(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.zeros((cap, *t.shape[1:]), dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        self.lora_A, self.lora_B = more(self.lora_A), more(self.lora_B)
        for variant in (self.bias, self.dora):
            if variant is not None:
                variant.grow(cap)
        self.cap = cap
        self.state.layout += 1
        self._changed()

    def write(
        self,
        slot: int,
        *,
        a: torch.Tensor,
        b: torch.Tensor,
        scale: float,
        bias: torch.Tensor | None = None,
        gm1: torch.Tensor | None = None,
    ) -> None:
        """Put one adapter's factors into ``slot``: ``a`` ``(r, in[, k...])``, ``b`` ``(out, r)``
        (``LoraModule`` layout; for an embedding ``a`` is ``(r, dim)`` and ``b`` the ``(num, r)`` table)."""
        r = int(a.shape[0])
        self._alloc(r)
        assert self.lora_A is not None and self.lora_B is not None
        a, b = a.detach().to(self.device), b.detach().to(self.device).reshape(b.shape[0], r)
        if r < self.rank:  # (a full-rank write overwrites the whole slot)
            self.lora_A[slot].zero_()
            self.lora_B[slot].zero_()
        # the first factor is copied as it is (rounded once to the bank's dtype); the second is scaled
        # in fp32 and rounded once, by one kernel writing into the bank (elementwise ops compute in
        # fp32 and round once; a factor of another dtype is made fp32 first, so a bf16 factor in an fp32
        # bank is not rounded to bf16 on the way)
        first, second = self.bank_sources(a, b)
        self.lora_A[slot][tuple(slice(0, d) for d in first.shape)].copy_(first)
        dt = self.dtype
        torch.mul(
            second if second.dtype == dt else second.to(torch.float32), scale, out=self.lora_B[slot, :r]
        )
        if bias is not None:
            self.bias = self.bias or LoraBias(self.cap, self.out_f, self.dtype, self.device)
            self.bias.write(slot, bias, scale)
        if gm1 is not None:
            self.dora = self.dora or Dora(self.cap, self.out_f, self.dtype, self.device)
            self.dora.write(slot, gm1)
        if bias is not None or gm1 is not None:
            self.extras.add(slot)
        self.users.add(slot)
        self.lora_slots.add(slot)
        self._changed()

    def bank_sources(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what goes into ``lora_A``, what is scaled into ``lora_B``) of one adapter's factors."""
        return a.reshape(a.shape[0], self.in_f, *self.kernel), b.T

    def write_replacement(self, slot: int, params: dict[str, torch.Tensor]) -> None:
        self.save.params[slot] = params
        self.users.add(slot)
        self._changed()

    def clear(self, slot: int) -> None:
        """Zero ``slot`` everywhere (an unloaded adapter's weights are never served again)."""
        for t in (self.lora_A, self.lora_B):
            if t is not None:
                t[slot].zero_()
        for variant in (self.bias, self.dora):
            if variant is not None:
                variant.clear(slot)
        self.save.params.pop(slot, None)
        self.users.discard(slot)
        self.lora_slots.discard(slot)
        self.extras.discard(slot)
        self._changed()

    def _changed(self) -> None:
        self.version += 1
        self._cache = self._rcache = None

    # ---------------------------------------------------------------------------- factors

    def gathered(self, sel: Selection, compiling: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(``lora_A``, ``lora_B``) of the selection's slots concatenated along the rank: ``(K*r, in)`` and
        ``(K*r, out)``, the coefficients folded into ``lora_B`` when every row takes the same."""
        if not compiling and self._cache is not None:
            c_sel, c_ver, c_sver, lora_a, lora_b = self._cache
            if c_sel is sel and c_ver == self.version and c_sver == sel.version:
                return lora_a, lora_b
        assert self.lora_A is not None and self.lora_B is not None
        idx, k, r = sel.idx, sel.k, self.rank
        lora_b = self.lora_B.index_select(0, idx).reshape(k * r, self.out_f)
        lora_a = self.gather_a(idx, k)
        if sel.rows is None and not sel.unit:  # one combination for all rows: fold it in
            lora_b = lora_b * sel.coef.reshape(-1).repeat_interleave(r).to(lora_b.dtype)[:, None]
        lora_b = self.shape_b(lora_b, k)
        if not compiling:
            self._cache = (sel, self.version, sel.version, lora_a, lora_b)
        return lora_a, lora_b

    def gather_a(self, idx: torch.Tensor, k: int) -> torch.Tensor | None:
        assert self.lora_A is not None
        return self.lora_A.index_select(0, idx).reshape(k * self.rank, self.in_f, *self.kernel)

    def shape_b(self, lora_b: torch.Tensor, k: int) -> torch.Tensor:
        return lora_b

    def row_factors(self, sel: Selection, n: int, compiling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, its own slots' factors: ``(n, M*r, in)`` and ``(n, M*r, out)`` with the row's weights
        folded into ``lora_B``."""
        if not compiling and self._rcache is not None:
            c_sel, c_ver, c_sver, c_n, lora_a, lora_b = self._rcache
            if c_sel is sel and c_ver == self.version and c_sver == sel.version and c_n == n:
                return lora_a, lora_b
        assert self.lora_A is not None and self.lora_B is not None
        slots, coef = sel.rows_of(n)
        flat = slots.reshape(-1)
        m, r = int(slots.shape[1]), self.rank
        lora_a = self.lora_A.index_select(0, flat).reshape(n, m * r, self.in_f)
        lora_b = self.lora_B.index_select(0, flat).reshape(n, m, r, self.out_f)
        lora_b = (lora_b * coef.to(lora_b.dtype).view(n, m, 1, 1)).reshape(n, m * r, self.out_f)
        if not compiling:
            self._rcache = (sel, self.version, sel.version, n, lora_a, lora_b)
        return lora_a, lora_b

    # ---------------------------------------------------------------------------- the forward's math

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """The forward hook: ``output`` with the selection's term (and variants) added."""
        state = self.state
        sel = state.sel
        if sel is None or state.passthrough or not isinstance(output, torch.Tensor):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        n = int(x.shape[0])
        if sel.same_rows is not None:
            sel.check_rows(n)
        if sel.replace and self.save:
            output = self.save.replace(self.module, state, sel, x, args, kwargs, output, n)
        if self.lora_A is None:
            return output
        return self.add_term(sel, x, output, n)

    def add_term(self, sel: Selection, x: torch.Tensor, output: torch.Tensor, n: int) -> torch.Tensor:
        """``output`` plus the selection's low-rank term for this kind (the subclasses' math)."""
        return output

    def plain(self, sel: Selection) -> bool:
        """Whether no variant applies under ``sel`` (the term can be added in place)."""
        return self.bias is None and not (sel.dora and self.dora is not None)

    def out_view(self, v: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """A per-row ``(n or 1, out)`` tensor viewed to broadcast over ``output`` (features last)."""
        return v.view(v.shape[0], *(1,) * (output.dim() - 2), self.out_f)

    def base_bias(self, output: torch.Tensor) -> torch.Tensor | None:
        """The module's own bias viewed to broadcast over ``output`` (None without one)."""
        b = getattr(self.module, "bias", None)
        return b.view(self.out_f) if isinstance(b, torch.Tensor) else None

    def finish(self, sel: Selection, output: torch.Tensor, delta: torch.Tensor, n: int) -> torch.Tensor:
        """``output + delta`` with the variants the selection uses (`_variants`)."""
        if not self.plain(sel):
            coef = sel.coef_for(n).to(self.dtype)

            def view(v: torch.Tensor) -> torch.Tensor:
                return self.out_view(v, output)

            if self.bias is not None:
                delta = self.bias.add(delta, sel, coef, view)
            if sel.dora and self.dora is not None:
                return self.dora.apply(output, delta, sel, coef, view, self.base_bias(output))
        delta = delta.to(output.dtype)
        if inplace_ok(output, delta):
            return output.add_(delta)
        return output + delta

    # ---------------------------------------------------------------------------- merging

    def lora_delta(self, slot: int) -> torch.Tensor:
        """``s * B @ A`` of ``slot`` in fp32, in the layout of the module's own weight tensor."""
        assert self.lora_A is not None and self.lora_B is not None
        lora_a = self.lora_A[slot].to(torch.float32)
        lora_b = self.lora_B[slot].to(torch.float32)
        return self.base.from_flat(lora_b.T @ lora_a.reshape(lora_a.shape[0], -1))


def inplace_ok(output: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether ``other`` may be added into ``output`` in place."""
    if output.dtype != other.dtype or not output.is_contiguous():
        return False
    return not (torch.is_grad_enabled() and (output.requires_grad or other.requires_grad))
