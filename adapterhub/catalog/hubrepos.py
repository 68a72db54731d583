"""The server's repos and refs (branches, tags, pull requests' branches) in the catalog: look-up by id
without regard to case, creation with its first commit, renames (the old name keeps resolving), the
history of a branch, and which stored objects commits still reference. Every write is one transaction.

Names and paths are checked by the server before they reach here (`adapterhub.server.checks`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from ..errors import ConflictError, RevisionNotFoundError
from . import Catalog
from .hubcommits import PR_PREFIX, TAG_PREFIX, commit_of_row, files_of, insert_commit, resolve_in
from .hubrecords import Commit, Entry, Ref, Repo, iso, utcnow
from .tables import hub_commit_files, hub_commits, hub_refs, hub_renames, hub_repos, hub_upload_proofs

__all__ = ["RepoRows", "repo_of_row"]


def repo_of_row(r: Any) -> Repo:
    """A ``hub_repos`` row as a `Repo`."""
    return Repo(r.id, r.namespace, r.name, bool(r.private), r.created_at, r.updated_at)


def _same_id(namespace: str, name: str) -> Any:
    return (func.lower(hub_repos.c.namespace) == namespace.lower()) & (
        func.lower(hub_repos.c.name) == name.lower()
    )


class RepoRows:
    """Repos, refs, old names and history over one catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    # ------------------------------------------------------------------ repos
    def get_repo(self, namespace: str, name: str) -> Repo | None:
        """The repo ``namespace/name``, matched without regard to case, or None."""
        with self.catalog.read() as conn:
            r = conn.execute(select(hub_repos).where(_same_id(namespace, name))).first()
        return repo_of_row(r) if r else None

    def repo_by_id(self, repo_id: int) -> Repo | None:
        with self.catalog.read() as conn:
            r = conn.execute(select(hub_repos).where(hub_repos.c.id == repo_id)).first()
        return repo_of_row(r) if r else None

    def insert_repo(
        self, namespace: str, name: str, *, private: bool, author: str, first: Entry, copy: Repo | None = None
    ) -> Repo:
        """A new repo whose ``main`` holds ``first`` (the ``.gitattributes``), then, given ``copy``, one more
        commit with the files of ``copy``'s main (``duplicate_repo``: objects shared), in one transaction."""
        now = utcnow()
        with self.catalog.write() as conn:
            if conn.execute(select(hub_repos.c.id).where(_same_id(namespace, name))).first():
                raise ConflictError("You already created this model repo")
            rid = conn.execute(
                insert(hub_repos)
                .values(namespace=namespace, name=name, private=private, created_at=now, updated_at=now)
                .returning(hub_repos.c.id)
            ).scalar_one()
            initial = insert_commit(
                conn, rid, "main", None, {first.path: first}, "initial commit", "", author, None, now
            )
            if copy is not None:
                head = resolve_in(conn, copy, "main")
                insert_commit(
                    conn,
                    rid,
                    "main",
                    initial,
                    files_of(conn, head.id),
                    f"Duplicate from {copy.repo_id}",
                    "",
                    author,
                    head.card,
                    now,
                )
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == rid)).one()
        return repo_of_row(row)

    def move_repo(self, repo: Repo, namespace: str, name: str) -> Repo:
        """Call ``repo`` ``namespace/name`` from now on; its old name keeps pointing at it (until another
        repo takes that name), all in one transaction."""
        with self.catalog.write() as conn:
            clash = conn.execute(
                select(hub_repos.c.id).where(_same_id(namespace, name), hub_repos.c.id != repo.id)
            ).first()
            if clash:
                raise ConflictError(f"A model repository called {namespace}/{name} already exists")
            conn.execute(
                update(hub_repos)
                .where(hub_repos.c.id == repo.id)
                .values(namespace=namespace, name=name, updated_at=utcnow())
            )
            old, new = repo.repo_id.lower(), f"{namespace}/{name}".lower()
            conn.execute(delete(hub_renames).where(hub_renames.c.old_id.in_([old, new])))
            if old != new:
                conn.execute(insert(hub_renames).values(old_id=old, repo_id=repo.id))
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == repo.id)).one()
        return repo_of_row(row)

    def renamed(self, namespace: str, name: str) -> Repo | None:
        """The repo that was called ``namespace/name`` before a move, if it still exists."""
        with self.catalog.read() as conn:
            r = conn.execute(
                select(hub_repos)
                .join(hub_renames, hub_renames.c.repo_id == hub_repos.c.id)
                .where(hub_renames.c.old_id == f"{namespace}/{name}".lower())
            ).first()
        return repo_of_row(r) if r else None

    def set_private(self, repo: Repo, private: bool) -> Repo:
        with self.catalog.write() as conn:
            conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(private=private))
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == repo.id)).one()
        return repo_of_row(row)

    def remove_repo(self, repo: Repo) -> set[str]:
        """Delete ``repo`` with everything that hangs off it (commits, refs, gate, access requests, upload
        proofs, discussions, likes, old names) in one transaction; returns the digests its commits held."""
        with self.catalog.write() as conn:
            commit_ids = select(hub_commits.c.id).where(hub_commits.c.repo_id == repo.id)
            digests = set(
                conn.execute(
                    select(hub_commit_files.c.sha256).where(hub_commit_files.c.commit_id.in_(commit_ids))
                ).scalars()
            )
            conn.execute(delete(hub_refs).where(hub_refs.c.repo_id == repo.id))
            conn.execute(delete(hub_commit_files).where(hub_commit_files.c.commit_id.in_(commit_ids)))
            conn.execute(delete(hub_commits).where(hub_commits.c.repo_id == repo.id))
            conn.execute(delete(hub_repos).where(hub_repos.c.id == repo.id))  # the rest cascades
        return digests

    def referenced(self, digests: Iterable[str]) -> set[str]:
        """Those of ``digests`` that some commit of some repo references."""
        ds = set(digests)
        if not ds:
            return set()
        with self.catalog.read() as conn:
            return set(
                conn.execute(
                    select(hub_commit_files.c.sha256).where(hub_commit_files.c.sha256.in_(ds))
                ).scalars()
            )

    def visible_repos(self, user: str | None) -> list[tuple[Repo, Commit]]:
        """Every repo ``user`` may see (public ones, and its own), with the head of ``main``."""
        stmt = (
            select(hub_repos, hub_commits)
            .join(hub_refs, (hub_refs.c.repo_id == hub_repos.c.id) & (hub_refs.c.name == "main"))
            .join(hub_commits, hub_commits.c.id == hub_refs.c.commit_id)
            .order_by(hub_repos.c.updated_at.desc(), hub_repos.c.id.desc())
        )
        if user is None:
            stmt = stmt.where(hub_repos.c.private.is_(False))
        else:
            stmt = stmt.where((hub_repos.c.private.is_(False)) | (hub_repos.c.namespace == user))
        out = []
        with self.catalog.read() as conn:
            for r in conn.execute(stmt):
                m = r._mapping
                repo = Repo(
                    m[hub_repos.c.id],
                    m[hub_repos.c.namespace],
                    m[hub_repos.c.name],
                    bool(m[hub_repos.c.private]),
                    m[hub_repos.c.created_at],
                    m[hub_repos.c.updated_at],
                )
                commit = Commit(
                    m[hub_commits.c.id],
                    m[hub_commits.c.oid],
                    m[hub_commits.c.parent_oid],
                    m[hub_commits.c.title],
                    m[hub_commits.c.message],
                    m[hub_commits.c.author],
                    m[hub_commits.c.card],
                    m[hub_commits.c.created_at],
                )
                out.append((repo, commit))
        return out

    def namespace_storage(self, namespace: str) -> list[tuple[Repo, int]]:
        """The repos of ``namespace``, newest change first, each with the bytes its files take: every
        distinct file content any of its commits holds (what deleting the repo would free, at most)."""
        mine = hub_repos.c.namespace == namespace  # exact: users differ by case (as `may_read` has it)
        distinct = (
            select(hub_commits.c.repo_id, hub_commit_files.c.blob_oid, hub_commit_files.c.size)
            .join(hub_commits, hub_commits.c.id == hub_commit_files.c.commit_id)
            .join(hub_repos, hub_repos.c.id == hub_commits.c.repo_id)
            .where(mine)
            .distinct()
            .subquery()
        )
        sizes = select(distinct.c.repo_id, func.sum(distinct.c.size).label("bytes")).group_by(
            distinct.c.repo_id
        )
        with self.catalog.read() as conn:
            used = {r.repo_id: int(r.bytes or 0) for r in conn.execute(sizes)}
            rows = conn.execute(
                select(hub_repos).where(mine).order_by(hub_repos.c.updated_at.desc(), hub_repos.c.id.desc())
            ).all()
        return [(repo_of_row(r), used.get(r.id, 0)) for r in rows]

    def may_reference(self, repo: Repo, user: str | None, sha256: str) -> bool:
        """Whether a commit to ``repo`` by ``user`` may point at the stored object ``sha256``: ``user``
        uploaded it to ``repo``, or a repo ``user`` can read holds it."""
        readable = (hub_repos.c.id == repo.id) | hub_repos.c.private.is_(False)
        if user is not None:
            readable = readable | (hub_repos.c.namespace == user)
        held = (
            select(hub_commit_files.c.sha256)
            .join(hub_commits, hub_commits.c.id == hub_commit_files.c.commit_id)
            .join(hub_repos, hub_repos.c.id == hub_commits.c.repo_id)
            .where(hub_commit_files.c.sha256 == sha256, readable)
            .limit(1)
        )
        with self.catalog.read() as conn:
            if user is not None:
                proof = conn.execute(
                    select(hub_upload_proofs.c.sha256).where(
                        hub_upload_proofs.c.repo_id == repo.id,
                        hub_upload_proofs.c.user == ("" if user == repo.namespace else user),
                        hub_upload_proofs.c.sha256 == sha256,
                    )
                ).first()
                if proof is not None:
                    return True
            return conn.execute(held).first() is not None

    # ------------------------------------------------------------------ revisions
    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag (``v1`` or ``refs/tags/v1``), ``refs/heads/NAME`` or a (possibly abbreviated)
        commit id -> the commit."""
        with self.catalog.read() as conn:
            return resolve_in(conn, repo, revision)

    def files(self, commit: Commit) -> dict[str, Entry]:
        with self.catalog.read() as conn:
            return files_of(conn, commit.id)

    def refs(self, repo: Repo) -> list[Ref]:
        """The repo's branches and tags, by name."""
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(hub_refs.c.name, hub_commits.c.oid)
                .join(hub_commits, hub_commits.c.id == hub_refs.c.commit_id)
                .where(hub_refs.c.repo_id == repo.id)
                .order_by(hub_refs.c.name)
            )
            return [
                Ref(n[len(TAG_PREFIX) :], "tag", o)
                if n.startswith(TAG_PREFIX)
                else Ref(n, "pr", o)
                if n.startswith(PR_PREFIX)
                else Ref(n, "branch", o)
                for n, o in rows
            ]

    def history(self, repo: Repo, head: Commit, *, limit: int = 1000) -> list[Commit]:
        with self.catalog.read() as conn:
            by_oid = {
                r.oid: commit_of_row(r)
                for r in conn.execute(select(hub_commits).where(hub_commits.c.repo_id == repo.id))
            }
        out: list[Commit] = []
        c: Commit | None = head
        while c is not None and len(out) < limit:
            out.append(c)
            c = by_oid.get(c.parent_oid) if c.parent_oid else None
        return out

    def last_commits(self, repo: Repo, head: Commit, paths: Iterable[str]) -> dict[str, Commit]:
        """For each file in ``paths`` (files of ``head``), the newest commit up to ``head`` that changed it:
        walks the history back until the file's entry differs in the parent (one listing per commit)."""
        history = self.history(repo, head)
        with self.catalog.read() as conn:
            current = files_of(conn, head.id)
            todo = {p: current[p] for p in paths if p in current}
            out: dict[str, Commit] = {}
            for i, c in enumerate(history):
                if not todo:
                    break
                parent = files_of(conn, history[i + 1].id) if i + 1 < len(history) else {}
                for p in [p for p, e in todo.items() if parent.get(p) != e]:
                    out[p] = c
                    del todo[p]
            for p in todo:  # older than the history walked: the oldest commit seen
                out[p] = history[-1]
        return out

    def add_ref(self, repo: Repo, stored: str, shown: str, starting_point: str) -> None:
        with self.catalog.write() as conn:
            if conn.execute(
                select(hub_refs.c.name).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored)
            ).first():
                raise ConflictError(f"Reference {shown} already exists")
            start = resolve_in(conn, repo, starting_point)
            conn.execute(insert(hub_refs).values(repo_id=repo.id, name=stored, commit_id=start.id))

    def drop_ref(self, repo: Repo, stored: str, shown: str) -> None:
        with self.catalog.write() as conn:
            n = conn.execute(
                delete(hub_refs).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored)
            ).rowcount
        if not n:
            raise RevisionNotFoundError(repo.repo_id, shown)

    # ------------------------------------------------------------------ LFS files
    def lfs_files(self, repo: Repo) -> list[dict[str, Any]]:
        """Each LFS object any commit of the repo holds, once: its sha256, the path it has where first
        seen, when it was first pushed, and the branch whose head holds it (main first), if any."""
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(
                    hub_commit_files.c.sha256,
                    hub_commit_files.c.path,
                    hub_commit_files.c.size,
                    hub_commit_files.c.blob_oid,
                    func.min(hub_commits.c.created_at),
                )
                .join(hub_commits, hub_commits.c.id == hub_commit_files.c.commit_id)
                .where(hub_commits.c.repo_id == repo.id, hub_commit_files.c.lfs.is_(True))
                .group_by(
                    hub_commit_files.c.sha256,
                    hub_commit_files.c.path,
                    hub_commit_files.c.size,
                    hub_commit_files.c.blob_oid,
                )
            ).all()
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
            out.setdefault(
                sha,
                {
                    "fileOid": sha,
                    "filename": path,
                    "oid": oid,
                    "size": size,
                    "pushedAt": iso(first),
                    "ref": refs.get(sha),
                },
            )
        return list(out.values())

    def purge_lfs_files(self, repo: Repo, shas: list[str]) -> None:
        """Remove the LFS objects ``shas`` from every commit of the repo (its history keeps its commits,
        less those files) and the repo's proofs of having been sent them, in one transaction."""
        with self.catalog.write() as conn:
            commits = select(hub_commits.c.id).where(hub_commits.c.repo_id == repo.id)
            conn.execute(
                delete(hub_commit_files).where(
                    hub_commit_files.c.commit_id.in_(commits),
                    hub_commit_files.c.lfs.is_(True),
                    hub_commit_files.c.sha256.in_(shas),
                )
            )
            conn.execute(
                delete(hub_upload_proofs).where(
                    hub_upload_proofs.c.repo_id == repo.id, hub_upload_proofs.c.sha256.in_(shas)
                )
            )
