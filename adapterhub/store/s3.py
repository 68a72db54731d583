"""Objects in S3-compatible storage (AWS S3, SeaweedFS, MinIO, R2, ...) through boto3.

Keys under ``s3://bucket/prefix``: ``NAME/objects/ab/cdef...`` for the objects and ``NAME/trash/...`` for
objects being removed (`trash` copies an object there and deletes it; `restore` copies it back; `purge`
deletes the copy). Every write is conditional (``If-None-Match: *``), so two writers of one object never
clobber each other: the second is told it exists and keeps the first one's. A file is hashed as it is
uploaded (in parts of `PART` bytes above `MULTIPART_AT`, one part in memory at a time) and the upload is
completed only if the hash is the object's name. Reads that need a local file (`path`) fetch the object
once into ``root/cache/`` through ``root/tmp/``, checking its sha256 on the way.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import StoreError
from .base import (
    CHUNK,
    STALE_AFTER,
    BlobStore,
    Progress,
    Scratch,
    StoredFile,
    check_digest,
    host_tag,
    pid_alive,
    scratch_prefix,
)

#: files up to this size go up in one conditional PUT; larger ones as a multipart upload
MULTIPART_AT = 64 * 1024 * 1024
#: bytes per part of a multipart upload (S3's minimum is 5 MiB; 10 000 parts make 80 GB)
PART = 8 * 1024 * 1024
#: parts uploaded at once
UPLOAD_THREADS = 8

#: outcomes of a request that callers expect (`S3Store._call`'s ``ok``)
ABSENT = "absent"
EXISTS = "exists"

_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "InvalidToken"}
_ABSENT = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    rest = url[len("s3://") :]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StoreError(f"{url!r} names no bucket: give s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3Store(BlobStore):
    """Objects under ``s3://bucket/prefix/name/``; ``root`` is the local scratch and cache."""

    def __init__(self, url: str, root: str | os.PathLike[str], *, name: str, client: Any = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, prefix = parse_url(url)
        self.name = name
        self.base = "/".join(p for p in (prefix, name) if p) + "/"
        self.root = Path(root)
        self.cache = self.root / "cache"
        self._client = client
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ plumbing
    @property
    def location(self) -> str:
        return f"s3://{self.bucket}/{self.base}"

    @property
    def is_local(self) -> bool:
        return False

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _make_client()
            return self._client

    def child(self, name: str) -> S3Store:
        return S3Store(self.url, self.root / name, name=f"{self.name}/{name}", client=self._client)

    def key(self, sha256: str) -> str:
        check_digest(sha256)
        return f"{self.base}objects/{sha256[:2]}/{sha256[2:]}"

    def object_name(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def _call(self, op: str, *, ok: tuple[str, ...] = (), **kw: Any) -> Any:
        """One S3 request; a failure becomes a one-line `StoreError`, except the outcomes named in
        ``ok`` (``ABSENT``: no such object; ``EXISTS``: a conditional write found it there), returned."""
        try:
            return getattr(self.client, op)(Bucket=self.bucket, **kw)
        except Exception as exc:
            outcome = _outcome(exc)
            if outcome in ok:
                return outcome
            raise _error(exc, self.location) from None

    def _cache_path(self, sha256: str) -> Path:
        return self.cache / sha256[:2] / sha256[2:]

    # ------------------------------------------------------------------ reads
    def has(self, sha256: str) -> bool:
        return self.size(sha256) is not None

    def size(self, sha256: str) -> int | None:
        got = self._call("head_object", Key=self.key(sha256), ok=(ABSENT,))
        return None if got == ABSENT else int(got["ContentLength"])

    def _stream(self, sha256: str, **kw: Any) -> Any:
        got = self._call("get_object", Key=self.key(sha256), ok=(ABSENT,), **kw)
        if got == ABSENT:
            raise StoreError(
                f"store object {sha256} is missing from {self.location}; the bucket was changed by hand"
            )
        return got

    def _download(self, sha256: str, fout: BinaryIO, progress: Progress | None = None) -> bool:
        """Write the object to ``fout``, hashing it; whether the content is ``sha256``."""
        got = self._stream(sha256)
        body, total = got["Body"], int(got.get("ContentLength") or 0)
        h = hashlib.sha256()
        done = 0
        try:
            while chunk := body.read(CHUNK):
                h.update(chunk)
                fout.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        except OSError:
            raise
        except Exception as exc:
            raise _error(exc, self.location) from None
        finally:
            body.close()
        return h.hexdigest() == sha256

    def _mismatch(self, sha256: str) -> StoreError:
        return StoreError(f"{self.object_name(sha256)} does not match its sha256; the bucket was changed")

    def path(self, sha256: str) -> Path:
        cached = self._cache_path(check_digest(sha256))
        if cached.is_file():
            return cached
        self.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.tmp, prefix=scratch_prefix("fetch"))
        try:
            with os.fdopen(fd, "wb") as fout:
                if not self._download(sha256, fout):
                    raise self._mismatch(sha256)
            cached.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, cached)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return cached

    def read_range(self, sha256: str, start: int, length: int) -> bytes:
        cached = self._cache_path(check_digest(sha256))
        if cached.is_file():
            with open(cached, "rb") as f:
                f.seek(start)
                return f.read(length)
        if length <= 0:
            return b""
        body = self._stream(sha256, Range=f"bytes={start}-{start + length - 1}")["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def copy_out(
        self, sha256: str, dest: str | os.PathLike[str], *, progress: Progress | None = None
    ) -> Path:
        out = Path(dest)
        cached = self._cache_path(check_digest(sha256))
        tmp = out.with_name(out.name + ".tmp")
        try:
            if cached.is_file():
                shutil.copyfile(cached, tmp)
            else:
                with open(tmp, "wb") as fout:
                    if not self._download(sha256, fout, progress):
                        raise self._mismatch(sha256)
        except StoreError:
            tmp.unlink(missing_ok=True)
            raise
        except OSError as exc:  # the failing side is the destination (a full disk, a size limit)
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(out)) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out)
        return out

    def verify(self, sha256: str) -> bool:
        if not self.has(sha256):
            return False
        with open(os.devnull, "wb") as sink:
            return self._download(sha256, sink)

    def listing(self) -> Iterator[tuple[str, int, float]]:
        for key, size, mtime in self._list(f"{self.base}objects/"):
            digest = key[len(self.base) + len("objects/") :].replace("/", "")
            if len(digest) == 64 and "/" not in key[len(self.base) + len("objects/") + 3 :]:
                yield digest, size, mtime

    def _list(self, prefix: str) -> Iterator[tuple[str, int, float]]:
        token: dict[str, Any] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=prefix, **token)
            for o in page.get("Contents", ()):
                yield o["Key"], int(o.get("Size", 0)), o["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    # ------------------------------------------------------------------ writes
    def put_file(
        self,
        src: str | os.PathLike[str],
        *,
        digest: str | None = None,
        size: int | None = None,
        progress: Progress | None = None,
    ) -> StoredFile:
        if digest is None or size is None:
            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            digest, size = h.hexdigest(), os.stat(src).st_size
        if self.has(digest):
            return StoredFile(digest, size, created=False)
        return self._upload(Path(src), digest, progress)

    def put_bytes(self, data: bytes) -> StoredFile:
        digest = hashlib.sha256(data).hexdigest()
        if self.has(digest):
            return StoredFile(digest, len(data), created=False)
        return StoredFile(digest, len(data), created=self._put_once(digest, data))

    def commit(self, tmp_name: str, digest: str, size: int) -> StoredFile:
        try:
            if self.has(digest):
                return StoredFile(digest, size, created=False)
            return self._upload(Path(tmp_name), digest, None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)

    def _put_once(self, digest: str, data: bytes) -> bool:
        """One conditional PUT; False when another writer got there first."""
        checksum = base64.b64encode(hashlib.sha256(data).digest()).decode()
        got = self._call(
            "put_object",
            Key=self.key(digest),
            Body=data,
            IfNoneMatch="*",
            ChecksumSHA256=checksum,
            ok=(EXISTS,),
        )
        return got != EXISTS

    def _upload(self, src: Path, digest: str, progress: Progress | None) -> StoredFile:
        """Upload ``src`` as object ``digest``, hashing it on the way; nothing is created unless the
        content is ``digest``."""
        total = src.stat().st_size
        if total <= MULTIPART_AT:
            data = src.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest:
                raise StoreError(f"{src}: its content does not have sha256 {digest}; nothing was stored")
            created = self._put_once(digest, data)
            if progress is not None:
                progress(total, total)
            return StoredFile(digest, total, created)
        key = self.key(digest)
        upload = self._call("create_multipart_upload", Key=key)["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            h, done = hashlib.sha256(), 0
            # parts go up UPLOAD_THREADS at a time; at most that many are in memory
            with ThreadPoolExecutor(UPLOAD_THREADS) as pool, open(src, "rb") as f:
                pending: deque[Future[dict[str, Any]]] = deque()
                while data := f.read(PART):
                    h.update(data)
                    pending.append(pool.submit(self._part, key, upload, len(parts) + len(pending) + 1, data))
                    done += len(data)
                    if len(pending) >= UPLOAD_THREADS:
                        parts.append(pending.popleft().result())
                    if progress is not None:
                        progress(done, total)
                parts += [p.result() for p in pending]
            if h.hexdigest() != digest:
                raise StoreError(f"{src}: its content does not have sha256 {digest}; nothing was stored")
            got = self._call(
                "complete_multipart_upload",
                Key=key,
                UploadId=upload,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
                ok=(EXISTS,),
            )
            if got == EXISTS:
                self._abort(key, upload)
                return StoredFile(digest, done, created=False)
        except BaseException:
            self._abort(key, upload)
            raise
        return StoredFile(digest, done, created=True)

    def _part(self, key: str, upload: str, number: int, data: bytes) -> dict[str, Any]:
        r = self._call("upload_part", Key=key, UploadId=upload, PartNumber=number, Body=data)
        return {"ETag": r["ETag"], "PartNumber": number}

    def _abort(self, key: str, upload: str) -> None:
        with contextlib.suppress(Exception):
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)

    # ------------------------------------------------------------------ removal
    def remove(self, sha256: str) -> None:
        self._call("delete_object", Key=self.key(sha256))
        self._cache_path(sha256).unlink(missing_ok=True)

    def trash(self, sha256: str) -> str | None:
        dest = f"{self.base}trash/{sha256}.{os.getpid()}.{host_tag()}.{uuid.uuid4().hex[:12]}"
        got = self._call(
            "copy_object", Key=dest, CopySource={"Bucket": self.bucket, "Key": self.key(sha256)}, ok=(ABSENT,)
        )
        if got == ABSENT:
            return None
        self._call("delete_object", Key=self.key(sha256))
        self._cache_path(sha256).unlink(missing_ok=True)
        return dest

    def restore(self, trashed: object, sha256: str) -> None:
        key = str(trashed)
        if not self.has(sha256):
            self._call("copy_object", Key=self.key(sha256), CopySource={"Bucket": self.bucket, "Key": key})
        self._call("delete_object", Key=key)

    def purge(self, trashed: Iterable[object]) -> None:
        for t in trashed:
            self._call("delete_object", Key=str(t))

    # ------------------------------------------------------------------ what writers left
    def leftovers(self, *, now: float | None = None) -> list[Scratch]:
        """Local scratch and cached copies of objects gone from the bucket, trashed objects in the
        bucket, and multipart uploads never completed. A trashed object names the process and machine
        that moved it; on another machine, or for an upload, only age (`STALE_AFTER`) tells."""
        now = now or time.time()
        found = super().leftovers(now=now)
        here = host_tag()
        for key, size, mtime in self._list(f"{self.base}trash/"):
            parts = key.rsplit("/", 1)[-1].split(".")
            if len(parts) >= 3 and parts[2] == here and parts[1].isdigit():
                stale = not pid_alive(int(parts[1]))
            else:
                stale = now - mtime > STALE_AFTER
            found.append(Scratch(f"s3://{self.bucket}/{key}", size, stale, parts[0], key))
        marker: dict[str, Any] = {}
        while True:
            page = self._call("list_multipart_uploads", Prefix=self.base, **marker)
            for u in page.get("Uploads", ()):
                stale = now - u["Initiated"].timestamp() > STALE_AFTER
                found.append(
                    Scratch(
                        f"s3://{self.bucket}/{u['Key']} (upload {u['UploadId'][:12]})",
                        0,
                        stale,
                        None,
                        ("upload", u["Key"], u["UploadId"]),
                    )
                )
            if not page.get("IsTruncated"):
                break
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
        return found

    def discard(self, item: Scratch) -> None:
        h = item.handle
        if isinstance(h, tuple) and h[0] == "upload":
            self._abort(h[1], h[2])
        elif isinstance(h, str):
            self._call("delete_object", Key=h)
        else:
            super().discard(item)

    def cached(self) -> Iterator[tuple[str, Path]]:
        """The objects with a local copy in the cache, and where it is."""
        if not self.cache.is_dir():
            return
        for sub in sorted(self.cache.iterdir()):
            for f in sorted(sub.iterdir()):
                yield sub.name + f.name, f


def _make_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StoreError(
            "ADAPTERHUB_STORE=s3://... needs the 's3' extra (boto3): pip install 'adapterhub[s3]'"
        ) from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"max_attempts": 4, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint else "auto"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=32,
    )
    # a session of its own: boto3's default session is not safe to make clients from in several threads
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=config)


def _outcome(exc: Exception) -> str | None:
    """`ABSENT` or `EXISTS` when that is what a failed request says."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return None
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code in _ABSENT:
        return ABSENT
    if code in _EXISTS or status == 412:
        return EXISTS
    return None


def _error(exc: Exception, where: str) -> StoreError:
    """A one-line `StoreError` for a failed S3 request."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _DENIED or status == 403:
            return StoreError(
                f"{where}: access denied ({code or status}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            )
        if code == "NoSuchBucket":
            return StoreError(f"{where}: the bucket does not exist; create it first")
        msg = str(err.get("Message", "")).split("\n")[0]
        return StoreError(f"{where}: {code or status}: {msg}".rstrip(": "))
    if isinstance(exc, NoCredentialsError):
        return StoreError(f"{where}: no credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, BotoCoreError):
        return StoreError(f"{where}: {str(exc).splitlines()[0]}")
    raise exc
