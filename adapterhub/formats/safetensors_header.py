"""A strict reader of safetensors headers. No torch: only the header is read, never tensor data.

Layout: 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the data. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets"}`` (offsets relative to the data start) and may hold
``__metadata__`` (str -> str). A hostile file can lie about all of it, so everything is checked: the
header must fit in the file, the tensors must tile the data section exactly (no overlap, no gap, nothing
past the end), and each tensor's byte size must equal its shape times its dtype's size.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidAdapterError

#: bytes per element of each dtype safetensors writes
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

#: largest header accepted (the safetensors library uses the same bound: 100_000_000, not 100 MiB)
MAX_HEADER_BYTES = 100_000_000

#: the safetensors library reads dims and offsets as u64 and refuses sizes that overflow it
_U64_MAX = 2**64 - 1

#: the only keys a tensor entry may hold
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset relative to the data section
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def ordered(self) -> list[TensorInfo]:
        """Tensors in file order."""
        return sorted(self.tensors.values(), key=lambda t: (t.begin, t.end))


def _bad(path: str, why: str) -> InvalidAdapterError:
    return InvalidAdapterError(f"{path}: not a valid safetensors file: {why}", path=path)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _strict_int(text: str) -> object:
    # "-0" is an integer to Python but a float to serde_json (safetensors refuses it as a dim or offset)
    return -0.0 if text.startswith("-") and int(text) == 0 else int(text)


def _utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape ("\ud800"), which safetensors refuses
        return False
    return True


def parse_header(raw_header: bytes, *, file_size: int, path: str = "<bytes>") -> SafetensorsHeader:
    """Check a header's JSON bytes against a file of ``file_size`` bytes and return what it says."""
    n = len(raw_header)
    try:
        doc = json.loads(
            raw_header.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_int=_strict_int,
        )
    except ValueError as exc:  # also bad UTF-8, and Python's int limit on numbers over 4300 digits
        raise _bad(path, f"header is not JSON ({exc.__class__.__name__.lstrip('_')}: {exc})") from None
    except RecursionError:
        raise _bad(path, "header JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise _bad(path, "header JSON is not an object")
    metadata: dict[str, str] = {}
    raw_meta = doc.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _utf8(k) and _utf8(v) for k, v in raw_meta.items()
        ):
            raise _bad(path, "__metadata__ must map strings to strings")
        metadata = dict(raw_meta)
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        if not isinstance(entry, dict):
            raise _bad(path, f"entry {name!r} is not an object")
        if not _utf8(name):
            raise _bad(path, f"tensor name {name!r} is not valid UTF-8")
        if set(entry) - _ENTRY_KEYS:
            raise _bad(path, f"tensor {name!r} has unexpected fields {sorted(set(entry) - _ENTRY_KEYS)}")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= _U64_MAX for d in shape
        ):
            raise _bad(path, f"tensor {name!r} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o <= _U64_MAX for o in offsets)
        ):
            raise _bad(path, f"tensor {name!r} has malformed data_offsets {offsets!r}")
        begin, end = offsets
        if begin < 0 or end < begin:
            raise _bad(path, f"tensor {name!r} has data_offsets {offsets} that run backwards")
        numel = 1
        for d in shape:  # in order, as safetensors does: [2**40, 2**40, 0] overflows there
            numel *= d
            if numel > _U64_MAX:
                raise _bad(path, f"tensor {name!r} has a shape {shape} whose size overflows 64 bits")
        if numel * DTYPE_SIZES[dtype] * 8 > _U64_MAX:
            raise _bad(path, f"tensor {name!r} has a shape {shape} whose size overflows 64 bits")
        expected = numel * DTYPE_SIZES[dtype]
        if end - begin != expected:
            raise _bad(
                path,
                f"tensor {name!r} takes {end - begin} bytes but shape {shape} of {dtype} needs {expected}",
            )
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    data_len = file_size - 8 - n
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < pos:
            raise _bad(path, f"tensor {t.name!r} overlaps the tensor before it (offset {t.begin} < {pos})")
        if t.begin > pos:
            raise _bad(path, f"gap of {t.begin - pos} bytes before tensor {t.name!r}")
        pos = t.end
    if pos > data_len:
        raise _bad(path, f"tensors need {pos} data bytes but the file holds {data_len} (truncated?)")
    if pos < data_len:
        raise _bad(path, f"{data_len - pos} unexplained bytes after the last tensor")
    return SafetensorsHeader(path=path, header_len=n, file_size=file_size, tensors=tensors, metadata=metadata)


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and check the header of a safetensors file. Raises `InvalidAdapterError`."""
    p = str(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise _bad(p, f"file is {size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", f.read(8))
            if n == 0:
                raise _bad(p, "header length is zero")
            if n > MAX_HEADER_BYTES:
                raise _bad(p, f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit")
            if 8 + n > size:
                raise _bad(p, f"header length {n} runs past the end of the {size}-byte file")
            raw = f.read(n)
    except IsADirectoryError:
        raise InvalidAdapterError(f"{p}: is a folder, not a safetensors file", path=p) from None
    except FileNotFoundError:
        raise InvalidAdapterError(f"{p}: no such file", path=p) from None
    except PermissionError:
        raise InvalidAdapterError(f"{p}: permission denied", path=p) from None
    return parse_header(raw, file_size=size, path=p)


def group_by_suffix(
    header: SafetensorsHeader, suffixes: Sequence[tuple[str, str]]
) -> tuple[dict[str, dict[str, TensorInfo]], list[str]]:
    """Tensors grouped by stem: ``{stem: {role: info}}`` for names ending in one of ``suffixes``
    (``(suffix, role)``, first match wins), and the names that matched none."""
    parts: dict[str, dict[str, TensorInfo]] = {}
    unexplained: list[str] = []
    for name, info in header.tensors.items():
        for suffix, role in suffixes:
            if name.endswith(suffix):
                parts.setdefault(name[: -len(suffix)], {})[role] = info
                break
        else:
            unexplained.append(name)
    return parts, unexplained
