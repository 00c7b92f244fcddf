"""Running the Director under uvicorn (DESIGN 6).

``NoDelayH11Protocol`` turns Nagle's algorithm off on every connection.
asyncio only does that for sockets it creates itself; uvicorn binds the
listening socket itself when it runs several worker processes, and then each
keep-alive request stalls for the peer's delayed ACK (about 40 ms on Linux).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY set on the connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # e.g. the peer is already gone
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
