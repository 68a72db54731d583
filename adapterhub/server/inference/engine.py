"""The scheduler: one thread owns the model and runs continuous batching over every request.

Each step it (1) drops cancelled requests, (2) installs adapters whose files finished reading, (3) admits
waiting requests whose adapters are resident (a request waiting on a cold adapter never holds up the
others), prefills them and (4) runs one decode step over every active request, whatever adapter each uses.

By default (`invariant`) a greedy request's tokens never depend on what else shares the batch: each is
prefilled alone and decode steps run over per-row KV columns (`invariant.RowsBatch`), on a GPU each step
shape captured in a CUDA graph. With
``batch_invariant=False`` requests are prefilled together (left-padded, each row with its own adapter
through ``rt.rows``) and the batch's KV cache is one left-padded ``DynamicCache`` (`_Batch`): a joining
group is padded to the batch's length (or the batch to the group's), finished rows are cut out with
``index_select`` and leading columns that no row uses any more are trimmed; on a GPU the steps run over
static buffers in CUDA graphs (`graphs`). Each row keeps its own positions and padding is masked, so
there a row's tokens are those of the request alone up to rounding.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import invariant
from .graphs import GraphDecoder, StaticBatch, spec_key
from .invariant import RowsBatch, RowsDecoder
from .metrics import Metrics
from .pool import AdapterPool
from .sampling import Logprob, Sampling, eos_ids, pick, record, stop_at, stop_prefix

logger = logging.getLogger(__name__)


@dataclass
class Job:
    """One request in the scheduler. ``sink`` gets ``("text", str)``, then ``("done", dict)`` or
    ``("error", exception)``; it is called from the scheduler thread."""

    prompt: list[int]
    sampling: Sampling
    spec: dict[str, float] | None  # content sha256 -> weight (None: the base)
    sink: Callable[[tuple[str, Any]], None]
    queued_at: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    generated: list[int] = field(default_factory=list)
    sent: str = ""
    finish: str | None = None
    gen: torch.Generator | None = None
    #: with ``sampling.logprobs``: one record per generated token, and how many went out with text
    logprobs: list[Logprob] = field(default_factory=list)
    logprobs_sent: int = 0
    #: with ``sampling.prompt_logprobs``: None for the first prompt token, then one record each
    prompt_logprobs: list[Logprob | None] | None = None
    #: constrained decoding (`grammar`): the request's llguidance matcher, and whether it is complete
    matcher: Any = None
    grammar_done: bool = False
    #: special tokens its text keeps (a tool format's markers: `tools.ToolPlan.keep`)
    keep: frozenset[int] = frozenset()

    @property
    def shas(self) -> tuple[str, ...]:
        return tuple(self.spec or ())

    def cancel(self) -> None:
        self.cancelled = True


class _Batch:
    """The active rows: their jobs, the left-padded KV cache, mask, next positions and last tokens."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.cache: Any = None
        self.mask: torch.Tensor | None = None  # (B, L) long
        self.pos: torch.Tensor | None = None  # (B,) long
        self.last: torch.Tensor | None = None  # (B,) long

    def join(
        self, jobs: list[Job], cache: Any, mask: torch.Tensor, pos: torch.Tensor, last: torch.Tensor
    ) -> None:
        if not self.jobs:
            self.jobs, self.cache, self.mask, self.pos, self.last = list(jobs), cache, mask, pos, last
            return
        assert self.mask is not None and self.pos is not None and self.last is not None
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left(mine.keys, width - old), _left(theirs.keys, width - new)], 0)
            mine.values = torch.cat([_left(mine.values, width - old), _left(theirs.values, width - new)], 0)
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))], 0)
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])
        self.jobs += jobs

    def keep(self, rows: list[int]) -> None:
        if len(rows) == len(self.jobs):
            return
        if not rows:
            self.clear()
            return
        assert self.mask is not None and self.pos is not None and self.last is not None
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = (mask.sum(0) > 0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask[:, start:]
        self.pos, self.last = self.pos.index_select(0, idx), self.last.index_select(0, idx)
        self.jobs = [self.jobs[i] for i in rows]

    def clear(self) -> None:
        self.jobs, self.cache, self.mask, self.pos, self.last = [], None, None, None, None


def _left(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n else t


class Engine:
    """Continuous batching over one model (see the module docstring). ``submit`` is thread-safe."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        pool: AdapterPool,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        max_queue: int = 256,
        prefill_tokens: int = 4096,
        graphs: bool | None = None,
        batch_invariant: bool | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_tokens = prefill_tokens
        self.device = next(model.parameters()).device
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos = eos_ids(model, tokenizer)
        import inspect

        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers renamed it
        self._pad = int(getattr(tokenizer, "pad_token_id", None) or next(iter(self.eos), 0))
        self._special: set[int] | None = None
        self._waiting: list[Job] = []
        if batch_invariant is None:
            batch_invariant = True
        #: a request's tokens never depend on what else runs, in any dtype (`invariant`)
        self.batch_invariant = batch_invariant
        #: the invariant steps; None where the model is not covered: then each request runs alone
        self.rows: RowsDecoder | None = None
        self._alone: list[_Batch] = []
        self._each_alone = False
        if batch_invariant:
            why_not = invariant.supported(model)
            if why_not is None:  # static inputs (CUDA graphs on a GPU) unless graphs=False; a GPU's default
                static = bool(graphs) or (graphs is None and self.device.type == "cuda")
                self.rows = RowsDecoder(
                    model, pool.runtime, self._cache_kw, max_batch=max_batch, pad=self._pad, static=static
                )
            else:
                logger.warning("batch invariance runs each request alone: %s", why_not)
                self._each_alone = True
            graphs = False
        why = GraphDecoder.supported(model) if graphs is not False else "turned off"
        if graphs and why:
            logger.warning("decode steps stay dynamic: %s", why)
        #: static buffers (and CUDA graphs on a GPU) for the decode steps; None: a growing DynamicCache
        self.graphs: GraphDecoder | None = None
        if why is None and (graphs or self.device.type == "cuda"):
            self.graphs = GraphDecoder(
                model, pool.runtime, self._cache_kw, max_batch=max_batch, pad=self._pad
            )
        self._batch = self._new_batch()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._rows_key: tuple[Any, ...] | None = None
        self._rows = contextlib.ExitStack()
        self._exclusive: list[tuple[Callable[[], Any], Callable[[tuple[str, Any]], None]]] = []
        pool.wake = self.wake

    def _new_batch(self) -> _Batch | StaticBatch | RowsBatch:
        if self.rows is not None:
            return RowsBatch(self.rows)
        return StaticBatch(self.graphs) if self.graphs is not None else _Batch()

    # ----------------------------------------------------------------------------- outside the thread

    def start(self) -> None:
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="adapterhub-inference", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> bool:
        """Queue ``job``; False when the queue is full (the caller answers 429)."""
        self.start()
        with self._cond:
            if len(self._waiting) >= self.max_queue:
                return False
            self._waiting.append(job)
            self.metrics.queue_length = len(self._waiting)
            self._cond.notify_all()
        return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def run_exclusive(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the scheduler thread between steps (embeddings); returns its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def sink(event: tuple[str, Any]) -> None:
            box["event"] = event
            done.set()

        self.start()
        with self._cond:
            self._exclusive.append((work, sink))
            self._cond.notify_all()
        done.wait()
        kind, value = box["event"]
        if kind == "error":
            raise value
        return value

    @property
    def active(self) -> int:
        return len(self._batch.jobs) + sum(len(b.jobs) for b in self._alone)

    def _all_jobs(self) -> list[Job]:
        return self._batch.jobs + [j for b in self._alone for j in b.jobs]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # ----------------------------------------------------------------------------- the thread

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stopping and not self._exclusive and not self.active:
                    self._cond.wait(timeout=0.05 if self._waiting else 0.5)
                if self._stopping:
                    break
                exclusive, self._exclusive = self._exclusive, []
            try:
                self._step(exclusive)
            except Exception as exc:  # never leave requests hanging: fail the batch, keep serving
                logger.exception("inference step failed")
                self.close_rows()
                for job in self._all_jobs():
                    self._fail(job, exc)
                self._batch = self._new_batch()
                self._alone = []
                self.metrics.active = 0
        self.close_rows()
        for job in self._all_jobs() + self._waiting:
            self._fail(job, RuntimeError("the server is shutting down"))

    def _step(self, exclusive: list[tuple[Callable[[], Any], Callable[[tuple[str, Any]], None]]]) -> None:
        for work, sink in exclusive:
            self.close_rows()
            try:
                sink(("done", work()))
            except Exception as exc:
                sink(("error", exc))
        if self._each_alone:
            self._step_alone()
            return
        self._drop_cancelled()
        if self._waiting:
            self.pool.install(self.close_rows, self._batch.jobs)
            new = self._admit()
            if new and self.rows is not None:  # each prefilled alone: its own shapes
                for job in new:
                    self._start([job])
            elif new:
                self._start(new)
        if self._batch.jobs:
            self._decode()
        self.metrics.active = len(self._batch.jobs)

    def _step_alone(self) -> None:
        """A step of the batch-invariant mode: each request is a batch of its own."""
        self._batch = _Batch()
        self._drop_cancelled()  # the waiting ones
        for b in self._alone:
            self._batch = b
            self._drop_cancelled()
        self._batch = _Batch()
        if self._waiting:
            self.pool.install(self.close_rows, self._all_jobs())
            for job in self._admit():
                self._batch = _Batch()
                self._start([job])
                if self._batch.jobs:
                    self._alone.append(self._batch)
        for b in self._alone:
            self._batch = b
            if b.jobs:
                self._decode()
        self._batch = _Batch()
        self._alone = [b for b in self._alone if b.jobs]
        self.metrics.active = self.active

    def _start(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` together; if that fails, each alone, so one bad request fails only itself."""
        try:
            self._prefill(jobs)
            return
        except Exception as exc:
            self.close_rows()
            if len(jobs) == 1:
                logger.info("request refused at prefill: %s", exc)
                self.pool.unpin(jobs[0].shas)
                self._fail(jobs[0], exc)
                return
        for job in jobs:
            self._start([job])

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [j for j in self._waiting if j.cancelled]
            self._waiting = [j for j in self._waiting if not j.cancelled]
        for j in gone:
            self.pool.failed_wait(j)
        rows = [i for i, j in enumerate(self._batch.jobs) if not j.cancelled]
        if len(rows) != len(self._batch.jobs):
            for j in self._batch.jobs:
                if j.cancelled:
                    self.pool.unpin(j.shas)
                    self.metrics.cancelled += 1
            self.close_rows()
            self._batch.keep(rows)

    def _admit(self) -> list[Job]:
        room = self.max_batch - self.active
        admitted: list[Job] = []
        tokens = 0
        with self._cond:
            waiting = list(self._waiting)
        for job in waiting:
            if room <= 0 or (admitted and tokens + len(job.prompt) > self.prefill_tokens):
                break
            problem = self.pool.problem(job.shas)
            if problem is not None:
                self._remove_waiting(job)
                self._fail(job, problem)
                continue
            if not self.pool.ready(job.shas):
                continue
            self.pool.pin(job.shas)
            self._remove_waiting(job)
            admitted.append(job)
            tokens += len(job.prompt)
            room -= 1
        return admitted

    def _remove_waiting(self, job: Job) -> None:
        with self._cond:
            self._waiting = [j for j in self._waiting if j is not job]
            self.metrics.queue_length = len(self._waiting)

    def _fail(self, job: Job, exc: BaseException) -> None:
        job.finish = "error"
        with contextlib.suppress(Exception):  # the client is gone
            job.sink(("error", exc))

    # ----------------------------------------------------------------------------- model steps

    def _set_rows(self, specs: Sequence[dict[str, float] | None]) -> None:
        key = spec_key(specs)
        if key == self._rows_key:
            return
        self.close_rows()
        self._rows.enter_context(self.pool.runtime.rows(list(specs)))
        self._rows_key = key

    def close_rows(self) -> None:
        """Leave the decode steps' rows (before the resident adapters change, or the batch does)."""
        if isinstance(self._batch, (StaticBatch, RowsBatch)):
            self._batch.table_key = None
        self._rows.close()
        self._rows = contextlib.ExitStack()
        self._rows_key = None

    @torch.no_grad()
    def _prefill(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache

        started = time.perf_counter()
        width = max(len(j.prompt) for j in jobs)
        ids = torch.full((len(jobs), width), self._pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for i, j in enumerate(jobs):
            ids[i, width - len(j.prompt) :] = torch.tensor(j.prompt, dtype=torch.long)
            mask[i, width - len(j.prompt) :] = 1
            if not j.sampling.greedy:
                j.gen = torch.Generator(device=self.device)
                seed = j.sampling.seed if j.sampling.seed is not None else torch.seed()
                j.gen.manual_seed(seed % (1 << 63))
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        self.close_rows()
        whole = any(j.sampling.prompt_logprobs for j in jobs)  # every position's logits, not the last only
        rows = self.rows.alone(jobs[0].spec) if self.rows is not None and len(jobs) == 1 else None
        with rows or self.pool.runtime.rows([j.spec for j in jobs]):
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=0 if whole else 1,
                **{self._cache_kw: cache},
            )
        if whole:
            for i, j in enumerate(jobs):
                if j.sampling.prompt_logprobs:
                    j.prompt_logprobs = _prompt_logprobs(out.logits[i], j, width)
        logits = out.logits[:, -1, :].float()
        nxt = self._pick(logits, jobs)
        pos = mask.sum(1)
        for j in jobs:
            self.metrics.first_token(time.perf_counter() - j.queued_at)
        self.metrics.prefill(len(jobs), int(mask.sum()), time.perf_counter() - started)
        start = len(self._batch.jobs)
        self._batch.join(jobs, cache, mask, pos, nxt)
        self._advance(nxt.tolist(), start)

    @torch.no_grad()
    def _decode(self) -> None:
        b = self._batch
        specs = [j.spec for j in b.jobs]
        if isinstance(b, StaticBatch):
            assert self.graphs is not None
            logits = self.graphs.step(b, specs)
        elif isinstance(b, RowsBatch):
            logits = b.d.step(b, specs)
        else:
            logits = self._dynamic_step(b, specs)
        assert b.pos is not None
        b.pos = b.pos + 1
        nxt = self._pick(logits.float(), b.jobs)
        b.last = nxt
        self.metrics.decode(len(b.jobs))
        self._advance(nxt.tolist(), 0)

    def _dynamic_step(self, b: _Batch, specs: list[dict[str, float] | None]) -> torch.Tensor:
        """The step's logits over the growing DynamicCache (the batch's mask grows by one column)."""
        assert b.mask is not None and b.pos is not None and b.last is not None
        self._set_rows(specs)
        mask = torch.cat(
            [b.mask, torch.ones((b.mask.shape[0], 1), dtype=b.mask.dtype, device=b.mask.device)], 1
        )
        out = self.model(
            input_ids=b.last[:, None],
            attention_mask=mask,
            position_ids=b.pos[:, None],
            use_cache=True,
            **{self._cache_kw: b.cache},
        )
        b.mask = mask
        return out.logits[:, -1, :]

    def _pick(self, logits: torch.Tensor, jobs: Sequence[Job]) -> torch.Tensor:
        nxt, records = pick(logits, jobs)
        for j, r in zip(jobs, records, strict=True):
            if r is not None:
                j.logprobs.append(r)
        return nxt

    def _advance(self, tokens: list[int], start: int) -> None:
        """Give rows ``start...`` their new tokens: stream text, decide whether each is finished, let finished
        rows go."""
        b = self._batch
        keep: list[int] = list(range(start))
        assert b.pos is not None
        positions = b.pos.tolist()
        for i, (job, tok) in enumerate(zip(b.jobs[start:], tokens, strict=True), start):
            job.generated.append(tok)
            self.metrics.tokens_out += 1
            finish = self._emit(job, tok)
            if finish is None and job.grammar_done:
                finish = "stop"
                self._emit_all(job)
            if finish is None and positions[i] >= self.max_context:
                finish = "length"
            if finish is None:
                keep.append(i)
                continue
            job.finish = finish
            self.pool.unpin(job.shas)
            self.metrics.finished += 1
            done = {
                "finish_reason": finish,
                "text": job.sent,
                "prompt_tokens": len(job.prompt),
                "completion_tokens": len(job.generated),
                "logprobs": job.logprobs,
                "prompt_logprobs": job.prompt_logprobs,
                "tokens": list(job.generated),
                "eos": tok in self.eos,
            }
            with contextlib.suppress(Exception):
                job.sink(("done", done))
        if len(keep) != len(b.jobs):
            self.close_rows()
            b.keep(keep)

    def _emit_all(self, job: Job) -> None:
        """Send what is held back of a finished job's text (a complete grammar ends it mid-way)."""
        text = self._text(job, job.generated)
        if text.startswith(job.sent) and len(text) > len(job.sent):
            lps = job.logprobs[job.logprobs_sent :]
            job.logprobs_sent = len(job.logprobs)
            with contextlib.suppress(Exception):
                job.sink(("text", (text[len(job.sent) :], lps)))
        job.sent = text

    def _text(self, job: Job, ids: list[int]) -> str:
        """``ids`` decoded without special tokens, but for those the job keeps."""
        if not job.keep:
            return str(self.tokenizer.decode(ids, skip_special_tokens=True))
        tok, drop = self.tokenizer, self._special
        if drop is None:  # the ids decoding skips: the special tokens, added ones included
            drop = self._special = set(tok.all_special_ids) | {
                i for i, t in tok.added_tokens_decoder.items() if t.special
            }
        return str(tok.decode([i for i in ids if i in job.keep or i not in drop], skip_special_tokens=False))

    def _emit(self, job: Job, tok: int) -> str | None:
        ended = tok in self.eos
        ids = job.generated[:-1] if ended else job.generated
        text = self._text(job, ids)
        finish = "stop" if ended else None
        cut = stop_at(text, job.sampling.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        elif finish is None and len(job.generated) >= job.sampling.max_tokens:
            finish = "length"
        if finish is None and text.endswith("\ufffd"):
            return None  # an incomplete character: wait for the rest of its bytes
        # while unfinished, hold back a tail that could begin a stop string (it may yet be cut)
        shown = text if finish is not None else text[: len(text) - stop_prefix(text, job.sampling.stop)]
        if shown.startswith(job.sent) and len(shown) > len(job.sent):
            piece = shown[len(job.sent) :]
            job.sent = shown
            lps = job.logprobs[job.logprobs_sent :]
            job.logprobs_sent = len(job.logprobs)
            try:
                job.sink(("text", (piece, lps)))
            except Exception:
                job.cancelled = True
        elif finish is not None:
            job.sent = text
        return finish


def _prompt_logprobs(logits: torch.Tensor, job: Job, width: int) -> list[Logprob | None]:
    """The prompt's records from one row's logits over the (left-padded) prefill: position ``t`` predicts
    prompt token ``t + 1``; the first token has none."""
    start = width - len(job.prompt)
    lps = torch.log_softmax(logits[start : width - 1].float(), -1)
    top = job.sampling.logprobs or 0
    out: list[Logprob | None] = [None]
    for k, tok in enumerate(job.prompt[1:]):
        out.append(record(lps[k], tok, top))
    return out
