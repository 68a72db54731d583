"""The strict safetensors header reader: exact on valid files, refuses every lie with InvalidAdapterError.

The safetensors library itself is the oracle: whatever our reader accepts, ``safe_open`` must open and
describe the same way.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.formats_fixtures import safetensors_bytes, write_bytes
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from adapterhub.errors import InvalidAdapterError
from adapterhub.formats.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    parse_header,
    read_header,
)

FUZZ = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

TORCH_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def _entry(dtype: str, shape: list[int], begin: int) -> dict[str, object]:
    return {
        "dtype": dtype,
        "shape": shape,
        "data_offsets": [begin, begin + math.prod(shape) * DTYPE_SIZES[dtype]],
    }


def _file(
    tmp_path: Path, header: dict[str, object] | bytes, data: bytes = b"", name: str = "x.safetensors"
) -> Path:
    return write_bytes(tmp_path / name, safetensors_bytes(header, data))


def _refused(path: Path, match: str) -> InvalidAdapterError:
    with pytest.raises(InvalidAdapterError, match=match) as info:
        read_header(path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == str(path)
    assert "not a valid safetensors file" in str(err) or "no such file" in str(err) or "folder" in str(err)
    return err


def _agrees_with_safetensors(path: Path) -> None:
    """Our reading of ``path`` equals the safetensors library's."""
    ours = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
        assert set(names) == set(ours.tensors)
        for name in names:
            sl = f.get_slice(name)
            assert tuple(sl.get_shape()) == ours.tensors[name].shape, name
            assert sl.get_dtype() == ours.tensors[name].dtype, name
        assert (f.metadata() or {}) == ours.metadata


# ---------------------------------------------------------------- valid files


def test_valid_file_reads_back_exactly(tmp_path: Path) -> None:
    tensors = {
        "a.weight": torch.randn(3, 4),
        "b.half": torch.randn(2, 5).half(),
        "c.bf16": torch.randn(7).bfloat16(),
        "d.int": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
        "g.bool": torch.tensor([True, False, True]),
        "h.u8": torch.arange(5, dtype=torch.uint8),
    }
    meta = {"format": "pt", "ss_network_dim": "4", "unicode": "héllo ✓"}
    path = tmp_path / "ok.safetensors"
    save_file(tensors, str(path), metadata=meta)
    h = read_header(path)
    assert set(h.tensors) == set(tensors)
    for name, t in tensors.items():
        info = h.tensors[name]
        assert info.shape == tuple(t.shape)
        assert info.dtype == TORCH_DTYPES[t.dtype]
        assert info.numel == t.numel()
        assert info.nbytes == t.numel() * t.element_size()
    assert h.metadata == meta
    assert h.file_size == path.stat().st_size
    # the tensors tile the data section exactly, in file order
    pos = 0
    for info in h.ordered():
        assert info.begin == pos
        pos = info.end
    assert h.data_start + pos == h.file_size
    _agrees_with_safetensors(path)


