"""What a repo's past leaves behind: the names it had before a ``move_repo`` (so that old links still
resolve, as on the Hub) and its LFS files, which the owner may list and purge for good.

Old names are kept in ``HOME/server/renames.json`` (lower-cased old id -> the repo's key, its row id and
creation time); a name points nowhere once its repo is gone, and a repo that takes the old name wins over
the redirect.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from sqlalchemy import delete, func, select

from ..catalog.tables import hub_commit_files, hub_commits, hub_refs, hub_repos
from ..errors import BadRequestError
from ..store import scratch_prefix
from .checks import SHA256_RE, TAG_PREFIX
from .records import Repo, iso
from .storage import ServerStore, repo_of_row


class RepoHistory:
    def __init__(self, store: ServerStore) -> None:
        self.store = store
        self.renames = store.blobs.root / "renames.json"

    # ------------------------------------------------------------------ old names
    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self.renames.read_text())
        except FileNotFoundError:
            return {}
        return {str(k): str(v) for k, v in data.items()}

    def record_rename(self, old_id: str, repo: Repo) -> None:
        """Note that ``old_id`` now names ``repo`` (which is called ``repo.repo_id``)."""
        names = self._load()
        names[old_id.lower()] = self.store.repo_key(repo)
        names.pop(repo.repo_id.lower(), None)  # its current name needs no redirect
        self.renames.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.renames.parent, prefix=scratch_prefix("renames"))
        with os.fdopen(fd, "w") as f:
            json.dump(names, f)
        os.replace(tmp, self.renames)

    def renamed(self, namespace: str, name: str) -> Repo | None:
        """The repo that was called ``namespace/name`` before a move, if it still exists."""
        key = self._load().get(f"{namespace}/{name}".lower())
        rid = key.split("-")[0] if key else ""
        if not rid.isdigit():
            return None
        with self.store.catalog.read() as conn:
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == int(rid))).first()
        repo = repo_of_row(row) if row else None
        return repo if repo is not None and self.store.repo_key(repo) == key else None

    # ------------------------------------------------------------------ LFS files
    def lfs_files(self, repo: Repo) -> list[dict[str, Any]]:
        """Each LFS object any commit of the repo holds, once: its sha256, the path it has where first
        seen, when it was first pushed, and the branch whose head holds it (main first), if any."""
        with self.store.catalog.read() as conn:
            rows = conn.execute(
                select(hub_commit_files.c.sha256, hub_commit_files.c.path, hub_commit_files.c.size,
                       hub_commit_files.c.blob_oid, func.min(hub_commits.c.created_at))
                .join(hub_commits, hub_commits.c.id == hub_commit_files.c.commit_id)
                .where(hub_commits.c.repo_id == repo.id, hub_commit_files.c.lfs.is_(True))
                .group_by(hub_commit_files.c.sha256, hub_commit_files.c.path, hub_commit_files.c.size,
                          hub_commit_files.c.blob_oid)
            ).all()  # fmt: skip
            heads = conn.execute(
                select(hub_refs.c.name, hub_commit_files.c.sha256)
                .join(hub_commit_files, hub_commit_files.c.commit_id == hub_refs.c.commit_id)
                .where(hub_refs.c.repo_id == repo.id, hub_commit_files.c.lfs.is_(True))
            ).all()
        refs: dict[str, str] = {}
        for ref, sha in sorted(heads, key=lambda r: (r[0] != "main", r[0])):
            if not ref.startswith(TAG_PREFIX):
                refs.setdefault(sha, ref)
        out: dict[str, dict[str, Any]] = {}
        for sha, path, size, oid, first in sorted(rows, key=lambda r: r[4]):
            out.setdefault(sha, {"fileOid": sha, "filename": path, "oid": oid, "size": size,
                                 "pushedAt": iso(first), "ref": refs.get(sha)})  # fmt: skip
        return list(out.values())

    def purge_lfs_files(self, repo: Repo, shas: list[str]) -> None:
        """Remove the LFS objects ``shas`` from every commit of the repo (its history keeps its commits,
        less those files) and drop the repo's proof of having uploaded them."""
        if not all(isinstance(s, str) and SHA256_RE.match(s) for s in shas):
            raise BadRequestError("deletions.sha must be a list of sha256 digests")
        with self.store.catalog.write() as conn:
            commits = select(hub_commits.c.id).where(hub_commits.c.repo_id == repo.id)
            conn.execute(
                delete(hub_commit_files).where(
                    hub_commit_files.c.commit_id.in_(commits),
                    hub_commit_files.c.lfs.is_(True),
                    hub_commit_files.c.sha256.in_(shas),
                )
            )
        for sha in shas:
            (self.store.upload_dir(repo) / sha).unlink(missing_ok=True)
            for proof in self.store.upload_dir(repo).glob(f"by/*/{sha}"):
                proof.unlink(missing_ok=True)
        self.store.drop_unreferenced(shas)
