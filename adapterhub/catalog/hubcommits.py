"""The server's commits in the catalog: a commit is its full file listing, written with the move of its
branch in one transaction; the new listing comes from the old one and the operations (`edit_tree`), and
a pull request merges as one commit onto its base. The server stages file contents in its blob store
before calling these (a commit references only stored, checked objects)."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from ..errors import ConflictError, EntryNotFoundError, PreconditionFailedError, RevisionNotFoundError
from . import Catalog
from .hubrecords import Commit, Entry, Op, Repo, utcnow
from .tables import hub_commit_files, hub_commits, hub_refs, hub_repos

__all__ = ["PR_PREFIX", "TAG_PREFIX", "CommitRows", "edit_tree", "insert_commit"]

PR_PREFIX = "refs/pr/"
TAG_PREFIX = "refs/tags/"  # tags are kept beside branches in hub_refs; no branch name starts with refs/
OID_PREFIX_MIN = 7

#: the model card of a README.md, given its sha256 (read from the blob store)
CardOf = Callable[[str], "dict[str, Any] | None"]


def commit_of_row(r: Any) -> Commit:
    return Commit(r.id, r.oid, r.parent_oid, r.title, r.message, r.author, r.card, r.created_at)


def files_of(conn: Connection, commit_id: int) -> dict[str, Entry]:
    rows = conn.execute(
        select(hub_commit_files)
        .where(hub_commit_files.c.commit_id == commit_id)
        .order_by(hub_commit_files.c.path)
    )
    return {r.path: Entry(r.path, r.size, r.blob_oid, r.sha256, bool(r.lfs)) for r in rows}


def branch_name(branch: str) -> str:
    return branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch


def ref_commit(conn: Connection, repo: Repo, stored_name: str) -> Commit | None:
    r = conn.execute(
        select(hub_commits)
        .join(hub_refs, hub_refs.c.commit_id == hub_commits.c.id)
        .where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored_name)
    ).first()
    return commit_of_row(r) if r else None


def resolve_in(conn: Connection, repo: Repo, revision: str) -> Commit:
    """A branch, a tag (``v1`` or ``refs/tags/v1``), ``refs/heads/NAME`` or a (possibly abbreviated)
    commit id -> the commit, inside the transaction ``conn``."""
    if revision.startswith("refs/heads/"):
        names = [revision[len("refs/heads/") :]]
    elif revision.startswith(TAG_PREFIX):
        names = [revision]
    else:
        names = [revision, TAG_PREFIX + revision]
    for n in names:
        c = ref_commit(conn, repo, n)
        if c is not None:
            return c
    if OID_PREFIX_MIN <= len(revision) <= 40 and all(ch in "0123456789abcdef" for ch in revision):
        rows = conn.execute(
            select(hub_commits)
            .where(hub_commits.c.repo_id == repo.id, hub_commits.c.oid.like(revision + "%"))
            .limit(2)
        ).all()
        if len(rows) == 1:
            return commit_of_row(rows[0])
    raise RevisionNotFoundError(repo.repo_id, revision)


def branch_head(conn: Connection, repo: Repo, branch: str) -> Commit:
    """The head of a branch (not a tag nor a commit: only branches move), inside ``conn``."""
    name = branch_name(branch)
    moves = not name.startswith("refs/") or name.startswith(PR_PREFIX)  # a pull request's branch moves
    c = ref_commit(conn, repo, name) if moves else None
    if c is None:
        raise RevisionNotFoundError(repo.repo_id, branch)
    return c


def edit_tree(
    before: dict[str, Entry], staged: Sequence[tuple[Op, Entry | None]], head_oid: str
) -> dict[str, Entry]:
    """The listing after applying ``staged`` (an operation and, for additions, its entry) to ``before``.

    A ``delete`` of a path that is no file but a folder deletes the folder, as the Hub does, so both
    idioms of the client (``CommitOperationDelete("dir/")`` and ``("dir")``) work.
    """
    after = dict(before)
    for op, entry in staged:
        if entry is not None:
            after[op.path] = entry
            continue
        if op.kind == "delete" and op.path in after:
            del after[op.path]
            continue
        prefix = op.path.rstrip("/") + "/"
        gone = [p for p in after if p.startswith(prefix)]
        if not gone:
            what = "folder" if op.kind == "delete_folder" else "file"
            raise EntryNotFoundError(f"A {what} with this name doesn't exist: {op.path}", head_oid)
        for p in gone:
            del after[p]
    return after


def insert_commit(
    conn: Connection,
    repo_id: int,
    branch: str,
    parent: Commit | None,
    files: dict[str, Entry],
    title: str,
    message: str,
    author: str,
    card: dict[str, Any] | None,
    now: dt.datetime,
) -> Commit:
    """Record a commit with its full file listing and point ``branch`` at it."""
    tree = hashlib.sha1(
        "".join(
            f"{e.path}\0{e.blob_oid}\0{e.sha256}\0{e.size}\n"
            for e in sorted(files.values(), key=lambda e: e.path)
        ).encode()
    ).hexdigest()
    body = (
        f"tree {tree}\nparent {parent.oid if parent else ''}\nauthor {author}\ndate {now.isoformat()}\n\n"
        f"{title}\n\n{message}"
    )
    oid = hashlib.sha1(body.encode()).hexdigest()
    parent_oid = parent.oid if parent else None
    cid = conn.execute(
        insert(hub_commits)
        .values(
            repo_id=repo_id,
            oid=oid,
            parent_oid=parent_oid,
            title=title,
            message=message,
            author=author,
            card=card,
            created_at=now,
        )
        .returning(hub_commits.c.id)
    ).scalar_one()
    if files:
        rows = [
            {
                "commit_id": cid,
                "path": e.path,
                "size": e.size,
                "blob_oid": e.blob_oid,
                "sha256": e.sha256,
                "lfs": e.lfs,
            }
            for e in files.values()
        ]
        conn.execute(insert(hub_commit_files), rows)
    where = (hub_refs.c.repo_id == repo_id) & (hub_refs.c.name == branch)
    if conn.execute(select(func.count()).select_from(hub_refs).where(where)).scalar_one():
        conn.execute(update(hub_refs).where(where).values(commit_id=cid))
    else:
        conn.execute(insert(hub_refs).values(repo_id=repo_id, name=branch, commit_id=cid))
    return Commit(cid, oid, parent_oid, title, message, author, card, now)


def _card_after(head: Commit, before: dict[str, Entry], after: dict[str, Entry], card_of: CardOf) -> Any:
    if "README.md" not in after:
        return None
    if after["README.md"] != before.get("README.md"):
        return card_of(after["README.md"].sha256)
    return head.card


class CommitRows:
    """Commits, squashes, duplicates and pull-request merges over one catalog; each one transaction."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def apply(
        self,
        repo: Repo,
        branch: str,
        staged: Sequence[tuple[Op, Entry | None]],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None,
        card_of: CardOf,
    ) -> tuple[Commit, bool]:
        """``staged`` (operations and, for additions, their stored entries) on top of ``branch`` as one
        commit; returns the new head and whether a commit was made (one that changes nothing makes none).
        ``parent_commit``: refuse (412) unless the branch is still there."""
        with self.catalog.write() as conn:
            head = branch_head(conn, repo, branch)
            if parent_commit is not None and not head.oid.startswith(parent_commit):
                raise PreconditionFailedError(
                    "The branch was updated since you opened this page. Please refresh and try again. "
                    f"({branch} is now at {head.oid}, not {parent_commit}: commit on top of it)"
                )
            before = files_of(conn, head.id)
            after = edit_tree(before, staged, head.oid)
            if after == before:
                return head, False
            card = _card_after(head, before, after, card_of)
            now = utcnow()
            commit = insert_commit(
                conn, repo.id, branch_name(branch), head, after, title, message, author, card, now
            )
            conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(updated_at=now))
        return commit, True

    def squash(self, repo: Repo, branch: str, *, message: str, author: str) -> Commit:
        """Replace ``branch``'s history by one commit with its current files (``super_squash_history``);
        other branches and tags keep theirs."""
        with self.catalog.write() as conn:
            head = branch_head(conn, repo, branch)
            files = files_of(conn, head.id)
            return insert_commit(
                conn, repo.id, branch_name(branch), None, files, message, "", author, head.card, utcnow()
            )

    @staticmethod
    def open_pr_ref(conn: Connection, repo: Repo, name: str, base: str) -> Commit:
        """The branch ``name`` (``refs/pr/N``) of a new pull request, at the head of ``base``, inside
        ``conn``."""
        start = branch_head(conn, repo, base)
        conn.execute(insert(hub_refs).values(repo_id=repo.id, name=name, commit_id=start.id))
        return start

    @staticmethod
    def merge_pr_in(
        conn: Connection,
        repo: Repo,
        pr_ref: str,
        base_oid: str,
        target: str,
        *,
        title: str,
        author: str,
        card_of: CardOf,
    ) -> Commit:
        """Apply what ``pr_ref`` changed since ``base_oid`` onto ``target``, as one commit, inside ``conn``;
        a file both sides changed since is a conflict (409) and nothing is written."""
        head = branch_head(conn, repo, target)
        pr = branch_head(conn, repo, pr_ref)
        base = files_of(conn, resolve_in(conn, repo, base_oid).id)
        theirs, ours = files_of(conn, pr.id), files_of(conn, head.id)
        changed = [p for p in sorted(set(base) | set(theirs)) if base.get(p) != theirs.get(p)]
        both = [p for p in changed if ours.get(p) not in (base.get(p), theirs.get(p))]
        if both:
            raise ConflictError(f"{pr_ref} and {target} both changed {', '.join(both[:10])}: merge by hand")
        after = dict(ours)
        for p in changed:
            if p in theirs:
                after[p] = theirs[p]
            else:
                after.pop(p, None)
        card = _card_after(head, ours, after, card_of)
        now = utcnow()
        commit = insert_commit(conn, repo.id, target, head, after, title, "", author, card, now)
        conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(updated_at=now))
        return commit
