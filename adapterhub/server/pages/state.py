"""What the pages read from the app: the home's `Hub` and the API's `ServerStore`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from ...hub import Hub
    from ..storage import ServerStore


def hub_of(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


def store_of(request: Request) -> ServerStore:
    store: ServerStore = request.app.state.server.store
    return store
