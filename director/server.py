"""Running the Director under uvicorn: the HTTP protocol and the limits on hostile clients.

The Director serves a fleet, so every connection is a possible attacker
(DESIGN 6; issue 12). ``DirectorProtocol`` is uvicorn's httptools protocol
(on uvloop: the lowest server CPU per request of the stacks measured, see
``docs/director-scale.md``) with:

- TCP_NODELAY on every connection (asyncio only sets it on sockets it
  creates itself; with ``--workers`` uvicorn binds the socket, and every
  keep-alive request would stall for the peer's delayed ACK);
- a header timeout: a request's headers must be complete within
  ``header_timeout`` of its first byte, and a new connection must send them
  within that time too (slowloris, idle connections);
- a cap on header bytes (``max_header_bytes``: 431);
- at most ``max_connections`` open connections per listener of a process:
  the next ones are closed at once (on a TLS listener counted from accept,
  the handshake included, by ``director.tls_accept``; here only from
  ``connection_made``);
- at most ``max_connections_per_address`` open connections from one peer
  address (an IPv6 peer: its /64) per process, when set: one host cannot
  take every slot of ``max_connections`` (``PeerCounts``; counted the same
  way);
- uvicorn's keep-alive timeout between requests;
- errors of the HTTP layer as JSON like every other Director answer;
- on a TLS listener, the VIN, serial and expiry of the verified client certificate
  in each request's scope (``extensions["tls"]["client_vin"]``, ``["client_serial"]``,
  ``["client_not_after"]``, see ``director.tls`` and ``director.revocation``).

Body read timeouts and the in-flight body memory budget are in
``director.app.GuardMiddleware`` (they need the ASGI view of the body).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


@dataclass(frozen=True)
class ConnectionLimits:
    """Per-process limits on connections (seconds and bytes)."""

    header_timeout: float = 10.0
    max_header_bytes: int = 65_536
    max_connections: int = 1000
    keep_alive_timeout: float = 5.0
    max_connections_per_address: int = 0  # 0: no limit per peer address


def peer_key(peer: object) -> str | None:
    """The address a peer (``get_extra_info("peername")``) is counted under.

    Its IP; one IPv6 host usually holds a whole /64, so an IPv6 peer counts
    as its /64, and an IPv4-mapped IPv6 address as its IPv4 address. None for
    a peer that is not on IP (a Unix socket): not limited.
    """
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return None
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class PeerCounts:
    """Open connections per peer address in one server process (DESIGN 6; issue 12)."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def take(self, peer: object, limit: int) -> tuple[bool, str | None]:
        """Count a new connection from ``peer`` (its transport's ``peername``).

        Returns (allowed, the key to ``release`` later or None).

        With ``limit`` 0 nothing is counted; a connection over ``limit`` is
        not counted and must be closed at once.
        """
        if limit <= 0:
            return True, None
        key = peer_key(peer)
        if key is None:
            return True, None
        held = self._open.get(key, 0)
        if held >= limit:
            return False, None
        self._open[key] = held + 1
        return True, key

    def release(self, key: str | None) -> None:
        """The connection counted under ``key`` is closed."""
        if key is None:
            return
        left = self._open.get(key, 0) - 1
        if left > 0:
            self._open[key] = left
        else:
            self._open.pop(key, None)

    def open(self, key: str) -> int:
        """Connections open now under ``key``."""
        return self._open.get(key, 0)


def _nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # e.g. the peer is already gone
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _json_answer(status: int, reason: str, error: str, detail: str) -> bytes:
    body = json.dumps({"error": error, "detail": detail}).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class DirectorProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the Director's connection limits."""

    limits: ClassVar[ConnectionLimits] = ConnectionLimits()
    # this process's open connections per peer address, TLS listeners' included
    # (``director.tls_accept`` counts those from accept)
    peers: ClassVar[PeerCounts] = PeerCounts()

    _header_timer: asyncio.TimerHandle | None = None
    _header_bytes = 0  # bytes received since the request began, while in its headers
    _header_size = 0  # bytes of the request line and headers parsed
    _headers_too_large = False
    _in_headers = True
    _tls: dict[str, str | None] | None = None  # TLS connections: the client certificate's VIN
    _peer: str | None = None  # the key this connection is counted under (plain listeners)

    @classmethod
    def configure(cls, limits: ConnectionLimits) -> None:
        """Set the limits of every connection this process accepts from now on."""
        cls.limits = limits

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _nodelay(transport)
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # called once the handshake verified any client certificate
            from director.tls import peer_not_after, peer_serial, peer_vin

            self._tls = {
                "client_vin": peer_vin(ssl_object),
                "client_serial": peer_serial(ssl_object),
                "client_not_after": peer_not_after(ssl_object),
            }
        if len(self.connections) > self.limits.max_connections:
            transport.close()  # over the limit: no request is read from it
            return
        if ssl_object is None:  # a TLS connection was counted at accept (tls_accept)
            allowed, self._peer = self.peers.take(
                transport.get_extra_info("peername"), self.limits.max_connections_per_address
            )
            if not allowed:
                transport.close()  # this address holds its share: no request is read
                return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        peer, self._peer = self._peer, None
        self.peers.release(peer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_headers:
            self._header_bytes += len(data)
        super().data_received(data)  # the body may follow the headers in the same read
        if (
            self._in_headers
            and self._header_bytes > self.limits.max_header_bytes
            and not self.transport.is_closing()
        ):
            self._answer_and_close(
                431, "Request Header Fields Too Large", "too_large", "request headers too large"
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": dict(self._tls)}  # type: ignore[dict-item]
        self._in_headers = True
        self._header_bytes = 0
        self._header_size = 0
        self._arm_header_timer()

    def on_url(self, url: bytes) -> None:
        self._header_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._cancel_header_timer()
        if self._header_size > self.limits.max_header_bytes:
            # raising stops the parser: httptools turns it into HttpParserCallbackError,
            # which uvicorn answers with send_400_response
            self._headers_too_large = True
            raise ValueError("request headers too large")
        super().on_headers_complete()

    def send_400_response(self, msg: str) -> None:
        if self._headers_too_large:
            self._answer_and_close(
                431, "Request Header Fields Too Large", "too_large", "request headers too large"
            )
        else:
            self._answer_and_close(400, "Bad Request", "malformed", msg)

    # --- internals -------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            self._answer_and_close(
                408, "Request Timeout", "timeout", "request headers not received in time"
            )
        else:
            self.transport.close()

    def _answer_and_close(self, status: int, reason: str, error: str, detail: str) -> None:
        self._cancel_header_timer()
        if not self.transport.is_closing():
            self.transport.write(_json_answer(status, reason, error, detail))
            self.transport.close()


class NoDelayH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with TCP_NODELAY set on the connection."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        _nodelay(transport)
        super().connection_made(transport)
