"""Loopback HTTP for the simulator and tests: a switchable, tamperable ASGI front.

``Switchboard`` sits in front of a real app (the Director's FastAPI app, the
Image repository's starlette app) under one uvicorn server that lives for
the whole test session. A test swaps in its own app and, to play the
attacker in the network or on a compromised server, overrides what one path
returns: other bytes, an endless stream, a slow trickle.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

Override = bytes | Callable[[], Response]


@dataclass
class Switchboard:
    """ASGI app forwarding to ``app`` unless ``overrides`` has the request path."""

    app: ASGIApp | None = None
    overrides: dict[str, Override] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def reset(self, app: ASGIApp | None = None) -> None:
        self.app = app
        self.overrides.clear()
        self.requests.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        path: str = scope.get("path", "")
        self.requests.append((scope.get("method", ""), path))
        override = self.overrides.get(path)
        if override is not None:
            response = Response(override) if isinstance(override, bytes) else override()
            await response(scope, receive, send)
            return
        if self.app is None:
            await Response(b"no app", status_code=503)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def endless(chunk: bytes = b"\0" * 65536) -> Callable[[], Response]:
    """A response that never ends (endless data, Uptane 2.1, 4.3.2)."""

    async def body() -> AsyncIterator[bytes]:
        while True:
            yield chunk
            await asyncio.sleep(0)

    return lambda: StreamingResponse(body(), media_type="application/octet-stream")


def trickle(data: bytes, piece: int = 8, delay: float = 0.05) -> Callable[[], Response]:
    """``data`` sent ``piece`` bytes every ``delay`` seconds (slow retrieval, 4.3.1)."""

    async def body() -> AsyncIterator[bytes]:
        for i in range(0, len(data), piece):
            yield data[i : i + piece]
            await asyncio.sleep(delay)

    return lambda: StreamingResponse(body(), media_type="application/octet-stream")


def fixed(data: bytes, status: int = 200, **headers: Any) -> Callable[[], Response]:
    return lambda: Response(data, status_code=status, headers=headers or None)


@contextmanager
def serve(app: ASGIApp) -> Iterator[str]:
    """Run ``app`` under uvicorn in a thread on 127.0.0.1 (free port); yields its URL.

    The listening socket is created with ``IPPROTO_TCP`` so that asyncio sets
    ``TCP_NODELAY`` on accepted connections (it checks ``sock.proto``);
    without it every response waits ~40 ms on delayed ACKs.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def truncated(data: bytes, keep: int) -> Callable[[], Response]:
    """Announce ``len(data)`` bytes but close after ``keep`` (a broken download)."""

    async def body() -> AsyncIterator[bytes]:
        yield data[:keep]
        raise ConnectionResetError("truncated on purpose")

    return lambda: StreamingResponse(
        body(),
        media_type="application/octet-stream",
        headers={"content-length": str(len(data))},
    )


def unavailable(status: int = 503) -> Callable[[], Response]:
    """The server drops the request (drop-request attack, Uptane 2.1, 4.3.1)."""
    return lambda: Response(b"dropped", status_code=status)
