"""Fold LoRA adapters into a base checkpoint, streaming, on the CPU or a GPU.

For every targeted tensor the result is ``W0 + sum_i w_i * s_i * B_i @ A_i``, accumulated in fp32 and
rounded once to the output dtype. DoRA, ``lora_bias``, embedding, GPT-2 ``Conv1D`` and conv LoRAs,
``modules_to_save`` replacements and tied embeddings are handled; see `merge_checkpoint`.

How it streams: the output has the base's shard layout. Each shard's header is computed up front and
written; untouched tensors are copied as bytes by the kernel (``copy_file_range``); targeted tensors are
read in chunks of rows straight from the shard file, computed, and written at their offset. A reader
thread, the computing thread and a writer thread overlap, with a small fixed pool of buffers (pinned,
with a CUDA stream, on a GPU), so memory stays bounded by a few chunks whatever the model size.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import queue
import shutil
import struct
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterHubError, BaseModelError, IncompatibleAdapterError
from ..formats.checkpoint import CONFIG_NAME, INDEX_NAME, CheckpointInfo, read_checkpoint
from ..formats.safetensors_header import DTYPE_SIZES
from ..lora import LoraWeights
from .keymap import describe_problems, map_keys, needs_transpose

if TYPE_CHECKING:
    import torch

__all__ = ["merge_checkpoint", "MergeResult", "OutputExistsError", "DTYPES"]

logger = logging.getLogger(__name__)

#: output dtype choices: "keep" leaves every tensor in its own dtype
DTYPES = ("keep", "float32", "bfloat16", "float16")
_DTYPE_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_FLOAT_CODES = frozenset({"F16", "BF16", "F32", "F64"})
#: weight files of other formats that would be stale beside merged safetensors: not copied
_STALE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_STALE_NAMES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
#: names of input embeddings, most specific first, for finding what a missing lm_head is tied to
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                     "embed_in.weight", "shared.weight")


class OutputExistsError(AdapterHubError, FileExistsError):
    """The output folder is already there (merge never overwrites)."""


@dataclass(frozen=True)
class MergeResult:
    """What `merge_checkpoint` wrote."""

    out: Path
    tensors_changed: int
    bytes_written: int
    seconds: float
    device: str
    #: tensors written to break a tie with a changed embedding (``lm_head.weight``)
    untied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class _Lora:
    """One adapter's low-rank term on one tensor, in the tensor's stored layout: ``L @ R``."""

    L: torch.Tensor  # (rows, r), the coefficient w * s (and the sign of unmerge) folded in
    R: torch.Tensor  # (r, cols)


@dataclass
class _Target:
    """A base tensor the merge changes, with everything that changes it."""

    name: str
    src: str  # base tensor its bytes come from (differs for an untied lm_head)
    rows: int
    cols: int
    pre: list[_Lora] = field(default_factory=list)  # plain LoRA terms before the DoRA one (adapter order)
    post: list[_Lora] = field(default_factory=list)
    dora: _Lora | None = None
    magnitude: torch.Tensor | None = None
    dora_columns: bool = False  # norm per column (Conv1D, embedding) rather than per row
    replacement: torch.Tensor | None = None  # (rows, cols)
    bias: torch.Tensor | None = None  # summed lora_B bias terms, for a 1-D bias target
    adapters: set[int] = field(default_factory=set)

    @property
    def is_identity(self) -> bool:
        return not (self.pre or self.post or self.dora or self.replacement is not None or self.bias is not None)


def _resolve_dtype(dtype: str) -> str | None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return _DTYPE_CODES.get(dtype)


def _find_tied(ckpt: CheckpointInfo) -> tuple[str, str] | None:
    """``(output name, input embedding name)`` when the output head is tied and absent from the files."""
    if not ckpt.tie_word_embeddings:
        return None
    out_name = "lm_head.weight"
    if any(n.startswith("cls.predictions.") for n in ckpt.tensors):
        out_name = "cls.predictions.decoder.weight"
    if out_name in ckpt.tensors:
        return None
    for suffix in _INPUT_EMBEDDINGS:
        hits = [n for n, (_, t) in ckpt.tensors.items() if n.endswith(suffix) and len(t.shape) == 2]
        if len(hits) == 1:
            return out_name, hits[0]
        if hits:
            return None
    return None


def _flat(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return t.reshape(rows, cols)


def _plan(
    ckpt: CheckpointInfo,
    adapters: Sequence[tuple[LoraWeights, float]],
    *,
    unmerge: bool,
    tied: tuple[str, str] | None,
    notes: list[str],
) -> dict[str, _Target]:
    """Check every adapter against the base and build the targets; raise before anything is written."""
    import torch

    base_shapes: dict[str, tuple[int, ...]] = {n: t.shape for n, (_, t) in ckpt.tensors.items()}
    base_dtypes: dict[str, str] = {n: t.dtype for n, (_, t) in ckpt.tensors.items()}
    if tied is not None:
        base_shapes[tied[0]] = base_shapes[tied[1]]
        base_dtypes[tied[0]] = base_dtypes[tied[1]]
    problems: list[str] = []
    targets: dict[str, _Target] = {}
    replaced_by: dict[str, int] = {}

    def target(name: str) -> _Target:
        if name not in targets:
            shape = base_shapes[name]
            rows = int(shape[0]) if shape else 1
            targets[name] = _Target(
                name=name,
                src=tied[1] if tied is not None and name == tied[0] else name,
                rows=rows,
                cols=math.prod(shape) // rows if rows else 0,
            )
        return targets[name]

    for idx, (weights, w) in enumerate(adapters):
        label = f"adapter {idx + 1}" + (f" ({weights.base_model})" if weights.base_model else "")
        keys = list(weights.modules) + list(weights.replacement_shapes)
        match = map_keys(keys, base_shapes)
        if not match.ok:
            problems.append(f"{label}: {describe_problems(match)}")
            continue
        sign = -1.0 if unmerge else 1.0
        fan_in_fan_out = bool(weights.config.get("fan_in_fan_out")) if weights.config else None
        lora_terms: list[tuple[str, _Lora]] = []
        for key, m in weights.modules.items():
            name = match.mapping[key]
            bshape = base_shapes[name]
            if m.A is None or m.B is None:
                problems.append(f"{label}: {m.module}: tensors were not loaded (read with load=True)")
                continue
            if base_dtypes[name] not in _FLOAT_CODES:
                problems.append(
                    f"{label}: {m.module}: base tensor {name} is {base_dtypes[name]}, not a float type "
                    "(quantized bases cannot be merged into; dequantize first)"
                )
                continue
            coef = sign * float(w) * float(m.scale)
            a = m.A.detach().to("cpu", torch.float32).reshape(m.rank, -1)
            b = m.B.detach().to("cpu", torch.float32).reshape(-1, m.rank)
            transpose = False
            try:
                if m.kind == "linear" and len(bshape) == 2:
                    transpose = needs_transpose(
                        m.key, m.delta_shape, bshape, model_type=ckpt.model_type,
                        fan_in_fan_out=fan_in_fan_out, base_key=name,
                    )
                elif tuple(m.delta_shape) != tuple(bshape):
                    raise IncompatibleAdapterError(
                        f"{name}: the adapter's {m.kind} update has shape {list(m.delta_shape)} but the base "
                        f"tensor is {list(bshape)}; the adapter was made for a different base model"
                    )
            except IncompatibleAdapterError as exc:
                problems.append(f"{label}: {exc}")
                continue
            term = _Lora(L=a.T.contiguous(), R=(coef * b).T.contiguous()) if transpose else _Lora(L=coef * b, R=a)
            lora_terms.append((name, term))
            if m.is_dora:
                if unmerge:
                    problems.append(
                        f"{label}: {m.module} is DoRA, whose merge rescales rows by norms of the unmerged "
                        "weight, so it cannot be subtracted again; unmerge needs plain LoRA adapters"
                    )
                    continue
                if m.magnitude is None:
                    problems.append(f"{label}: {m.module}: DoRA magnitude was not loaded")
                    continue
                mag = m.magnitude.detach().to("cpu", torch.float32).reshape(-1)
                columns = transpose or m.kind == "embedding"
                want = int(bshape[1]) if columns else int(bshape[0])
                if mag.numel() != want:
                    problems.append(
                        f"{label}: {m.module}: DoRA magnitude has {mag.numel()} entries, the base weight needs {want}"
                    )
                    continue
                t = target(name)
                if t.dora is not None:
                    problems.append(
                        f"{label}: {m.module} already has a DoRA adapter from adapter {min(t.adapters) + 1}; "
                        "merging several DoRA adapters into one module is not supported (merge them one at a time)"
                    )
                    continue
                t.dora, t.magnitude, t.dora_columns = term, mag, columns
            if m.bias is not None:
                bias_name = (name[: -len(".weight")] if name.endswith(".weight") else name) + ".bias"
                if bias_name not in base_shapes:
                    problems.append(
                        f"{label}: {m.module} has a lora_B bias (lora_bias=True) but the base has no {bias_name} "
                        "to add it to; merge it into a base whose layer has a bias"
                    )
                    continue
                bvec = m.bias.detach().to("cpu", torch.float32).reshape(-1)
                if tuple(base_shapes[bias_name]) != (bvec.numel(),):
                    problems.append(
                        f"{label}: {m.module}: lora_B bias has {bvec.numel()} entries but {bias_name} is "
                        f"{list(base_shapes[bias_name])}"
                    )
                    continue
                bt = target(bias_name)
                bt.bias = coef * bvec if bt.bias is None else bt.bias + coef * bvec
                bt.adapters.add(idx)
        for name, term in lora_terms:
            t = target(name)
            t.adapters.add(idx)
            if term is t.dora:
                continue
            (t.post if t.dora is not None else t.pre).append(term)
        names_src: dict[str, str] = getattr(weights, "source_names", {}) or {}
        for key, shape in weights.replacement_shapes.items():
            name = match.mapping[key]
            is_base_layer = ".base_layer." in names_src.get(key, "")
            if unmerge:
                if is_base_layer:
                    notes.append(f"{name}: the adapter's saved base layer was ignored (unmerge subtracts the LoRA)")
                    continue
                problems.append(
                    f"{label}: {name} is a full replacement (modules_to_save), which cannot be unmerged"
                )
                continue
            if tuple(shape) != tuple(base_shapes[name]):
                problems.append(
                    f"{label}: {name}: the replacement has shape {list(shape)} but the base tensor is "
                    f"{list(base_shapes[name])} (resized vocabulary?); resize the base first"
                )
                continue
            tensor = weights.replacements.get(key)
            if tensor is None:
                problems.append(f"{label}: {name}: replacement tensor was not loaded (read with load=True)")
                continue
            t = target(name)
            flat = tensor.detach().to("cpu", torch.float32).reshape(t.rows, t.cols)
            if t.replacement is not None and not torch.equal(t.replacement, flat):
                problems.append(
                    f"{label}: {name} is replaced by adapter {replaced_by[name] + 1} too, with different "
                    "values; two adapters cannot both replace one tensor (modules_to_save)"
                )
                continue
            t.replacement = flat
            replaced_by.setdefault(name, idx)
            t.adapters.add(idx)
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IncompatibleAdapterError(f"cannot merge into {ckpt.path}; nothing was written:\n  {shown}{more}")
    return targets


# ---------------------------------------------------------------------------------------------- output


def _check_out(base: Path, out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out} already exists; choose a new output folder or remove it first")
    b, o = base.resolve(), out.resolve()
    if o == b or b in o.parents:
        raise OutputExistsError(f"{out} is inside the base checkpoint {base}; write the merge elsewhere")


def _copy_extras(ckpt: CheckpointInfo, tmp: Path, notes: list[str], skip: set[str]) -> None:
    """Copy every file of the base folder that is not a weight file we rewrite (config, tokenizer...)."""
    for entry in sorted(ckpt.path.iterdir()):
        name = entry.name
        if name in skip or name in ckpt.shards or name == INDEX_NAME:
            continue
        if entry.is_dir():
            if name == ".cache":
                continue
            shutil.copytree(entry, tmp / name)
            continue
        if name.endswith(".safetensors") or name.endswith(_STALE_SUFFIXES) or name in _STALE_NAMES:
            notes.append(f"not copied: {name} (weights in another file would be stale after the merge)")
            continue
        shutil.copy2(entry, tmp / name)


def _write_config(ckpt: CheckpointInfo, tmp: Path, *, untie: bool, dtype: str | None) -> bool:
    """Write config.json when the merge changes it; return whether it was written."""
    if not (ckpt.path / CONFIG_NAME).is_file() or not (untie or dtype):
        return False
    config = json.loads((ckpt.path / CONFIG_NAME).read_text(encoding="utf-8"))
    if untie:
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict) and "tie_word_embeddings" in config["text_config"]:
            config["text_config"]["tie_word_embeddings"] = False
    if dtype:
        name = {v: k for k, v in _DTYPE_CODES.items()}[dtype]
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = name
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return True


def _build_shards(
    ckpt: CheckpointInfo,
    targets: dict[str, _Target],
    *,
    out_dtype: str | None,
    extra: dict[str, tuple[str, str]],
) -> list[_ShardPlan]:
    """The output files: per shard, its tensors in file order with their output dtype and source."""
    plans = []
    for shard in ckpt.shards:
        header = ckpt.headers[shard]
        entries = []
        names = [t.name for t in header.ordered()] + [n for n, (s, _) in extra.items() if s == shard]
        for name in names:
            src = targets[name].src if name in targets else extra[name][1] if name in extra else name
            info = ckpt.info(src)
            dt = out_dtype if (out_dtype and info.dtype in _FLOAT_CODES) else info.dtype
            entries.append(
                _Entry(
                    name=name,
                    dtype=dt,
                    shape=info.shape,
                    src_dtype=info.dtype,
                    src_offset=header.data_start + info.begin,
                    src_nbytes=info.nbytes,
                    target=targets.get(name),
                )
            )
        plans.append(_ShardPlan(name=shard, src=ckpt.path / shard, metadata=dict(header.metadata),
                                       entries=entries))
    return plans


# ---------------------------------------------------------------------------------------------- streaming

_TORCH_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
#: bytes of input per chunk, and of fp32 scratch per sub-block on the CPU (fits the L2 cache)
_CPU_CHUNK = 8 << 20
_CPU_BLOCK = 2 << 20
_GPU_CHUNK = 64 << 20
_POOL = 4


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
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.out_nbytes]}
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
    shard: int
    entry: _Entry
    r0: int
    r1: int
    phase: str  # "norm" (DoRA column norms, no output) or "apply"
    src_offset: int
    nbytes: int
    dst_offset: int
    out_nbytes: int
    last: bool  # the target's last chunk: its device state can go


class _Failed(Exception):
    """Raised in one pipeline thread when another one failed."""


class _Pipe:
    """A bounded queue whose waits give up as soon as any stage of the pipeline failed."""

    def __init__(self, failed: threading.Event, maxsize: int = 0) -> None:
        self.q: queue.Queue[Any] = queue.Queue(maxsize)
        self.failed = failed

    def put(self, item: Any) -> None:
        while True:
            if self.failed.is_set():
                raise _Failed
            try:
                self.q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        while True:
            if self.failed.is_set():
                raise _Failed
            try:
                return self.q.get(timeout=0.1)
            except queue.Empty:
                continue


class _Buffer:
    """A reusable host buffer: a uint8 tensor (pinned for a GPU) and a writable memoryview of it."""

    def __init__(self, nbytes: int, pin: bool) -> None:
        import torch

        self.tensor = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)
        raw = (ctypes.c_char * self.tensor.numel()).from_address(self.tensor.data_ptr())
        self.view = memoryview(raw).cast("B")
        self.event: Any = None  # a CUDA event that must complete before the buffer is reused


def _read_into(fd: int, view: memoryview, offset: int) -> None:
    done, n = 0, len(view)
    while done < n:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise BaseModelError(f"unexpected end of file while reading a base shard at offset {offset + done}")
        done += got


def _write_from(fd: int, view: memoryview, offset: int) -> None:
    done, n = 0, len(view)
    while done < n:
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_range(src: int, dst: int, src_off: int, dst_off: int, n: int, scratch: list[bytearray]) -> None:
    done = 0
    if _HAS_COPY_RANGE and not _NO_COPY_RANGE:
        try:
            while done < n:
                got = os.copy_file_range(src, dst, n - done, src_off + done, dst_off + done)
                if got <= 0:
                    break
                done += got
        except OSError:  # not supported between these files: fall back to read + write
            _NO_COPY_RANGE.append(True)
    if done < n and not scratch:
        scratch.append(bytearray(4 << 20))
    while done < n:
        buf = memoryview(scratch[0])[: min(len(scratch[0]), n - done)]
        _read_into(src, buf, src_off + done)
        _write_from(dst, buf, dst_off + done)
        done += len(buf)


_HAS_COPY_RANGE = hasattr(os, "copy_file_range")
_NO_COPY_RANGE: list[bool] = []


class _Engine:
    """Computes chunks: ``W0 (or its replacement) + LoRA terms``, DoRA rescaling, bias terms."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.state: dict[str, dict[str, Any]] = {}
        self.scratch: torch.Tensor | None = None

    def _factors(self, t: _Target, cdt: torch.dtype) -> dict[str, Any]:
        st = self.state.get(t.name)
        if st is not None:
            return st
        torch = self.torch

        def mv(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(self.device, cdt, non_blocking=False).contiguous()

        def cat(terms: list[_Lora]) -> tuple[Any, Any]:
            if not terms:
                return None, None
            return mv(torch.cat([x.L for x in terms], 1)), mv(torch.cat([x.R for x in terms], 0))

        st = {"pre": cat(t.pre), "post": cat(t.post), "dora": cat([t.dora] if t.dora else []),
              "mag": mv(t.magnitude), "rep": mv(t.replacement), "bias": mv(t.bias), "colsq": None}
        self.state[t.name] = st
        return st

    def apply(self, t: _Target, x: torch.Tensor, g0: int, g1: int, cdt: torch.dtype) -> torch.Tensor:
        """``x`` holds base rows g0:g1 in the compute dtype; returns the merged rows (may be ``x``)."""
        st = self._factors(t, cdt)
        if st["rep"] is not None:
            x.copy_(st["rep"][g0:g1])
        (lp, rp), (lq, rq), (ld, rd) = st["pre"], st["post"], st["dora"]
        if ld is not None:
            y = self.torch.addmm(x, ld[g0:g1], rd)  # W0 + d: the weight whose norm DoRA uses
            if t.dora_columns:
                factor = (st["mag"] / st["colsq"].sqrt().to(y.dtype)).unsqueeze(0)
            else:
                factor = (st["mag"][g0:g1] / self.torch.linalg.vector_norm(y, dim=1)).unsqueeze(1)
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

    def norm(self, t: _Target, x: torch.Tensor, g0: int, g1: int, cdt: torch.dtype) -> None:
        """Accumulate the column sums of squares of ``W0 + d`` for a column-normed DoRA target."""
        st = self._factors(t, cdt)
        if st["rep"] is not None:
            x.copy_(st["rep"][g0:g1])
        ld, rd = st["dora"]
        y = self.torch.addmm(x, ld[g0:g1], rd)
        sq = y.square().sum(0, dtype=self.torch.float64)
        st["colsq"] = sq if st["colsq"] is None else st["colsq"] + sq

    def chunk(self, c: _Chunk, inp: _Buffer, out: _Buffer | None) -> Any:
        """Process one chunk from ``inp`` into ``out``; returns an event to wait for on a GPU."""
        torch = self.torch
        e = c.entry
        rows, cols = c.r1 - c.r0, e.rows_cols[1]
        src_dt = getattr(torch, _TORCH_DTYPES[e.src_dtype]) if e.src_dtype in _TORCH_DTYPES else None
        out_dt = getattr(torch, _TORCH_DTYPES[e.dtype]) if e.dtype in _TORCH_DTYPES else None
        cdt = torch.float64 if torch.float64 in (src_dt, out_dt) else torch.float32
        src = inp.tensor[: c.nbytes].view(src_dt).view(rows, cols)
        t = e.target
        if self.cuda:
            assert self.stream is not None
            with torch.cuda.stream(self.stream):
                g = src.to(self.device, non_blocking=True)
                inp.event = torch.cuda.Event()
                inp.event.record(self.stream)
                x = g.to(cdt)
                if t is not None and c.phase == "norm":
                    self.norm(t, x, c.r0, c.r1, cdt)
                    return None
                if t is not None:
                    x = self.apply(t, x, c.r0, c.r1, cdt)
                assert out is not None and out_dt is not None
                res = x.to(out_dt)
                out.tensor[: c.out_nbytes].copy_(res.view(-1).view(torch.uint8), non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.stream)
                if c.last and t is not None:
                    self.state.pop(t.name, None)
                return done
        if t is None:  # a dtype conversion only
            assert out is not None and out_dt is not None
            out.tensor[: c.out_nbytes].view(out_dt).view(rows, cols).copy_(src)
            return None
        block = max(1, _CPU_BLOCK // max(1, cols * 4))
        if self.scratch is None or self.scratch.numel() < block * cols or self.scratch.dtype != cdt:
            self.scratch = torch.empty(block * cols, dtype=cdt)
        dst = None if out is None else out.tensor[: c.out_nbytes].view(out_dt).view(rows, cols)
        for s0 in range(0, rows, block):
            s1 = min(rows, s0 + block)
            x = self.scratch[: (s1 - s0) * cols].view(s1 - s0, cols)
            x.copy_(src[s0:s1])
            if c.phase == "norm":
                self.norm(t, x, c.r0 + s0, c.r0 + s1, cdt)
                continue
            x = self.apply(t, x, c.r0 + s0, c.r0 + s1, cdt)
            assert dst is not None
            dst[s0:s1].copy_(x)
        if c.last and c.phase == "apply":
            self.state.pop(t.name, None)
        return None


def _items(plans: list[_ShardPlan], chunk_bytes: int) -> Any:
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
            t = e.target
            phases = ["norm", "apply"] if t is not None and t.dora is not None and t.dora_columns else ["apply"]
            for phase in phases:
                for r0 in range(0, rows, step):
                    r1 = min(rows, r0 + step)
                    yield _Chunk(si, e, r0, r1, phase, e.src_offset + r0 * in_row, (r1 - r0) * in_row,
                                 dst + r0 * out_row, (r1 - r0) * out_row, last=r1 == rows)


def _write_shards(
    plans: list[_ShardPlan],
    folder: Path,
    *,
    device: torch.device,
    progress: Callable[[int, int], None] | None,
) -> int:
    """Write every shard into ``folder``; returns the bytes written."""
    import torch

    cuda = device.type == "cuda"
    chunk_bytes = _GPU_CHUNK if cuda else _CPU_CHUNK
    biggest = 0
    for plan in plans:
        for e in plan.entries:
            if e.computed:
                rows, cols = e.rows_cols
                row = cols * max(DTYPE_SIZES[e.src_dtype], DTYPE_SIZES[e.dtype])
                biggest = max(biggest, min(row * rows, max(chunk_bytes, row)))
    headers = [_header_bytes(p) for p in plans]
    total = sum(len(h) + sum(e.out_nbytes for e in p.entries) for p, h in zip(plans, headers, strict=True))
    src_fds: list[int] = []
    dst_fds: list[int] = []
    failed = threading.Event()
    errors: list[BaseException] = []
    done = [0]
    try:
        for plan, header in zip(plans, headers, strict=True):
            src_fds.append(os.open(plan.src, os.O_RDONLY))
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(src_fds[-1], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            fd = os.open(folder / plan.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            dst_fds.append(fd)
            os.ftruncate(fd, len(header) + sum(e.out_nbytes for e in plan.entries))
            _write_from(fd, memoryview(header), 0)
            done[0] += len(header)
        free_in = _Pipe(failed)
        free_out = _Pipe(failed)
        if biggest:
            for _ in range(_POOL):
                free_in.put(_Buffer(biggest, cuda))
                free_out.put(_Buffer(biggest, cuda))
        to_compute = _Pipe(failed, _POOL * 4)
        to_write = _Pipe(failed, _POOL * 4)

        def guard(fn: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    fn()
                except _Failed:
                    pass
                except BaseException as exc:  # handed to the calling thread
                    errors.append(exc)
                    failed.set()

            return run

        def reader() -> None:
            for item in _items(plans, chunk_bytes):
                if isinstance(item, _Chunk):
                    buf = free_in.get()
                    if buf.event is not None:
                        buf.event.synchronize()
                    _read_into(src_fds[item.shard], buf.view[: item.nbytes], item.src_offset)
                    to_compute.put((item, buf))
                else:
                    to_compute.put((item, None))
            to_compute.put(None)

        def writer() -> None:
            scratch: list[bytearray] = []
            while (got := to_write.get()) is not None:
                item, buf, event = got
                if isinstance(item, _Copy):
                    _copy_range(src_fds[item.shard], dst_fds[item.shard], item.src_offset, item.dst_offset,
                                item.nbytes, scratch)
                    done[0] += item.nbytes
                    continue
                if event is not None:
                    event.synchronize()
                _write_from(dst_fds[item.shard], buf.view[: item.out_nbytes], item.dst_offset)
                free_out.put(buf)
                done[0] += item.out_nbytes

        threads = [threading.Thread(target=guard(f), name=f"adapterhub-merge-{f.__name__}", daemon=True)
                   for f in (reader, writer)]
        for th in threads:
            th.start()
        engine = _Engine(device)
        reported = -1
        try:
            with torch.inference_mode():
                while (got := to_compute.get()) is not None:
                    item, buf = got
                    if isinstance(item, _Chunk):
                        out = free_out.get() if item.phase == "apply" else None
                        event = engine.chunk(item, buf, out)
                        free_in.put(buf)
                        if out is not None:
                            to_write.put((item, out, event))
                    else:
                        to_write.put((item, None, None))
                    if progress is not None and done[0] != reported:
                        reported = done[0]
                        progress(reported, total)
                to_write.put(None)
        except _Failed:
            pass
        except BaseException as exc:
            errors.append(exc)
            failed.set()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        if cuda:
            torch.cuda.synchronize(device)
    finally:
        failed.set()
        for fd in src_fds + dst_fds:
            os.close(fd)
    if progress is not None:
        progress(total, total)
    return total


# ---------------------------------------------------------------------------------------------- API


def merge_checkpoint(
    base: str | os.PathLike[str],
    adapters: Sequence[tuple[LoraWeights, float] | LoraWeights],
    out: str | os.PathLike[str],
    *,
    dtype: str = "keep",
    device: str = "auto",
    unmerge: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> MergeResult:
    """Merge adapters into the base checkpoint folder ``base`` and write the result to ``out``.

    Every targeted tensor becomes ``W0 + sum_i w_i * s_i * B_i @ A_i`` (``unmerge=True`` subtracts),
    accumulated in fp32 and rounded once to the output dtype. With DoRA (one DoRA adapter per module)
    PEFT's merge is reproduced: ``m / ||W0 + d|| * (W + d)``, the norm per output feature, with adapters
    applied in list order. ``lora_bias`` terms are added into the base's ``<module>.bias``;
    ``modules_to_save`` tensors replace base tensors outright.

    Args:
        base: a checkpoint folder: ``model.safetensors`` or shards with ``model.safetensors.index.json``,
            plus ``config.json`` and any other files (all copied).
        adapters: ``(weights, w)`` pairs, weights read with ``read_adapter(path, load=True)``; a bare
            `LoraWeights` counts as weight 1.0. Weights may be negative.
        out: the folder to create; it must not exist. It appears only once complete (written beside it
            under a temporary name, then renamed); on any error nothing is left behind.
        dtype: ``keep`` (each tensor keeps its dtype), ``float32``, ``bfloat16`` or ``float16`` (all float
            tensors converted, config.json's dtype updated).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        unmerge: subtract the adapters instead (not possible for DoRA or modules_to_save).
        progress: called as ``progress(bytes_done, bytes_total)`` while writing.

    Raises:
        IncompatibleAdapterError: some adapter key matches no base tensor, several, or one of another
            shape; lists every problem, and nothing is written.
        BaseModelError: the base folder cannot be read.
        OutputExistsError: ``out`` exists.

    When the base ties its output head to the input embeddings (no ``lm_head.weight`` in the files) and
    the merge changes either, the head is written out untied and ``tie_word_embeddings`` is set false;
    `MergeResult.untied` names it.
    """
    t0 = time.perf_counter()
    out_dtype = _resolve_dtype(dtype)
    base_path, out_path = Path(base), Path(out)
    ckpt = read_checkpoint(base_path)
    _check_out(base_path, out_path)
    pairs: list[tuple[LoraWeights, float]] = [
        (a, 1.0) if isinstance(a, LoraWeights) else (a[0], float(a[1])) for a in adapters
    ]
    if not pairs:
        raise ValueError("no adapters given; pass a list of (LoraWeights, weight) pairs")
    for w, _ in pairs:
        if not isinstance(w, LoraWeights):
            raise TypeError(f"adapters must be LoraWeights (from read_adapter(..., load=True)), got {type(w).__name__}")
    notes: list[str] = []
    tied = _find_tied(ckpt)
    targets = _plan(ckpt, pairs, unmerge=unmerge, tied=tied, notes=notes)

    untied: list[str] = []
    extra: dict[str, tuple[str, str]] = {}  # new tensor name -> (shard, source tensor)
    if tied is not None and (tied[0] in targets or tied[1] in targets):
        head, emb = tied
        extra[head] = (ckpt.shard_of(emb), emb)
        untied.append(head)
        notes.append(
            f"{head} was tied to {emb}, which the merge changes; wrote it untied and set tie_word_embeddings false"
        )
    targets = {n: t for n, t in targets.items() if not t.is_identity}

    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA device")
    plans = _build_shards(ckpt, targets, out_dtype=out_dtype, extra=extra)
    if out_dtype:
        notes.append(f"float tensors converted to {dtype}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        written = _write_shards(plans, tmp, device=dev, progress=progress)
        index = ckpt.index
        if index is not None:
            new_index = dict(index)
            weight_map = dict(index["weight_map"])
            for name, (shard, _) in extra.items():
                weight_map[name] = shard
            meta = dict(index.get("metadata") or {})
            meta["total_size"] = sum(e.out_nbytes for p in plans for e in p.entries)
            new_index["metadata"], new_index["weight_map"] = meta, weight_map
            (tmp / INDEX_NAME).write_text(json.dumps(new_index, indent=2) + "\n", encoding="utf-8")
        wrote_config = _write_config(ckpt, tmp, untie=bool(untied), dtype=out_dtype)
        _copy_extras(ckpt, tmp, notes, skip={CONFIG_NAME} if wrote_config else set())
        if out_path.exists():  # an empty folder: os.replace needs it gone
            out_path.rmdir()
        os.replace(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - t0
    changed = len(targets) + len(untied)
    logger.info("merged %d adapter(s) into %s: %d tensors changed, %.1f MB in %.2f s on %s",
                len(pairs), out_path, changed, written / 1e6, seconds, dev)
    return MergeResult(
        out=out_path,
        tensors_changed=changed,
        bytes_written=written,
        seconds=seconds,
        device=str(dev),
        untied=untied,
        notes=notes,
    )
