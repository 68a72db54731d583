"""``adapterhub serve``: a Hub-compatible adapter server over the catalog database of a home folder.

Importing this package is light; FastAPI and uvicorn (the ``serve`` extra) load in `serve` and `app`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AdapterHubError
from ..store import open_store

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ..catalog import Catalog
    from .storage import ServerStore

__all__ = ["create_app", "serve", "server_store"]

log = logging.getLogger(__name__)


def server_store(catalog: Catalog, home: Path) -> ServerStore:
    """The server's repos and tokens in ``catalog``, file contents under ``HOME/server``."""
    from .storage import ServerStore

    return ServerStore(catalog, open_store(home / "server", name="server"))


def create_app(store: ServerStore) -> FastAPI:
    """The FastAPI app of the Hub-compatible API over ``store`` (needs the ``serve`` extra)."""
    from .app import create_app as make

    return make(store)


def serve(
    catalog: Catalog,
    home: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    ready: Callable[[str], None] | None = None,
    log_level: str = "warning",
    mount: Callable[[FastAPI], None] | None = None,
) -> None:
    """Serve until interrupted. ``port=0`` picks a free port; ``ready`` gets the URL once it listens;
    ``mount`` adds more to the app first (the Hub mounts the web pages and the /v1 inference API)."""
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
    config = uvicorn.Config(app, log_level=log_level, http=os.environ.get("ADAPTERHUB_SERVE_HTTP", "h11"),
                            loop=os.environ.get("ADAPTERHUB_SERVE_LOOP", "auto"), access_log=log_level in ("debug", "info"), lifespan="off",
                            timeout_keep_alive=30, h11_max_incomplete_event_size=64 * 1024)  # fmt: skip
    server = uvicorn.Server(config)
    if ready is not None:
        ready(url)
    log.info("serving %s on %s", home, url)
    server.run(sockets=[sock])
