"""Test-only launcher: the server's app (`create_app`) with the web pages mounted (`mount_pages`), on a
free port of 127.0.0.1. Prints the URL on its first line, then serves until terminated.

Usage: python tests/_pages_server.py HOME
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path


def main(home: Path) -> None:
    import uvicorn

    from adapterhub import Hub
    from adapterhub.server import create_app, server_store
    from adapterhub.server.pages import mount_pages

    hub = Hub(home)
    app = create_app(server_store(hub.catalog, home))
    mount_pages(app, hub)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(app, log_level="warning", http="h11", lifespan="off", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
