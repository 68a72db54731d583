"""One hooked layer of a live model: stacked factor banks of every resident adapter and the hook math.

Each targeted module gets one forward hook (registered when the first resident adapter targets it,
removed when the last one leaves). The hook reads the runtime's current `Selection` and adds, for the
batch's ``K`` slots together,

- Linear and GPT-2 ``Conv1D``: ``((x @ A_cat.T) * mask) @ Bs_cat``, ``A_cat`` ``(K*r, in)`` and
  ``Bs_cat = (s * B).T`` stacked ``(K*r, out)``;
- Embedding: ``(B_table[slots, ids] * mask) @ sA_cat`` (the table lookup gathers only the rows used);
- Conv: ``conv1x1(convNd(x, A_cat) * mask, Bs_cat)`` with the base's stride, padding and dilation;

where ``mask`` holds each row's coefficient for each slot (``w_i``; the scale ``s_i`` is folded into the
second factor when the adapter is loaded). Slots of a bank are padded with zeros to the largest rank
resident on the layer, so one slot index addresses every bank and switching never changes a shape.

DoRA rescales output features per adapter: ``g = m / ||W0 + s B A||`` is computed once at load (base
weights do not change while an adapter is resident), and the output becomes
``G * (y - b) + b + G * delta`` with ``G`` the row's ``g`` (1 for rows without DoRA), which is PEFT's
forward. ``lora_bias`` adds ``w * s * bias``. ``modules_to_save`` replacements recompute the module's
output with the replacement parameters for the rows that use them (one call per replacing adapter in the
batch: they are whole weights, not low-rank terms).

In eager mode the gathered ``A_cat`` / ``Bs_cat`` of a selection are cached per layer, so decode steps
under one selection gather once; under ``torch.compile`` they are gathered in the graph.

The banks are plain inference buffers (scale folded in, no autograd). Trainable adapters
(``Runtime.create``) live in `adapterhub.runtime.train`, as hooks of their own holding ``A`` / ``B`` as
``nn.Parameter``; freezing one turns it into resident banks like any loaded adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidOptionError
from ._rowkernel import rows_term
from ._select import Selection

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

LayerKind = Literal["linear", "conv1d", "embedding", "conv", "replace"]


def conv1d_class() -> type | None:
    """transformers' GPT-2 style ``Conv1D`` (weight stored ``(in, out)``), when transformers is there."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is optional for the runtime
        return None
    return Conv1D


def layer_kind(module: nn.Module) -> LayerKind | None:
    """Which LoRA math a module takes, or None when the runtime cannot adapt it."""
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


def logical_shape(module: nn.Module, weight: torch.Tensor) -> tuple[int, ...]:
    """The weight's shape in ``torch.nn`` layout (``(out, in)`` also for a transposed ``Conv1D``)."""
    if layer_kind(module) == "conv1d":
        return (int(weight.shape[1]), int(weight.shape[0]))
    return tuple(int(d) for d in weight.shape)


class RuntimeState:
    """What every hook of one runtime reads: the current selection and a re-entrancy flag."""

    def __init__(self) -> None:
        self.sel: Selection | None = None
        self.passthrough = False  # set while a replacement recomputes a module (its own hook must not fire)
        #: (parent module name, input width, dtype, device) -> the `_fused.Family` of fused linears
        #: that may share ``x @ A.T``
        self.families: dict[tuple[Any, ...], Any] = {}
        #: bumped whenever a layer comes or goes or its banks are reallocated (`table.RowTable.current`)
        self.layout = 0


