"""One host cannot take every connection slot: ``max_connections_per_address`` (issue 12,
"Hostile connections"; ``director.server.PeerCounts``).

Real sockets from two loopback addresses (127.0.0.1 and 127.0.0.2, both this
host's on Linux) against uvicorn running ``DirectorProtocol`` on uvloop (plain
HTTP, in this process) and against a real ``uptane director serve --tls``
process, where connections still in their TLS handshake count too.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.director_env import _serve_asgi
from test_director_tls_handshakes import TOKEN, Listeners, _client_hello, _vehicle_context

from director.app import create_app
from director.config import DirectorConfig
from director.server import ConnectionLimits, DirectorProtocol, PeerCounts, peer_key
from director.service import Director
from director.setup import init_director
from director.tls import tls_paths
from uptane.errors import ConfigError

PER_ADDRESS = 3
LIMITS = ConnectionLimits(
    header_timeout=30.0,
    max_header_bytes=8192,
    max_connections=12,
    keep_alive_timeout=30.0,
    max_connections_per_address=PER_ADDRESS,
)
HOST, OTHER = "127.0.0.1", "127.0.0.2"  # two peers of one machine
PATIENCE = 30.0


def _other_address_works() -> bool:
    with socket.socket() as s:
        try:
            s.bind((OTHER, 0))
        except OSError:
            return False
    return True


pytestmark = pytest.mark.skipif(
    not _other_address_works(), reason="127.0.0.2 is not a local address here (Linux's is)"
)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A plain-HTTP Director on 127.0.0.1 with ``LIMITS``, as ``serve`` runs it; its port."""
    config = init_director(tmp_path_factory.mktemp("peer-limit") / "d")
    director = Director.from_config(config)
    before = DirectorProtocol.limits
    DirectorProtocol.configure(LIMITS)
    url, stop = _serve_asgi(
        create_app(director, config.token), http=DirectorProtocol, loop="uvloop"
    )
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        stop()
        DirectorProtocol.configure(before)
        director.close()


def _connect(port: int, source: str) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=PATIENCE, source_address=(source, 0))
    return s


def _health(s: socket.socket) -> int:
    """``GET /health`` on ``s`` (keep-alive); the status, 0 when the server closed it."""
    try:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: director\r\n\r\n")
        answer = s.recv(65536)
    except (ConnectionResetError, BrokenPipeError):
        return 0
    return int(answer.split()[1]) if answer else 0


def _served_soon(port: int, source: str) -> socket.socket:
    """A connection from ``source`` answered 200, retried while closed ones are released."""
    deadline = time.monotonic() + PATIENCE
    while True:
        s = _connect(port, source)
        if _health(s) == 200:
            return s
        s.close()
        assert time.monotonic() < deadline, f"{source} was never served again"
        time.sleep(0.1)


def test_one_address_gets_its_share_and_no_more(plain: int) -> None:
    held = [_served_soon(plain, HOST) for _ in range(PER_ADDRESS)]
    try:
        extra = _connect(plain, HOST)
        try:
            assert extra.recv(65536) == b""  # closed at once, without an answer
        finally:
            extra.close()
        other = _connect(plain, OTHER)  # another host: slots are left under max_connections
        try:
            assert _health(other) == 200
        finally:
            other.close()
        assert _health(held[0]) == 200  # the held ones still work
    finally:
        for s in held:
            s.close()
    # closing frees the address's slots: its share is served again, and no more
    again = [_served_soon(plain, HOST) for _ in range(PER_ADDRESS)]
    try:
        extra = _connect(plain, HOST)
        with contextlib.closing(extra):
            assert extra.recv(65536) == b""
    finally:
        for s in again:
            s.close()


def test_a_refused_connection_is_not_counted(plain: int) -> None:
    """Connections closed for being over the share do not use up the share later."""
    held = [_served_soon(plain, HOST) for _ in range(PER_ADDRESS)]
    for _ in range(20):
        with contextlib.closing(_connect(plain, HOST)) as s:
            assert s.recv(65536) == b""
    for s in held:
        s.close()
    fresh = [_served_soon(plain, HOST) for _ in range(PER_ADDRESS)]
    for s in fresh:
        s.close()


# --- TLS: connections in their handshake count ------------------------------------


