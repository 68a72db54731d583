"""What the pages read from the app: the home's `Hub` (as the narrow protocol the pages use, so this
package never imports `adapterhub.hub`, which imports the server) and the API's `ServerStore`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from fastapi import Request

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ...lora import LoraWeights
    from ...ops.validate import ValidationReport
    from ...records import AdapterInfo, BaseInfo, EvaluationRecord, FilterKeywords
    from ..storage import ServerStore


class CatalogHub(Protocol):
    """The part of `adapterhub.Hub` the pages call."""

    home: Path

    def adapter_records_json(
        self,
        query: str | None = None,
        *,
        compatible_with: str | None = None,
        **filters: Unpack[FilterKeywords],
    ) -> list[str]: ...
    def adapter_info(self, name: str) -> AdapterInfo: ...
    def load_adapter(self, name: str) -> LoraWeights: ...
    def list_bases(self) -> list[BaseInfo]: ...
    def validate_catalog(
        self, *, base: str, names: Sequence[str] | None = None
    ) -> list[ValidationReport]: ...
    def evaluations(
        self, adapter: str | None = None, *, dataset: str | None = None, metric: str | None = None,
        base: str | None = None,
    ) -> list[EvaluationRecord]: ...  # fmt: skip


def hub_of(request: Request) -> CatalogHub:
    hub: CatalogHub = request.app.state.hub
    return hub


def store_of(request: Request) -> ServerStore:
    store: ServerStore = request.app.state.server.store
    return store
