"""The streaming writer of `merge_checkpoint`: output shards written chunk by chunk, by a few threads.

How it streams: the output has the base's shard layout. Each shard's header is computed up front and
written; untouched tensors are copied as bytes by the kernel (``copy_file_range``); targeted tensors are
mapped (CPU) or read into pinned buffers (GPU) in chunks of rows straight from the shard file, computed,
and written at their offset. A few worker threads each take the next chunk, so reading, computing and
writing of different chunks overlap; memory stays bounded by a few chunks whatever the model size.

`merge` decides what each output tensor gets (a `_targets._Target` for every changed tensor, a `_ShardPlan` for
every output file); this module only reads, computes and writes them, through `_write_shards`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BaseModelError, IncompatibleAdapterError
from ..formats.safetensors_header import DTYPE_SIZES
from ._targets import _Lora, _Target

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: bytes of input per chunk, and of fp32 scratch per sub-block on the CPU
_CPU_CHUNK = 4 << 20
_CPU_BLOCK = 1 << 20
_GPU_CHUNK = 32 << 20
_GPU_WORKERS = 3


@dataclass
class _Entry:
    """One tensor of an output shard."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    src_dtype: str
    src_offset: int  # absolute offset in the source shard file
    src_nbytes: int
    target: _Target | None = None
    out_offset: int = 0  # relative to the output's data section, set by _header_bytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_nbytes(self) -> int:
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def computed(self) -> bool:
        return self.target is not None or self.dtype != self.src_dtype

    @property
    def rows_cols(self) -> tuple[int, int]:
        if self.target is not None:
            return self.target.rows, self.target.cols
        rows = int(self.shape[0]) if self.shape else 1
        return rows, (self.numel // rows if rows else 0)


@dataclass
class _ShardPlan:
    name: str
    src: Path
    metadata: dict[str, str]
    entries: list[_Entry]
    data_start: int = 0


def _header_bytes(plan: _ShardPlan) -> bytes:
    """The safetensors header of an output shard (tensors in input order, header padded to 8 bytes)."""
    doc: dict[str, Any] = {}
    if plan.metadata:
        doc["__metadata__"] = plan.metadata
    offset = 0
    for e in plan.entries:
        e.out_offset = offset
        doc[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.out_nbytes],
        }
        offset += e.out_nbytes
    raw = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    plan.data_start = 8 + len(raw)
    return struct.pack("<Q", len(raw)) + raw


@dataclass
class _Copy:
    shard: int
    src_offset: int
    dst_offset: int
    nbytes: int


@dataclass
class _Chunk:
    """Rows r0:r1 of a computed tensor; phase "norm" covers the whole tensor (DoRA column norms)."""

    shard: int
    entry: _Entry
    r0: int
    r1: int
    phase: str  # "norm" | "apply"
    src_offset: int
    nbytes: int
    dst_offset: int
    out_nbytes: int
    chunks: int  # apply chunks of this tensor, so the last one to finish frees its factors


def _buffer(nbytes: int, pin: bool) -> tuple[torch.Tensor, memoryview]:
    """A uint8 tensor (pinned for a GPU) and a writable memoryview of the same memory."""
    import torch

    t = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
    return t, memoryview((ctypes.c_char * t.numel()).from_address(t.data_ptr())).cast("B")


class _Mapped:
    """A range of a source shard mapped into memory (no copy); unmapped by `close`."""

    def __init__(self, fd: int, offset: int, nbytes: int) -> None:
        import torch

        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self.map = mmap.mmap(fd, offset + nbytes - start, flags=_MAP_FLAGS, prot=mmap.PROT_READ, offset=start)
        with warnings.catch_warnings():  # read-only on purpose: nothing writes to it
            warnings.simplefilter("ignore", UserWarning)
            self.tensor: Any = torch.frombuffer(
                self.map, dtype=torch.uint8, count=nbytes, offset=offset - start
            )

    def close(self) -> None:
        self.tensor = None
        with contextlib.suppress(BufferError):  # a view still alive: the mapping goes when it does
            self.map.close()