class Layer:
    """The banks and the hook of one adapted module."""

    def __init__(
        self,
        name: str,
        module: nn.Module,
        kind: LayerKind,
        state: RuntimeState,
        *,
        cap: int,
        dtype: torch.dtype,
    ) -> None:
        self.name = name
        self.module = module
        self.kind = kind
        self.state = state
        self.cap = cap
        self.rank = 0
        self.weight: torch.Tensor = module.weight  # type: ignore[assignment]
        self.device = self.weight.device
        self.dtype = dtype
        shape = logical_shape(module, self.weight)
        if kind == "embedding":
            self.in_f, self.out_f = int(shape[0]), int(shape[1])  # num_embeddings, dim
        else:
            self.in_f, self.out_f = int(shape[1]), int(shape[0])
        self.kernel: tuple[int, ...] = tuple(int(d) for d in shape[2:]) if kind == "conv" else ()
        self.first: torch.Tensor | None = None  # A (cap, r, in[, k...]); embedding: B table (cap, num, r)
        self.second: torch.Tensor | None = None  # (s*B).T (cap, r, out); embedding: s*A (cap, r, dim)
        self.bias: torch.Tensor | None = None  # s * lora_B bias (cap, out)
        self.gm1: torch.Tensor | None = None  # DoRA g - 1 (cap, out)
        self.replacements: dict[int, dict[str, torch.Tensor]] = {}  # slot -> param name -> tensor
        self.users: set[int] = set()  # slots that wrote anything here
        self.lora_slots: set[int] = set()  # slots with low-rank factors here
        self.extras: set[int] = set()  # slots with a lora_bias or DoRA magnitudes here
        self.version = 0
        self._cache: tuple[Any, ...] | None = None
        self._rcache: tuple[Any, ...] | None = None
        self.family: Any = None  # the `_fused.Family` of a fused linear
        self.plan: Any = None  # the `_fused.Plan` of its last selection and input shape
        self.handle: RemovableHandle | None = None  # the forward hook (`hook`), or
        self.forward: Any = None  # the module's fused forward (`_fused.install`)

    def hook(self) -> None:
        """Apply through a forward hook (every kind of layer; `_fused.install` does plain linears)."""
        self.state.layout += 1
        self.handle = self.module.register_forward_hook(self, with_kwargs=True)

    # ----------------------------------------------------------------------------------------- banks

    def _zeros(self, *shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _alloc(self, rank: int) -> None:
        """Make the LoRA banks hold ``rank`` (growing the padded rank of what is there)."""
        if self.first is not None and rank <= self.rank:
            return
        old_r = self.rank
        if self.kind == "embedding":
            first = self._zeros(self.cap, self.in_f, rank)
            second = self._zeros(self.cap, rank, self.out_f)
            if self.first is not None:
                first[:, :, :old_r] = self.first
        else:
            first = self._zeros(self.cap, rank, self.in_f, *self.kernel)
            second = self._zeros(self.cap, rank, self.out_f)
            if self.first is not None:
                first[:, :old_r] = self.first
        if self.second is not None:
            second[:, :old_r] = self.second
        self.first, self.second, self.rank = first, second, rank
        self.state.layout += 1
        self._changed()

    def grow(self, cap: int) -> None:
        """Make room for ``cap`` slots (new slots are zero, so they add nothing)."""
        if cap <= self.cap:
            return

        def more(t: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.full((cap, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
            out[: t.shape[0]] = t
            return out

        self.first, self.second = more(self.first), more(self.second)
        self.bias, self.gm1 = more(self.bias), more(self.gm1)
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
        assert self.first is not None and self.second is not None
        dev, dt = self.device, self.dtype
        a, b = a.detach().to(dev), b.detach().to(dev).reshape(b.shape[0], r)
        if r < self.rank:  # (a full-rank write overwrites the whole slot)
            self.first[slot].zero_()
            self.second[slot].zero_()
        # the first factor is copied as it is (rounded once to the bank's dtype); the second is scaled
        # in fp32 and rounded once, by one kernel writing into the bank (elementwise ops compute in
        # fp32 and round once; a factor of another dtype is made fp32 first, so a bf16 factor in an fp32
        # bank is not rounded to bf16 on the way)
        if self.kind == "embedding":
            self.first[slot, :, :r].copy_(b)
            scaled = self.second[slot, :r]
            src = a
        else:
            self.first[slot, :r].copy_(a.reshape(r, self.in_f, *self.kernel))
            scaled = self.second[slot, :r]
            src = b.T
        torch.mul(src if src.dtype == dt else src.to(torch.float32), scale, out=scaled)
        if bias is not None:
            if self.bias is None:
                self.bias = self._zeros(self.cap, self.out_f)
            self.bias[slot] = (scale * bias.detach().to(dev, torch.float32).reshape(-1)).to(dt)
        if gm1 is not None:
            if self.gm1 is None:
                self.gm1 = self._zeros(self.cap, self.out_f)
            self.gm1[slot] = gm1.to(dev, dt)
        if bias is not None or gm1 is not None:
            self.extras.add(slot)
        self.users.add(slot)
        self.lora_slots.add(slot)
        self._changed()

    def write_replacement(self, slot: int, params: dict[str, torch.Tensor]) -> None:
        self.replacements[slot] = params
        self.users.add(slot)
        self._changed()

    def clear(self, slot: int) -> None:
        """Zero ``slot`` everywhere (an unloaded adapter's weights are never served again)."""
        for t in (self.first, self.second, self.bias, self.gm1):
            if t is not None:
                t[slot].zero_()
        self.replacements.pop(slot, None)
        self.users.discard(slot)
        self.lora_slots.discard(slot)
        self.extras.discard(slot)
        self._changed()

    def remove(self) -> None:
        self.state.layout += 1
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        if self.forward is not None:
            if self.module.__dict__.get("forward") is self.forward:
                del self.module.__dict__["forward"]
            self.forward = None
        if self.family is not None:
            self.family.leave(self)
        self.first = self.second = self.bias = self.gm1 = None
        self.replacements.clear()
        self._cache = self._rcache = self.plan = None

    def _changed(self) -> None:
        self.version += 1
        self._cache = self._rcache = self.plan = None
        if self.family is not None:
            self.family.reset()

    # ----------------------------------------------------------------------------------------- math

    def lora_delta(self, slot: int) -> torch.Tensor:
        """``s * B @ A`` of ``slot`` in fp32, in the layout of the module's own weight tensor."""
        assert self.first is not None and self.second is not None
        first = self.first[slot].to(torch.float32)
        second = self.second[slot].to(torch.float32)
        if self.kind == "embedding":
            return first @ second  # (num, r) @ (r, dim)
        d = second.T @ first.reshape(first.shape[0], -1)  # (out, r) @ (r, in*k)
        if self.kind == "conv1d":
            return d.T.contiguous()
        return d.reshape(self.weight.shape)

    def _gathered(self, sel: Selection, compiling: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(first factor, second factor) of the selection's slots, concatenated along the rank."""
        if not compiling and self._cache is not None:
            c_sel, c_ver, c_sver, first, second = self._cache
            if c_sel is sel and c_ver == self.version and c_sver == sel.version:
                return first, second
        assert self.first is not None and self.second is not None
        idx, k, r = sel.idx, sel.k, self.rank
        second = self.second.index_select(0, idx).reshape(k * r, self.out_f)
        first = None
        if self.kind != "embedding":
            first = self.first.index_select(0, idx).reshape(k * r, self.in_f, *self.kernel)
        if sel.rows is None and not sel.unit:  # one combination for all rows: fold it in
            second = second * sel.coef.reshape(-1).repeat_interleave(r).to(second.dtype)[:, None]
        if self.kind == "conv":
            second = second.T.reshape(self.out_f, k * r, *(1,) * len(self.kernel)).contiguous()
        if not compiling:
            self._cache = (sel, self.version, sel.version, first, second)
        return first, second

    def _row_factors(self, sel: Selection, n: int, compiling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row, its own slots' factors: ``(n, M*r, in)`` and ``(n, M*r, out)`` with the row's weights
        folded into the second."""
        if not compiling and self._rcache is not None:
            c_sel, c_ver, c_sver, c_n, first, second = self._rcache
            if c_sel is sel and c_ver == self.version and c_sver == sel.version and c_n == n:
                return first, second
        assert self.first is not None and self.second is not None
        slots, coef = sel.rows_of(n)
        flat = slots.reshape(-1)
        m, r = int(slots.shape[1]), self.rank
        first = self.first.index_select(0, flat).reshape(n, m * r, self.in_f)
        second = self.second.index_select(0, flat).reshape(n, m, r, self.out_f)
        second = (second * coef.to(second.dtype).view(n, m, 1, 1)).reshape(n, m * r, self.out_f)
        if not compiling:
            self._rcache = (sel, self.version, sel.version, n, first, second)
        return first, second

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        state = self.state
        sel = state.sel
        if sel is None or state.passthrough or not isinstance(output, torch.Tensor):
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        n = int(x.shape[0])
        if sel.same_rows is not None:
            sel.check_rows(n)
        if sel.replace and self.replacements:
            output = self._replace(sel, x, args, kwargs, output, n)
        if self.first is None:
            return output
        if sel.table:
            return self.table_term(sel, x, output)
        compiling = torch.compiler.is_compiling()
        kind = self.kind
        masked = sel.rows is not None
        if kind in ("linear", "conv1d") and self.per_row_wanted(sel, x, n):
            return self.per_row(sel, x, output, n, compiling)
        if kind in ("linear", "conv1d"):
            return self.concat(sel, self.lin_input(x), output, n, compiling)
        first, second = self._gathered(sel, compiling)
        k, r = sel.k, self.rank
        if kind == "embedding":
            table = self.first
            h = table[sel.idx.view(*(1,) * x.dim(), k), x.unsqueeze(-1)]  # (..., K, r)
            if masked:
                coef = sel.coef_for(n).to(h.dtype)
                h = h * coef.view(coef.shape[0], *(1,) * (x.dim() - 1), k, 1)
            delta = h.reshape(*x.shape, k * r) @ second
            scale = getattr(module, "embed_scale", None)
            if scale is not None:
                delta = delta * scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else delta * scale
        else:  # conv
            assert first is not None
            conv = (F.conv1d, F.conv2d, F.conv3d)[len(self.kernel) - 1]
            xin = x if x.dtype == first.dtype else x.to(first.dtype)
            m: Any = module
            h = conv(xin, first, None, m.stride, m.padding, m.dilation)
            if masked:
                mask = (
                    sel.mask_for(n, r, h.dtype)
                    if not compiling
                    else sel.coef_for(n).repeat_interleave(r, dim=1).to(h.dtype)
                )
                h = h * mask.view(mask.shape[0], k * r, *(1,) * len(self.kernel))
            delta = conv(h, second)
        return self._finish(sel, module, output, delta, n)

    # linear and Conv1D layers (the hook above and `_fused.fused_linear` share these)

    def table_term(self, sel: Selection, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """Each row's term from the banks through a `table.RowTable`'s buffers (`_rowkernel`)."""
        assert self.first is not None and self.second is not None and sel.rows is not None
        if self.kind not in ("linear", "conv1d"):
            return output  # `RowTable.set` refuses adapters with factors here: no row has a term
        xin = self.lin_input(x)
        if xin.shape[0] % sel.rows or not output.is_contiguous():
            raise InvalidOptionError(f"the batch does not have the row table's {sel.rows} rows")
        assert sel.row_slots is not None and sel.row_coef is not None
        rows_term(xin, self.first, self.second, sel.row_slots, sel.row_coef, output.view(-1, self.out_f))
        return output

    def lin_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as ``(tokens, in)`` in the banks' dtype."""
        xin = x.reshape(-1, self.in_f)
        return xin if xin.dtype == self.dtype else xin.to(self.dtype)

    def per_row_wanted(self, sel: Selection, x: torch.Tensor, n: int) -> bool:
        """Long rows over more adapters than any row uses: `per_row` (else `concat`) costs less."""
        return (
            sel.rows is not None
            and sel.row_slots is not None
            and sel.k > sel.row_slots.shape[1]
            and x.numel() >= LONG_ROWS * n * self.in_f
        )

    def first_product(
        self, sel: Selection, xin: torch.Tensor, first: torch.Tensor, n: int, compiling: bool
    ) -> torch.Tensor:
        """``xin @ first.T``, each row's columns scaled by its coefficients when rows differ."""
        h = torch.mm(xin, first.T)
        if sel.rows is None:
            return h
        if compiling:
            mask = sel.coef_for(n).repeat_interleave(self.rank, dim=1).to(h.dtype)
            return (h.view(n, -1, h.shape[-1]) * mask.unsqueeze(1)).view(h.shape)
        return scale_rows(h, n, sel.mask_for(n, self.rank, h.dtype))

    def concat(
        self,
        sel: Selection,
        xin: torch.Tensor,
        output: torch.Tensor,
        n: int,
        compiling: bool,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add the selection's term through the concatenated factors of its slots (``h``: the first
        product when a `_fused.Family` has made it already)."""
        first, second = self._gathered(sel, compiling)
        if h is None:
            assert first is not None
            h = self.first_product(sel, xin, first, n, compiling)
        if self.bias is None and not (sel.dora and self.gm1 is not None) and _inplace_ok(output, h):
            output.view(-1, self.out_f).addmm_(h, second)
            return output
        delta = (h @ second).view(*output.shape)
        return self._finish(sel, self.module, output, delta, n)

    def per_row(
        self,
        sel: Selection,
        x: torch.Tensor,
        output: torch.Tensor,
        n: int,
        compiling: bool,
        h: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Long rows over several adapters: two batched GEMMs, each row with only its own factors
        (``h``: the first one, when a `_fused.Family` has made it already)."""
        first, second = self._row_factors(sel, n, compiling)
        if h is None:
            h = torch.bmm(self.lin_input(x).view(n, -1, self.in_f), first.transpose(1, 2))  # (n, tokens, M*r)
        if self.bias is None and not (sel.dora and self.gm1 is not None) and _inplace_ok(output, h):
            output.view(n, -1, self.out_f).baddbmm_(h, second)
            return output
        delta = torch.bmm(h, second).view(*output.shape)
        return self._finish(sel, self.module, output, delta, n)

    def _finish(
        self, sel: Selection, module: nn.Module, output: torch.Tensor, delta: torch.Tensor, n: int
    ) -> torch.Tensor:
        feat_last = self.kind != "conv"

        def per_row(v: torch.Tensor) -> torch.Tensor:  # (n or 1, out) -> broadcastable on output
            if feat_last:
                return v.view(v.shape[0], *(1,) * (output.dim() - 2), self.out_f)
            return v.view(v.shape[0], self.out_f, *(1,) * (output.dim() - 2))

        if self.bias is not None or (sel.dora and self.gm1 is not None):
            coef = sel.coef_for(n).to(self.dtype)
            if self.bias is not None:
                delta = delta + per_row(coef @ self.bias.index_select(0, sel.idx))
            if sel.dora and self.gm1 is not None:
                g = per_row(1 + coef @ self.gm1.index_select(0, sel.idx)).to(output.dtype)
                base_bias = getattr(module, "bias", None) if self.kind != "embedding" else None
                if isinstance(base_bias, torch.Tensor):
                    b = (
                        base_bias.view(self.out_f)
                        if feat_last
                        else base_bias.view(self.out_f, *(1,) * (output.dim() - 2))
                    )
                    return g * (output - b) + b + g * delta.to(output.dtype)
                return g * (output + delta.to(output.dtype))
        delta = delta.to(output.dtype)
        if _inplace_ok(output, delta):
            return output.add_(delta)
        return output + delta

    def _replace(
        self,
        sel: Selection,
        x: torch.Tensor,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: torch.Tensor,
        n: int,
    ) -> torch.Tensor:
        """Recompute the output with each replacing slot's parameters for the rows that use it."""
        for slot in sel.replace:
            params = self.replacements.get(slot)
            if params is None:
                continue
            rows = sel.rows_for(slot, n, x.device) if sel.rows is not None else None
            call_args = args if rows is None else (x.index_select(0, rows), *args[1:])
            self.state.passthrough = True
            try:
                y = torch.func.functional_call(self.module, params, call_args, kwargs)
            finally:
                self.state.passthrough = False
            output = y if rows is None else output.index_copy(0, rows, y.to(output.dtype))
        return output


#: tokens per row from which rows over several adapters take the per-row batched GEMMs (below it, the
#: concatenated factors of all the batch's adapters with a per-row mask cost less)
LONG_ROWS = 8


def scale_rows(h: torch.Tensor, n: int, mask: torch.Tensor) -> torch.Tensor:
    """``h`` (n * tokens, C) times the per-row column scales ``mask`` (n, C), in place."""
    if h.shape[0] == n:
        return h.mul_(mask)
    return h.view(n, -1, h.shape[-1]).mul_(mask.unsqueeze(1)).view(h.shape)


def _inplace_ok(output: torch.Tensor, other: torch.Tensor) -> bool:
    if output.dtype != other.dtype or not output.is_contiguous():
        return False
    return not (torch.is_grad_enabled() and (output.requires_grad or other.requires_grad))
