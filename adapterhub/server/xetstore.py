"""What the Xet upload path keeps: xorbs, and the files rebuilt from them when a shard arrives.

A xorb is stored under the sha256 of its bytes in a store of its own (``HOME/server/xorbs``, outside the
objects that `db gc` weighs against commits: a client's local shard cache may refer to a xorb weeks later).
Which repo received which xorb, and which user sent it, are rows of the catalog (``hub_repo_xorbs``,
``hub_user_xorbs``: xorb hash -> that sha256), beside the LFS upload proofs. A shard
names each file as chunk ranges of xorbs; the server rebuilds every file from xorbs the committer may
use (sent to the repo or by the committer, else held by a repo the committer can read: own ones first), computes the sha256, stores the file in the server's object store and records an upload
proof for the repo, exactly as a checked LFS upload does. Only then can a commit reference it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

from ..errors import BadRequestError
from ..store import scratch_prefix
from .checks import SHA256_RE
from .records import Repo
from .storage import ServerStore
from .xetformat import Chunk, ShardFile, chunk_bytes, parse_shard, parse_xorb

XORB_CACHE = 2  # parsed xorbs kept while one shard is rebuilt (each at most 64 MiB)


class XetStore:
    """Xorbs and shards of the Xet upload protocol over a `ServerStore`."""

    def __init__(self, store: ServerStore) -> None:
        self.store = store
        self.xorbs = store.blobs.child("xorbs")

    def add_xorb(self, repo: Repo, user: str, xorb: str, data: bytes) -> bool:
        """Keep a serialized xorb sent to ``repo`` by ``user``; True when the user had no xorb of that
        hash before. The user's own record outlives the repo: the client's local shard cache lets it
        refer to this xorb again, weeks later and from any repo, without sending it again. A pull
        request's author keeps the xorbs he sends to himself (only the owner's go to the repo)."""
        if not SHA256_RE.match(xorb):
            raise BadRequestError(f"not a xorb hash (64 hex digits): {xorb!r}")
        parse_xorb(data)
        stored = self.xorbs.put_bytes(data)
        return self.store.gate_rows.record_xorb(repo, user, xorb, stored.sha256)

    def _find(self, repo: Repo, user: str, xorb: str) -> Path | None:
        """The stored bytes of ``xorb`` as a commit to ``repo`` by ``user`` may use them (sent to the repo
        or by the user, else held by a repo the user can read: the user's own first), or None."""
        others = [r for r, _ in self.store.repos.visible_repos(user) if r.id != repo.id]
        others.sort(key=lambda r: r.namespace != user)
        for digest in self.store.gate_rows.xorb_digests(repo, user, xorb, others):
            if SHA256_RE.match(digest) and self.xorbs.has(digest):
                return self.xorbs.path(digest)
        return None

    def add_shard(self, repo: Repo, user: str, data: bytes) -> list[tuple[str, int]]:
        """Rebuild every file of a shard sent to ``repo`` by ``user``; returns (sha256, size) of each, now
        stored and referable by a commit to ``repo``. Nothing is recorded unless every file checks out."""
        files = parse_shard(data)
        cache: OrderedDict[str, tuple[bytes, list[Chunk]]] = OrderedDict()
        built = [self._rebuild(repo, user, f, cache) for f in files]
        for sha256, _ in built:
            self.store.gates.record_upload(repo, sha256, user)
        return built

    def _xorb(
        self, repo: Repo, user: str, xorb: str, cache: OrderedDict[str, tuple[bytes, list[Chunk]]]
    ) -> tuple[bytes, list[Chunk]]:
        if xorb in cache:
            cache.move_to_end(xorb)
            return cache[xorb]
        path = self._find(repo, user, xorb)
        if path is None:
            raise BadRequestError(
                f"xorb {xorb} was not uploaded by {user} nor to a repo {user} can read. If another user "
                "uploaded it from this machine, the Xet cache refers to it: clear it (HF_XET_CACHE, by "
                "default ~/.cache/huggingface/xet) and upload again"
            )
        data = path.read_bytes()
        cache[xorb] = (data, parse_xorb(data))
        while len(cache) > XORB_CACHE:
            cache.popitem(last=False)
        return cache[xorb]

    def _rebuild(
        self, repo: Repo, user: str, f: ShardFile, cache: OrderedDict[str, tuple[bytes, list[Chunk]]]
    ) -> tuple[str, int]:
        blobs = self.store.blobs
        blobs.tmp.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=blobs.tmp, prefix=scratch_prefix("xet"))
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                for seg in f.segments:
                    data, chunks = self._xorb(repo, user, seg.xorb, cache)
                    if seg.end > len(chunks):
                        raise BadRequestError(
                            f"file {f.file_hash}: chunks {seg.start}..{seg.end} of xorb {seg.xorb}, which has "
                            f"{len(chunks)}"
                        )
                    got = 0
                    for c in chunks[seg.start : seg.end]:
                        piece = chunk_bytes(data, c)
                        h.update(piece)
                        out.write(piece)
                        got += len(piece)
                    if got != seg.size:
                        raise BadRequestError(
                            f"file {f.file_hash}: a segment of xorb {seg.xorb} holds {got} bytes, the shard "
                            f"says {seg.size}"
                        )
                    size += got
            digest = h.hexdigest()
            if f.sha256 is not None and f.sha256 != digest:
                raise BadRequestError(
                    f"file {f.file_hash}: its chunks have sha256 {digest}, the shard says {f.sha256}"
                )
            blobs.commit(tmp, digest, size)
            return digest, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
