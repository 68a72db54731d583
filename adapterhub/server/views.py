"""The JSON shapes the Hub answers with, built from the server's records."""

from __future__ import annotations

import hashlib
from typing import Any

from .cards import card_tags
from .records import Commit, Entry, Repo, iso


def model_json(
    repo: Repo, commit: Commit, files: dict[str, Entry] | None, blobs: bool, gated: str | bool = False
) -> dict[str, Any]:
    """``/api/models/{id}``: the repo at ``commit``, with its files (``siblings``) when given."""
    tags, library = card_tags(commit.card)
    d: dict[str, Any] = {
        "_id": f"{repo.id:024x}",
        "id": repo.repo_id,
        "modelId": repo.repo_id,
        "author": repo.namespace,
        "sha": commit.oid,
        "lastModified": iso(commit.created_at),
        "createdAt": iso(repo.created_at),
        "private": repo.private,
        "gated": gated,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": tags,
        "library_name": library,
    }
    if commit.card is not None:
        d["cardData"] = commit.card
    if files is not None:
        sib = []
        for e in files.values():
            s: dict[str, Any] = {"rfilename": e.path}
            if blobs:
                s.update(size=e.size, blobId=e.blob_oid)
                if e.lfs:
                    s["lfs"] = {"size": e.size, "sha256": e.sha256, "pointerSize": e.pointer_size}
            sib.append(s)
        d["siblings"] = sib
    return d


def last_commit_json(c: Commit) -> dict[str, Any]:
    return {"id": c.oid, "title": c.title, "date": iso(c.created_at)}


def file_json(e: Entry, last: Commit | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": e.path}
    if e.lfs:
        d["lfs"] = {"oid": e.sha256, "size": e.size, "pointerSize": e.pointer_size}
    if last is not None:
        d["lastCommit"] = last_commit_json(last)
    return d


def folder_json(commit: Commit, path: str, last: Commit | None = None) -> dict[str, Any]:
    oid = hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()
    d: dict[str, Any] = {"type": "directory", "oid": oid, "size": 0, "path": path}
    if last is not None:
        d["lastCommit"] = last_commit_json(last)
    return d


def folder_last_commits(files: dict[str, Commit], folders: list[str]) -> dict[str, Commit]:
    """A folder's last commit: the newest last commit of the files under it."""
    out: dict[str, Commit] = {}
    for d in folders:
        under = [c for p, c in files.items() if p.startswith(d + "/")]
        if under:
            out[d] = max(under, key=lambda c: (c.created_at, c.id))
    return out


def tree_json(
    commit: Commit,
    files: dict[str, Entry],
    prefix: str,
    recursive: bool,
    last: dict[str, Commit] | None = None,
) -> list[dict[str, Any]]:
    """The entries under ``prefix`` ('' or 'dir/'): files and folders, one level or all of them; with
    ``last`` (path -> commit, for files and folders), each entry's ``lastCommit``."""
    last = last or {}
    out: list[dict[str, Any]] = []
    for p in tree_paths(files, prefix, recursive, folders=False):
        out.append(file_json(files[p], last.get(p)))
    out += [folder_json(commit, d, last.get(d)) for d in tree_paths(files, prefix, recursive, folders=True)]
    out.sort(key=lambda x: x["path"])
    return out


def tree_paths(files: dict[str, Entry], prefix: str, recursive: bool, *, folders: bool) -> list[str]:
    """The files (or the folders) a tree listing under ``prefix`` shows."""
    found: dict[str, None] = {}
    for p in files:
        if not p.startswith(prefix):
            continue
        parts = p[len(prefix) :].split("/")
        if folders:
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    found.setdefault(prefix + "/".join(parts[:i]))
        elif recursive or len(parts) == 1:
            found.setdefault(p)
    return list(found)


def commit_json(c: Commit) -> dict[str, Any]:
    return {
        "id": c.oid,
        "title": c.title,
        "message": c.message,
        "date": iso(c.created_at),
        "authors": [{"user": c.author or "unknown"}],
    }
