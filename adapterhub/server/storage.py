"""The server's state, split by job: repos and refs (`Repos`), commits (`Commits`), tokens (`Tokens`),
gating and upload proofs (`Gates`). All of it lives in the catalog database (the SQL is in
``adapterhub.catalog.hub*``), file contents in a content-addressed blob store, so that two servers on one
database and one store act as one.

Every commit records the full listing of its files (path, size, git blob id, sha256, LFS or not), so every
revision stays downloadable and a commit is one transaction: either all its rows are written and the
branch moves, or nothing changes. File contents live in a `Store` of their own under the home folder
(``HOME/server/objects``), so that removing a cataloged adapter can never delete a blob a commit serves.

The blob store is shared by every repo (deduplicated), so knowing a sha256 must never be enough to reach
its content: a commit may reference an LFS object only when it was uploaded to that repo (the uploader
sent the bytes, which the server hashed: an upload proof) or when a repo the committer can read already
holds it. A pull request's author, who may upload to a repo he does not own, gets proofs of his own,
which only his commits may use.

Repo ids are case-insensitive, as on the Hub: look-ups ignore case and answer with the id as created.

No FastAPI here (the CLI's ``token`` commands use this package too): errors are the domain errors of
`adapterhub.errors`, which the server maps to HTTP in one place.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..catalog import Catalog
from ..catalog.hubcommits import CommitRows
from ..catalog.hubgates import GateRows
from ..catalog.hubrepos import RepoRows
from ..errors import BadRequestError, ForbiddenError, RevisionNotFoundError
from ..store import BlobStore
from .cards import parse_card
from .checks import LFS_SUFFIXES, SHA256_RE, TAG_PREFIX, check_name, check_path, check_ref_name
from .records import Commit, Entry, Op, Repo, git_blob_oid, lfs_pointer
from .tokens import Tokens

__all__ = ["Commits", "Gates", "Repos", "ServerStore"]

GATE_MODES = ("auto", "manual")
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


class Repos(RepoRows):
    """Repos and refs: the catalog's rows, with the server's checks of names and its blob store."""

    def __init__(self, catalog: Catalog, blobs: BlobStore) -> None:
        super().__init__(catalog)
        self.blobs = blobs

    def create_repo(self, namespace: str, name: str, *, private: bool, author: str) -> Repo:
        check_name("namespace", namespace)
        check_name("repo name", name)
        stored = self.blobs.put_bytes(GITATTRIBUTES)
        first = Entry(".gitattributes", stored.size, git_blob_oid(GITATTRIBUTES), stored.sha256, False)
        return self.insert_repo(namespace, name, private=private, author=author, first=first)

    def duplicate_repo(self, source: Repo, namespace: str, name: str, *, private: bool, author: str) -> Repo:
        """A new repo ``namespace/name`` whose main branch holds the files of ``source``'s main, in one more
        commit (the objects are shared, not copied); all in one transaction."""
        check_name("namespace", namespace)
        check_name("repo name", name)
        stored = self.blobs.put_bytes(GITATTRIBUTES)
        first = Entry(".gitattributes", stored.size, git_blob_oid(GITATTRIBUTES), stored.sha256, False)
        return self.insert_repo(namespace, name, private=private, author=author, first=first, copy=source)

    def rename_repo(self, repo: Repo, namespace: str, name: str) -> Repo:
        """Move ``repo`` to ``namespace/name`` with its whole history (``move_repo``); the old name keeps
        resolving to it."""
        check_name("namespace", namespace)
        check_name("repo name", name)
        return self.move_repo(repo, namespace, name)

    def delete_repo(self, repo: Repo) -> None:
        """Delete ``repo`` and all that hangs off it, then the objects no other commit references."""
        self.drop_unreferenced(self.remove_repo(repo))

    def drop_unreferenced(self, digests: Iterable[str]) -> None:
        """Remove those of ``digests`` from the blob store that no commit of any repo references."""
        ds = set(digests)
        for d in ds - self.referenced(ds):
            self.blobs.remove(d)

    def purge_lfs(self, repo: Repo, shas: list[str]) -> None:
        """Remove the LFS objects ``shas`` from every commit of the repo and drop what nothing else holds."""
        if not all(isinstance(s, str) and SHA256_RE.match(s) for s in shas):
            raise BadRequestError("deletions.sha must be a list of sha256 digests")
        self.purge_lfs_files(repo, shas)
        self.drop_unreferenced(shas)

    def card_of(self, sha256: str) -> dict[str, object] | None:
        """The model card of the stored README ``sha256``."""
        return parse_card(self.blobs.path(sha256).read_bytes())

    # ------------------------------------------------------------------ refs
    def create_branch(self, repo: Repo, branch: str, *, starting_point: str | None) -> None:
        self.resolve(repo, starting_point or "main")  # a missing start is named before a bad name
        check_ref_name("branch", branch)
        self.add_ref(repo, branch, f"refs/heads/{branch}", starting_point or "main")

    def delete_branch(self, repo: Repo, branch: str) -> None:
        if branch == "main":
            raise ForbiddenError("Cannot delete refs/heads/main: the main branch cannot be deleted")
        if branch.startswith("refs/"):
            raise RevisionNotFoundError(repo.repo_id, branch)
        self.drop_ref(repo, branch, branch)

    def create_tag(self, repo: Repo, tag: str, *, revision: str) -> None:
        self.resolve(repo, revision)  # as on the Hub, a missing revision is named before a bad tag name
        check_ref_name("tag", tag)
        self.add_ref(repo, TAG_PREFIX + tag, TAG_PREFIX + tag, revision)

    def delete_tag(self, repo: Repo, tag: str) -> None:
        name = tag[len(TAG_PREFIX) :] if tag.startswith(TAG_PREFIX) else tag
        self.drop_ref(repo, TAG_PREFIX + name, tag)


class Gates:
    """Gated repos and the proofs of what each user uploaded to each repo."""

    def __init__(self, rows: GateRows, repos: Repos) -> None:
        self.rows = rows
        self.repos = repos

    def gated(self, repo: Repo) -> str | bool:
        """``"auto"`` or ``"manual"`` when ``repo`` is gated (its files are for its owner only), else False."""
        mode = self.rows.gate(repo)
        return mode if mode in GATE_MODES else False

    def set_gated(self, repo: Repo, gated: str | bool) -> None:
        if gated not in (False, *GATE_MODES):
            raise BadRequestError(f"gated must be 'auto', 'manual' or false, not {gated!r}")
        self.rows.set_gate(repo, None if gated is False else str(gated))

    def record_upload(self, repo: Repo, sha256: str, user: str | None = None) -> None:
        """Note that ``user`` uploaded the bytes of ``sha256`` to ``repo`` (checked against the digest)."""
        if not SHA256_RE.match(sha256):
            raise BadRequestError(f"not a sha256 digest: {sha256!r}")
        self.rows.record_upload(repo, sha256, user)

    def referable_size(self, repo: Repo, user: str | None, sha256: str) -> int | None:
        """The size of the stored object ``sha256`` if a commit to ``repo`` by ``user`` may point at it, else
        None (the same answer whether the object is absent or held only by repos ``user`` cannot read)."""
        if not SHA256_RE.match(sha256):
            return None
        size = self.repos.blobs.size(sha256)
        if size is None:
            return None
        return size if self.repos.may_reference(repo, user, sha256) else None


class Commits:
    """Commits: contents staged in the blob store, then one catalog transaction."""

    def __init__(self, rows: CommitRows, repos: Repos, gates: Gates) -> None:
        self.rows = rows
        self.repos = repos
        self.gates = gates

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
            return self.rows.apply(
                repo,
                branch,
                staged,
                title=title,
                message=message,
                author=author,
                parent_commit=parent_commit,
                card_of=self.repos.card_of,
            )
        except BaseException:
            self.repos.drop_unreferenced(created)
            raise

    def squash(self, repo: Repo, branch: str, *, message: str, author: str) -> Commit:
        return self.rows.squash(repo, branch, message=message, author=author)

    def _stage(self, repo: Repo, author: str, op: Op, created: list[str]) -> Entry | None:
        """The entry an addition will have (its content stored first); None for a deletion."""
        if op.kind == "file":
            assert op.content is not None
            sf = self.repos.blobs.put_bytes(op.content)
            if sf.created:
                created.append(sf.sha256)
            return Entry(op.path, sf.size, git_blob_oid(op.content), sf.sha256, False)
        if op.kind != "lfs":
            return None
        if not op.oid or not SHA256_RE.match(op.oid):
            raise BadRequestError(f"{op.path}: lfsFile needs a sha256 oid (64 hex digits)")
        # one answer whether the object is absent or belongs to repos the author cannot read
        size = self.gates.referable_size(repo, author, op.oid)
        if size is None:
            raise BadRequestError(
                f"{op.path}: LFS object {op.oid} was not uploaded to {repo.repo_id}; upload it through "
                "the LFS batch API before committing"
            )
        if op.size is not None and op.size != size:
            raise BadRequestError(f"{op.path}: LFS object {op.oid} has {size} bytes, not {op.size}")
        return Entry(op.path, size, git_blob_oid(lfs_pointer(op.oid, size)), op.oid, True)


class ServerStore:
    """The server's state over one catalog and one blob store, by job: ``repos`` (repos, refs, history),
    ``commits``, ``tokens``, ``gates`` (gating, upload proofs). The social state (discussions, collections,
    likes, webhooks) is built on the same catalog by `adapterhub.server.deps.Server`."""

    def __init__(self, catalog: Catalog, blobs: BlobStore) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.repos = Repos(catalog, blobs)
        self.tokens = Tokens(catalog)
        self.gate_rows = GateRows(catalog)
        self.gates = Gates(self.gate_rows, self.repos)
        self.commits = Commits(CommitRows(catalog), self.repos, self.gates)
