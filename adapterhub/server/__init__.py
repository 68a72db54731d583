"""``adapterhub serve``: a Hub-compatible adapter server over the catalog database of a home folder,
built on that home's `adapterhub.Hub` (the CLI's ``serve`` command calls `serve` with it, its ``token``
commands `adapterhub.server.tokens`).

All of the server's state is in the catalog (`adapterhub.catalog.hub*`) and its blob store, so two
``adapterhub serve`` processes on one database and one store act as one hub.

Importing this package is light; FastAPI and uvicorn (the ``serve`` extra) load in `serve` and `app`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AdapterHubError
from ..store import open_store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..catalog import Catalog
    from ..hub import Hub
    from .storage import ServerStore

__all__ = ["create_app", "serve", "serve_app", "server_store"]

log = logging.getLogger(__name__)


def server_store(catalog: Catalog, home: Path) -> ServerStore:
    """The server's state in ``catalog``, file contents under ``HOME/server``. State that older versions
    kept in files there is brought into the catalog the first time (`adapterhub.server.legacy`)."""
    from .legacy import import_files
    from .storage import ServerStore

    import_files(catalog, home / "server")
    return ServerStore(catalog, open_store(home / "server", name="server"))


def create_app(store: ServerStore) -> FastAPI:
    """The FastAPI app of the Hub-compatible API over ``store`` (needs the ``serve`` extra)."""
    from .app import create_app as make

    return make(store)


def serve(
    hub: Hub,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    model: str | None = None,
    **inference: Any,
) -> None:
    """Run the Hub-compatible server and its web pages on ``hub``'s home until interrupted (the ``serve``
    extra); with ``model``, also the OpenAI-compatible /v1 API over that base and the adapters that fit
    it (``inference``: the options of `adapterhub.server.inference.mount_inference`). ``port=0`` picks a
    free port; ``ready`` gets the URL once it listens."""

    def mount(app: FastAPI) -> None:
        from .pages import mount_pages

        mount_pages(app, hub)
        if model is not None:
            from .inference import mount_inference

            mount_inference(app, hub, model=model, **inference)

    serve_app(hub.catalog, hub.home, host=host, port=port, ready=ready, log_level=log_level, mount=mount)


def serve_app(
    catalog: Catalog,
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    mount: Callable[[FastAPI], None] | None = None,
) -> None:
    """Serve the Hub API over ``catalog`` and ``home`` until interrupted; ``mount`` adds more to the app
    first (`serve` mounts the web pages and the /v1 inference API)."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise AdapterHubError(
            f"adapterhub serve needs the 'serve' extra ({exc.name} is missing): pip install 'adapterhub[serve]'"
        ) from None
    app = create_app(server_store(catalog, home))
    if mount is not None:
        mount(app)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AdapterHubError(
            f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port"
        ) from None
    sock.listen(128)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    url = f"http://{shown}:{bound}"
    from .timed import TimedH11  # h11 with a deadline for each request's head

    http: Any = os.environ.get("ADAPTERHUB_SERVE_HTTP", "h11")
    config = uvicorn.Config(
        app,
        log_level=log_level,
        http=TimedH11 if http == "h11" else http,
        loop=os.environ.get("ADAPTERHUB_SERVE_LOOP", "auto"),
        access_log=log_level in ("debug", "info"),
        lifespan="off",
        timeout_keep_alive=30,
        h11_max_incomplete_event_size=64 * 1024,
    )
    server = uvicorn.Server(config)
    if ready is not None:
        ready(url)
    log.info("serving %s on %s", home, url)
    server.run(sockets=[sock])
