"""adapterhub: catalog, validate, merge, combine, share and run LoRA adapters.

Every public name is exported here, lazily (PEP 562): importing this package imports neither torch nor
SQLAlchemy; each name's module loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # the API
    "Hub": "hub",
    "default_home": "home",
    # the in-memory adapter
    "LoraModule": "lora",
    "LoraWeights": "lora",
    # records and results
    "AdapterFilter": "records",
    "AdapterInfo": "records",
    "BaseInfo": "records",
    "BulkAddResult": "records",
    "BulkItem": "records",
    "CheckReport": "records",
    "GcReport": "records",
    "Problem": "records",
    "FileInfo": "records",
    "MergeRecord": "records",
    "ModuleInfo": "records",
    "ParentInfo": "records",
    "PushRecord": "records",
    "BaseLayout": "ops.validate",
    "Check": "ops.validate",
    "ValidationReport": "ops.validate",
    "MergeResult": "ops.merge",
    "CombineResult": "ops.result",
    "CombineSummary": "services.compute",
    "ComposeResult": "compose",
    "NewToken": "remote.results",
    "PullResult": "remote.results",
    "PushResult": "remote.results",
    "RemoteAdapter": "remote.results",
    "TrainResult": "services.training",
    "MemoryPlan": "services.train_plan",
    "Generation": "records",
    # errors
    "AdapterExistsError": "errors",
    "AdapterHubError": "errors",
    "AdapterNotFoundError": "errors",
    "BadRequestError": "errors",
    "BaseModelError": "errors",
    "CatalogError": "errors",
    "CatalogVersionError": "errors",
    "ComposeError": "errors",
    "ConflictError": "errors",
    "EndpointNotFoundError": "errors",
    "EntryNotFoundError": "errors",
    "ForbiddenError": "errors",
    "IncompatibleAdapterError": "errors",
    "InvalidAdapterError": "errors",
    "InvalidConfigError": "errors",
    "InvalidOptionError": "errors",
    "NotResidentError": "errors",
    "OutputExistsError": "errors",
    "PayloadTooLargeError": "errors",
    "PickleRefusedError": "errors",
    "PreconditionFailedError": "errors",
    "RecipeError": "errors",
    "RemoteError": "errors",
    "RepoError": "errors",
    "RepoNotFoundError": "errors",
    "RevisionNotFoundError": "errors",
    "StoreError": "errors",
    "TokenError": "errors",
    "TrainingDataError": "errors",
    "UnauthorizedError": "errors",
    "UnknownMethodError": "errors",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:
    from .compose import ComposeResult
    from .errors import (
        AdapterExistsError,
        AdapterHubError,
        AdapterNotFoundError,
        BadRequestError,
        BaseModelError,
        CatalogError,
        CatalogVersionError,
        ComposeError,
        ConflictError,
        EndpointNotFoundError,
        EntryNotFoundError,
        ForbiddenError,
        IncompatibleAdapterError,
        InvalidAdapterError,
        InvalidConfigError,
        InvalidOptionError,
        NotResidentError,
        OutputExistsError,
        PayloadTooLargeError,
        PickleRefusedError,
        PreconditionFailedError,
        RecipeError,
        RemoteError,
        RepoError,
        RepoNotFoundError,
        RevisionNotFoundError,
        StoreError,
        TokenError,
        TrainingDataError,
        UnauthorizedError,
        UnknownMethodError,
    )
    from .home import default_home
    from .hub import Hub
    from .lora import LoraModule, LoraWeights
    from .ops.merge import MergeResult
    from .ops.result import CombineResult
    from .ops.validate import BaseLayout, Check, ValidationReport
    from .records import (
        AdapterFilter,
        AdapterInfo,
        BaseInfo,
        BulkAddResult,
        BulkItem,
        CheckReport,
        FileInfo,
        GcReport,
        Generation,
        MergeRecord,
        ModuleInfo,
        ParentInfo,
        Problem,
        PushRecord,
    )
    from .remote.results import NewToken, PullResult, PushResult, RemoteAdapter
    from .services.compute import CombineSummary
    from .services.train_plan import MemoryPlan
    from .services.training import TrainResult


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({n for n in globals() if n.startswith("__")} | set(__all__))