_MAP_FLAGS = getattr(mmap, "MAP_SHARED", 0) | getattr(mmap, "MAP_POPULATE", 0)
#: map source chunks instead of reading them, where mmap takes flags (Linux)
_CAN_MAP = hasattr(mmap, "MAP_POPULATE")
_HAS_COPY_RANGE = hasattr(os, "copy_file_range")


#: bytes per read/write call: calls of 2 MB and more ran 10x slower than 1 MB ones on the 2-core VM
#: this was tuned on (large page-cache folios, presumably); 1 MB calls cost nothing elsewhere
_IO_PIECE = 1 << 20


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done : done + _IO_PIECE]], offset + done)
        if got <= 0:
            raise BaseModelError(
                f"unexpected end of file while reading a base shard at offset {offset + done}"
            )
        done += got


def _write_from(fd: int, view: memoryview, offset: int) -> None:
    done, n = 0, len(view)
    while done < n:
        done += os.pwrite(fd, view[done : done + _IO_PIECE], offset + done)


class _Worker:
    """One thread of the merge, with its own buffers (and CUDA stream): read, compute, write."""

    def __init__(self, shared: _Shared) -> None:
        import torch

        self.torch = torch
        self.sh = shared
        self.cuda = shared.device.type == "cuda"
        self.stream = torch.cuda.Stream(shared.device) if self.cuda else None
        self.scratch: torch.Tensor | None = None
        self._in: tuple[torch.Tensor, memoryview] | None = None
        self._out: tuple[torch.Tensor, memoryview] | None = None
        self._copybuf: memoryview | None = None

    # -- io

    def _in_buf(self, n: int) -> tuple[torch.Tensor, memoryview]:
        if self._in is None or self._in[0].numel() < n:
            self._in = _buffer(max(n, self.sh.buffer_bytes), self.cuda)
        return self._in

    def _out_buf(self, n: int) -> tuple[torch.Tensor, memoryview]:
        if self._out is None or self._out[0].numel() < n:
            self._out = _buffer(max(n, self.sh.buffer_bytes), self.cuda)
        return self._out

    def _source(self, fd: int, offset: int, nbytes: int) -> tuple[torch.Tensor, _Mapped | None]:
        if _CAN_MAP and not self.cuda:
            m = _Mapped(fd, offset, nbytes)
            return m.tensor, m
        t, view = self._in_buf(nbytes)
        _read_into(fd, view[:nbytes], offset)
        return t[:nbytes], None

    def copy(self, item: _Copy) -> None:
        src, dst = self.sh.src_fds[item.shard], self.sh.dst_fds[item.shard]
        done, n = 0, item.nbytes
        if _HAS_COPY_RANGE and not self.sh.no_copy_range:
            try:
                while done < n:
                    got = os.copy_file_range(
                        src, dst, n - done, item.src_offset + done, item.dst_offset + done
                    )
                    if got <= 0:
                        break
                    done += got
            except OSError:  # not between these files: read and write instead
                self.sh.no_copy_range = True
        while done < n:
            if self._copybuf is None:
                self._copybuf = memoryview(bytearray(4 << 20))
            view = self._copybuf[: min(len(self._copybuf), n - done)]
            _read_into(src, view, item.src_offset + done)
            _write_from(dst, view, item.dst_offset + done)
            done += len(view)

    # -- compute

    def run(self, item: _Chunk) -> None:
        torch = self.torch
        e, t = item.entry, item.entry.target
        rows, cols = item.r1 - item.r0, e.rows_cols[1]
        src_dt = getattr(torch, _TORCH_DTYPES[e.src_dtype])
        out_dt = getattr(torch, _TORCH_DTYPES[e.dtype])
        cdt = torch.float64 if torch.float64 in (src_dt, out_dt) else torch.float32
        fd = self.sh.src_fds[item.shard]
        if item.phase == "norm":
            assert t is not None
            self._norms(item, t, fd, src_dt, cdt)
            return
        st = self.sh.state(t, cdt, self.stream) if t is not None else None
        if st is not None and st["norm_done"] is not None and not self.sh.wait(st["norm_done"]):
            return  # another worker failed
        out_t, out_view = self._out_buf(item.out_nbytes)
        dst = out_t[: item.out_nbytes].view(out_dt).view(rows, cols)
        raw, mapped = self._source(fd, item.src_offset, item.nbytes)
        try:
            compute = self._gpu if self.cuda else self._cpu
            src = raw.view(src_dt).view(rows, cols)
            if not compute(item, t, st, src, dst, cdt):
                _refuse_non_finite(torch, item, src, dst)
            del src
        finally:
            del raw  # the last view of a mapping: it can be unmapped now
            if mapped is not None:
                mapped.close()
        _write_from(self.sh.dst_fds[item.shard], out_view[: item.out_nbytes], item.dst_offset)
        if t is not None:
            self.sh.chunk_done(t, item.chunks)

    def _cpu(self, item: _Chunk, t: _Target | None, st: Any, src: Any, dst: Any, cdt: Any) -> bool:
        """Compute rows of ``dst``; return whether every value written is finite."""
        torch = self.torch
        if t is None:  # a dtype conversion only
            dst.copy_(src)
            return bool(torch.isfinite(dst).all())
        if src.dtype == cdt == dst.dtype and st["plain"]:  # fp32 in and out, plain LoRA: one op
            torch.addmm(src, st["pre"][0][item.r0 : item.r1], st["pre"][1], out=dst)
            return bool(torch.isfinite(dst).all())
        rows, cols = src.shape
        block = max(1, _CPU_BLOCK // max(1, cols * 4))
        if (
            self.scratch is None
            or self.scratch.numel() < min(block, rows) * cols
            or self.scratch.dtype != cdt
        ):
            self.scratch = torch.empty(min(block, rows) * cols, dtype=cdt)
        for s0 in range(0, rows, block):
            s1 = min(rows, s0 + block)
            x = self.scratch[: (s1 - s0) * cols].view(s1 - s0, cols)
            x.copy_(src[s0:s1])
            dst[s0:s1].copy_(_apply(torch, t, st, x, item.r0 + s0, item.r0 + s1))
        return bool(torch.isfinite(dst).all())

    def _gpu(self, item: _Chunk, t: _Target | None, st: Any, src: Any, dst: Any, cdt: Any) -> bool:
        torch = self.torch
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            x = src.to(self.sh.device, non_blocking=True).to(cdt)
            if t is not None:
                x = _apply(torch, t, st, x, item.r0, item.r1)
            y = x.to(dst.dtype)
            finite = torch.isfinite(y).all()
            dst.copy_(y, non_blocking=True)
        self.stream.synchronize()
        return bool(finite)

    def _norms(self, item: _Chunk, t: _Target, fd: int, src_dt: Any, cdt: Any) -> None:
        """Column sums of squares of ``W0 + d`` over the whole tensor, block by block."""
        torch = self.torch
        st = self.sh.state(t, cdt, self.stream)
        rows, cols = t.rows, t.cols
        row_bytes = cols * DTYPE_SIZES[item.entry.src_dtype]
        step = max(1, self.sh.chunk_bytes // max(1, row_bytes))
        total = None
        ld, rd = st["dora"]
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw, mapped = self._source(fd, item.src_offset + r0 * row_bytes, (r1 - r0) * row_bytes)
            try:
                with torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext():
                    if st["rep"] is not None:
                        base = st["rep"][r0:r1]
                    else:
                        base = raw.view(src_dt).view(r1 - r0, cols).to(self.sh.device, cdt, non_blocking=True)
                    sq = torch.addmm(base, ld[r0:r1], rd).square_().sum(0, dtype=torch.float64)
                    total = sq if total is None else total + sq
                    del base
                if self.stream is not None:
                    self.stream.synchronize()
            finally:
                del raw
                if mapped is not None:
                    mapped.close()
        assert total is not None
        st["colnorm"] = total.sqrt().to(cdt)
        st["norm_done"].set()


def _refuse_non_finite(torch: Any, item: _Chunk, src: Any, dst: Any) -> None:
    """Raise when the merge made a value that is not finite (a NaN / Inf already in the base is kept)."""
    made = ~torch.isfinite(dst) & torch.isfinite(src)
    n = int(made.sum())
    if not n:
        return
    e = item.entry
    row = item.r0 + int(made.any(1).nonzero()[0, 0])
    why = (
        "the merged values overflow float16; merge with dtype float32 or bfloat16"
        if e.dtype == "F16"
        else "the adapter's update is too large for the base's values (check its alpha and weights)"
    )
    raise IncompatibleAdapterError(
        f"{e.name}: the merged weight would hold {n} non-finite value{'s' * (n != 1)} (first in row {row}): "
        f"{why}; nothing was written"
    )


def _apply(torch: Any, t: _Target, st: dict[str, Any], x: Any, g0: int, g1: int) -> Any:
    """``x`` holds base rows g0:g1 in the compute dtype; return the merged rows (maybe ``x`` itself)."""
    if st["rep"] is not None:
        x.copy_(st["rep"][g0:g1])
    (lp, rp), (lq, rq), (ld, rd) = st["pre"], st["post"], st["dora"]
    if ld is not None:
        y = torch.addmm(x, ld[g0:g1], rd)  # W0 + d: the weight whose norm DoRA uses
        if t.dora_columns:
            factor = (st["mag"] / st["colnorm"]).unsqueeze(0)
        else:
            factor = (st["mag"][g0:g1] / torch.linalg.vector_norm(y, dim=1)).unsqueeze(1)
        if lp is not None:
            y.addmm_(lp[g0:g1], rp)
        x = y.mul_(factor)
    elif lp is not None:
        x.addmm_(lp[g0:g1], rp)
    if lq is not None:
        x.addmm_(lq[g0:g1], rq)
    if st["bias"] is not None:
        x.add_(st["bias"][g0:g1].unsqueeze(1))
    return x


class _Shared:
    """What the workers share: file descriptors, the work iterator, per-target factors, failure."""

    def __init__(self, device: torch.device, chunk_bytes: int, buffer_bytes: int) -> None:
        self.device = device
        self.chunk_bytes = chunk_bytes
        self.buffer_bytes = buffer_bytes
        self.src_fds: list[int] = []
        self.dst_fds: list[int] = []
        self.lock = threading.Lock()
        self.failed = threading.Event()
        self.errors: list[BaseException] = []
        self.done = 0
        self.no_copy_range = False
        self._state: dict[str, dict[str, Any]] = {}
        self._left: dict[str, int] = {}

    def state(self, t: _Target, cdt: Any, stream: Any) -> dict[str, Any]:
        """The target's factors on the device, made once by whichever worker comes first."""
        with self.lock:
            st = self._state.get(t.name)
            if st is not None:
                return st
            import torch

            def mv(x: torch.Tensor | None) -> torch.Tensor | None:
                return None if x is None else x.to(self.device, cdt).contiguous()

            def cat(terms: list[_Lora]) -> tuple[Any, Any]:
                if not terms:
                    return None, None
                pairs = [x.factors() for x in terms]
                return mv(torch.cat([p[0] for p in pairs], 1)), mv(torch.cat([p[1] for p in pairs], 0))

            ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
            with ctx:
                st = {
                    "pre": cat(t.pre),
                    "post": cat(t.post),
                    "dora": cat([t.dora] if t.dora else []),
                    "mag": mv(t.magnitude),
                    "rep": mv(t.replacement),
                    "bias": mv(t.bias),
                    "colnorm": None,
                    "norm_done": threading.Event() if t.dora is not None and t.dora_columns else None,
                }
            if stream is not None:
                stream.synchronize()  # other workers' streams use these tensors
            st["plain"] = bool(t.pre) and not (
                t.post or t.dora or t.replacement is not None or t.bias is not None
            )
            self._state[t.name] = st
            return st

    def chunk_done(self, t: _Target, chunks: int) -> None:
        with self.lock:
            left = self._left.get(t.name, chunks) - 1
            if left <= 0:
                self._state.pop(t.name, None)
                self._left.pop(t.name, None)
            else:
                self._left[t.name] = left

    def wait(self, event: threading.Event) -> bool:
        """Wait for ``event``; False when another worker failed first (then stop)."""
        while not event.wait(0.05):
            if self.failed.is_set():
                return False
        return True

    def add_done(self, n: int) -> None:
        with self.lock:
            self.done += n


def _items(plans: list[_ShardPlan], chunk_bytes: int) -> Iterator[_Copy | _Chunk]:
    """The work, in file order: byte copies, and row chunks of the tensors that are computed."""
    for si, plan in enumerate(plans):
        for e in plan.entries:
            if e.out_nbytes == 0:
                continue
            dst = plan.data_start + e.out_offset
            if not e.computed:
                yield _Copy(si, e.src_offset, dst, e.src_nbytes)
                continue
            rows, cols = e.rows_cols
            in_row = cols * DTYPE_SIZES[e.src_dtype]
            out_row = cols * DTYPE_SIZES[e.dtype]
            step = max(1, chunk_bytes // max(in_row, out_row, 1))
            n = -(-rows // step)
            t = e.target
            if t is not None and t.dora is not None and t.dora_columns:
                yield _Chunk(si, e, 0, rows, "norm", e.src_offset, rows * in_row, dst, 0, n)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                yield _Chunk(
                    si,
                    e,
                    r0,
                    r1,
                    "apply",
                    e.src_offset + r0 * in_row,
                    (r1 - r0) * in_row,
                    dst + r0 * out_row,
                    (r1 - r0) * out_row,
                    n,
                )


def _write_shards(
    plans: list[_ShardPlan],
    folder: Path,
    *,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every shard into ``folder`` with a few worker threads; return the bytes written.

    Each worker takes the next piece of work (a byte copy, or a chunk of rows to map or read, compute
    and write at its offset), so reading, computing and writing of different chunks overlap. On the CPU
    there is one worker per torch thread, each running torch single-threaded (no thread barriers, so a
    busy core slows one worker, not all); on a GPU a few workers, each with its own CUDA stream and
    pinned buffers.
    """
    import torch

    cuda = device.type == "cuda"
    chunk_bytes = _GPU_CHUNK if cuda else _CPU_CHUNK
    headers = [_header_bytes(p) for p in plans]
    total = sum(len(h) + sum(e.out_nbytes for e in p.entries) for p, h in zip(plans, headers, strict=True))
    threads_before = torch.get_num_threads()
    n_workers = _GPU_WORKERS if cuda else max(1, min(threads_before, os.cpu_count() or 1))
    sh = _Shared(device, chunk_bytes, chunk_bytes if cuda else 0)
    work = _items(plans, chunk_bytes)
    reported = -1

    def worker() -> None:
        try:
            with torch.inference_mode():
                _work(_Worker(sh))
        except BaseException as exc:  # handed to the calling thread
            with sh.lock:
                sh.errors.append(exc)
            sh.failed.set()

    def _work(w: _Worker) -> None:
        while not sh.failed.is_set():
            with sh.lock:
                item = next(work, None)
            if item is None:
                return
            if isinstance(item, _Copy):
                w.copy(item)
                sh.add_done(item.nbytes)
            else:
                w.run(item)
                sh.add_done(item.out_nbytes)

    try:
        for plan, header in zip(plans, headers, strict=True):
            sh.src_fds.append(os.open(plan.src, os.O_RDONLY))
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(sh.src_fds[-1], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            fd = os.open(folder / plan.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            sh.dst_fds.append(fd)
            os.ftruncate(fd, len(header) + sum(e.out_nbytes for e in plan.entries))
            _write_from(fd, memoryview(header), 0)
            sh.add_done(len(header))
        if not cuda:
            torch.set_num_threads(1)  # parallel across workers instead (restored below)
        threads = [
            threading.Thread(target=worker, name=f"adapterhub-merge-{i}", daemon=True)
            for i in range(n_workers)
        ]
        for th in threads:
            th.start()
        try:
            for th in threads:
                while th.is_alive():
                    th.join(0.05)
                    if progress is not None and sh.done != reported and not sh.failed.is_set():
                        reported = sh.done
                        progress(reported, total)
        except BaseException:  # the progress callback raised, or KeyboardInterrupt
            sh.failed.set()
            for th in threads:
                th.join()
            raise
        if sh.errors:
            raise sh.errors[0]
    finally:
        sh.failed.set()
        torch.set_num_threads(threads_before)
        for fd in sh.src_fds + sh.dst_fds:
            os.close(fd)
    if progress is not None and reported != total:
        progress(total, total)
    return total
