"""Connections in their TLS handshake count against ``max_connections`` (issue 12,
"Hostile connections"; ``director.tls_accept``).

Real ``uptane director serve --tls`` processes (one process; two workers over
PostgreSQL) with ``max_connections`` 5, and raw sockets that connect and send no
ClientHello or half of one, or fail their handshake in every way a client can. A
connection over the limit is closed before any TLS byte is sent back: a real
ClientHello gets no ServerHello (``_refused_before_tls``).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_director_tls import _free_port, _serve, _wait_for
from test_director_tls_workers import _owner, _start, _stop

from director.setup import init_director
from director.tls import CA_CERT, issue_vehicle_certificate, tls_dir, tls_paths

TOKEN = "tls-handshakes-operator-token-0123456789"
LIMIT = 5  # max_connections of every server here
PATIENCE = 60.0  # how long a client waits for the server to act: far above every limit


def _director(directory: Path, header_timeout: float, db_url: str | None = None) -> Path:
    """A Director directory whose listeners take ``LIMIT`` connections each."""
    init_director(directory, token=TOKEN, db_url=db_url)
    config = directory / "director.json"
    data = json.loads(config.read_text())
    data.update(max_connections=LIMIT, header_timeout=header_timeout, keep_alive_timeout=120.0)
    config.write_text(json.dumps(data))
    tls_paths(directory)  # the server certificate, as serve --tls makes it
    return directory


def _vehicle_context(directory: Path, tmp: Path, vin: str = "VINHANDSHAKE01") -> ssl.SSLContext:
    """A client context trusting ``directory``'s CA, with a certificate from it for ``vin``."""
    cert, key, _ = issue_vehicle_certificate(directory, vin).write(tmp / vin, "client")
    ctx = ssl.create_default_context(cafile=str(tls_dir(directory) / CA_CERT))
    ctx.load_cert_chain(cert, key)
    return ctx


class Listeners:
    """``serve --tls`` in a process: the vehicle and operator ports and a vehicle's context."""

    def __init__(self, directory: Path, tmp: Path) -> None:
        self.port, self.operator_port = _free_port(), _free_port()
        self.proc, line = _serve(
            directory, "--tls", "--port", str(self.port), "--operator-port", str(self.operator_port)
        )
        assert "mutual TLS" in line, line
        self.ca = ssl.create_default_context(cafile=str(tls_dir(directory) / CA_CERT))
        assert _wait_for(f"https://127.0.0.1:{self.operator_port}/health", self.ca).is_success
        self.vehicle = _vehicle_context(directory, tmp)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def _running(tmp_path: Path, header_timeout: float) -> Iterator[Listeners]:
    served = Listeners(_director(tmp_path / "d", header_timeout=header_timeout), tmp_path)
    try:
        yield served
    finally:
        served.stop()


@pytest.fixture
def quick(tmp_path: Path) -> Iterator[Listeners]:
    """Handshakes (and request headers) must complete within 2 s."""
    yield from _running(tmp_path, 2.0)


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Listeners]:
    """Handshakes may take far longer than any test here (no staller times out)."""
    yield from _running(tmp_path, 600.0)


# --- clients --------------------------------------------------------------------


def _client_hello(ctx: ssl.SSLContext) -> bytes:
    """The ClientHello ``ctx`` sends first (made in memory, no socket)."""
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a TLS handshake record
    return hello


def _staller(port: int, sent: bytes = b"") -> socket.socket:
    """A TCP connection that sends ``sent`` (nothing, or part of a ClientHello) and stops."""
    s = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE)
    if sent:
        s.sendall(sent)
    return s


