"""Test-only launcher: the server's app (`create_app`) with the OpenAI-compatible API mounted
(`mount_inference`), on a free port of 127.0.0.1. Prints the URL on its first line, then serves until
terminated.

Usage: python tests/_serve_launcher.py HOME BASE [--require-token] [--max-batch N] [--adapter-memory SIZE]
       [--max-queue N]
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("home", type=Path)
    p.add_argument("base")
    p.add_argument("--require-token", action="store_true")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=512)
    p.add_argument("--adapter-memory", default=None)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    import torch
    import uvicorn

    if args.threads:
        torch.set_num_threads(args.threads)
    from adapterhub import Hub
    from adapterhub.server import create_app, server_store
    from adapterhub.server.inference import mount_inference

    hub = Hub(args.home)
    app = create_app(server_store(hub.catalog, args.home))
    mount_inference(
        app,
        hub,
        model=args.base,
        device="cpu",
        max_batch=args.max_batch,
        adapter_memory=args.adapter_memory,
        require_token=args.require_token,
        max_queue=args.max_queue,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    from adapterhub.server.timed import TimedH11

    config = uvicorn.Config(app, log_level="warning", http=TimedH11, lifespan="on", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
