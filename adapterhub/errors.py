"""The one exception tree of adapterhub.

```
AdapterHubError
 +-- InvalidAdapterError (ValueError)        a file or folder is not a sound adapter
 |    +-- PickleRefusedError                 weights are a pickle and --allow-pickle was not given
 +-- InvalidConfigError (ValueError)         adapter_config.json or a recipe breaks its schema
 |    +-- RecipeError                        (adapterhub.compose) a recipe is malformed
 +-- IncompatibleAdapterError (ValueError)   adapters do not fit a base or each other
 +-- AdapterNotFoundError (LookupError)      no adapter of that name in the catalog
 +-- AdapterExistsError (ValueError)         the name is taken
 +-- BaseModelError (ValueError)             a base checkpoint cannot be read or matched
 +-- UnknownMethodError (LookupError)        a method name that no registry knows
 +-- InvalidOptionError (ValueError)         an option value out of range or missing for a method
 +-- ComposeError                            a recipe step failed (its outputs were removed again)
 +-- CatalogError                            the catalog database cannot be used
 |    +-- CatalogVersionError                the catalog was written by a newer adapterhub
 +-- OutputExistsError (FileExistsError)     an output folder is already there (merge never overwrites)
 +-- StoreError (OSError)                    the content-addressed store is damaged
 +-- RemoteError                             a Hub server refused or failed a request
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
    def __init__(self, name: str) -> None:
        super().__init__(f"no adapter named {name!r} in the catalog; `adapterhub list` shows what is there")
        self.name = name

    def __str__(self) -> str:  # LookupError would repr() the message otherwise
        return str(self.args[0])


class AdapterExistsError(AdapterHubError, ValueError):
    def __init__(self, name: str) -> None:
        super().__init__(f"an adapter named {name!r} is already cataloged; pick another --name or remove it first")
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
