"""Decode steps over a static KV cache, each batch shape's step captured once in a CUDA graph, for the
engine without batch invariance (``batch_invariant=False``; the invariant steps capture theirs in
`invariant`). Rows share columns here, so a row's numbers depend on the batch.

The eager decode step of a small model is bound by the host: it enqueues ~40 kernels per layer, and
the adapters' low-rank terms add more. Here the batch lives in fixed buffers instead of a growing
``DynamicCache``: per layer ``K``/``V`` of ``(max_batch, heads, L, dim)``, one bool mask ``(max_batch, L)``,
and the step's inputs. Rows share columns, left-padded as in the dynamic batch: history in columns
``[0, width)``, each step writes column ``width`` for every row. Rows of a batch of ``n`` run in the
smallest bucket (a power of two, or ``max_batch``) that holds them; the rows past ``n`` are dead (the
base, a pad token, attending only to themselves). A batch of base rows only takes a step captured without
any adapter, so it costs what the base costs.

Adapters go through a `adapterhub.runtime.RowTable` (each row's slots in a fixed buffer, read by one
kernel per linear), so the step captured for a bucket serves every mix of resident adapters; only a
change of the runtime's banks (a new module, a higher rank, more slots) or of the capacity ``L`` makes a
new capture. On CUDA the step of each ``(bucket, L, slots per row)`` is captured once (a few eager runs,
then ``torch.cuda.graph``) and replayed; elsewhere, or where capture fails, the same step runs eagerly.

Rows that a table cannot serve (an adapter with DoRA magnitudes, a ``lora_bias``, replacements) make
their batch step eagerly over the same buffers through ``rt.rows``, until the batch changes.

Covered: models whose transformers ``StaticCache`` is all full-attention ``StaticLayer`` s, under the
``sdpa`` attention (it takes the bool mask as it is). Anything else keeps the dynamic batch
(`Engine` asks `GraphDecoder.supported`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ...errors import IncompatibleAdapterError

if TYPE_CHECKING:
    from adapterhub.runtime import RowTable

logger = logging.getLogger(__name__)


@dataclass
class _Step:
    """One captured (or eager) step: its cache object over views of the shared buffers, table, inputs."""

    cache: Any
    table: RowTable | None  # where the step reads its rows' adapters; None: base rows only
    ids: torch.Tensor  # (bucket, 1)
    pos: torch.Tensor  # (bucket, 1)
    serial: int
    graph: Any = None  # torch.cuda.CUDAGraph
    logits: torch.Tensor | None = None  # the graph's output


class GraphDecoder:
    """The static buffers and the steps over them (see the module docstring)."""

    def __init__(
        self,
        model: Any,
        runtime: Any,
        cache_kw: str,
        *,
        max_batch: int,
        pad: int,
        capture: bool | None = None,
    ) -> None:
        self.model = model
        self.runtime = runtime
        self.cache_kw = cache_kw
        self.max_batch = max_batch
        self.pad = pad
        self.device = next(model.parameters()).device
        self.capture = self.device.type == "cuda" if capture is None else capture
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        self.L = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.mask = torch.zeros((max_batch, 0), dtype=torch.bool, device=self.device)
        self._cum: torch.Tensor | None = None  # each layer's write column (StaticLayer.cumulative_length)
        self._steps: dict[tuple[int, int, int], _Step] = {}
        #: per layer (K heads, K dim, V heads, V dim), and their dtype, learnt from the first prefill
        self._shapes: list[tuple[int, int, int, int]] = []
        self._dtype = torch.float32
        self.captures = 0
        self._serial = 0

    # ----------------------------------------------------------------------------------- support

    @staticmethod
    def supported(model: Any) -> str | None:
        """None when the static path covers ``model``, else why not (one line)."""
        cfg = getattr(model, "config", None)
        if (
            cfg is None
            or getattr(cfg, "is_encoder_decoder", False)
            or not type(model).__name__.endswith("ForCausalLM")
        ):
            return "not a decoder-only transformers causal LM"
        impl = getattr(cfg, "_attn_implementation", None)
        if impl != "sdpa":
            return f"attention implementation {impl!r} (the static path takes sdpa's bool mask)"
        try:
            cache = _static_cache(cfg, 8)
        except Exception as exc:  # pragma: no cover - transformers without a StaticCache for this config
            return f"no static cache for this model ({exc})"
        kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [])}
        if kinds != {"StaticLayer"} or any(getattr(cache, "is_sliding", [False])):
            return f"its static cache has {sorted(kinds)} layers (sliding windows or other kinds)"
        return None

    # ----------------------------------------------------------------------------------- buffers

    def _layout(self, cache: Any) -> None:
        """Learn each layer's K / V shape from a prefill's DynamicCache."""
        if not self._shapes:
            self._shapes = [
                (
                    int(la.keys.shape[1]),
                    int(la.keys.shape[3]),
                    int(la.values.shape[1]),
                    int(la.values.shape[3]),
                )
                for la in cache.layers
            ]
            self._dtype = cache.layers[0].keys.dtype

    def _alloc(self, cols: int, keep_rows: int, keep_cols: int) -> None:
        """Capacity ``cols`` (rounded up to a power of two); rows / columns in use are copied over."""
        assert self._shapes
        cap = 1 << max(4, (cols - 1).bit_length())
        keys, values = [], []
        for i, (hk, dk, hv, dv) in enumerate(self._shapes):
            k = torch.zeros((self.max_batch, hk, cap, dk), dtype=self._dtype, device=self.device)
            v = torch.zeros((self.max_batch, hv, cap, dv), dtype=self._dtype, device=self.device)
            if self.keys and keep_rows and keep_cols:
                k[:keep_rows, :, :keep_cols] = self.keys[i][:keep_rows, :, :keep_cols]
                v[:keep_rows, :, :keep_cols] = self.values[i][:keep_rows, :, :keep_cols]
            keys.append(k)
            values.append(v)
        mask = torch.zeros((self.max_batch, cap), dtype=torch.bool, device=self.device)
        if keep_rows and keep_cols:
            mask[:keep_rows, :keep_cols] = self.mask[:keep_rows, :keep_cols]
        self.keys, self.values, self.mask, self.L = keys, values, mask, cap
        self._cum = torch.zeros(len(keys), dtype=torch.long, device=self.device)
        self._steps.clear()  # their views are of the old buffers

    def move_cols(self, rows: int, src: int, dst: int, count: int) -> None:
        """Columns ``[src, src+count)`` of rows ``[0, rows)`` to ``[dst, dst+count)``; the mask's columns
        left outside are cleared."""
        if count and src != dst:
            for t in (*self.keys, *self.values):
                t[:rows, :, dst : dst + count] = t[:rows, :, src : src + count].clone()
            self.mask[:rows, dst : dst + count] = self.mask[:rows, src : src + count].clone()
        lo, hi = min(src, dst), max(src, dst) + count
        if dst > src:
            self.mask[:rows, lo:dst] = False
        else:
            self.mask[:rows, dst + count : hi] = False

    def room(self, batch: StaticBatch, cols: int) -> None:
        """Make ``cols`` columns fit: drop leading columns no row uses, else grow the capacity."""
        if cols <= self.L:
            return
        n = len(batch.jobs)
        if n and batch.width:
            used = self.mask[:n, : batch.width].any(0).nonzero()
            start = int(used[0]) if used.numel() else batch.width
            if start:
                self.move_cols(n, start, 0, batch.width - start)
                batch.width -= start
                cols -= start
        if cols > self.L:
            self._alloc(min(cols, self.max_context + 1), n, batch.width)

    # ----------------------------------------------------------------------------------- steps

    def bucket(self, n: int) -> int:
        b = 1
        while b < n:
            b *= 2
        return min(b, self.max_batch)

    def _step_for(self, bucket: int, width: int) -> _Step:
        from adapterhub.runtime import RowTable

        key = (bucket, self.L, width)
        step = self._steps.get(key)
        if step is not None and (step.table is None or step.table.current):
            return step
        self._steps.pop(key, None)
        assert self._cum is not None
        cache = _static_cache(self.model.config, self.L)
        for i, layer in enumerate(cache.layers):
            k, v = self.keys[i][:bucket], self.values[i][:bucket]
            layer.lazy_initialization(k[:, :, :1], v[:, :, :1])
            layer.keys, layer.values = k, v
            layer.cumulative_length = self._cum[i]
        step = _Step(
            cache=cache,
            table=RowTable(self.runtime, bucket, width) if width else None,
            ids=torch.full((bucket, 1), self.pad, dtype=torch.long, device=self.device),
            pos=torch.zeros((bucket, 1), dtype=torch.long, device=self.device),
            serial=self._serial,
        )
        self._serial += 1
        self._steps[key] = step
        return step

    def _forward(self, step: _Step, bucket: int, rows: list[Any] | None = None) -> torch.Tensor:
        """The step's forward: through its table, or (``rows``, eagerly) through ``rt.rows``."""
        mask = self.mask[:bucket].view(bucket, 1, 1, self.L)
        if rows is not None:
            ctx = self.runtime.rows(rows + [None] * (bucket - len(rows)))
        elif step.table is not None:
            ctx = step.table.applied()
        else:  # a batch of base rows only runs the base: no selection at all while it is captured
            ctx = self.runtime.rows([None] * bucket)
        with ctx:
            out = self.model(
                input_ids=step.ids,
                attention_mask=mask,
                position_ids=step.pos,
                use_cache=True,
                **{self.cache_kw: step.cache},
            )
        return out.logits[:, -1, :]

    def _capture(self, step: _Step, bucket: int, width: int) -> None:
        assert self._cum is not None
        cum = self._cum
        step.graph, step.logits = capture_graph(lambda: self._forward(step, bucket), lambda: cum.fill_(width))
        self.captures += 1

    def step(self, batch: StaticBatch, specs: Sequence[dict[str, float] | None]) -> torch.Tensor:
        """One decode step over ``batch`` (rows with their specs); the logits ``(n, vocab)``."""
        n = len(batch.jobs)
        assert batch.pos is not None and batch.last is not None
        self.room(batch, batch.width + 1)
        bucket = self.bucket(n)
        per_row = max([len(s) for s in specs if s] or [0])
        slots = 1 << (per_row - 1).bit_length() if per_row else 0
        step = self._step_for(bucket, slots)
        key = (step.serial, spec_key(specs))
        if batch.table_key != key and step.table is not None:
            try:
                step.table.set(specs)
                batch.table_key = key
            except IncompatibleAdapterError:  # DoRA, lora_bias, ...: this batch steps eagerly, rt.rows
                batch.table_key = ("rows", key)
        eager_rows = batch.table_key == ("rows", key)
        w = batch.width
        step.ids[:n, 0] = batch.last
        step.pos[:n, 0] = batch.pos
        self.mask[:n, w] = True
        if bucket > n:  # dead rows: a pad token attending to itself
            step.ids[n:] = self.pad
            step.pos[n:] = 0
            self.mask[n:bucket] = False
            self.mask[n:bucket, w] = True
        assert self._cum is not None
        if self.capture and step.graph is None and not eager_rows:
            try:
                self._capture(step, bucket, w)
            except Exception as exc:
                logger.warning("decode steps run eagerly: capturing one in a CUDA graph failed (%s)", exc)
                self.capture = False
        self._cum.fill_(w)
        if eager_rows:
            logits = self._forward(step, bucket, list(specs))
        elif step.graph is not None:
            step.graph.replay()
            assert step.logits is not None
            logits = step.logits
        else:
            logits = self._forward(step, bucket)
        batch.width = w + 1
        return logits[:n]


