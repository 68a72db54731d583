"""What the server accepts as names, paths, revisions and upload contents. Raises `BadRequestError`."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

from ..errors import BadRequestError

NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
OID_RE = re.compile(r"^[0-9a-f]{7,40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TAG_PREFIX = "refs/tags/"  # tags are kept beside branches in hub_refs; no branch name starts with refs/
LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".onnx",
    ".gguf",
    ".npy",
    ".npz",
    ".msgpack",
    ".pkl",
    ".pickle",
    ".zip",
    ".gz",
    ".tar",
    ".zst",
    ".parquet",
    ".arrow",
    ".model",
    ".ot",
    ".tflite",
)
LFS_THRESHOLD = 10 * 1024 * 1024


def is_name(value: str) -> bool:
    return (
        bool(NAME_RE.match(value)) and ".." not in value and "--" not in value and not value.endswith(".git")
    )


def check_name(kind: str, value: str) -> str:
    if not is_name(value):
        raise BadRequestError(
            f"invalid {kind} {value!r}: use letters, digits, '-', '_' and '.', start and end with a letter or "
            "digit, at most 96 characters"
        )
    return value


def check_ref_name(kind: str, name: Any) -> str:
    """A branch or tag name: git's rules, less what would be ambiguous here."""
    if (
        not isinstance(name, str)
        or not BRANCH_RE.match(name)
        or ".." in name
        or name.startswith("refs/")
        or name.endswith(("/", ".lock"))
        or "//" in name
    ):
        raise BadRequestError(f"invalid {kind} name {name!r}")
    return name


def check_path(path: Any, *, folder: bool = False) -> str:
    """A path inside a repo: relative, no '..', '.', empty or '.git' segments, no backslashes or NULs.
    With ``folder``, one trailing '/' is allowed (and dropped)."""
    if folder and isinstance(path, str) and path.endswith("/"):
        path = path[:-1]
    if (
        not isinstance(path, str)
        or not path
        or len(path) > 1000
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(seg in ("", ".", "..", ".git") for seg in path.split("/"))
    ):
        raise BadRequestError(
            f"invalid path {path!r}: paths are relative, without '..', '.', '.git' or empty parts, and "
            "without backslashes"
        )
    return path


def decode_base64(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequestError(f"{path}: file content must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise BadRequestError(f"{path}: file content is not valid base64") from None


def upload_mode(path: str, size: int, sample: bytes) -> str:
    if size == 0:
        return "regular"
    if path.lower().endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample:
        return "lfs"
    return "regular"


def loads(data: bytes | str, what: str) -> Any:
    """JSON that is malformed or nested too deeply for the parser is the client's error."""
    try:
        return json.loads(data)
    except RecursionError:
        raise BadRequestError(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise BadRequestError(f"{what} is not valid JSON: {exc}") from None
