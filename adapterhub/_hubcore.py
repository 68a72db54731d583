"""`HubCore`: what the capability mixins of `Hub` (bases, ops, remote) may call on `self`.

`Hub` (hub.py) implements the catalog core; each mixin adds one capability. This class only tells the
type checker what they share, so no mixin repeats those declarations.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import Catalog
    from .formats import AdapterFiles
    from .lora import LoraWeights
    from .ops.validate import BaseLayout
    from .records import AdapterInfo
    from .store import Store


class HubCore:
    if TYPE_CHECKING:
        home: Path
        store: Store

        @property
        def catalog(self) -> Catalog: ...
        def adapter_info(self, name: str) -> AdapterInfo: ...
        def adapter_files(self, name: str) -> AdapterFiles: ...
        def remove_adapters(self, names: Sequence[str]) -> list[str]: ...
        def _exists(self, name: str) -> bool: ...
        def _catalog_files(
            self,
            name: str,
            files: AdapterFiles,
            weights: LoraWeights,
            *,
            base: str | None,
            tags: Sequence[str],
            description: str | None,
            source: str | None,
            parents: Sequence[dict[str, Any]] = (),
        ) -> AdapterInfo: ...
        def base_layout(self, base: str | os.PathLike[str]) -> BaseLayout: ...
        def _fingerprint_of(self, model_name: str | None) -> str | None: ...
