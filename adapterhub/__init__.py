"""adapterhub: catalog, validate, merge, combine and share LoRA adapters.

Importing this package imports neither torch nor SQLAlchemy; they load when a call needs them.
"""

from __future__ import annotations

from .errors import (
    AdapterExistsError,
    AdapterHubError,
    AdapterNotFoundError,
    BaseModelError,
    CatalogError,
    CatalogVersionError,
    ComposeError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    InvalidConfigError,
    InvalidOptionError,
    OutputExistsError,
    PickleRefusedError,
    RemoteError,
    StoreError,
    UnknownMethodError,
)
from .hub import Hub, default_home
from .lora import LoraModule, LoraWeights
from .records import AdapterInfo, FileInfo, ModuleInfo, ParentInfo

__version__ = "0.1.0"

__all__ = [
    "AdapterExistsError",
    "AdapterHubError",
    "AdapterInfo",
    "AdapterNotFoundError",
    "BaseModelError",
    "CatalogError",
    "CatalogVersionError",
    "ComposeError",
    "FileInfo",
    "Hub",
    "IncompatibleAdapterError",
    "InvalidAdapterError",
    "InvalidConfigError",
    "InvalidOptionError",
    "OutputExistsError",
    "LoraModule",
    "LoraWeights",
    "ModuleInfo",
    "ParentInfo",
    "PickleRefusedError",
    "RemoteError",
    "StoreError",
    "UnknownMethodError",
    "__version__",
    "default_home",
]