def test_valid_file_without_metadata_or_tensors(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    h = read_header(path)
    assert h.tensors == {} and h.metadata == {}
    # padded header (safetensors pads with spaces to 8-byte alignment) and a null __metadata__
    h2 = read_header(_file(tmp_path, b'{"__metadata__": null}   ', name="null.safetensors"))
    assert h2.metadata == {} and h2.tensors == {}


def test_reader_does_not_import_torch(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(path), metadata={"k": "v"})
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from adapterhub.formats.safetensors_header import read_header\n"
        f"h = read_header({str(path)!r})\n"
        "assert h.tensors['w'].shape == (2, 2) and h.metadata == {'k': 'v'}\n"
        "assert sys.modules['torch'] is None\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- hostile files, one lie each


def test_file_shorter_than_8_bytes(tmp_path: Path) -> None:
    for n in range(8):
        path = write_bytes(tmp_path / f"short{n}.safetensors", b"\x01" * n)
        _refused(path, f"file is {n} bytes, shorter than the 8-byte header length")


def test_header_length_zero(tmp_path: Path) -> None:
    _refused(write_bytes(tmp_path / "z.safetensors", struct.pack("<Q", 0) + b"{}"), "header length is zero")


def test_header_length_past_the_file(tmp_path: Path) -> None:
    path = write_bytes(tmp_path / "p.safetensors", struct.pack("<Q", 50) + b"{}")
    _refused(path, "header length 50 runs past the end of the 10-byte file")


def test_header_length_huge(tmp_path: Path) -> None:
    for n in (MAX_HEADER_BYTES + 1, 2**64 - 1):
        path = write_bytes(tmp_path / "h.safetensors", struct.pack("<Q", n) + b"{}")
        _refused(path, f"header length {n} is larger than the {MAX_HEADER_BYTES}-byte limit")


def test_header_limit_is_the_safetensors_one(tmp_path: Path) -> None:
    # a sparse file: header length just over safetensors' 100_000_000 limit, file long enough for it
    n = 100_000_001
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{}")
        f.truncate(8 + n)
    _refused(path, "larger than the 100000000-byte limit")
    with pytest.raises(Exception, match="too large"), safe_open(str(path), framework="pt"):
        pass


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"{not json", "header is not JSON"),
        (b"\xff\xfe{}", "header is not JSON \\(UnicodeDecodeError"),
        (b'{"a": 1} trailing', "header is not JSON"),
        (b'{"__metadata__": {"k": NaN}}', "NaN is not JSON"),
        (b'{"__metadata__": {"k": "a", "k": "b"}}', "duplicate key 'k'"),
        (b'{"__metadata__": {"k": ' + b"1" * 5000 + b"}}", "header is not JSON"),
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_bad_json(tmp_path: Path, raw: bytes, match: str) -> None:
    _refused(_file(tmp_path, raw), match)


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"s"', b"null", b"true"])
def test_header_not_an_object(tmp_path: Path, raw: bytes) -> None:
    _refused(_file(tmp_path, raw), "header JSON is not an object")


@pytest.mark.parametrize(
    "meta",
    [[], "x", 1, {"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"n": "v"}}],
)
def test_bad_metadata(tmp_path: Path, meta: object) -> None:
    _refused(_file(tmp_path, {"__metadata__": meta}), "__metadata__ must map strings to strings")


def test_lone_surrogate_refused(tmp_path: Path) -> None:
    # Python's json takes "\ud800"; safetensors (serde_json) does not
    _refused(
        _file(tmp_path, b'{"__metadata__": {"k": "\\ud800"}}'), "__metadata__ must map strings to strings"
    )
    raw = b'{"\\udc00": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}'
    _refused(_file(tmp_path, raw, name="n.safetensors"), "is not valid UTF-8")


def test_offsets_overlap(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    _refused(
        _file(tmp_path, header, bytes(12)), "tensor 'b' overlaps the tensor before it \\(offset 4 < 8\\)"
    )


def test_offsets_alias_the_same_bytes(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [2], 0), "b": _entry("F32", [2], 0)}
    _refused(_file(tmp_path, header, bytes(8)), "overlaps the tensor before it")


def test_offsets_leave_a_gap(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [1], 0), "b": _entry("F32", [1], 8)}
    _refused(_file(tmp_path, header, bytes(12)), "gap of 4 bytes before tensor 'b'")
    _refused(_file(tmp_path, {"a": _entry("F32", [1], 4)}, bytes(8), name="g.safetensors"), "gap of 4 bytes")


def test_offsets_past_the_end(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [4], 0)}
    _refused(
        _file(tmp_path, header, bytes(10)),
        "tensors need 16 data bytes but the file holds 10 \\(truncated\\?\\)",
    )


def test_trailing_bytes(tmp_path: Path) -> None:
    header = {"a": _entry("F32", [1], 0)}
    _refused(_file(tmp_path, header, bytes(7)), "3 unexplained bytes after the last tensor")
    _refused(_file(tmp_path, {}, b"x", name="e.safetensors"), "1 unexplained bytes after the last tensor")


