"""The content-addressed blob store: every file kept once, under its sha256, behind one interface
(`BlobStore`) with two backends:

- `LocalStore` (the default): a folder, ``objects/ab/cdef...``, written through ``tmp/`` and `os.replace`;
- `S3Store`: S3-compatible object storage, chosen by ``ADAPTERHUB_STORE=s3://bucket/prefix`` with the
  usual AWS variables (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_REGION``); needs the ``s3`` extra (boto3). Conditional writes (``If-None-Match: *``), multipart
  uploads streamed for large files, range reads, sha256 checked on the way in and on the way out.

`open_store` picks the backend; ``Store`` is the local one under its old name.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import StoreError
from .base import (
    CHUNK,
    STALE_AFTER,
    BlobStore,
    Progress,
    Scratch,
    StoredFile,
    pid_alive,
    scratch_owner,
    scratch_prefix,
    sha256_file,
)
from .local import LocalStore, Store

__all__ = [
    "CHUNK",
    "ENV",
    "STALE_AFTER",
    "BlobStore",
    "LocalStore",
    "Progress",
    "Scratch",
    "Store",
    "StoredFile",
    "open_store",
    "pid_alive",
    "scratch_owner",
    "scratch_prefix",
    "sha256_file",
]

#: the environment variable that puts the blobs in a bucket: ``s3://bucket/prefix``
ENV = "ADAPTERHUB_STORE"


def open_store(root: Path, *, name: str, url: str | None = None) -> BlobStore:
    """The store ``name`` (``store``, ``server``) of a home: a folder at ``root``, or, when ``url`` (default
    ``$ADAPTERHUB_STORE``) is an ``s3://`` address, the objects under ``prefix/name/`` in that bucket with
    ``root`` as the local scratch and cache."""
    url = os.environ.get(ENV, "") if url is None else url
    if not url:
        return LocalStore(root)
    if not url.startswith("s3://"):
        raise StoreError(f"{ENV}={url!r}: give an s3://bucket/prefix address, or leave it unset for a folder")
    from .s3 import S3Store

    return S3Store(url, root, name=name)
