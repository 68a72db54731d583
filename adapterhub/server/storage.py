"""The server's repos, commits, branches and tokens, kept in the catalog database, with file contents in a
content-addressed store.

Every commit records the full listing of its files (path, size, git blob id, sha256, LFS or not), so
every revision stays downloadable and a commit is one transaction: either all its rows are written and
the branch moves, or nothing changes. File contents live in a `Store` of their own under the home folder
(``HOME/server/objects``), so that removing a cataloged adapter can never delete a blob a commit serves.

No FastAPI here: the CLI's ``token`` commands use this module too.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import secrets
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update

from ..catalog import Catalog
from ..catalog.tables import hub_commit_files, hub_commits, hub_refs, hub_repos, hub_tokens
from ..errors import AdapterHubError
from ..store import Store
from .errors import HubHTTPError, bad_request, entry_not_found, revision_not_found

NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
BRANCH_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
OID_RE = re.compile(r"^[0-9a-f]{7,40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_PREFIX = "ahub_"
LFS_SUFFIXES = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".npy", ".npz", ".msgpack",
    ".pkl", ".pickle", ".zip", ".gz", ".tar", ".zst", ".parquet", ".arrow", ".model", ".ot", ".tflite",
)  # fmt: skip
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


class TokenError(AdapterHubError, ValueError):
    pass


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def iso(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(kind: str, value: str) -> str:
    if not NAME_RE.match(value) or ".." in value or "--" in value or value.endswith(".git"):
        raise bad_request(
            f"invalid {kind} {value!r}: use letters, digits, '-', '_' and '.', start and end with a letter or "
            "digit, at most 96 characters"
        )
    return value


def check_path(path: Any) -> str:
    """A path inside a repo: relative, no '..', '.', empty or '.git' segments, no backslashes or NULs."""
    if (
        not isinstance(path, str)
        or not path
        or len(path) > 1000
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(seg in ("", ".", "..", ".git") for seg in path.split("/"))
    ):
        raise bad_request(
            f"invalid path {path!r}: paths are relative, without '..', '.', '.git' or empty parts"
        )
    return path


CARD_TEXT_LIMIT = 1024 * 1024
CARD_EXPANDED_LIMIT = 2_000_000


def parse_card(readme: bytes) -> dict[str, Any] | None:
    """The YAML front matter of a README.md, or None. Raises ValueError when the YAML is broken, or
    too large once its aliases are expanded (a "billion laughs" card is refused before it is built)."""
    import yaml

    text = readme.decode("utf-8", errors="replace")
    m = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not m:
        return None
    block = m.group(1)
    if len(block) > CARD_TEXT_LIMIT:
        raise ValueError(f"the metadata block of README.md is larger than {CARD_TEXT_LIMIT:,} characters")
    loader = yaml.SafeLoader(block)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, CARD_EXPANDED_LIMIT)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("the metadata block of README.md is nested too deeply") from None
    finally:
        loader.dispose()
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("the metadata block of README.md must be a YAML mapping")
    return json.loads(json.dumps(data, default=str))


def _check_expanded_size(root: Any, limit: int) -> None:
    """Refuse a composed YAML node graph whose tree, with every alias expanded, would exceed ``limit``
    (nodes plus scalar characters), or that refers to itself. Linear in the graph, never expanding it."""
    import yaml

    def children(node: Any) -> list[Any]:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            if isinstance(node, yaml.ScalarNode):
                total = 1 + len(node.value)
            else:
                total = 1 + sum(size[id(c)] for c in children(node))
            if total > limit:
                raise ValueError(
                    "the metadata block of README.md expands to more than "
                    f"{limit:,} nodes and characters once its aliases are resolved"
                )
            size[key] = total
            continue
        if key in size:
            continue
        open_.add(key)
        stack.append((node, True))
        for c in children(node):
            if id(c) in open_:
                raise ValueError("the metadata block of README.md refers to itself through an alias")
            if id(c) not in size:
                stack.append((c, False))


def card_tags(card: dict[str, Any] | None) -> tuple[list[str], str | None]:
    """The tags the Hub derives from a model card, and its library name."""
    if not card:
        return [], None
    tags: list[str] = []
    raw = card.get("tags") or []
    tags += [str(t) for t in (raw if isinstance(raw, list) else [raw])]
    library = card.get("library_name")
    library = str(library) if library else None
    if library:
        tags.append(library)
    bases = card.get("base_model") or []
    relation = card.get("base_model_relation")
    for b in bases if isinstance(bases, list) else [bases]:
        tags.append(f"base_model:{b}")
        if relation:
            tags.append(f"base_model:{relation}:{b}")
    if card.get("license"):
        tags.append(f"license:{card['license']}")
    return list(dict.fromkeys(tags)), library


@dataclass(frozen=True)
class TokenInfo:
    id: int
    user: str
    write: bool
    created_at: str
    last_used_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "role": "write" if self.write else "read",
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
        }


@dataclass(frozen=True)
class Repo:
    id: int
    namespace: str
    name: str
    private: bool
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class Commit:
    id: int
    oid: str
    parent_oid: str | None
    title: str
    message: str
    author: str | None
    card: dict[str, Any] | None
    created_at: dt.datetime


@dataclass(frozen=True)
class Entry:
    path: str
    size: int
    blob_oid: str
    sha256: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_oid


@dataclass(frozen=True)
class Op:
    """One line of a commit: ``file`` (content), ``lfs`` (an uploaded object), ``delete`` or ``delete_folder``."""

    kind: str
    path: str
    content: bytes | None = None
    oid: str | None = None
    size: int | None = None


def _tok(r: Any) -> TokenInfo:
    return TokenInfo(
        r.id,
        r.user,
        bool(r.write),
        iso(r.created_at)[:19] + "Z",
        iso(r.last_used_at)[:19] + "Z" if r.last_used_at else None,
    )


def _repo(r: Any) -> Repo:
    return Repo(r.id, r.namespace, r.name, bool(r.private), r.created_at, r.updated_at)


def _commit(r: Any) -> Commit:
    return Commit(r.id, r.oid, r.parent_oid, r.title, r.message, r.author, r.card, r.created_at)


class ServerStore:
    """Repos, commits, refs and tokens over one catalog and one blob store."""

    def __init__(self, catalog: Catalog, blobs: Store) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.uploads = blobs.root / "uploads"

    # ------------------------------------------------------------------ who may reference which blob
    # The blob store is shared by every repo (content-addressed, deduplicated), so knowing a sha256 must
    # never be enough to reach its content. A commit may reference an LFS object only when it was uploaded
    # to that repo (the uploader sent the bytes, which the server hashed), or when a repo the committer can
    # read already holds it. Upload proofs are empty files ``uploads/<repo key>/<sha256>`` beside the
    # objects they prove.

    def _upload_dir(self, repo: Repo) -> Path:
        return self.uploads / f"{repo.id}-{repo.created_at:%Y%m%d%H%M%S%f}"

    def record_upload(self, repo: Repo, sha256: str) -> None:
        """Note that the bytes of ``sha256`` were uploaded to ``repo`` (and checked against the digest)."""
        if not SHA256_RE.match(sha256):
            raise bad_request(f"not a sha256 digest: {sha256!r}")
        d = self._upload_dir(repo)
        d.mkdir(parents=True, exist_ok=True)
        (d / sha256).touch()

    def referable_size(self, repo: Repo, user: str | None, sha256: str) -> int | None:
        """The size of the stored object ``sha256`` if a commit to ``repo`` by ``user`` may point at it, else
        None (the same answer whether the object is absent or held only by repos ``user`` cannot read)."""
        if not SHA256_RE.match(sha256):
            return None
        try:
            size = self.blobs.path(sha256).stat().st_size
        except FileNotFoundError:
            return None
        if (self._upload_dir(repo) / sha256).is_file():
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

    # ------------------------------------------------------------------ tokens
    def create_token(self, user: str, *, write: bool = False) -> tuple[str, TokenInfo]:
        """A new token for ``user``; the token itself is returned once and only its sha256 is kept."""
        try:
            check_name("user name", user)
        except HubHTTPError as exc:
            raise TokenError(exc.message) from None
        token = TOKEN_PREFIX + secrets.token_urlsafe(30)
        now = utcnow().replace(microsecond=0)
        with self.catalog.write() as conn:
            tid = conn.execute(
                insert(hub_tokens)
                .values(user=user, token_hash=hash_token(token), write=write, created_at=now)
                .returning(hub_tokens.c.id)
            ).scalar_one()
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.id == tid)).one()
        return token, _tok(row)

    def list_tokens(self, *, user: str | None = None) -> list[TokenInfo]:
        stmt = select(hub_tokens).order_by(hub_tokens.c.id)
        if user is not None:
            stmt = stmt.where(hub_tokens.c.user == user)
        with self.catalog.read() as conn:
            return [_tok(r) for r in conn.execute(stmt)]

    def revoke_token(self, token_or_id: str) -> TokenInfo:
        """Revoke by the id `token list` shows, or by the token itself."""
        cond = (
            hub_tokens.c.id == int(token_or_id)
            if token_or_id.isdigit()
            else hub_tokens.c.token_hash == hash_token(token_or_id)
        )
        with self.catalog.write() as conn:
            row = conn.execute(select(hub_tokens).where(cond)).first()
            if row is None:
                raise TokenError(
                    "no such token; `adapterhub token list` shows the ids of the tokens there are"
                )
            conn.execute(delete(hub_tokens).where(hub_tokens.c.id == row.id))
        return _tok(row)

    def authenticate(self, token: str) -> TokenInfo | None:
        h = hash_token(token)
        with self.catalog.read() as conn:
            row = conn.execute(select(hub_tokens).where(hub_tokens.c.token_hash == h)).first()
        if row is None:
            return None
        now = utcnow().replace(microsecond=0)
        if row.last_used_at is None or (now - row.last_used_at).total_seconds() > 60:
            with self.catalog.write() as conn:
                conn.execute(update(hub_tokens).where(hub_tokens.c.id == row.id).values(last_used_at=now))
        return _tok(row)

    # ------------------------------------------------------------------ repos
    def get_repo(self, namespace: str, name: str) -> Repo | None:
        with self.catalog.read() as conn:
            r = conn.execute(
                select(hub_repos).where(hub_repos.c.namespace == namespace, hub_repos.c.name == name)
            ).first()
        return _repo(r) if r else None

    def create_repo(self, namespace: str, name: str, *, private: bool, author: str) -> Repo:
        check_name("namespace", namespace)
        check_name("repo name", name)
        gitattributes = self.blobs.put_bytes(GITATTRIBUTES)
        now = utcnow()
        with self.catalog.write() as conn:
            if conn.execute(
                select(hub_repos.c.id).where(hub_repos.c.namespace == namespace, hub_repos.c.name == name)
            ).first():
                raise HubHTTPError(409, "You already created this model repo")
            rid = conn.execute(
                insert(hub_repos)
                .values(namespace=namespace, name=name, private=private, created_at=now, updated_at=now)
                .returning(hub_repos.c.id)
            ).scalar_one()
            entry = Entry(
                ".gitattributes", gitattributes.size, git_blob_oid(GITATTRIBUTES), gitattributes.sha256, False
            )
            self._insert_commit(
                conn, rid, "main", None, {entry.path: entry}, "initial commit", "", author, None, now
            )
            row = conn.execute(select(hub_repos).where(hub_repos.c.id == rid)).one()
        return _repo(row)

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
        shutil.rmtree(self._upload_dir(repo), ignore_errors=True)
        self._drop_unreferenced(digests)

    def _drop_unreferenced(self, digests: Iterable[str]) -> None:
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
        """A branch name or a (possibly abbreviated) commit id -> the commit."""
        with self.catalog.read() as conn:
            return self._resolve(conn, repo, revision)

    def _resolve(self, conn: Connection, repo: Repo, revision: str) -> Commit:
        r = conn.execute(
            select(hub_commits)
            .join(hub_refs, hub_refs.c.commit_id == hub_commits.c.id)
            .where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == revision)
        ).first()
        if r is None and OID_RE.match(revision):
            rows = conn.execute(
                select(hub_commits)
                .where(hub_commits.c.repo_id == repo.id, hub_commits.c.oid.like(revision + "%"))
                .limit(2)
            ).all()
            r = rows[0] if len(rows) == 1 else None
        if r is None:
            raise revision_not_found(repo.repo_id, revision)
        return _commit(r)

    def files(self, commit: Commit) -> dict[str, Entry]:
        with self.catalog.read() as conn:
            return self._files(conn, commit.id)

    def _files(self, conn: Connection, commit_id: int) -> dict[str, Entry]:
        rows = conn.execute(
            select(hub_commit_files)
            .where(hub_commit_files.c.commit_id == commit_id)
            .order_by(hub_commit_files.c.path)
        )
        return {r.path: Entry(r.path, r.size, r.blob_oid, r.sha256, bool(r.lfs)) for r in rows}

    def refs(self, repo: Repo) -> list[tuple[str, str]]:
        with self.catalog.read() as conn:
            rows = conn.execute(
                select(hub_refs.c.name, hub_commits.c.oid)
                .join(hub_commits, hub_commits.c.id == hub_refs.c.commit_id)
                .where(hub_refs.c.repo_id == repo.id)
                .order_by(hub_refs.c.name)
            )
            return [(n, o) for n, o in rows]

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

    def create_branch(self, repo: Repo, branch: str, *, starting_point: str | None) -> None:
        if (
            not BRANCH_RE.match(branch)
            or ".." in branch
            or branch.startswith("refs/")
            or branch.endswith("/")
        ):
            raise bad_request(f"invalid branch name {branch!r}")
        with self.catalog.write() as conn:
            if conn.execute(
                select(hub_refs.c.name).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == branch)
            ).first():
                raise HubHTTPError(409, f"Reference already exists: {branch}")
            start = self._resolve(conn, repo, starting_point or "main")
            conn.execute(insert(hub_refs).values(repo_id=repo.id, name=branch, commit_id=start.id))

    def delete_branch(self, repo: Repo, branch: str) -> None:
        if branch == "main":
            raise HubHTTPError(403, "The main branch cannot be deleted")
        with self.catalog.write() as conn:
            n = conn.execute(
                delete(hub_refs).where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == branch)
            ).rowcount
        if not n:
            raise revision_not_found(repo.repo_id, branch)

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
        """Apply ``ops`` on top of ``branch`` as one commit: all of it or nothing.

        Returns the new head and whether a commit was made (a commit that changes nothing makes none).
        """
        for op in ops:
            check_path(op.path)
        created: list[str] = []
        staged: list[tuple[Op, Entry | None]] = []
        try:
            for op in ops:
                if op.kind == "file":
                    assert op.content is not None
                    sf = self.blobs.put_bytes(op.content)
                    if sf.created:
                        created.append(sf.sha256)
                    staged.append((op, Entry(op.path, sf.size, git_blob_oid(op.content), sf.sha256, False)))
                elif op.kind == "lfs":
                    if not op.oid or not SHA256_RE.match(op.oid):
                        raise bad_request(f"{op.path}: lfsFile needs a sha256 oid (64 hex digits)")
                    # one answer whether the object is absent or belongs to repos the author cannot read
                    size = self.referable_size(repo, author, op.oid)
                    if size is None:
                        raise bad_request(
                            f"{op.path}: LFS object {op.oid} was not uploaded to {repo.repo_id}; upload it through "
                            "the LFS batch API before committing"
                        )
                    if op.size is not None and op.size != size:
                        raise bad_request(f"{op.path}: LFS object {op.oid} has {size} bytes, not {op.size}")
                    staged.append(
                        (op, Entry(op.path, size, git_blob_oid(lfs_pointer(op.oid, size)), op.oid, True))
                    )
                else:
                    staged.append((op, None))
            with self.catalog.write() as conn:
                head = self._resolve_branch(conn, repo, branch)
                if parent_commit is not None and not head.oid.startswith(parent_commit):
                    raise HubHTTPError(
                        412, f"A commit has happened since {parent_commit}: {branch} is now at {head.oid}"
                    )
                before = self._files(conn, head.id)
                after = dict(before)
                for op, entry in staged:
                    if entry is not None:
                        after[op.path] = entry
                    elif op.kind == "delete":
                        if op.path not in after:
                            raise entry_not_found(f"A file with this name doesn't exist: {op.path}", head.oid)
                        del after[op.path]
                    else:
                        prefix = op.path.rstrip("/") + "/"
                        gone = [p for p in after if p.startswith(prefix)]
                        if not gone:
                            raise entry_not_found(
                                f"A folder with this name doesn't exist: {op.path}", head.oid
                            )
                        for p in gone:
                            del after[p]
                if after == before:
                    return head, False
                card = head.card
                if "README.md" not in after:
                    card = None
                elif after["README.md"] != before.get("README.md"):
                    try:
                        card = parse_card(self.blobs.path(after["README.md"].sha256).read_bytes())
                    except ValueError as exc:
                        raise bad_request(
                            f"Invalid metadata in README.md: {str(exc).splitlines()[0]}"
                        ) from None
                now = utcnow()
                commit = self._insert_commit(
                    conn, repo.id, branch, head, after, title, message, author, card, now
                )
                conn.execute(update(hub_repos).where(hub_repos.c.id == repo.id).values(updated_at=now))
            return commit, True
        except BaseException:
            self._drop_unreferenced(created)
            raise

    def _resolve_branch(self, conn: Connection, repo: Repo, branch: str) -> Commit:
        r = conn.execute(
            select(hub_commits)
            .join(hub_refs, hub_refs.c.commit_id == hub_commits.c.id)
            .where(hub_refs.c.repo_id == repo.id, hub_refs.c.name == branch)
        ).first()
        if r is None:
            raise HubHTTPError(
                404, f"Invalid rev id: {branch} is not a branch of {repo.repo_id}", code="RevisionNotFound"
            )
        return _commit(r)

    def _insert_commit(
        self,
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
        tree = hashlib.sha1(
            "".join(
                f"{e.path}\0{e.blob_oid}\0{e.sha256}\0{e.size}\n"
                for e in sorted(files.values(), key=lambda e: e.path)
            ).encode()
        ).hexdigest()
        body = f"tree {tree}\nparent {parent.oid if parent else ''}\nauthor {author}\ndate {now.isoformat()}\n\n{title}\n\n{message}"
        oid = hashlib.sha1(body.encode()).hexdigest()
        cid = conn.execute(
            insert(hub_commits)
            .values(
                repo_id=repo_id,
                oid=oid,
                parent_oid=parent.oid if parent else None,
                title=title,
                message=message,
                author=author,
                card=card,
                created_at=now,
            )  # fmt: skip
            .returning(hub_commits.c.id)
        ).scalar_one()
        if files:
            conn.execute(
                insert(hub_commit_files),
                [
                    {
                        "commit_id": cid,
                        "path": e.path,
                        "size": e.size,
                        "blob_oid": e.blob_oid,
                        "sha256": e.sha256,
                        "lfs": e.lfs,
                    }  # fmt: skip
                    for e in files.values()
                ],
            )
        exists = conn.execute(
            select(func.count())
            .select_from(hub_refs)
            .where(hub_refs.c.repo_id == repo_id, hub_refs.c.name == branch)
        ).scalar_one()
        if exists:
            conn.execute(
                update(hub_refs)
                .where(hub_refs.c.repo_id == repo_id, hub_refs.c.name == branch)
                .values(commit_id=cid)
            )
        else:
            conn.execute(insert(hub_refs).values(repo_id=repo_id, name=branch, commit_id=cid))
        return Commit(cid, oid, parent.oid if parent else None, title, message, author, card, now)


def decode_base64(value: Any, path: str) -> bytes:
    if not isinstance(value, str):
        raise bad_request(f"{path}: file content must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise bad_request(f"{path}: file content is not valid base64") from None


def upload_mode(path: str, size: int, sample: bytes) -> str:
    if size == 0:
        return "regular"
    if path.lower().endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample:
        return "lfs"
    return "regular"