class ActiveRows:
    """The engine's active rows in a decoder's fixed buffers: their jobs, each row's position and last
    token. ``keep`` moves the kept rows to the front (the buffers through ``_gather``)."""

    def __init__(self) -> None:
        self.jobs: list[Any] = []
        self.pos: torch.Tensor | None = None  # (B,) long: each row's next position
        self.last: torch.Tensor | None = None  # (B,) long: each row's last token
        self.table_key: Any = None

    def _add(self, jobs: list[Any], pos: torch.Tensor, last: torch.Tensor) -> None:
        n = len(self.jobs)
        self.pos = pos if self.pos is None or not n else torch.cat([self.pos, pos])
        self.last = last if self.last is None or not n else torch.cat([self.last, last])
        self.jobs = self.jobs + list(jobs)
        self.table_key = None

    def _gather(self, idx: torch.Tensor, k: int) -> None:
        """Move the buffers' rows ``idx`` to rows ``[0, k)``."""
        raise NotImplementedError

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), moved to the first rows of the buffers."""
        if len(rows) == len(self.jobs):
            return
        self.table_key = None
        if not rows:
            self.clear()
            return
        assert self.pos is not None and self.last is not None
        k = len(rows)
        if rows != list(range(k)):
            idx = torch.tensor(rows, dtype=torch.long, device=self.pos.device)
            self._gather(idx, k)
            self.pos, self.last = self.pos.index_select(0, idx), self.last.index_select(0, idx)
        else:
            self.pos, self.last = self.pos[:k], self.last[:k]
        self.jobs = [self.jobs[i] for i in rows]

    def clear(self) -> None:
        self.jobs, self.pos, self.last, self.table_key = [], None, None, None


class StaticBatch(ActiveRows):
    """The active rows of the engine in a `GraphDecoder`'s buffers (the interface of the dynamic batch)."""

    def __init__(self, decoder: GraphDecoder) -> None:
        super().__init__()
        self.d = decoder
        self.width = 0

    def join(
        self, jobs: list[Any], cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor
    ) -> None:
        """Add prefilled rows: their DynamicCache ``cache`` and 2-D ``mask`` ``(g, w)``."""
        d = self.d
        d._layout(cache)
        n, g, w = len(self.jobs), len(jobs), int(mask.shape[1])
        if not n:
            self.width = 0
        if not d.L:
            d._alloc(w + 1, 0, 0)
        d.room(self, max(self.width, w) + 1)
        if w > self.width and n:
            d.move_cols(n, 0, w - self.width, self.width)
            self.width = w
        width = max(self.width, w)
        for i, layer in enumerate(cache.layers):
            d.keys[i][n : n + g, :, width - w : width] = layer.keys
            d.values[i][n : n + g, :, width - w : width] = layer.values
        d.mask[n : n + g] = False
        d.mask[n : n + g, width - w : width] = mask.bool()
        self.width = width
        self._add(jobs, pos, last)

    def _gather(self, idx: torch.Tensor, k: int) -> None:
        d, w = self.d, self.width
        for t in (*d.keys, *d.values):
            t[:k, :, :w] = t[:, :, :w].index_select(0, idx)
        d.mask[:k] = d.mask.index_select(0, idx)

    def clear(self) -> None:
        super().clear()
        self.width = 0


def capture_graph(
    run: Callable[[], torch.Tensor], prepare: Callable[[], Any] = lambda: None
) -> tuple[Any, torch.Tensor]:
    """``run`` captured in a CUDA graph, and the output tensor its replays write: two warm-up runs on a side
    stream first (kernels compiled, workspaces made off the graph); ``prepare`` runs before each run, outside
    the graph (it sets what the captured run reads). Each graph gets its own memory pool: a
    decode step's activations are small, and a pool shared with graphs that are dropped later (new banks,
    new capacity) tripped an allocator assertion."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            prepare()
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    prepare()
    with torch.cuda.graph(graph):
        out = run()
    return graph, out


def spec_key(specs: Sequence[dict[str, float] | None]) -> tuple[Any, ...]:
    """A hashable key of the rows' specs (what the rows apply, in order)."""
    return tuple(tuple(sorted(s.items())) if s else None for s in specs)


def _static_cache(config: Any, cols: int) -> Any:
    from transformers import StaticCache

    return StaticCache(config=config, max_cache_len=cols)
