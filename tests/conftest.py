"""Shared pytest fixtures (keep small and generic)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvicorn

pytest_plugins = ["ecus.sim.fixtures", "helpers.director_env"]


@pytest.fixture
def asgi_server() -> Iterator[Callable[[Any], str]]:
    """Run ASGI apps under uvicorn in threads on 127.0.0.1 (free port).

    Usage: ``base_url = asgi_server(app)``; every server started this way is
    stopped at the end of the test.
    """
    running: list[tuple[uvicorn.Server, threading.Thread, socket.socket]] = []

    def start(app: Any) -> str:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        running.append((server, thread, sock))
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ASGI server did not start")
            time.sleep(0.01)
        return f"http://127.0.0.1:{port}"

    yield start
    for server, thread, sock in running:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