def test_offsets_backwards_or_malformed(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [0], "data_offsets": [4, 0]}}
    _refused(_file(tmp_path, header, bytes(4)), "run backwards")
    for offsets in ([0], [0, 4, 8], [0.0, 4], [True, 4], "0-4", None, [-4, 0]):
        header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": offsets}}
        _refused(_file(tmp_path, header, bytes(4)), "malformed data_offsets")
    raw = b'{"a": {"dtype": "F32", "shape": [0], "data_offsets": [-0, 0]}}'
    _refused(_file(tmp_path, raw), "malformed data_offsets")


def test_size_disagrees_with_shape_and_dtype(tmp_path: Path) -> None:
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}
    _refused(_file(tmp_path, header, bytes(8)), "tensor 'a' takes 8 bytes but shape \\[1\\] of F32 needs 4")
    header = {"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 24]}}
    _refused(_file(tmp_path, header, bytes(24)), "takes 24 bytes but shape \\[2, 3\\] of F16 needs 12")


@pytest.mark.parametrize("dtype", ["F33", "f32", "", "float32", None, 4, ["F32"]])
def test_unknown_dtype(tmp_path: Path, dtype: object) -> None:
    header = {"a": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}
    _refused(_file(tmp_path, header, bytes(4)), f"tensor 'a' has unknown dtype {dtype!r}".replace("[", "\\["))


@pytest.mark.parametrize("shape", [[-1], [2, -3], [True], [False, 1], [1.0], ["2"], None, 3, [2**64]])
def test_malformed_shape(tmp_path: Path, shape: object) -> None:
    header = {"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    _refused(_file(tmp_path, header, bytes(4)), "tensor 'a' has a malformed shape")


def test_shape_size_overflows_64_bits(tmp_path: Path) -> None:
    # safetensors multiplies dims in order with overflow checks: [2**40, 2**40, 0] is refused there too
    header = {"a": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}
    _refused(_file(tmp_path, header), "overflows 64 bits")


def test_entry_not_an_object_or_with_unknown_fields(tmp_path: Path) -> None:
    _refused(_file(tmp_path, {"a": ["F32", [1], [0, 4]]}, bytes(4)), "entry 'a' is not an object")
    header = {"a": dict(_entry("F32", [1], 0), extra=[[[1]]])}
    _refused(_file(tmp_path, header, bytes(4)), "tensor 'a' has unexpected fields \\['extra'\\]")
    raw = b'{"a": {"dtype": "F16", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    _refused(_file(tmp_path, raw, bytes(4)), "duplicate key 'dtype'")


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    a = json.dumps(_entry("F32", [1], 0)).encode()
    b = json.dumps(_entry("F16", [2], 0)).encode()
    _refused(_file(tmp_path, b'{"a": ' + a + b', "a": ' + b + b"}", bytes(4)), "duplicate key 'a'")


def test_not_a_file(tmp_path: Path) -> None:
    _refused(tmp_path / "missing.safetensors", "no such file")
    (tmp_path / "dir.safetensors").mkdir()
    _refused(tmp_path / "dir.safetensors", "is a folder")


# ---------------------------------------------------------------- fuzz


def _valid_bytes() -> bytes:
    from safetensors.torch import save

    return save(
        {
            "m.lora_A.weight": torch.ones(2, 3),
            "m.lora_B.weight": torch.ones(3, 2).half(),
            "s": torch.tensor(1.0),
        },
        metadata={"format": "pt"},
    )


VALID = _valid_bytes()


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(VALID)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "header_len"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from(b'{}[]",:0123456789-. \x00\xff'))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[i : i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        else:
            n = struct.unpack("<Q", bytes(data[:8]).ljust(8, b"\0"))[0] if len(data) >= 8 else 0
            data[:8] = struct.pack("<Q", max(0, n + draw(st.integers(-16, 16))))
    return bytes(data)


DTYPE_CHOICES = [*DTYPE_SIZES, "F4", "X"]


@st.composite
def plausible_header(draw: st.DrawFn) -> bytes:
    """Headers close to valid: right structure, values that are sometimes off by a little."""
    names = draw(st.lists(st.text(max_size=6), max_size=4, unique=True))
    header: dict[str, object] = {}
    pos = 0
    for name in names:
        dtype = draw(st.sampled_from(DTYPE_CHOICES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        if draw(st.integers(0, 9)) == 0:
            shape.append(draw(st.sampled_from([-1, True, 2**64, 2**63, 1.0])))
        size = (
            math.prod(shape) * DTYPE_SIZES.get(dtype, 1)
            if all(type(d) is int and 0 <= d <= 4 for d in shape)
            else 4
        )
        begin = pos + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        end = begin + size + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
        pos = max(pos, end)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.one_of(
                st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
                st.dictionaries(st.text(max_size=4), st.integers(), max_size=1),
                st.none(),
            )
        )
    data = bytes(max(0, pos + draw(st.sampled_from([0, 0, 0, 1, -1]))))
    return safetensors_bytes(header, data)


def _read_or_refuse(path: Path) -> bool:
    """True if accepted; InvalidAdapterError is the only exception allowed."""
    try:
        read_header(path)
    except InvalidAdapterError:
        return False
    return True


def _safetensors_accepts(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception:
        return False
    return True


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_random_bytes(tmp_path: Path, blob: bytes) -> None:
    path = write_bytes(tmp_path / "fuzz.safetensors", blob)
    if _read_or_refuse(path):
        _agrees_with_safetensors(path)


@FUZZ
@given(st.integers(0, 300).flatmap(lambda n: st.tuples(st.just(n), st.binary(max_size=300))))
def test_fuzz_random_header_bytes(tmp_path: Path, case: tuple[int, bytes]) -> None:
    n, rest = case
    path = write_bytes(tmp_path / "fuzz.safetensors", struct.pack("<Q", n) + rest)
    if _read_or_refuse(path):
        _agrees_with_safetensors(path)


@FUZZ
@given(mutated())
def test_fuzz_mutations_of_a_valid_file(tmp_path: Path, blob: bytes) -> None:
    path = write_bytes(tmp_path / "fuzz.safetensors", blob)
    if _read_or_refuse(path):
        _agrees_with_safetensors(path)


@FUZZ
@given(plausible_header())
def test_fuzz_plausible_headers_agree_with_safetensors(tmp_path: Path, blob: bytes) -> None:
    path = write_bytes(tmp_path / "fuzz.safetensors", blob)
    if _read_or_refuse(path):
        _agrees_with_safetensors(path)
    else:
        # everything we refuse that safetensors opens is a dtype it knows and we do not
        assume(_safetensors_accepts(path))
        with safe_open(str(path), framework="pt") as f:
            names = f.keys()
            assert any(f.get_slice(k).get_dtype() not in DTYPE_SIZES for k in names)


@st.composite
def tensor_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(list(TORCH_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        out[name] = torch.zeros(shape, dtype=dtype)
    return out


@FUZZ
@given(tensor_dicts(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
def test_fuzz_generated_valid_files_agree(
    tmp_path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> None:
    path = tmp_path / "gen.safetensors"
    save_file(tensors, str(path), metadata=meta or None)
    h = read_header(path)  # never refused
    assert {k: (v.dtype, v.shape) for k, v in h.tensors.items()} == {
        k: (TORCH_DTYPES[t.dtype], tuple(t.shape)) for k, t in tensors.items()
    }
    assert h.metadata == meta
    _agrees_with_safetensors(path)


def test_parse_header_on_bytes() -> None:
    raw = json.dumps({"a": _entry("F32", [2], 0)}).encode()
    h = parse_header(raw, file_size=8 + len(raw) + 8)
    assert h.tensors["a"].shape == (2,) and h.path == "<bytes>"
    with pytest.raises(InvalidAdapterError, match="<bytes>: not a valid safetensors file"):
        parse_header(raw, file_size=8 + len(raw) + 9)
