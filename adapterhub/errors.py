"""The one exception tree of adapterhub.

```
AdapterHubError
 +-- InvalidAdapterError (ValueError)        a file or folder is not a sound adapter
 |    +-- PickleRefusedError                 weights are a pickle and --allow-pickle was not given
 +-- InvalidConfigError (ValueError)         adapter_config.json or a recipe breaks its schema
 |    +-- RecipeError                        a composition recipe is malformed
 +-- IncompatibleAdapterError (ValueError)   adapters do not fit a base or each other
 +-- AdapterNotFoundError (LookupError)      no adapter of that name in the catalog
 |    +-- NotResidentError                    no adapter of that name is loaded in a runtime
 +-- AdapterExistsError (ValueError)         the name is taken
 +-- BaseModelError (ValueError)             a base checkpoint cannot be read or matched
 +-- UnknownMethodError (LookupError)        a method name that no registry knows
 +-- InvalidOptionError (ValueError)         an option value out of range or missing for a method
 |    +-- TrainingDataError                  a training data file has a bad line (``path``, ``line``)
 +-- ComposeError                            a recipe step failed (its outputs were removed again)
 +-- CatalogError                            the catalog database cannot be used
 |    +-- CatalogVersionError                the catalog was written by a newer adapterhub
 +-- OutputExistsError (FileExistsError)     an output folder is already there (merge never overwrites)
 +-- StoreError (OSError)                    the content-addressed store is damaged
 +-- RemoteError                             a Hub server refused or failed a request
 +-- TokenError (ValueError)                 a server token cannot be made, found or revoked
 +-- RepoError                               a hosted-repo request is refused (the server maps each
      |                                      subclass to the Hub's HTTP status and X-Error-Code)
      +-- BadRequestError (ValueError)        400: a malformed request body, path or parameter
      +-- UnauthorizedError (PermissionError) 401: a token is required or invalid
      +-- ForbiddenError (PermissionError)    403: the token may not write there
      +-- RepoNotFoundError (LookupError)     404 RepoNotFound (also for a private repo one may not read)
      +-- RevisionNotFoundError (LookupError) 404 RevisionNotFound
      +-- EntryNotFoundError (LookupError)    404 EntryNotFound
      +-- ConflictError                       409: the repo, branch or tag already exists
      +-- PayloadTooLargeError                413: a body over the server's limit
      +-- PreconditionFailedError             412: the parent commit is no longer the branch head
      +-- EndpointNotFoundError (LookupError) 404: no such route on this server
```

Every error carries a message that says what was wrong and how to fix it. The CLI catches
`AdapterHubError` once and prints the message with exit code 1.
"""

from __future__ import annotations


class AdapterHubError(Exception):
    """Base class of every error adapterhub raises on purpose."""


class InvalidAdapterError(AdapterHubError, ValueError):
    def __init__(self, message: str, *, path: str | None = None, module: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.module = module


class PickleRefusedError(InvalidAdapterError):
    pass


class InvalidConfigError(AdapterHubError, ValueError):
    def __init__(self, message: str, *, path: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class IncompatibleAdapterError(AdapterHubError, ValueError):
    def __init__(self, message: str, *, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class AdapterNotFoundError(AdapterHubError, LookupError):
    def __init__(self, name: str, *, path_too: bool = False) -> None:
        where = " and no file or folder at that path" if path_too else ""
        super().__init__(
            f"no adapter named {name!r} in the catalog{where}; `adapterhub list` shows what is there"
        )
        self.name = name

    def __str__(self) -> str:  # LookupError would repr() the message otherwise
        return str(self.args[0])


class NotResidentError(AdapterNotFoundError):
    """A runtime was asked for an adapter that is not loaded in it."""

    def __init__(self, name: str, resident: tuple[str, ...] = ()) -> None:
        shown = ", ".join(sorted(resident)[:10]) or "none"
        AdapterHubError.__init__(
            self, f"no adapter named {name!r} is resident; load it with rt.load() first (resident: {shown})"
        )
        self.name = name
        self.resident = resident


class AdapterExistsError(AdapterHubError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(
            f"an adapter named {name!r} is already cataloged; pick another --name or remove it first"
        )
        self.name = name


class BaseModelError(AdapterHubError, ValueError):
    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class UnknownMethodError(AdapterHubError, LookupError):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown method {name!r}; known methods: {', '.join(sorted(known))}")
        self.name = name
        self.known = known

    def __str__(self) -> str:
        return str(self.args[0])


class InvalidOptionError(AdapterHubError, ValueError):
    pass


class TrainingDataError(InvalidOptionError):
    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.line = line


class ComposeError(AdapterHubError):
    def __init__(self, message: str, *, step: str, cause: BaseException) -> None:
        super().__init__(message)
        self.step = step
        self.cause = cause


class CatalogError(AdapterHubError):
    pass


class CatalogVersionError(CatalogError):
    pass


class OutputExistsError(AdapterHubError, FileExistsError):
    pass


class StoreError(AdapterHubError, OSError):
    pass


class RemoteError(AdapterHubError):
    pass


class RecipeError(InvalidConfigError):
    """A recipe that breaks the schema or refers to something that is not there."""


class TokenError(AdapterHubError, ValueError):
    pass


class RepoError(AdapterHubError):
    """A request on a hosted repo that the server refuses; ``status`` is the HTTP status it maps to."""

    status = 400
    code: str | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})

    def __str__(self) -> str:
        return self.message


class BadRequestError(RepoError, ValueError):
    status = 400


class UnauthorizedError(RepoError, PermissionError):
    status = 401


class ForbiddenError(RepoError, PermissionError):
    status = 403


class RepoNotFoundError(RepoError, LookupError):
    status = 404
    code = "RepoNotFound"

    def __init__(self, repo_id: str) -> None:
        super().__init__(
            f"Repository not found: {repo_id} does not exist, or it is private and the request carries no "
            "token of its owner"
        )
        self.repo_id = repo_id


class RevisionNotFoundError(RepoError, LookupError):
    status = 404
    code = "RevisionNotFound"

    def __init__(self, repo_id: str, revision: str) -> None:
        super().__init__(f"Invalid rev id: {revision} is not a branch, tag or commit of {repo_id}")
        self.repo_id = repo_id
        self.revision = revision


class EntryNotFoundError(RepoError, LookupError):
    status = 404
    code = "EntryNotFound"

    def __init__(self, path: str, commit: str | None = None) -> None:
        super().__init__(f"Entry not found: {path}", headers={"X-Repo-Commit": commit} if commit else None)
        self.path = path
        self.commit = commit


class ConflictError(RepoError):
    status = 409


class PayloadTooLargeError(RepoError):
    status = 413

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} is larger than this server accepts ({limit:,} bytes)")
        self.limit = limit


class PreconditionFailedError(RepoError):
    """412: the commit names a parent commit that is no longer the head of its branch."""

    status = 412


class EndpointNotFoundError(RepoError, LookupError):
    """404 with no X-Error-Code: the server has no such route (the Hub answers so too)."""

    status = 404
