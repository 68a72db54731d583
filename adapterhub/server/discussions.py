"""Discussions and pull requests of a repo: numbered threads of events (comments, status and title
changes, commits). A pull request is a discussion with a branch of its own, ``refs/pr/N`` (a row of
``hub_refs``), started at the head of its base branch; merging applies its changes since that start onto
the base branch, refusing files that both sides changed.

Threads and their events are rows of the catalog (`adapterhub.catalog.hubthreads`); each change, a pull
request's branch with its thread and a merge with its status change, is one transaction.
"""

from __future__ import annotations

import secrets
from typing import Any

from ..catalog.hubthreads import ThreadRows
from ..errors import BadRequestError, EntryNotFoundError, ForbiddenError
from .records import Commit, Repo, iso, utcnow
from .storage import Repos

TITLE_LIMIT = 200
TEXT_LIMIT = 65_536


def event(kind: str, author: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": secrets.token_hex(12),
        "type": kind,
        "createdAt": iso(utcnow()),
        "author": {"name": author},
        "data": data,
    }


def comment_event(author: str, text: str) -> dict[str, Any]:
    return event(
        author=author,
        kind="comment",
        data={"edited": False, "hidden": False, "numEdits": 0, "latest": {"raw": text, "html": text}},
    )


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise BadRequestError(f"{what} must be a string of at most {limit:,} characters")
    return value.strip()


class Discussions:
    def __init__(self, rows: ThreadRows, repos: Repos) -> None:
        self.rows = rows
        self.repos = repos

    # ------------------------------------------------------------------ reading
    def list(self, repo: Repo) -> list[dict[str, Any]]:
        """Every thread, newest first."""
        return self.rows.threads(repo)

    def get(self, repo: Repo, num: int) -> dict[str, Any]:
        d = self.rows.get(repo, num)
        if d is None:
            raise EntryNotFoundError(f"Discussion {num} of {repo.repo_id}")
        return d

    # ------------------------------------------------------------------ writing
    def create(
        self, repo: Repo, author: str, title: Any, description: Any, *, pull_request: bool, base: str = "main"
    ) -> dict[str, Any]:
        """Open a thread (a pull request: also its branch ``refs/pr/N`` at the head of ``base``)."""
        title = _text(title, "title", TITLE_LIMIT)
        if not title:
            raise BadRequestError("a discussion needs a title")
        text = _text(description or "", "description", TEXT_LIMIT)
        events = [comment_event(author, text)] if text else []
        return self.rows.create(repo, author, title, events, pull_request=pull_request, base=base)

    def _update(self, repo: Repo, num: int, change: Any) -> dict[str, Any]:
        return dict(self.rows.change(repo, num, change))

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

        def events() -> list[dict[str, Any]]:
            made = [comment_event(user, note)] if note else []
            return [*made, event("status-change", user, {"status": "merged"})]

        return self.rows.merge(repo, num, user, events, self.repos.card_of)


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
