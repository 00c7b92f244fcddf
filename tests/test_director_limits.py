"""Hostile connections against the Director's real server (issue 12): header and body
read timeouts, keep-alive timeout, header size, connection cap, in-flight body budget.

Each limit is exercised with real sockets from a slow or greedy client against
uvicorn running ``director.server.DirectorProtocol`` on uvloop, as ``serve`` does.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from director.app import create_app
from director.server import ConnectionLimits, DirectorProtocol
from director.service import Director
from director.setup import init_director

LIMITS = ConnectionLimits(
    header_timeout=1.0, max_header_bytes=8192, max_connections=12, keep_alive_timeout=1.0
)
MAX_BODY = 200_000
BODY_BUDGET = 300_000
BODY_TIMEOUT = 1.0
PATIENCE = 15.0  # how long a client waits for the server to act: far above every limit


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    config = init_director(tmp_path_factory.mktemp("limits") / "d")
    director = Director.from_config(config)
    app = create_app(
        director,
        config.token,
        max_body=MAX_BODY,
        body_timeout=BODY_TIMEOUT,
        body_budget=BODY_BUDGET,
    )
    before = DirectorProtocol.limits
    DirectorProtocol.configure(LIMITS)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            http=DirectorProtocol,
            loop="uvloop",
            timeout_keep_alive=LIMITS.keep_alive_timeout,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield "127.0.0.1", sock.getsockname()[1]
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        DirectorProtocol.configure(before)
        director.close()


def _connect(server: tuple[str, int]) -> socket.socket:
    s = socket.create_connection(server)
    s.settimeout(PATIENCE)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def _answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _request(path: str = "/root/1.root.json") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: director\r\n\r\n".encode()


def test_slowloris_headers_are_cut_off(server: tuple[str, int]) -> None:
    s = _connect(server)
    s.sendall(b"GET /root/1.root.json HTTP/1.1\r\nHost: director\r\n")
    closed = False
    for _ in range(int(PATIENCE / 0.1)):  # one header byte every 0.1 s, far longer than allowed
        try:
            s.sendall(b"X")
        except OSError:  # reset: the server closed it
            closed = True
            break
        time.sleep(0.1)
        s.setblocking(False)
        try:
            if s.recv(65536, socket.MSG_PEEK):
                closed = True
                break
        except BlockingIOError:
            pass
        finally:
            s.setblocking(True)
            s.settimeout(PATIENCE)
    assert closed, "the server kept a slowloris connection open"
    try:
        status, _, body = _answer(_read_all(s))
    except ConnectionResetError:
        return  # closed with our unread trickle in its buffer: a reset, also fine
    assert status == 408 and json.loads(body)["error"] == "timeout"
    s.close()


def test_idle_new_connection_is_closed(server: tuple[str, int]) -> None:
    s = _connect(server)
    status, headers, body = _answer(_read_all(s))  # returns only once the server closes
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body) == {
        "error": "timeout",
        "detail": "request headers not received in time",
    }
    s.close()


def test_keep_alive_connection_is_closed_when_idle(server: tuple[str, int]) -> None:
    s = _connect(server)
    s.settimeout(4.0)  # far above the 1 s configured, below uvicorn's own default of 5 s
    s.sendall(_request())
    raw = _read_all(s)  # the answer, then the close once the keep-alive time is over
    status, headers, body = _answer(raw)
    assert status == 200 and len(body) == int(headers["content-length"])
    s.close()


def test_slow_body_is_cut_off(server: tuple[str, int]) -> None:
    s = _connect(server)
    s.sendall(
        b"PUT /vehicles/VIN1/manifest HTTP/1.1\r\nHost: director\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b"{" * 1000
    )
    status, headers, body = _answer(_read_all(s))
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"] == "timeout"
    s.close()


def test_oversized_headers_are_refused(server: tuple[str, int]) -> None:
    s = _connect(server)
    s.sendall(b"GET / HTTP/1.1\r\nHost: director\r\nX-Pad: " + b"a" * 10_000 + b"\r\n\r\n")
    status, _, body = _answer(_read_all(s))
    assert (status, json.loads(body)["error"]) == (431, "too_large")
    s.close()


def test_malformed_request_gets_a_json_400(server: tuple[str, int]) -> None:
    s = _connect(server)
    s.sendall(b"\x00\x01 nonsense\r\n\r\n")
    status, headers, body = _answer(_read_all(s))
    assert status == 400 and headers["content-type"] == "application/json"
    assert json.loads(body)["error"] == "malformed"
    s.close()


def test_connections_over_the_cap_are_closed_at_once(server: tuple[str, int]) -> None:
    held = [_connect(server) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)  # let the server accept them (no limit is anywhere near)
        extra = _connect(server)
        try:
            assert extra.recv(65536) == b""  # closed without an answer
        finally:
            extra.close()
        # one of the held connections can still be used
        held[0].sendall(_request())
        status, _, _ = _answer(held[0].recv(65536))
        assert status == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    s = _connect(server)  # the slots are free again
    s.sendall(_request())
    assert _answer(s.recv(65536))[0] == 200
    s.close()


def test_bodies_in_flight_share_a_memory_budget(server: tuple[str, int]) -> None:
    """Two uploads held at once past the 300 kB budget: the second is refused, 503 busy."""
    head = (
        b"PUT /vehicles/VIN1/manifest HTTP/1.1\r\nHost: director\r\n"
        b"Content-Type: application/json\r\nContent-Length: 170000\r\n\r\n"
    )
    a, b = _connect(server), _connect(server)
    try:
        a.sendall(head + b" " * 160_000)
        time.sleep(0.3)  # the server reads A's part while A holds it
        # B's 140,001 bytes take the bodies in flight past 300 kB with its last byte (no
        # unread byte makes the server's close a reset that would eat the answer)
        b.sendall(head + b" " * 140_001)
        status_b, headers_b, body_b = _answer(_read_all(b))
        assert (status_b, json.loads(body_b)["error"]) == (503, "busy")
        assert headers_b["retry-after"] == "1"
        a.sendall(b" " * 10_000)  # A completes: its body is still within the budget
        status_a, _, body_a = _answer(_read_all(a))
        assert status_a != 503, body_a
    finally:
        a.close()
        b.close()
    # nothing stays reserved: a whole upload goes through again
    c = _connect(server)
    c.sendall(head + b" " * 170_000)
    assert _answer(_read_all(c))[0] not in (408, 503)
    c.close()


def test_limits_come_from_the_config(tmp_path: Path) -> None:
    from director.config import DirectorConfig
    from uptane.errors import ConfigError

    config = init_director(tmp_path / "d")
    data = json.loads((tmp_path / "d" / "director.json").read_text())
    data.update(header_timeout=2.5, max_connections=7, body_budget=5_000_000)
    (tmp_path / "d" / "director.json").write_text(json.dumps(data))
    loaded = DirectorConfig.load(tmp_path / "d")
    assert loaded.connection_limits() == ConnectionLimits(
        header_timeout=2.5,
        max_header_bytes=config.max_header_bytes,
        max_connections=7,
        keep_alive_timeout=config.keep_alive_timeout,
    )
    assert loaded.body_budget == 5_000_000
    data.update(body_budget=10)
    (tmp_path / "d" / "director.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="body_budget"):
        DirectorConfig.load(tmp_path / "d")
