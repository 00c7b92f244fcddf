"""TLS listeners whose connections count against ``max_connections`` from accept to close.

asyncio and uvloop call a TLS server's protocol ``connection_made`` only once the
TLS handshake is done, so ``DirectorProtocol`` alone counts no connection still in
its handshake: a client that opens thousands of TCP connections and never finishes
(or stalls in) the handshake holds a socket and the handshake's memory for each, in
number unbounded (issue 12, "Hostile connections"). Here a TLS listener is a plain
TCP server (``HandshakeBoundLoop.create_server``) whose protocol, ``_Accepted``:

- counts the connection at accept, per listener, until its socket is closed
  (handshake, requests and all);
- closes a connection over ``max_connections``, or over
  ``max_connections_per_address`` from its peer address, at once, before any
  TLS work;
- otherwise runs the handshake itself (``loop.start_tls``, server side, bounded by
  ``header_timeout``) and, once it succeeded, creates the listener's HTTP protocol
  (uvicorn's ``DirectorProtocol``) and hands it the TLS transport, whose
  ``ssl_object``/``peercert``/``sslcontext`` carry the verified client certificate
  as on an ``ssl=`` server; a failed or timed-out handshake closes the socket and
  releases the count (no HTTP protocol was made for it).

Nothing raises out of the protocol factory (that would close the server), and the
count is released once per connection whichever way it ends.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Any

import uvloop


class _Listener:
    """One TLS listener: its HTTP protocol factory, TLS context and open connections."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        shutdown_timeout: float | None = None,
    ) -> None:
        self.loop = loop
        self.factory = factory
        self.context = context
        self.shutdown_timeout = shutdown_timeout
        self.open = 0  # accepted connections whose socket is not closed yet
        self.handshakes: set[asyncio.Task[None]] = set()  # strong references
        self.server: asyncio.AbstractServer | None = None

    def accept(self) -> asyncio.Protocol:
        """The protocol factory of the plain TCP server (must not raise)."""
        return _Accepted(self)


