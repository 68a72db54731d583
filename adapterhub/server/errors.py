"""The errors the server answers with, in the Hub's shapes: a JSON body ``{"error": message}`` plus the
``X-Error-Code`` / ``X-Error-Message`` headers that huggingface_hub turns into typed exceptions."""

from __future__ import annotations


class HubHTTPError(Exception):
    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}


def repo_not_found(repo_id: str) -> HubHTTPError:
    return HubHTTPError(
        404,
        f"Repository not found: {repo_id} does not exist, or it is private and the request carries no token "
        "of its owner",
        code="RepoNotFound",
    )


def revision_not_found(repo_id: str, revision: str) -> HubHTTPError:
    return HubHTTPError(
        404, f"Invalid rev id: {revision} is not a branch or commit of {repo_id}", code="RevisionNotFound"
    )


def entry_not_found(path: str, commit: str | None = None) -> HubHTTPError:
    headers = {"X-Repo-Commit": commit} if commit else {}
    return HubHTTPError(404, f"Entry not found: {path}", code="EntryNotFound", headers=headers)


def bad_request(message: str) -> HubHTTPError:
    return HubHTTPError(400, message)


def too_large(what: str, limit: int) -> HubHTTPError:
    return HubHTTPError(413, f"{what} is larger than this server accepts ({limit:,} bytes)")
