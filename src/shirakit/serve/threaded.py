"""uvicorn on a thread bound to one address (tests and benchmarks): both engines' ``start_*server`` use it."""

from __future__ import annotations

import socket
import threading
import time
from typing import Callable


def serve_on_thread(app, host: str, port: int, timeout: float, on_failure: Callable[[], None]):
    """Run ``app`` under uvicorn on a daemon thread; return ``(url, server, thread)`` once it accepts
    connections. ``port`` 0 picks a free one. If it does not start within ``timeout`` seconds (or its
    thread dies), ``on_failure`` runs (stop the engine behind it) and RuntimeError is raised."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="shirakit-http")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            on_failure()
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    return f"http://{host}:{sock.getsockname()[1]}", server, thread