def _stallers(port: int, ctx: ssl.SSLContext, n: int) -> list[socket.socket]:
    """``n`` stalled handshakes: every other one silent, the rest half a ClientHello."""
    hello = _client_hello(ctx)
    return [_staller(port, b"" if i % 2 == 0 else hello[: len(hello) // 2]) for i in range(n)]


def _refused_before_tls(port: int, ctx: ssl.SSLContext) -> None:
    """A new connection sending a valid ClientHello is closed without a TLS byte back."""
    with socket.create_connection(("127.0.0.1", port), timeout=PATIENCE) as s:
        try:
            s.sendall(_client_hello(ctx))
            answer = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):  # closed with the hello unread
            answer = b""
    assert answer == b"", answer[:16]  # a ServerHello would start b"\x16\x03"


def _served(port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection | None:
    """A new TLS connection answered ``GET /health`` with 200 and kept open; None if it
    was refused (closed during or right after its handshake)."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=PATIENCE)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException):
        conn.close()
        return None
    assert (response.status, body) == (200, b'{"ok":true}'), (response.status, body)
    return conn


def _served_soon(port: int, ctx: ssl.SSLContext) -> http.client.HTTPSConnection:
    """``_served``, retried while the server releases closed connections."""
    deadline = time.monotonic() + PATIENCE
    while (conn := _served(port, ctx)) is None:
        assert time.monotonic() < deadline, "a valid client was never served again"
        time.sleep(0.2)
    return conn


def _admits_exactly_the_limit(port: int, ctx: ssl.SSLContext) -> None:
    """``LIMIT`` valid clients are served at once (no count leaked), the next one is
    closed before TLS (the limit still holds), and is served once a slot is free."""
    held = [_served_soon(port, ctx) for _ in range(LIMIT)]
    try:
        _refused_before_tls(port, ctx)
    finally:
        for conn in held:
            conn.close()
    _served_soon(port, ctx).close()


def _closed_by_server(s: socket.socket) -> None:
    with contextlib.suppress(ConnectionResetError):  # a reset is a close too
        assert s.recv(65536) == b""


# --- one process ----------------------------------------------------------------


@pytest.mark.parametrize("listener", ["vehicle", "operator"])
def test_stalled_handshakes_fill_the_limit_until_they_close(
    patient: Listeners, listener: str
) -> None:
    """Five connections that never finish their handshake (no ClientHello, half of one)
    hold all five slots: a valid client is closed before TLS until they close."""
    port = patient.port if listener == "vehicle" else patient.operator_port
    ctx = patient.vehicle if listener == "vehicle" else patient.ca
    stalled = _stallers(port, ctx, LIMIT)
    try:
        _refused_before_tls(port, ctx)
        with pytest.raises((ssl.SSLError, OSError)):  # a real client: no connection
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=PATIENCE)
            try:
                conn.request("GET", "/health")
                conn.getresponse()
            finally:
                conn.close()
        _refused_before_tls(port, ctx)  # still full: nothing released the stallers' slots
    finally:
        for s in stalled:
            s.close()
    _served_soon(port, ctx).close()
    _admits_exactly_the_limit(port, ctx)


def test_stalled_handshakes_free_their_slots_at_the_handshake_timeout(
    quick: Listeners,
) -> None:
    """Stallers the client never closes are cut after ``header_timeout`` (2 s) and their
    slots are free again: the limit admits five valid clients, not fewer."""
    stalled = _stallers(quick.port, quick.vehicle, 2 * LIMIT)  # the last five closed at once
    try:
        for s in stalled:
            _closed_by_server(s)
    finally:
        for s in stalled:
            s.close()
    _admits_exactly_the_limit(quick.port, quick.vehicle)


def test_handshakes_refusing_a_certificate_release_their_slots(
    quick: Listeners, tmp_path: Path
) -> None:
    """Twice the limit of clients with a certificate from another CA, in TLS 1.2 (refused
    in the handshake) and TLS 1.3 (refused after the client's last handshake message),
    then without a certificate: each is refused and its slot released."""
    other = _director(tmp_path / "other", header_timeout=2.0)  # another Director CA
    wrong = _vehicle_context(other, tmp_path / "o")
    wrong.load_verify_locations(cafile=str(tls_dir(tmp_path / "d") / CA_CERT))
    for ctx in (wrong, quick.ca):
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            ctx.minimum_version = ctx.maximum_version = version
            for _ in range(LIMIT):
                assert _served(quick.port, ctx) is None
    _admits_exactly_the_limit(quick.port, quick.vehicle)


def test_handshakes_cut_short_release_their_slots(quick: Listeners) -> None:
    """Plain HTTP on the TLS port, half a ClientHello then a close or a reset, a close
    right after connecting, a handshake left to time out: none leaks its slot."""
    hello = _client_hello(quick.vehicle)
    for _ in range(LIMIT):
        with _staller(quick.port, b"GET /health HTTP/1.1\r\nHost: d\r\n\r\n") as s:
            _closed_by_server(s)  # not a ClientHello: the handshake fails
        with _staller(quick.port, hello[:20]):
            pass  # half a ClientHello, then FIN
        reset = _staller(quick.port, hello[:20])
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # half a ClientHello, then RST
        _staller(quick.port).close()  # nothing at all
    with _staller(quick.port, hello[:20]) as s:
        _closed_by_server(s)  # the handshake timeout
    _admits_exactly_the_limit(quick.port, quick.vehicle)


# --- worker processes -----------------------------------------------------------


def test_every_worker_counts_its_stalled_handshakes(db_url: str, tmp_path: Path) -> None:
    """``serve --tls --workers 2`` and four times ``LIMIT`` stallers: whichever worker
    the kernel hands each to, no worker holds more than ``LIMIT`` of them (read from
    /proc) and the rest are closed at once; a valid client is served once they close,
    and SIGTERM stops the service cleanly while stallers are held."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several workers are for PostgreSQL (SQLite serializes the writers)")
    directory = _director(tmp_path / "d", header_timeout=600.0, db_url=db_url)
    served = _start(directory, tmp_path)
    stalled: list[socket.socket] = []
    try:
        ctx = _vehicle_context(directory, tmp_path)
        workers = served.workers
        held = dict.fromkeys(workers, 0)
        closed = 0
        for _ in range(4 * LIMIT):
            s = _staller(served.port)
            stalled.append(s)
            s.settimeout(0.05)
            deadline = time.monotonic() + PATIENCE
            while (owner := _owner(workers, served.port, s.getsockname()[1])) is None:
                try:  # closed at once: the worker that accepted it is full
                    if s.recv(1) == b"":
                        break
                except TimeoutError:
                    pass
                except ConnectionResetError:
                    break
                assert time.monotonic() < deadline, "no worker accepted the connection"
            if owner is None:
                closed += 1
            else:
                held[owner] += 1
        assert all(n <= LIMIT for n in held.values()), held
        assert closed == 4 * LIMIT - sum(held.values()) >= 2 * LIMIT
        for s in stalled:
            s.close()
        _served_soon(served.port, ctx).close()  # their slots are free again
        stalled = _stallers(served.port, ctx, 2 * LIMIT)
        served.proc.send_signal(signal.SIGTERM)  # stops while they are held
        assert served.proc.wait(timeout=PATIENCE) == 0, served.log.read_text()
    finally:
        for s in stalled:
            s.close()
        _stop(served)