class _Accepted(asyncio.Protocol):
    """One accepted connection: counted, its handshake run, then the HTTP protocol fed.

    The protocol of the plain TCP transport until ``start_tls`` puts the TLS layer
    there, then the protocol of the TLS transport (passing on to the HTTP one)."""

    def __init__(self, listener: _Listener) -> None:
        self.listener = listener
        self.counted = False
        self.peer: str | None = None  # counted under this peer address (``PeerCounts``)
        self.raw: asyncio.Transport | None = None
        self.wrapped = False  # start_tls took the TCP transport: data now comes decrypted
        self.hello: list[bytes] = []  # TCP bytes read before start_tls took the transport
        self.early: list[bytes] = []  # decrypted bytes read before the HTTP protocol was made
        self.app: asyncio.Protocol | None = None  # the HTTP protocol, after the handshake

    def release(self) -> None:
        if self.counted:
            from director.server import DirectorProtocol

            self.counted = False
            self.listener.open -= 1
            peer, self.peer = self.peer, None
            DirectorProtocol.peers.release(peer)

    # a stream server's transport (uvloop's TCPTransport has asyncio.Transport's methods
    # without subclassing it), narrower than BaseProtocol's BaseTransport
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        from director.server import DirectorProtocol

        listener = self.listener
        self.counted = True
        listener.open += 1
        limits = DirectorProtocol.limits
        if listener.open > limits.max_connections:
            transport.close()  # over the limit: no TLS work, released in connection_lost
            return
        allowed, self.peer = DirectorProtocol.peers.take(
            transport.get_extra_info("peername"), limits.max_connections_per_address
        )
        if not allowed:
            transport.close()  # this address holds its share: no TLS work
            return
        self.raw = transport
        task = listener.loop.create_task(self._handshake(transport, limits.header_timeout))
        listener.handshakes.add(task)
        task.add_done_callback(listener.handshakes.discard)

    async def _handshake(self, raw: asyncio.Transport, timeout: float) -> None:
        listener = self.listener
        if not self.counted or raw.is_closing():  # gone before the handshake began
            self.release()
            return
        self.wrapped = True
        # runs after start_tls put its TLS protocol on the transport and before that
        # protocol's connection_made starts the handshake (call_soon is first in,
        # first out): bytes given to it then are only stored, read by the handshake
        listener.loop.call_soon(self._replay_hello, raw)
        try:
            tls = await listener.loop.start_tls(
                raw,
                self,
                listener.context,
                server_side=True,
                ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=listener.shutdown_timeout,
            )
        except Exception:  # failed (a certificate refused), timed out, reset: closed
            raw.close()  # start_tls closed it already: a no-op then
            self.release()
            return
        except BaseException:  # cancelled: the event loop is ending
            self.release()
            raise
        if tls is None or tls.is_closing() or not self.counted:
            self.release()  # the connection ended with its handshake
            return
        server = listener.server
        if server is not None and not server.is_serving():
            tls.close()  # the server is stopping: no new connection is served
            return
        app = listener.factory()
        self.app = app
        app.connection_made(tls)
        early, self.early = self.early, []
        for data in early:
            app.data_received(data)

    def _replay_hello(self, raw: asyncio.Transport) -> None:
        """Give the TLS protocol the bytes read before it took the transport (uvloop
        reads a new connection as soon as ``connection_made`` returns, before the
        handshake task runs: typically the whole ClientHello). It stores them as
        received bytes; its handshake, started next, reads them first."""
        hello, self.hello = self.hello, []
        tls: Any = raw.get_protocol()  # uvloop's is buffered, not an asyncio.BufferedProtocol
        for data in hello:
            if not hasattr(tls, "get_buffer"):
                tls.data_received(data)
                continue
            while data:
                view = memoryview(tls.get_buffer(len(data)))
                n = min(len(view), len(data))
                if n == 0:
                    raw.abort()
                    return
                view[:n] = data[:n]
                tls.buffer_updated(n)
                data = data[n:]

    def connection_lost(self, exc: Exception | None) -> None:
        # the socket is closed: before the handshake began (over the limit, gone early),
        # after a failed handshake, or at the end of a served connection
        self.release()
        if self.app is not None:
            self.app.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.app is not None:
            self.app.data_received(data)  # decrypted, for the HTTP protocol
        elif self.wrapped:
            self.early.append(data)  # decrypted, before the HTTP protocol exists
        else:
            self.hello.append(data)  # raw TCP, before start_tls: for the TLS protocol
            if self.raw is not None:
                self.raw.pause_reading()  # start_tls resumes it

    def eof_received(self) -> bool | None:
        return self.app.eof_received() if self.app is not None else None

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()


class HandshakeBoundLoop(uvloop.Loop):
    """uvloop whose TLS servers count every accepted connection, in its handshake too,
    against ``max_connections`` and bound the handshake by ``header_timeout`` (see the
    module docstring). uvicorn's ``create_server(factory, ..., ssl=context)`` becomes a
    plain TCP server running the handshake itself; servers without ``ssl`` are as
    uvloop makes them."""

    # uvloop's stub spells out every keyword of create_server; this override takes the
    # ones it needs and passes the rest on unchanged, hence the narrower signature
    async def create_server(  # type: ignore[override]
        self,
        protocol_factory: Callable[[], asyncio.Protocol],
        *args: Any,
        ssl: ssl.SSLContext | None = None,
        **kwargs: Any,
    ) -> Any:
        if ssl is None:
            return await super().create_server(protocol_factory, *args, **kwargs)
        kwargs.pop("ssl_handshake_timeout", None)  # header_timeout bounds the handshakes
        listener = _Listener(self, protocol_factory, ssl, kwargs.pop("ssl_shutdown_timeout", None))
        server = await super().create_server(listener.accept, *args, **kwargs)
        listener.server = server
        return server
