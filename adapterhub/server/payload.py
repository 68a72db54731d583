"""The NDJSON commit payload the client posts: a ``header`` line, then ``file`` (base64 content),
``lfsFile`` (an uploaded object), ``deletedFile`` and ``deletedFolder`` lines, checked line by line."""

from __future__ import annotations

from ..errors import BadRequestError, PayloadTooLargeError
from .checks import OID_RE, check_path, decode_base64, loads
from .records import Op

REGULAR_FILE_LIMIT = 64 * 1024 * 1024


def parse_commit(body: bytes) -> tuple[str, str, str | None, list[Op]]:
    """The payload -> (summary, description, parent commit, operations). Raises `BadRequestError`."""
    title: str | None = None
    message = ""
    parent: str | None = None
    ops: list[Op] = []
    for n, line in enumerate(body.split(b"\n"), 1):
        if not line.strip():
            continue
        item = loads(line, f"malformed NDJSON commit payload: line {n}")
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("key"), str)
            or not isinstance(item.get("value"), dict)
        ):
            raise BadRequestError(f"malformed NDJSON commit payload, line {n}: expected {{key, value}}")
        key, value = item["key"], item["value"]
        if key == "header":
            if title is not None:
                raise BadRequestError(f"malformed NDJSON commit payload, line {n}: a second header")
            if not isinstance(value.get("summary"), str) or not value["summary"].strip():
                raise BadRequestError("the commit header needs a non-empty summary")
            title = value["summary"]
            message = str(value.get("description") or "")
            parent = value.get("parentCommit")
            continue
        if title is None:
            raise BadRequestError("malformed NDJSON commit payload: the first line must be the header")
        ops.append(_op(key, value, n))
    if title is None:
        raise BadRequestError("malformed NDJSON commit payload: no header line")
    if parent is not None and (not isinstance(parent, str) or not OID_RE.match(parent)):
        raise BadRequestError("parentCommit must be a commit id")
    return title, message, parent, ops


def _op(key: str, value: dict[str, object], n: int) -> Op:
    if key == "deletedFile":
        return Op("delete", check_path(value.get("path"), folder=True))
    if key == "deletedFolder":
        return Op("delete_folder", check_path(value.get("path"), folder=True))
    path = check_path(value.get("path"))
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            raise BadRequestError(f"{path}: only base64 file content is supported")
        content = decode_base64(value.get("content"), path)
        if len(content) > REGULAR_FILE_LIMIT:
            raise PayloadTooLargeError(f"{path} (a regular file; upload it through LFS)", REGULAR_FILE_LIMIT)
        return Op("file", path, content=content)
    if key == "lfsFile":
        size, oid = value.get("size"), value.get("oid")
        if (
            value.get("algo", "sha256") != "sha256"
            or (size is not None and (not isinstance(size, int) or isinstance(size, bool)))
            or not isinstance(oid, str)
        ):
            raise BadRequestError(f"{path}: lfsFile needs algo sha256, an oid and an integer size")
        return Op("lfs", path, oid=oid, size=size)
    raise BadRequestError(f"malformed NDJSON commit payload, line {n}: unknown key {key!r}")
