"""Discussions and pull requests of a repo: numbered threads of events (comments, status and title
changes, commits). A pull request is a discussion with a branch of its own, ``refs/pr/N`` (a row of
``hub_refs``), started at the head of its base branch; merging applies its changes since that start onto
the base branch, refusing files that both sides changed.

The threads of a repo are one JSON file (``HOME/server/discussions/<repo key>.json``), rewritten whole
through a temporary file under a lock (the server is one process).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..errors import BadRequestError, EntryNotFoundError, ForbiddenError
from ..store import scratch_prefix
from .records import Commit, Repo, iso, utcnow
from .storage import ServerStore

PR_PREFIX = "refs/pr/"
TITLE_LIMIT = 200
TEXT_LIMIT = 65_536
_LOCK = threading.Lock()


def event(kind: str, author: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": secrets.token_hex(12), "type": kind, "createdAt": iso(utcnow()), "author": {"name": author},
            "data": data}  # fmt: skip


def comment_event(author: str, text: str) -> dict[str, Any]:
    return event(author=author, kind="comment",
                 data={"edited": False, "hidden": False, "numEdits": 0, "latest": {"raw": text, "html": text}})  # fmt: skip


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequestError(f"{what} must be a string of at most {limit:,} characters")
    return value.strip()


class Discussions:
    def __init__(self, store: ServerStore) -> None:
        self.store = store
        self.root = store.blobs.root / "discussions"

    def _file(self, repo: Repo) -> Path:
        return self.root / f"{self.store.repo_key(repo)}.json"

    def _load(self, repo: Repo) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._file(repo).read_text())
            return data
        except FileNotFoundError:
            return {"next": 1, "items": {}}

    def _save(self, repo: Repo, data: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=scratch_prefix("discussions"))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self._file(repo))

    def drop(self, repo: Repo) -> None:
        self._file(repo).unlink(missing_ok=True)

    # ------------------------------------------------------------------ reading
    def list(self, repo: Repo) -> list[dict[str, Any]]:
        """Every thread, newest first."""
        items = self._load(repo)["items"]
        return [items[k] for k in sorted(items, key=int, reverse=True)]

    def get(self, repo: Repo, num: int) -> dict[str, Any]:
        d = self._load(repo)["items"].get(str(num))
        if d is None:
            raise EntryNotFoundError(f"Discussion {num} of {repo.repo_id}")
        return dict(d)

    # ------------------------------------------------------------------ writing
    def create(
        self, repo: Repo, author: str, title: Any, description: Any, *, pull_request: bool, base: str = "main"
    ) -> dict[str, Any]:
        """Open a thread (a pull request: also its branch ``refs/pr/N`` at the head of ``base``)."""
        title = _text(title, "title", TITLE_LIMIT)
        if not title:
            raise BadRequestError("a discussion needs a title")
        text = _text(description or "", "description", TEXT_LIMIT)
        with _LOCK:
            data = self._load(repo)
            num = int(data["next"])
            d: dict[str, Any] = {
                "num": num, "title": title, "status": "open", "isPullRequest": pull_request,
                "createdAt": iso(utcnow()), "author": {"name": author},
                "repo": {"name": repo.repo_id, "type": "model"}, "pinned": False,
                "events": [comment_event(author, text)] if text else [],
            }  # fmt: skip
            if pull_request:
                name = base[len("refs/heads/") :] if base.startswith("refs/heads/") else base
                start = self.store.create_pr_ref(repo, f"{PR_PREFIX}{num}", name)
                d["changes"] = {"base": f"refs/heads/{name}", "baseOid": start.oid, "mergeCommitId": None}
            data["items"][str(num)] = d
            data["next"] = num + 1
            self._save(repo, data)
        return d

    def _update(self, repo: Repo, num: int, change: Any) -> dict[str, Any]:
        with _LOCK:
            data = self._load(repo)
            d = data["items"].get(str(num))
            if d is None:
                raise EntryNotFoundError(f"Discussion {num} of {repo.repo_id}")
            out = change(d)
            self._save(repo, data)
        return dict(out)

    @staticmethod
    def _may_edit(d: dict[str, Any], repo: Repo, user: str) -> None:
        if user not in (repo.namespace, d["author"]["name"]):
            raise ForbiddenError(
                f"only {d['author']['name']} or {repo.namespace} may change discussion {d['num']}"
            )

    def comment(self, repo: Repo, num: int, user: str, text: Any) -> dict[str, Any]:
        body = _text(text, "comment", TEXT_LIMIT)
        if not body:
            raise BadRequestError("a comment needs some text")

        def add(d: dict[str, Any]) -> dict[str, Any]:
            e = comment_event(user, body)
            d["events"].append(e)
            return e

        return self._update(repo, num, add)

    def edit_comment(self, repo: Repo, num: int, user: str, comment_id: str, text: Any) -> dict[str, Any]:
        body = _text(text, "content", TEXT_LIMIT)

        def edit(d: dict[str, Any]) -> dict[str, Any]:
            e = self._event(d, comment_id)
            if e["author"]["name"] != user:
                raise ForbiddenError("only its author may edit a comment")
            e["data"].update(
                edited=True, numEdits=e["data"]["numEdits"] + 1, latest={"raw": body, "html": body}
            )
            return dict(e)

        return self._update(repo, num, edit)

    def hide_comment(self, repo: Repo, num: int, user: str, comment_id: str) -> dict[str, Any]:
        def hide(d: dict[str, Any]) -> dict[str, Any]:
            e = self._event(d, comment_id)
            if user not in (repo.namespace, e["author"]["name"]):
                raise ForbiddenError(f"only its author or {repo.namespace} may hide a comment")
            e["data"]["hidden"] = True
            return dict(e)

        return self._update(repo, num, hide)

    @staticmethod
    def _event(d: dict[str, Any], comment_id: str) -> dict[str, Any]:
        for e in d["events"]:
            if e["id"] == comment_id and e["type"] == "comment":
                return e
        raise EntryNotFoundError(f"comment {comment_id} of discussion {d['num']}")

    def rename(self, repo: Repo, num: int, user: str, title: Any) -> dict[str, Any]:
        new = _text(title, "title", TITLE_LIMIT)
        if not new:
            raise BadRequestError("a discussion needs a title")

        def rename(d: dict[str, Any]) -> dict[str, Any]:
            self._may_edit(d, repo, user)
            e = event("title-change", user, {"from": d["title"], "to": new})
            d["title"] = new
            d["events"].append(e)
            return e

        return self._update(repo, num, rename)

    def set_status(self, repo: Repo, num: int, user: str, status: Any, text: Any) -> dict[str, Any]:
        if status not in ("open", "closed"):
            raise BadRequestError(f"status must be 'open' or 'closed', not {status!r}")
        note = _text(text or "", "comment", TEXT_LIMIT)

        def change(d: dict[str, Any]) -> dict[str, Any]:
            self._may_edit(d, repo, user)
            if d["status"] == "merged":
                raise BadRequestError(f"pull request {num} is merged already")
            if note:
                d["events"].append(comment_event(user, note))
            e = event("status-change", user, {"status": status})
            d["status"] = status
            d["events"].append(e)
            return e

        return self._update(repo, num, change)

    def add_commit(self, repo: Repo, num: int, user: str, commit: Commit) -> None:
        def add(d: dict[str, Any]) -> dict[str, Any]:
            e = event("commit", user, {"subject": commit.title, "oid": commit.oid})
            d["events"].append(e)
            return e

        self._update(repo, num, add)

    def merge(self, repo: Repo, num: int, user: str, text: Any) -> dict[str, Any]:
        """Merge pull request ``num`` into its base branch (the repo's owner only)."""
        if user != repo.namespace:
            raise ForbiddenError(f"only {repo.namespace} may merge pull requests into {repo.repo_id}")
        note = _text(text or "", "comment", TEXT_LIMIT)
        with _LOCK:
            data = self._load(repo)
            d = data["items"].get(str(num))
            if d is None or not d["isPullRequest"]:
                raise EntryNotFoundError(f"Pull request {num} of {repo.repo_id}")
            if d["status"] != "open":
                raise BadRequestError(f"pull request {num} is {d['status']}, not open")
            changes = d["changes"]
            base = changes["base"][len("refs/heads/") :]
            merged = self.store.merge_pr(repo, f"{PR_PREFIX}{num}", changes["baseOid"], base,
                                         title=f"Merge {PR_PREFIX}{num}: {d['title']}", author=user)  # fmt: skip
            if note:
                d["events"].append(comment_event(user, note))
            d["events"].append(event("status-change", user, {"status": "merged"}))
            d["status"] = "merged"
            changes["mergeCommitId"] = merged.oid
            self._save(repo, data)
        return d


def summary(d: dict[str, Any]) -> dict[str, Any]:
    """A thread as the listing shows it."""
    out = {k: v for k, v in d.items() if k not in ("events", "changes")}
    out["numComments"] = sum(1 for e in d["events"] if e["type"] == "comment")
    out["topReactions"] = []
    return out


def details(d: dict[str, Any]) -> dict[str, Any]:
    """A thread with its events; a pull request with its base and merge commit."""
    out = summary(d)
    out["events"] = d["events"]
    if d["isPullRequest"]:
        out["changes"] = {"base": d["changes"]["base"], "mergeCommitId": d["changes"]["mergeCommitId"]}
        out["filesWithConflicts"] = []
        out["diff"] = ""
    return out
