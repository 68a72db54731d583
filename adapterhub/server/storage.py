"""The server's repos, refs (branches and tags) and commits, kept in the catalog database, with file
contents in a content-addressed store.

Every commit records the full listing of its files (path, size, git blob id, sha256, LFS or not), so
every revision stays downloadable and a commit is one transaction: either all its rows are written and
the branch moves, or nothing changes. File contents live in a `Store` of their own under the home folder
(``HOME/server/objects``), so that removing a cataloged adapter can never delete a blob a commit serves.

The blob store is shared by every repo (deduplicated), so knowing a sha256 must never be enough to reach
its content: a commit may reference an LFS object only when it was uploaded to that repo (the uploader
sent the bytes, which the server hashed) or when a repo the committer can read already holds it. Upload
proofs are empty files ``uploads/<repo key>/<sha256>`` beside the objects they prove (the owner's); a pull
request's author, who may upload to a repo he does not own, gets his own, ``uploads/<repo key>/by/<user>/``,
which only his commits may use.

Repo ids are case-insensitive, as on the Hub: look-ups ignore case and answer with the id as created.

No FastAPI here (the CLI's ``token`` commands use this module too): errors are the domain errors of
`adapterhub.errors`, which the server maps to HTTP in one place.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from ..catalog import Catalog
from ..catalog.tables import hub_commit_files, hub_commits, hub_refs, hub_repos
from ..errors import (
    BadRequestError,
    ConflictError,
    ForbiddenError,
    PreconditionFailedError,
    RevisionNotFoundError,
)
from ..store import BlobStore
from .cards import parse_card
from .checks import LFS_SUFFIXES, OID_RE, SHA256_RE, TAG_PREFIX, check_name, check_path, check_ref_name
from .commits import edit_tree, insert_commit
from .records import Commit, Entry, Op, Ref, Repo, TokenInfo, git_blob_oid, lfs_pointer, utcnow
from .tokens import Tokens

__all__ = ["ServerStore", "TokenInfo"]

GATE_MODES = ("auto", "manual")
PR_PREFIX = "refs/pr/"
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def repo_of_row(r: Any) -> Repo:
    """A ``hub_repos`` row as a `Repo`."""
    return Repo(r.id, r.namespace, r.name, bool(r.private), r.created_at, r.updated_at)


def _commit(r: Any) -> Commit:
    return Commit(r.id, r.oid, r.parent_oid, r.title, r.message, r.author, r.card, r.created_at)


class ServerStore:
    """Repos, commits, refs and tokens over one catalog and one blob store."""

    def __init__(self, catalog: Catalog, blobs: BlobStore) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.uploads = blobs.root / "uploads"
        self.tokens = Tokens(catalog)

    # ------------------------------------------------------------------ tokens
    def create_token(self, user: str, *, write: bool = False) -> tuple[str, TokenInfo]:
        return self.tokens.create(user, write=write)

    def list_tokens(self, *, user: str | None = None) -> list[TokenInfo]:
        return self.tokens.list(user=user)

    def revoke_token(self, token_or_id: str) -> TokenInfo:
        return self.tokens.revoke(token_or_id)

    def authenticate(self, token: str) -> TokenInfo | None:
        return self.tokens.authenticate(token)

    # ------------------------------------------------------------------ who may reference which blob
    @staticmethod
    def repo_key(repo: Repo) -> str:
        """A name for ``repo`` on disk that a later repo of the same id cannot share."""
        return f"{repo.id}-{repo.created_at:%Y%m%d%H%M%S%f}"

    def upload_dir(self, repo: Repo) -> Path:
        """The folder of ``repo``'s upload proofs (LFS objects; Xet xorbs under ``xorbs/``)."""
        return self.uploads / self.repo_key(repo)

    # ------------------------------------------------------------------ gating
    def _gate_file(self, repo: Repo) -> Path:
        return self.blobs.root / "gated" / self.repo_key(repo)

    def gated(self, repo: Repo) -> str | bool:
        """``"auto"`` or ``"manual"`` when ``repo`` is gated (its files are for its owner only), else False."""
        try:
            value = self._gate_file(repo).read_text().strip()
        except FileNotFoundError:
            return False
        return value if value in GATE_MODES else False

    def set_gated(self, repo: Repo, gated: str | bool) -> None:
        if gated not in (False, *GATE_MODES):
            raise BadRequestError(f"gated must be 'auto', 'manual' or false, not {gated!r}")
        path = self._gate_file(repo)
        if gated is False:
            path.unlink(missing_ok=True)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(gated))

    def _proof(self, repo: Repo, user: str | None, sha256: str) -> Path:
        """Where the proof of an upload to ``repo`` by ``user`` lives: the owner's (or a user-less one) in
        the repo's folder, another user's (a pull request's author) in ``by/<user>/``, usable by that user
        only."""
        d = self.upload_dir(repo)
        return d / sha256 if user is None or user == repo.namespace else d / "by" / user / sha256

    def record_upload(self, repo: Repo, sha256: str, user: str | None = None) -> None:
        """Note that ``user`` uploaded the bytes of ``sha256`` to ``repo`` (checked against the digest)."""
        if not SHA256_RE.match(sha256):
            raise BadRequestError(f"not a sha256 digest: {sha256!r}")
        proof = self._proof(repo, user, sha256)
        proof.parent.mkdir(parents=True, exist_ok=True)
        proof.touch()

    def referable_size(self, repo: Repo, user: str | None, sha256: str) -> int | None:
        """The size of the stored object ``sha256`` if a commit to ``repo`` by ``user`` may point at it, else
        None (the same answer whether the object is absent or held only by repos ``user`` cannot read)."""
        if not SHA256_RE.match(sha256):
            return None
        size = self.blobs.size(sha256)
        if size is None:
            return None
        if user is not None and self._proof(repo, user, sha256).is_file():
            return size
        readable = (hub_repos.c.id == repo.id) | hub_repos.c.private.is_(False)
        if user is not None:
            readable = readable | (hub_repos.c.namespace == user)
        stmt = (
            select(hub_commit_files.c.sha256)
            .join(hub_commits, hub_commits.c.id == hub_commit_files.c.commit_id)
            .join(hub_repos, hub_repos.c.id == hub_commits.c.repo_id)
            .where(hub_commit_files.c.sha256 == sha256, readable)
            .limit(1)
        )
        with self.catalog.read() as conn:
            return size if conn.execute(stmt).first() is not None else None

    # ------------------------------------------------------------------ repos
    @staticmethod
    def _same_id(namespace: str, name: str) -> Any:
        return (func.lower(hub_repos.c.namespace) == namespace.lower()) & (
            func.lower(hub_repos.c.name) == name.lower()
        )

    def get_repo(self, namespace: str, name: str) -> Repo | None:
        """The repo ``namespace/name``, matched without regard to case, or None."""
        with self.catalog.read() as conn:
            r = conn.execute(select(hub_repos).where(self._same_id(namespace, name))).first()
        return repo_of_row(r) if r else None

    def create_repo(self, namespace: str, name: str, *, private: bool, author: str) -> Repo:
        check_name("namespace", namespace)
        check_name("repo name", name)
        gitattributes = self.blobs.put_bytes(GITATTRIBUTES)
        now = utcnow()
        with self.catalog.write() as conn:
            if conn.execute(select(hub_repos.c.id).where(self._same_id(namespace, name))).first():
                raise ConflictError("You already created this model repo")
            rid = conn.execute(
                insert(hub_repos)
                .values(namespace=namespace, name=name, private=private, created_at=now, updated_at=now)
                .returning(hub_repos.c.id)
            ).scalar_one()
            entry = Entry(
                ".gitattributes", gitattributes.size, git_blob_oid(GITATTRIBUTES), gitattributes.sha256, False
            )
            insert_commit(
                conn, rid, "main", None, {entry.path: entry}, "initial commit", "", author, None, now
            )
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == rid)).one()
        return repo_of_row(row)

    def rename_repo(self, repo: Repo, namespace: str, name: str) -> Repo:
        """Move ``repo`` to ``namespace/name`` with its whole history (``move_repo``)."""
        check_name("namespace", namespace)
        check_name("repo name", name)
        with self.catalog.write() as conn:
            clash = conn.execute(
                select(hub_repos.c.id).where(self._same_id(namespace, name), hub_repos.c.id != repo.id)
            ).first()
            if clash:
                raise ConflictError(f"A model repository called {namespace}/{name} already exists")
            conn.execute(
                update(hub_repos)
                .where(hub_repos.c.id == repo.id)
                .values(namespace=namespace, name=name, updated_at=utcnow())
            )
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == repo.id)).one()
        return repo_of_row(row)

    def duplicate_repo(self, source: Repo, namespace: str, name: str, *, private: bool, author: str) -> Repo:
        """A new repo ``namespace/name`` whose main branch holds the files of ``source``'s main, in one commit
        (the objects are shared, not copied)."""
        repo = self.create_repo(namespace, name, private=private, author=author)
        head = self.resolve(source, "main")
        with self.catalog.write() as conn:
            initial = self.resolve_branch(conn, repo, "main")
            files = self.files_of(conn, head.id)
            insert_commit(conn, repo.id, "main", initial, files, f"Duplicate from {source.repo_id}", "", author,
                          head.card, utcnow())  # fmt: skip
        return repo

    def set_private(self, repo: Repo, private: bool) -> Repo:
        with self.catalog.write() as conn:
            conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(private=private))
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == repo.id)).one()
        return repo_of_row(row)

    def delete_repo(self, repo: Repo) -> None:
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
            conn.execute(delete(hub_repos).where(hub_repos.c.id == repo.id))
        shutil.rmtree(self.upload_dir(repo), ignore_errors=True)
        for gate in self._gate_file(repo).parent.glob(self.repo_key(repo) + "*"):
            gate.unlink(missing_ok=True)  # the gate and its access requests
        (self.blobs.root / "discussions" / f"{self.repo_key(repo)}.json").unlink(missing_ok=True)
        self.drop_unreferenced(digests)

    def drop_unreferenced(self, digests: Iterable[str]) -> None:
        """Remove those of ``digests`` from the blob store that no commit of any repo references."""
        ds = set(digests)
        if not ds:
            return
        with self.catalog.read() as conn:
            keep = set(
                conn.execute(
                    select(hub_commit_files.c.sha256).where(hub_commit_files.c.sha256.in_(ds))
                ).scalars()
            )
        for d in ds - keep:
            self.blobs.remove(d)

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
                repo = Repo(m[hub_repos.c.id], m[hub_repos.c.namespace], m[hub_repos.c.name], bool(m[hub_repos.c.private]),
                            m[hub_repos.c.created_at], m[hub_repos.c.updated_at])  # fmt: skip
                commit = Commit(m[hub_commits.c.id], m[hub_commits.c.oid], m[hub_commits.c.parent_oid],
                                m[hub_commits.c.title], m[hub_commits.c.message], m[hub_commits.c.author],
                                m[hub_commits.c.card], m[hub_commits.c.created_at])  # fmt: skip
                out.append((repo, commit))
        return out

    # ------------------------------------------------------------------ revisions
    def resolve(self, repo: Repo, revision: str) -> Commit:
        """A branch, a tag (``v1`` or ``refs/tags/v1``), ``refs/heads/NAME`` or a (possibly abbreviated)
        commit id -> the commit."""
        with self.catalog.read() as conn:
            return self._resolve(conn, repo, revision)

    def _ref_commit(self, conn: Connection, repo: Repo, stored_name: str) -> Commit | None:
        r = conn.execute(
            select(hub_commits)
            .join(hub_refs, hub_refs.c.commit_id == hub_commits.c.id)
            .where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored_name)
        ).first()
        return _commit(r) if r else None

    def _resolve(self, conn: Connection, repo: Repo, revision: str) -> Commit:
        if revision.startswith("refs/heads/"):
            names = [revision[len("refs/heads/") :]]
        elif revision.startswith(TAG_PREFIX):
            names = [revision]
        else:
            names = [revision, TAG_PREFIX + revision]
        for n in names:
            c = self._ref_commit(conn, repo, n)
            if c is not None:
                return c
        if OID_RE.match(revision):
            rows = conn.execute(
                select(hub_commits)
                .where(hub_commits.c.repo_id == repo.id, hub_commits.c.oid.like(revision + "%"))
                .limit(2)
            ).all()
            if len(rows) == 1:
                return _commit(rows[0])
        raise RevisionNotFoundError(repo.repo_id, revision)

    def resolve_branch(self, conn: Connection, repo: Repo, branch: str) -> Commit:
        """The head of a branch (not a tag nor a commit: only branches move)."""
        name = branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch
        moves = not name.startswith("refs/") or name.startswith(PR_PREFIX)  # a pull request's branch moves
        c = self._ref_commit(conn, repo, name) if moves else None
        if c is None:
            raise RevisionNotFoundError(repo.repo_id, branch)
        return c

    def files(self, commit: Commit) -> dict[str, Entry]:
        with self.catalog.read() as conn:
            return self.files_of(conn, commit.id)

    @staticmethod
    def files_of(conn: Connection, commit_id: int) -> dict[str, Entry]:
        rows = conn.execute(
            select(hub_commit_files)
            .where(hub_commit_files.c.commit_id == commit_id)
            .order_by(hub_commit_files.c.path)
        )
        return {r.path: Entry(r.path, r.size, r.blob_oid, r.sha256, bool(r.lfs)) for r in rows}

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
                r.oid: _commit(r)
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
            current = self.files_of(conn, head.id)
            todo = {p: current[p] for p in paths if p in current}
            out: dict[str, Commit] = {}
            for i, c in enumerate(history):
                if not todo:
                    break
                parent = self.files_of(conn, history[i + 1].id) if i + 1 < len(history) else {}
                for p in [p for p, e in todo.items() if parent.get(p) != e]:
                    out[p] = c
                    del todo[p]
            for p in todo:  # older than the history walked: the oldest commit seen
                out[p] = history[-1]
        return out

    def _add_ref(self, repo: Repo, stored: str, shown: str, starting_point: str) -> None:
        with self.catalog.write() as conn:
            if conn.execute(
                select(hub_refs.c.name).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored)
            ).first():
                raise ConflictError(f"Reference {shown} already exists")
            start = self._resolve(conn, repo, starting_point)
            conn.execute(insert(hub_refs).values(repo_id=repo.id, name=stored, commit_id=start.id))

    def _drop_ref(self, repo: Repo, stored: str, shown: str) -> None:
        with self.catalog.write() as conn:
            n = conn.execute(
                delete(hub_refs).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == stored)
            ).rowcount
        if not n:
            raise RevisionNotFoundError(repo.repo_id, shown)

    def create_branch(self, repo: Repo, branch: str, *, starting_point: str | None) -> None:
        self.resolve(repo, starting_point or "main")  # a missing start is named before a bad name
        check_ref_name("branch", branch)
        self._add_ref(repo, branch, f"refs/heads/{branch}", starting_point or "main")

    def delete_branch(self, repo: Repo, branch: str) -> None:
        if branch == "main":
            raise ForbiddenError("Cannot delete refs/heads/main: the main branch cannot be deleted")
        if branch.startswith("refs/"):
            raise RevisionNotFoundError(repo.repo_id, branch)
        self._drop_ref(repo, branch, branch)

    def create_tag(self, repo: Repo, tag: str, *, revision: str) -> None:
        self.resolve(repo, revision)  # as on the Hub, a missing revision is named before a bad tag name
        check_ref_name("tag", tag)
        self._add_ref(repo, TAG_PREFIX + tag, TAG_PREFIX + tag, revision)

    def delete_tag(self, repo: Repo, tag: str) -> None:
        name = tag[len(TAG_PREFIX) :] if tag.startswith(TAG_PREFIX) else tag
        self._drop_ref(repo, TAG_PREFIX + name, tag)

    def squash(self, repo: Repo, branch: str, *, message: str, author: str) -> Commit:
        """Replace ``branch``'s history by one commit with its current files (``super_squash_history``);
        other branches and tags keep theirs."""
        with self.catalog.write() as conn:
            head = self.resolve_branch(conn, repo, branch)
            files = self.files_of(conn, head.id)
            name = branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch
            return insert_commit(conn, repo.id, name, None, files, message, "", author, head.card, utcnow())

    # ------------------------------------------------------------------ pull requests
    def create_pr_ref(self, repo: Repo, name: str, base: str) -> Commit:
        """The branch ``name`` (``refs/pr/N``) of a new pull request, at the head of ``base``."""
        with self.catalog.write() as conn:
            start = self.resolve_branch(conn, repo, base)
            conn.execute(insert(hub_refs).values(repo_id=repo.id, name=name, commit_id=start.id))
        return start

    def merge_pr(
        self, repo: Repo, pr_ref: str, base_oid: str, target: str, *, title: str, author: str
    ) -> Commit:
        """Apply what ``pr_ref`` changed since ``base_oid`` onto ``target``, as one commit; a file both
        sides changed since is a conflict (409) and nothing is written."""
        with self.catalog.write() as conn:
            head = self.resolve_branch(conn, repo, target)
            pr = self.resolve_branch(conn, repo, pr_ref)
            base = self.files_of(conn, self._resolve(conn, repo, base_oid).id)
            theirs, ours = self.files_of(conn, pr.id), self.files_of(conn, head.id)
            changed = [p for p in sorted(set(base) | set(theirs)) if base.get(p) != theirs.get(p)]
            both = [p for p in changed if ours.get(p) not in (base.get(p), theirs.get(p))]
            if both:
                raise ConflictError(
                    f"{pr_ref} and {target} both changed {', '.join(both[:10])}: merge by hand"
                )
            after = dict(ours)
            for p in changed:
                if p in theirs:
                    after[p] = theirs[p]
                else:
                    after.pop(p, None)
            card = head.card
            if "README.md" not in after:
                card = None
            elif after["README.md"] != ours.get("README.md"):
                card = parse_card(self.blobs.path(after["README.md"].sha256).read_bytes())
            now = utcnow()
            commit = insert_commit(conn, repo.id, target, head, after, title, "", author, card, now)
            conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(updated_at=now))
        return commit

    # ------------------------------------------------------------------ commits
    def commit(
        self,
        repo: Repo,
        branch: str,
        ops: Sequence[Op],
        *,
        title: str,
        message: str,
        author: str,
        parent_commit: str | None = None,
    ) -> tuple[Commit, bool]:
        """Apply ``ops`` on top of ``branch`` as one commit by ``author``: all of it or nothing.

        Returns the new head and whether a commit was made (a commit that changes nothing makes none).
        """
        for op in ops:
            check_path(op.path)
        created: list[str] = []
        try:
            staged = [(op, self._stage(repo, author, op, created)) for op in ops]
            with self.catalog.write() as conn:
                head = self.resolve_branch(conn, repo, branch)
                if parent_commit is not None and not head.oid.startswith(parent_commit):
                    raise PreconditionFailedError(
                        "The branch was updated since you opened this page. Please refresh and try again. "
                        f"({branch} is now at {head.oid}, not {parent_commit}: commit on top of it)"
                    )
                before = self.files_of(conn, head.id)
                after = edit_tree(before, staged, head.oid)
                if after == before:
                    return head, False
                card = head.card
                if "README.md" not in after:
                    card = None
                elif after["README.md"] != before.get("README.md"):
                    card = parse_card(self.blobs.path(after["README.md"].sha256).read_bytes())
                now = utcnow()
                name = branch[len("refs/heads/") :] if branch.startswith("refs/heads/") else branch
                commit = insert_commit(conn, repo.id, name, head, after, title, message, author, card, now)
                conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(updated_at=now))
            return commit, True
        except BaseException:
            self.drop_unreferenced(created)
            raise

    def _stage(self, repo: Repo, author: str, op: Op, created: list[str]) -> Entry | None:
        """The entry an addition will have (its content stored first); None for a deletion."""
        if op.kind == "file":
            assert op.content is not None
            sf = self.blobs.put_bytes(op.content)
            if sf.created:
                created.append(sf.sha256)
            return Entry(op.path, sf.size, git_blob_oid(op.content), sf.sha256, False)
        if op.kind != "lfs":
            return None
        if not op.oid or not SHA256_RE.match(op.oid):
            raise BadRequestError(f"{op.path}: lfsFile needs a sha256 oid (64 hex digits)")
        # one answer whether the object is absent or belongs to repos the author cannot read
        size = self.referable_size(repo, author, op.oid)
        if size is None:
            raise BadRequestError(
                f"{op.path}: LFS object {op.oid} was not uploaded to {repo.repo_id}; upload it through "
                "the LFS batch API before committing"
            )
        if op.size is not None and op.size != size:
            raise BadRequestError(f"{op.path}: LFS object {op.oid} has {size} bytes, not {op.size}")
        return Entry(op.path, size, git_blob_oid(lfs_pointer(op.oid, size)), op.oid, True)
