"""Fold LoRA adapters into a base checkpoint, streaming, on the CPU or a GPU.

For every targeted tensor the result is ``W0 + sum_i w_i * s_i * B_i @ A_i``, accumulated in fp32 and
rounded once to the output dtype. DoRA, ``lora_bias``, embedding, GPT-2 ``Conv1D`` and conv LoRAs,
``modules_to_save`` replacements and tied embeddings are handled; see `merge_checkpoint`.

How it streams: the output has the base's shard layout. Each shard's header is computed up front and
written; untouched tensors are copied as bytes by the kernel (``copy_file_range``); targeted tensors are
mapped (CPU) or read into pinned buffers (GPU) in chunks of rows straight from the shard file, computed,
and written at their offset. A few worker threads each take the next chunk, so reading, computing and
writing of different chunks overlap; memory stays bounded by a few chunks whatever the model size.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import mmap
import os
import shutil
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import (
    BaseModelError,
    IncompatibleAdapterError,
    InvalidOptionError,
    OutputExistsError,
)
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
_STALE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".onnx_data")
_STALE_NAMES = ("pytorch_model.bin.index.json", "tf_model.h5.index.json", "flax_model.msgpack.index.json")
#: names of input embeddings, most specific first, for finding what a missing lm_head is tied to
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "tok_embeddings.weight",
                     "embed_in.weight", "shared.weight")
#: architectures with an output head that transformers ties to the input embeddings
_LM_HEADS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM", "WithLMHead", "ForPreTraining")


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
    """One adapter's low-rank term on one tensor: ``coef * B @ A``, ``coef`` = sign * weight * scale.

    In the tensor's stored layout it is ``L @ R``: ``(coef * B) @ A``, or ``A.T @ (coef * B).T`` for a
    transposed (Conv1D) base. The scaled factors are built per tensor while it is merged, not up front.
    """

    a: torch.Tensor  # (r, cols or rows)
    b: torch.Tensor  # (out, r)
    coef: float
    transpose: bool = False

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.transpose:
            return self.a.T, (self.coef * self.b).T
        return self.coef * self.b, self.a


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
        raise InvalidOptionError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return _DTYPE_CODES.get(dtype)


def _find_tied(ckpt: CheckpointInfo) -> tuple[str, str] | None:
    """``(output name, input embedding name)`` when the output head is tied and absent from the files."""
    if not ckpt.tie_word_embeddings or not any(a.endswith(_LM_HEADS) for a in ckpt.architectures):
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
        clashes = [
            f"{a} and {b} both match {match.mapping[a]}"
            for group in (list(weights.modules), list(weights.replacement_shapes))
            for i, a in enumerate(group)
            for b in group[i + 1 :]
            if match.mapping[a] == match.mapping[b]
        ] if len(match.mapping) != len(set(match.mapping.values())) else []
        if clashes:
            problems.append(f"{label}: {'; '.join(clashes[:5])}")
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
                elif m.kind == "linear" and tuple(bshape) == (*m.delta_shape, *(1,) * (len(bshape) - 2)):
                    pass  # a linear LoRA on a 1x1 conv (kohya does this for proj_in / proj_out)
                elif tuple(m.delta_shape) != tuple(bshape):
                    raise IncompatibleAdapterError(
                        f"{name}: the adapter's {m.kind} update has shape {list(m.delta_shape)} but the base "
                        f"tensor is {list(bshape)}; the adapter was made for a different base model"
                    )
            except IncompatibleAdapterError as exc:
                problems.append(f"{label}: {exc}")
                continue
            term = _Lora(a=a, b=b, coef=coef, transpose=transpose)
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


def _stale(name: str) -> bool:
    return name.endswith((".safetensors", *_STALE_SUFFIXES)) or name in _STALE_NAMES


def _copy_extras(ckpt: CheckpointInfo, tmp: Path, notes: list[str], skip: set[str]) -> None:
    """Copy every file of the base folder that is not a weight file we rewrite (config, tokenizer...).

    Weights in other files (``pytorch_model.bin``, ``onnx/model.onnx``, a second ``.safetensors``) would
    be stale after the merge, so they are left out and named in the notes.
    """
    left_out: list[str] = []

    def ignore(folder: str, names: list[str]) -> list[str]:
        bad = [n for n in names if _stale(n) and not os.path.isdir(os.path.join(folder, n))]
        left_out.extend(os.path.relpath(os.path.join(folder, n), ckpt.path) for n in bad)
        return bad

    for entry in sorted(ckpt.path.iterdir()):
        name = entry.name
        if name in skip or name in ckpt.shards or name == INDEX_NAME or name == ".cache":
            continue
        if entry.is_dir():
            shutil.copytree(entry, tmp / name, ignore=ignore)
        elif _stale(name):
            left_out.append(name)
        else:
            shutil.copy2(entry, tmp / name)
    if left_out:
        notes.append(f"not copied (weights there would be stale after the merge): {', '.join(sorted(left_out))}")


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


class _Failed(Exception):
    """Raised in one worker when another one failed."""


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
            self.tensor: Any = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset - start)

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
            raise BaseModelError(f"unexpected end of file while reading a base shard at offset {offset + done}")
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
                    got = os.copy_file_range(src, dst, n - done, item.src_offset + done, item.dst_offset + done)
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
        if st is not None and st["norm_done"] is not None:
            self.sh.wait(st["norm_done"])
        out_t, out_view = self._out_buf(item.out_nbytes)
        dst = out_t[: item.out_nbytes].view(out_dt).view(rows, cols)
        raw, mapped = self._source(fd, item.src_offset, item.nbytes)
        try:
            compute = self._gpu if self.cuda else self._cpu
            compute(item, t, st, raw.view(src_dt).view(rows, cols), dst, cdt)
        finally:
            del raw  # the last view of a mapping: it can be unmapped now
            if mapped is not None:
                mapped.close()
        _write_from(self.sh.dst_fds[item.shard], out_view[: item.out_nbytes], item.dst_offset)
        if t is not None:
            self.sh.chunk_done(t, item.chunks)

    def _cpu(self, item: _Chunk, t: _Target | None, st: Any, src: Any, dst: Any, cdt: Any) -> None:
        torch = self.torch
        if t is None:  # a dtype conversion only
            dst.copy_(src)
            return
        if src.dtype == cdt == dst.dtype and st["plain"]:  # fp32 in and out, plain LoRA: one op
            torch.addmm(src, st["pre"][0][item.r0 : item.r1], st["pre"][1], out=dst)
            return
        rows, cols = src.shape
        block = max(1, _CPU_BLOCK // max(1, cols * 4))
        if self.scratch is None or self.scratch.numel() < min(block, rows) * cols or self.scratch.dtype != cdt:
            self.scratch = torch.empty(min(block, rows) * cols, dtype=cdt)
        for s0 in range(0, rows, block):
            s1 = min(rows, s0 + block)
            x = self.scratch[: (s1 - s0) * cols].view(s1 - s0, cols)
            x.copy_(src[s0:s1])
            dst[s0:s1].copy_(_apply(torch, t, st, x, item.r0 + s0, item.r0 + s1))

    def _gpu(self, item: _Chunk, t: _Target | None, st: Any, src: Any, dst: Any, cdt: Any) -> None:
        torch = self.torch
        assert self.stream is not None
        with torch.cuda.stream(self.stream):
            x = src.to(self.sh.device, non_blocking=True).to(cdt)
            if t is not None:
                x = _apply(torch, t, st, x, item.r0, item.r1)
            dst.copy_(x.to(dst.dtype), non_blocking=True)
        self.stream.synchronize()

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
                st = {"pre": cat(t.pre), "post": cat(t.post), "dora": cat([t.dora] if t.dora else []),
                      "mag": mv(t.magnitude), "rep": mv(t.replacement), "bias": mv(t.bias), "colnorm": None,
                      "norm_done": threading.Event() if t.dora is not None and t.dora_columns else None}
            if stream is not None:
                stream.synchronize()  # other workers' streams use these tensors
            st["plain"] = bool(t.pre) and not (t.post or t.dora or t.replacement is not None or t.bias is not None)
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

    def wait(self, event: threading.Event) -> None:
        while not event.wait(0.05):
            if self.failed.is_set():
                raise _Failed

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
                yield _Chunk(si, e, r0, r1, "apply", e.src_offset + r0 * in_row, (r1 - r0) * in_row,
                             dst + r0 * out_row, (r1 - r0) * out_row, n)


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
        except _Failed:
            pass
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
        threads = [threading.Thread(target=worker, name=f"adapterhub-merge-{i}", daemon=True) for i in range(n_workers)]
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

    With several adapters, ``modules_to_save`` replacements apply first, then the LoRA terms in list
    order. Two adapters may replace one tensor only with equal values. Files written are not fsynced.
    On the CPU the work is spread over one worker thread per torch thread, each running torch
    single-threaded (``torch.set_num_threads(1)`` for the duration of the call, then restored). On a GPU
    the products are fp32 matmuls and follow torch's precision settings: leave TF32 off (the default).
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
        raise InvalidOptionError("no adapters given; pass a list of (LoraWeights, weight) pairs")
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
        what = " and ".join(n for n in (emb, head) if n in targets)
        notes.append(
            f"{head} was tied to {emb}; the merge changes {what}, so {head} was written untied and "
            "tie_word_embeddings set false"
        )
    targets = {n: t for n, t in targets.items() if not t.is_identity}

    import torch

    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device {device!r} was asked for but torch sees no CUDA device")
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
    changed = len(set(targets) | set(untied))
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
