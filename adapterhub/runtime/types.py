"""The runtime's public value types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: what `Runtime.activate` and `Runtime.rows` take for one row: a resident name, None for the base
#: model, or an exact linear combination ``{name: weight}`` of resident adapters
AdapterSpec = str | None | Mapping[str, float]


@dataclass(frozen=True)
class ResidentAdapter:
    """One name bound to resident content."""

    name: str
    sha256: str  # content hash (see `content_sha256`), or the one given to `Runtime.load`
    bytes: int  # device memory of its own factors (shared with other names of the same content)
    device: str
    modules: int  # modules it adapts or replaces
    rank: int
    dora: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "device": self.device,
            "modules": self.modules,
            "rank": self.rank,
            "dora": self.dora,
        }
