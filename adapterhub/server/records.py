"""The server's records, kept beside the catalog tables that hold them (`adapterhub.catalog.hubrecords`)."""

from __future__ import annotations

from ..catalog.hubrecords import (
    Commit,
    Entry,
    Op,
    Ref,
    Repo,
    TokenInfo,
    git_blob_oid,
    iso,
    lfs_pointer,
    utcnow,
)

__all__ = [
    "Commit",
    "Entry",
    "Op",
    "Ref",
    "Repo",
    "TokenInfo",
    "git_blob_oid",
    "iso",
    "lfs_pointer",
    "utcnow",
]