@pytest.fixture
def tls(tmp_path: Path) -> Iterator[tuple[Listeners, Path]]:
    """``serve --tls`` taking 2 connections per address (10 in all); its directory."""
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    config = directory / "director.json"
    data = json.loads(config.read_text())
    data.update(max_connections=10, max_connections_per_address=2, keep_alive_timeout=120.0)
    config.write_text(json.dumps(data))
    tls_paths(directory)
    served = Listeners(directory, tmp_path)
    try:
        yield served, directory
    finally:
        served.stop()


def _tls_served(port: int, ctx: ssl.SSLContext, source: str) -> bool:
    conn = http.client.HTTPSConnection(
        HOST, port, context=ctx, timeout=PATIENCE, source_address=(source, 0)
    )
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _refused_before_tls(port: int, ctx: ssl.SSLContext, source: str) -> None:
    with _connect(port, source) as s:
        try:
            s.sendall(_client_hello(ctx))
            answer = s.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    assert answer == b"", answer[:16]  # a ServerHello would start b"\x16\x03"


def test_stalled_handshakes_of_one_address_do_not_lock_out_others(
    tls: tuple[Listeners, Path], tmp_path: Path
) -> None:
    """Two connections from one address that never send a ClientHello hold that
    address's share (closed before any TLS work for the third), not the server's."""
    served, directory = tls
    ctx = served.vehicle
    stalled = [_connect(served.port, HOST) for _ in range(2)]
    try:
        time.sleep(0.3)  # accepted and counted
        _refused_before_tls(served.port, ctx, HOST)
        assert _tls_served(served.port, ctx, OTHER)
        other_vehicle = _vehicle_context(directory, tmp_path, "VINPEERLIMIT02")
        assert _tls_served(served.port, other_vehicle, OTHER)
    finally:
        for s in stalled:
            s.close()
    deadline = time.monotonic() + PATIENCE
    while not _tls_served(served.port, ctx, HOST):
        assert time.monotonic() < deadline, "the address's slots were never released"
        time.sleep(0.1)


# --- the pieces ---------------------------------------------------------------------


def test_peer_key_groups_an_ipv6_host_by_its_64() -> None:
    assert peer_key(("192.0.2.7", 50000)) == "192.0.2.7"
    assert peer_key(("2001:db8:1:2:aaaa::1", 5, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:2:bbbb::9", 6, 0, 0)) == "2001:db8:1:2::/64"
    assert peer_key(("2001:db8:1:3::1", 6, 0, 0)) == "2001:db8:1:3::/64"
    assert peer_key(("::ffff:192.0.2.7", 7, 0, 0)) == "192.0.2.7"
    assert peer_key(("fe80::1%eth0", 7, 0, 2)) == "fe80::/64"
    assert peer_key("/run/director.sock") is None  # a Unix socket
    assert peer_key(None) is None
    assert peer_key(("not an address", 1)) is None


def test_peer_counts_take_and_release() -> None:
    counts = PeerCounts()
    a, b = ("192.0.2.1", 1), ("192.0.2.2", 1)
    keys = [counts.take(a, 2) for _ in range(2)]
    assert keys == [(True, "192.0.2.1")] * 2
    assert counts.take(a, 2) == (False, None)  # over the share: not counted
    assert counts.take(b, 2) == (True, "192.0.2.2")
    counts.release(keys[0][1])
    assert counts.open("192.0.2.1") == 1
    assert counts.take(a, 2) == (True, "192.0.2.1")
    assert counts.take(a, 0) == (True, None)  # no limit: not counted
    assert counts.take("/run/director.sock", 2) == (True, None)  # not on IP: not limited
    counts.release(None)  # nothing was counted: nothing happens
    assert counts.open("192.0.2.1") == 2


def test_the_share_comes_from_the_config(tmp_path: Path) -> None:
    init_director(tmp_path / "d")
    path = tmp_path / "d" / "director.json"
    data = json.loads(path.read_text())
    assert DirectorConfig.load(tmp_path / "d").connection_limits().max_connections_per_address == 0
    data.update(max_connections_per_address=16)
    path.write_text(json.dumps(data))
    loaded = DirectorConfig.load(tmp_path / "d")
    assert loaded.connection_limits().max_connections_per_address == 16
    assert loaded.to_dict()["max_connections_per_address"] == 16
    data.update(max_connections_per_address=-1)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="max_connections_per_address"):
        DirectorConfig.load(tmp_path / "d")
