"""Serving the two mutual-TLS listeners (``serve --tls``), in one process or in N workers.

``serve --tls`` runs the vehicle listener and the operator listener of
``director.tls.listener_configs`` in one uvloop event loop
(``serve_listeners``); with ``--workers N`` each of N worker processes does
(``director.workers``: per worker its own listening sockets with SO_REUSEPORT,
the parent's process management). In every process:

- every accepted connection counts against ``max_connections`` from accept to close,
  its TLS handshake included, and the handshake is bounded by ``header_timeout``
  (``director.tls_accept.HandshakeBoundLoop``);
- SIGTERM or SIGINT stops every listener of the process gracefully (a second SIGINT
  cuts the connections in flight), and a worker whose parent is gone stops within
  ``PARENT_CHECK_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
import uvloop

from director.tls_accept import HandshakeBoundLoop

PARENT_CHECK_SECONDS = 1.0  # a worker checks this often that its parent still runs


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to ``serve_listeners`` (which stops every
    server of the process on the first signal; uvicorn's own handler would stop only
    the server that installed it last, and re-raise the signal after shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_listeners(
    configs: Sequence[uvicorn.Config],
    sockets: Sequence[socket.socket] | None = None,
    parent: int | None = None,
) -> bool:
    """Serve every config in one uvloop event loop, on ``sockets`` (one each) if given,
    until SIGTERM/SIGINT (a second SIGINT cuts connections in flight) or until ``parent``
    is no longer this process's parent. True if every server started and stopped because
    it was asked to; False if one failed or stopped on its own (the others are then
    stopped too)."""
    servers = [_Server(c) for c in configs]
    asked = False

    def stop(force: bool = False) -> None:
        for s in servers:
            s.should_exit = True
            s.force_exit = s.force_exit or force

    async def main() -> bool:
        nonlocal asked
        loop = asyncio.get_running_loop()
        interrupts = 0

        def on_signal(sig: int) -> None:
            nonlocal asked, interrupts
            asked = True
            interrupts += sig == signal.SIGINT
            stop(force=interrupts > 1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        tasks = [
            asyncio.ensure_future(s.serve(sockets=None if sockets is None else [sockets[i]]))
            for i, s in enumerate(servers)
        ]

        async def watch_parent() -> None:
            nonlocal asked
            while os.getppid() == parent:
                await asyncio.sleep(PARENT_CHECK_SECONDS)
            asked = True
            stop()

        watcher = asyncio.ensure_future(watch_parent()) if parent is not None else None
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()  # one server ended: the others end too
        results = await asyncio.gather(*tasks, return_exceptions=True)
        if watcher is not None:
            watcher.cancel()
        for config, result in zip(configs, results, strict=True):
            if isinstance(result, BaseException):  # e.g. the TLS key does not fit the cert
                text = " ".join(str(result).split()) or type(result).__name__
                print(f"listener on port {config.port}: {text}", file=sys.stderr)
        return all(s.started for s in servers) and not any(
            isinstance(r, BaseException) for r in results
        )

    served = uvloop.run(main(), loop_factory=HandshakeBoundLoop)
    return served and asked


@contextlib.contextmanager
def vehicle_listener(
    app: Any, directory: Path, host: str = "127.0.0.1", revocations: Any = "app"
) -> Iterator[str]:
    """The vehicle listener alone, in a thread on a free port (tests, ``World(tls=True)``):
    ``app`` behind ``ListenerGate(VEHICLE)``, client certificates from the Director CA
    required, revoked ones refused (``revocations`` as for ``listener_configs``); yields
    ``https://host:port``."""
    import threading

    from director.server import DirectorProtocol
    from director.tls import listener_configs, tls_paths

    ca, cert, key = tls_paths(directory)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    (config,) = listener_configs(
        app,
        host=host,
        port=sock.getsockname()[1],
        operator_port=0,
        cert=cert,
        key=key,
        ca=ca,
        revocations=revocations,
        http=DirectorProtocol,
        loop="director.tls_accept:HandshakeBoundLoop",
        log_level="warning",
    )[:1]
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("TLS listener thread exited before it started")
            threading.Event().wait(0.01)
        yield f"https://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
