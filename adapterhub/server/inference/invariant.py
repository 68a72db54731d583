"""Batch-invariant decode steps: a request's greedy tokens never depend on what else shares the batch.

Its prefill runs alone (shape ``[1, T]``: its own), and its decode steps run batched with every other row,
through computations in which a row's numbers do not depend on the others':

- **Each row owns its columns.** K / V live in fixed buffers ``(max_batch, heads, cap, dim)`` (fp32 in
  any model dtype: twice a bf16 cache's memory), row
  ``i``'s tokens at columns ``[0, len_i)`` whatever the other rows hold; each step writes each row's new
  K / V at its own column (`RowsCache.update`), so there is no left padding whose width depends on the batch.
- **Attention in fixed blocks of ``BLOCK`` keys** (`rows_attention`, an ``AttentionInterface`` function used
  only during these steps): per block ``s = q k^T``, the block's max, ``p = exp(s - m)`` and
  ``p @ [V, 1]`` (the ones column gives the softmax's sum in the same product), combined block after
  block as flash attention does. Every product has one shape per block, whatever the batch; keys past a
  row's length are masked to exactly zero weight, and a block wholly past it leaves the running sums
  exactly as they were, so a row that meets more blocks in a batch than alone gets the same numbers.
- **Rows come in buckets** (`floor_and_buckets`): the batch runs as the smallest bucket that holds it, the
  rest dead rows (a pad token at position 0). A GEMM's row depends on the number of rows ``M`` through the
  kernel the BLAS picks for ``M`` (MKL: one kernel for ``M = 1``, another up to 10-15 rows, a third
  above); the buckets start where the model's own linear shapes give every bucket the same numbers
  (measured once, when the engine starts) and never go below 2 (``bmm`` over one matrix takes another
  path).
- **Adapters through a `RowTable`** (each row reads only its own slots' factors, one batched product per
  slot, `adapterhub.runtime._rowkernel`), never the concatenated factors of the whole batch's adapters.

Not covered: what the resident set does to the banks. Factors are padded to the highest rank resident so
far (`adapterhub.runtime`), and a product over more (zero) rank columns may round apart, so a row's numbers
can change once an adapter of a higher rank is first loaded; the banks never shrink back.

**CUDA graphs.** With ``static`` (a GPU's default; ``graphs=True`` anywhere) a step reads fixed input
tensors (`_Static`: ids, positions, its row table) and runs a whole power of two of attention blocks (a
block past every row changes nothing, see above), so each ``(bucket, slots per row, blocks)`` is one shape:
on CUDA it is captured in a graph once and replayed; elsewhere the same step runs eagerly, and the tests
run it so on the CPU. Triton's row kernel sums each slot in its own tile, in slot order, with tiles that do
not depend on the number of slots (`adapterhub.runtime._rowkernel`), so a row's term is the same whatever
the other rows use, as torch's kernel is.

Measured and tested on the CPU (bench/RESULTS.md, "serve: the cost of batch invariance";
tests/test_serve_invariant.py, eager and static). On a GPU the invariance rests on the batch floor measured
there (cuBLAS's products of each bucket size) and on the row kernel; tests/test_serve_invariant.py and
tests/test_runtime_table.py check both with ``ADAPTERHUB_TEST_DEVICE=cuda``, not yet run on a GPU. Covered:
decoder-only transformers causal LMs whose attention goes through ``AttentionInterface`` with full
attention in every layer; `Engine` falls back to each request alone elsewhere, and for LLM.int8 bases
(bitsandbytes' 8-bit layers move the input columns holding an outlier in any row to fp16, for every row).
The batch floor is measured on each linear layer as the model runs it: ``F.linear`` on a plain weight, a
4-bit layer's own forward (bitsandbytes' NF4 kernels pick by row count too: a floor of 4 on this CPU, where
plain bf16 gives 2). Adapters a row table cannot serve (DoRA, ``lora_bias``, ``modules_to_save``, non-linear layers) make their steps go
through ``rt.rows``, eagerly, which is not invariant.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import IncompatibleAdapterError
from .graphs import ActiveRows, capture_graph

logger = logging.getLogger(__name__)

NAME = "adapterhub_rows"
#: keys per attention block (a row's attention is the same whatever else shares the batch, but depends
#: on this; fixed per process)
BLOCK = 128
#: one-row tables kept for prefills, one per adapter combination prefilled lately
ALONE_TABLES = 64
_ACTIVE: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("adapterhub_rows", default=None)
_registered = False


def supported(model: Any) -> str | None:
    """None when the invariant steps cover ``model``, else why not (one line)."""
    cfg = getattr(model, "config", None)
    if (
        cfg is None
        or getattr(cfg, "is_encoder_decoder", False)
        or not type(model).__name__.endswith("ForCausalLM")
    ):
        return "not a decoder-only transformers causal LM"
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return f"attention implementation {getattr(cfg, '_attn_implementation', None)!r}"
    types = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    if (
        types != {"full_attention"}
        or getattr(cfg, "sliding_window", None)
        and getattr(cfg, "use_sliding_window", True)
    ):
        return "layers other than full attention"
    if any(
        type(m).__name__ == "Linear8bitLt" and getattr(getattr(m, "state", None), "threshold", 0) > 0
        for m in model.modules()
    ):  # LLM.int8 moves the input columns with an outlier in any row of the batch to fp16, for every row
        return "LLM.int8 layers (their outlier columns depend on every row of the batch)"
    module = sys.modules.get(type(model).__module__)
    if module is None or not hasattr(module, "ALL_ATTENTION_FUNCTIONS"):
        return "its attention does not go through transformers' AttentionInterface"
    return None


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, rows_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True


def rows_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """One decode step's attention over `RowsCache` buffers (see the module docstring): ``query``
    ``(b, heads, 1, d)``, ``key`` ``(b, kv_heads, cap, d)``, ``value`` ``(b, kv_heads, cap, dv + 1)`` (its last
    column ones), ``attention_mask`` ``(b, 1, 1, cap)`` float: 0 for a row's keys, -inf past them."""
    state = _ACTIVE.get()
    if state is None:  # outside an invariant step (a prefill): sdpa, as the model was loaded
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    state.append(1)
    assert attention_mask is not None
    b, h, _, d = query.shape
    hk, dv = key.shape[1], value.shape[-1] - 1
    scale = scaling if scaling is not None else d**-0.5
    q = (query.float() * scale).view(b, hk, h // hk, d)
    blocks = state[0]
    acc = m = None
    for i in range(blocks):
        cols = slice(i * BLOCK, (i + 1) * BLOCK)
        s = torch.matmul(q, key[:, :, cols].transpose(-1, -2)).add_(attention_mask[:, :, :, cols])
        top = s.amax(-1, keepdim=True)
        if m is None:
            m = top
            acc = torch.matmul(s.sub_(m).exp_(), value[:, :, cols])
        else:
            new = torch.maximum(m, top)
            assert acc is not None
            acc = acc.mul_((m - new).exp_()).add_(torch.matmul(s.sub_(new).exp_(), value[:, :, cols]))
            m = new
    assert acc is not None
    out = acc[..., :dv] / acc[..., dv:]
    return out.view(b, h, 1, dv).transpose(1, 2).to(query.dtype), None


def floor_and_buckets(model: Any, max_batch: int) -> list[int]:
    """The batch sizes decode steps run as: powers of two from the smallest at which every linear shape
    of ``model`` gives a row the same numbers at every larger size (and in any position), up to
    ``max_batch``. Measured here, on this BLAS, with this number of threads."""
    ladder = []
    b = 2
    while b < max_batch:
        ladder.append(b)
        b *= 2
    ladder.append(max(2, max_batch))
    probes = _linears(model)
    start = 0
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for run, n_in, dtype, device in probes:
            probe = torch.randn(2, n_in, generator=g).to(device, dtype)
            rows: list[torch.Tensor] = []
            for n in ladder:
                x = torch.randn(n, n_in, generator=g).to(device, dtype)
                x[0], x[n - 1] = probe[0], probe[1]
                y = run(x)
                rows.append(torch.stack([y[0], y[n - 1]]))
            ref = rows[-1]
            k = len(ladder) - 1
            while k > 0 and torch.equal(rows[k - 1], ref):
                k -= 1
            start = max(start, k)
    if start:
        logger.info("batch-invariant decode steps run at least %d rows (this BLAS)", ladder[start])
    return ladder[start:]


def _linears(model: Any) -> list[tuple[Any, int, torch.dtype, torch.device]]:
    """One probe per distinct linear layer of ``model``: how to run it on ``(n, in)`` rows, ``in``, the input
    dtype and device. A plain linear runs as ``F.linear`` on its weight; a quantized one (bitsandbytes
    ``Linear4bit``) through its own class's forward (the kernel it picks per row count is what counts;
    forward hooks, an adapter's among them, left out)."""
    act = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    out: dict[tuple[Any, ...], tuple[Any, int, torch.dtype, torch.device]] = {}
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or not isinstance(weight, torch.Tensor):
            continue
        if weight.device.type == "meta":
            continue
        if weight.is_floating_point() and weight.dim() == 2:
            key: tuple[Any, ...] = (tuple(weight.shape), weight.dtype)
            out.setdefault(
                key, (lambda x, w=weight: F.linear(x, w), weight.shape[1], weight.dtype, weight.device)
            )
        else:
            key = (type(mod).__name__, mod.in_features, mod.out_features)
            out.setdefault(key, (lambda x, m=mod: type(m).forward(m, x), mod.in_features, act, weight.device))
    return list(out.values())


class RowsCache:
    """Per-row K / V buffers (the transformers cache interface the attention layers call: ``update``)."""

    def __init__(self, max_batch: int, device: torch.device) -> None:
        self.max_batch = max_batch
        self.device = device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cap = 0
        self.rows = torch.zeros(0, dtype=torch.long, device=device)  # this step's rows, 0..bucket-1
        self.cols = torch.zeros(0, dtype=torch.long, device=device)  # the column each writes
        self.is_compileable = False

    def alloc(self, cols: int, layers: list[tuple[int, int, int, int]], keep: int) -> None:
        """Capacity for ``cols`` columns (whole blocks); the first ``keep`` rows are copied over."""
        cap = -(-cols // BLOCK) * BLOCK
        keys, values = [], []
        for i, (hk, dk, hv, dv) in enumerate(layers):
            k = torch.zeros((self.max_batch, hk, cap, dk), dtype=torch.float32, device=self.device)
            v = torch.zeros((self.max_batch, hv, cap, dv + 1), dtype=torch.float32, device=self.device)
            v[..., dv] = 1.0
            if self.keys and keep:
                k[:keep, :, : self.cap] = self.keys[i][:keep]
                v[:keep, :, : self.cap] = self.values[i][:keep]
            keys.append(k)
            values.append(v)
        self.keys, self.values, self.cap = keys, values, cap

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.keys[layer_idx], self.values[layer_idx]
        n = key.shape[0]
        k[self.rows, :, self.cols] = key[:, :, 0].float()
        v[self.rows, :, self.cols, :-1] = value[:, :, 0].float()
        return k[:n], v[:n]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


class RowsDecoder:
    """The buffers and the step (see the module docstring); `RowsBatch` is the engine's view of them."""

    def __init__(
        self,
        model: Any,
        runtime: Any,
        cache_kw: str,
        *,
        max_batch: int,
        pad: int,
        static: bool = False,
        capture: bool | None = None,
    ) -> None:
        _register()
        self.model = model
        self.runtime = runtime
        self.cache_kw = cache_kw
        self.pad = pad
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        #: steps read fixed input tensors (`_Static`), captured in CUDA graphs where ``capture``
        self.static = static
        self.capture = static and (self.device.type == "cuda" if capture is None else capture)
        self.captures = 0
        self._static: dict[tuple[int, int], _Static] = {}
        self.buckets = floor_and_buckets(model, max_batch)
        self.cache = RowsCache(self.buckets[-1], self.device)
        self.layers: list[tuple[int, int, int, int]] = []
        self._tables: dict[tuple[int, int], Any] = {}
        #: one-row tables of the specs prefilled last (each keeps its factors gathered), oldest first
        self._alone: dict[tuple[Any, ...], tuple[list[Any], Any]] = {}

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def room(self, keep: int, cols: int) -> None:
        """Capacity for ``cols`` columns: doubled, never past the model's context."""
        if cols > self.cache.cap:
            self._static.clear()  # their graphs read the old buffers
            self.cache.alloc(max(cols, min(2 * self.cache.cap, self.max_context + 1)), self.layers, keep)

    def _table(self, bucket: int, specs: Sequence[dict[str, float] | None], batch: RowsBatch) -> Any:
        """The row table this step reads its adapters through (None: base rows only, or ``"rows"``)."""
        from adapterhub.runtime import RowTable

        per_row = max([len(s) for s in specs if s] or [0])
        if not per_row:
            return None
        width = 1 << (per_row - 1).bit_length()
        table = self._tables.get((bucket, width))
        if table is None or not table.current:
            table = self._tables[(bucket, width)] = RowTable(self.runtime, bucket, width)
            batch.table_key = None
        key = (id(table), tuple(tuple(sorted(s.items())) if s else None for s in specs))
        if batch.table_key != key:
            try:
                table.set(list(specs))
            except IncompatibleAdapterError as exc:
                logger.warning("a decode step through rt.rows, not batch-invariant: %s", exc)
                batch.table_key = None
                return "rows"
            batch.table_key = key
        return table

    def alone(self, spec: dict[str, float] | None) -> Any:
        """Where a prefill of one request with ``spec`` reads its adapters: a one-row table (its factors
        gathered once, not a new selection per request), else None (``rt.rows``)."""
        from adapterhub.runtime import RowTable

        if not spec:
            return None
        key = tuple(sorted(spec.items()))
        try:  # what each name is resident as now (an adapter evicted and loaded again is another)
            now = [self.runtime.residency.content(name) for name, _ in key]
        except KeyError:
            return None
        kept = self._alone.pop(key, None)
        table: Any = kept[1] if kept is not None else None
        if kept is None or not table.current or any(a is not b for a, b in zip(kept[0], now, strict=True)):
            table = RowTable(self.runtime, 1, 1 << (len(spec) - 1).bit_length())
            try:
                table.set([spec])
            except IncompatibleAdapterError:
                return None
        self._alone[key] = (now, table)  # the most recent last; the oldest goes past ALONE_TABLES
        while len(self._alone) > ALONE_TABLES:
            del self._alone[next(iter(self._alone))]
        return table.applied()

    def step(self, batch: RowsBatch, specs: Sequence[dict[str, float] | None]) -> torch.Tensor:
        """One decode step over ``batch``; the logits ``(n, vocab)``."""
        n = len(batch.jobs)
        assert batch.pos is not None and batch.last is not None
        bucket = self.bucket(n)
        dead = bucket - n
        top = int(batch.pos.max()) + 1
        self.room(n, top)
        need = -(-top // BLOCK)
        padded = list(specs) + [None] * dead
        table = self._table(bucket, padded, batch)
        if table == "rows" or not self.static:
            ids = torch.cat([batch.last, batch.last.new_full((dead,), self.pad)])[:, None]
            pos = torch.cat([batch.pos, batch.pos.new_zeros(dead)])
            rows = torch.arange(bucket, device=self.device)
            return self._forward(ids, pos, rows, table, padded, need)[:n]
        st = self._static_for(bucket, table)
        st.ids[:n, 0] = batch.last
        st.ids[n:, 0] = self.pad
        st.pos[:n] = batch.pos
        st.pos[n:] = 0
        # whole powers of two of blocks (fewer steps to capture): blocks past every row change nothing
        blocks = min(1 << (need - 1).bit_length(), self.cache.cap // BLOCK)
        captured = st.graphs.get(blocks)
        if captured is None and self.capture:
            try:
                captured = st.graphs[blocks] = capture_graph(
                    lambda: self._forward(st.ids, st.pos, st.rows, table, padded, blocks)
                )
                self.captures += 1
            except Exception as exc:
                logger.warning("decode steps run eagerly: capturing one in a CUDA graph failed (%s)", exc)
                self.capture = False
        if captured is None:
            return self._forward(st.ids, st.pos, st.rows, table, padded, blocks)[:n]
        captured[0].replay()
        return captured[1][:n]

    def _static_for(self, bucket: int, table: Any) -> _Static:
        """The fixed inputs of a step of ``bucket`` rows through ``table`` (made anew with the table)."""
        key = (bucket, 0 if table is None else table.width)
        st = self._static.get(key)
        if st is None or st.table is not table:
            st = self._static[key] = _Static(
                table=table,
                ids=torch.full((bucket, 1), self.pad, dtype=torch.long, device=self.device),
                pos=torch.zeros(bucket, dtype=torch.long, device=self.device),
                rows=torch.arange(bucket, device=self.device),
            )
        return st

    def _forward(
        self,
        ids: torch.Tensor,
        pos: torch.Tensor,
        rows: torch.Tensor,
        table: Any,
        padded: list[dict[str, float] | None],
        blocks: int,
    ) -> torch.Tensor:
        """The model over one token per row (what a captured step replays): logits ``(bucket, vocab)``."""
        c = self.cache
        bucket = int(ids.shape[0])
        c.rows, c.cols = rows, pos
        cols = torch.arange(c.cap, device=self.device)
        mask = torch.zeros((bucket, 1, 1, c.cap), dtype=torch.float32, device=self.device)
        mask.masked_fill_((cols[None, :] > pos[:, None]).view(bucket, 1, 1, c.cap), float("-inf"))
        if table == "rows":
            ctx = self.runtime.rows(padded)
        elif table is not None:
            ctx = table.applied()
        else:
            ctx = self.runtime.rows([None] * bucket)
        cfg = self.model.config
        impl = cfg._attn_implementation
        state = [blocks]
        token = _ACTIVE.set(state)
        try:
            cfg._attn_implementation = NAME
            with ctx:
                out = self.model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=pos[:, None],
                    use_cache=True,
                    **{self.cache_kw: c},
                )
        finally:
            cfg._attn_implementation = impl
            _ACTIVE.reset(token)
        if len(state) == 1:
            raise RuntimeError("the model's attention did not go through AttentionInterface")
        return out.logits[:, -1, :]


@dataclass
class _Static:
    """A bucket's step inputs in fixed tensors (what its captured graphs read), and the graphs (and the
    logits each replay writes) per number of attention blocks."""

    table: Any  # RowTable | None
    ids: torch.Tensor  # (bucket, 1)
    pos: torch.Tensor  # (bucket,)
    rows: torch.Tensor  # arange(bucket)
    graphs: dict[int, tuple[Any, torch.Tensor]] = field(default_factory=dict)


class RowsBatch(ActiveRows):
    """The active rows of the engine in a `RowsDecoder`'s buffers (the interface of the dynamic batch);
    ``pos`` is each row's length, the column it writes next."""

    def __init__(self, decoder: RowsDecoder) -> None:
        super().__init__()
        self.d = decoder

    def join(
        self, jobs: list[Any], cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor
    ) -> None:
        """Add prefilled rows: their DynamicCache ``cache`` (left-padded) and 2-D ``mask`` ``(g, w)``."""
        d = self.d
        if not d.layers:
            d.layers = [
                (
                    int(la.keys.shape[1]),
                    int(la.keys.shape[3]),
                    int(la.values.shape[1]),
                    int(la.values.shape[3]),
                )
                for la in cache.layers
            ]
        n, w = len(self.jobs), int(mask.shape[1])
        d.room(n, w + 1)
        lens = mask.sum(1).tolist()
        for i, layer in enumerate(cache.layers):
            for r, ln in enumerate(lens):
                d.cache.keys[i][n + r, :, :ln] = layer.keys[r, :, w - ln :]
                d.cache.values[i][n + r, :, :ln, :-1] = layer.values[r, :, w - ln :]
        self._add(jobs, pos, last)

    def _gather(self, idx: torch.Tensor, k: int) -> None:
        for t in (*self.d.cache.keys, *self.d.cache.values):
            t[:k] = t.index_select(0, idx)
