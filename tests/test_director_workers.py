"""``uptane director serve --workers 2``: worker processes share one database and apply
the connection limits of ``director.json``, each with its own listening socket
(SO_REUSEPORT, ``director.workers``), stopped together (issue 12). On PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers.director_env import (
    new_car,
)
from helpers.proc_sockets import children, connection_owners, listening_sockets, stop_group

from director.setup import init_director
from director.workers import reuseport_available


@dataclass
class Served:
    url: str
    token: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def director(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One Director (directory and database schema) for the module's servers; its token."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several workers are for PostgreSQL (SQLite serializes the writers)")
    directory = tmp_path_factory.mktemp("workers") / "d"
    config = init_director(directory, db_url=db_url)
    data = json.loads((directory / "director.json").read_text())
    data["header_timeout"] = 1.0  # checked below: the workers read it
    (directory / "director.json").write_text(json.dumps(data))
    return directory, config.token


@pytest.fixture
def served(director: tuple[Path, str], tmp_path: Path) -> Iterator[Served]:
    directory, token = director
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("wb")
    serve = ["director", "serve", "--dir", str(directory), "--port", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uptane.cli", *serve, "--workers", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                up = httpx.get(f"{url}/health", timeout=2).status_code == 200
                if up and len(children(proc.pid)) == 2:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve --workers 2 did not start"
            time.sleep(0.2)
        yield Served(url, token, port, proc, tmp_path / "serve.log")
    finally:
        stop_group(proc)  # a group already gone is fine
        log.close()


def test_two_workers_share_the_database_and_the_limits(served: Served) -> None:
    url, token = served.url, served.token
    car = new_car()
    op = {"Authorization": f"Bearer {token}"}
    # new connections each time: the kernel spreads them over both workers
    assert httpx.post(f"{url}/api/vehicles", json=car.body(), headers=op).status_code == 201
    for _ in range(6):
        r = httpx.put(f"{url}/vehicles/{car.vin}/manifest", content=car.manifest())
        assert r.status_code == 200, r.text
        ts = httpx.get(f"{url}/vehicles/{car.vin}/metadata/timestamp.json")
        assert ts.status_code == 200
        again = httpx.get(
            f"{url}/vehicles/{car.vin}/metadata/timestamp.json",
            headers={"If-None-Match": ts.headers["etag"]},
        )
        assert again.status_code == 304
    status = httpx.get(f"{url}/api/vehicles/{car.vin}", headers=op).json()
    assert {e["report_counter"] for e in status["ecus"]} == {6}
    # an idle connection is closed by whichever worker took it (header_timeout 1 s)
    host, port = url.removeprefix("http://").split(":")
    for _ in range(2):
        s = socket.create_connection((host, int(port)))
        s.settimeout(4.0)  # far above the configured 1 s, below the default 10 s
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        s.close()


def _hold_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` new keep-alive connections, each answered once (``GET /health``), held."""
    held = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, "the server closed the connection"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        held.append(s)
    return held


def test_each_worker_has_its_own_socket_and_serves_its_share(served: Served) -> None:
    """Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads new
    connections by their hash: 40 new connections, each worker holds at least 5. With
    the hash uniform, a worker's count is Binomial(40, 1/2) and one of two below 5 has
    probability 2 * (1 + 40 + 780 + 9880 + 91390) / 2**40 = 1.9e-7. (On one shared
    socket the kernel wakes whichever worker waits, and one may take them all.)"""
    if not reuseport_available():
        pytest.skip("SO_REUSEPORT spreading is Linux's")
    workers = children(served.proc.pid)
    assert len(workers) == 2
    listening = listening_sockets({served.proc.pid, *workers}, served.port)
    # each worker: exactly one listening socket, not the other's; the parent: none
    assert set(listening) == workers, listening
    first, second = (listening[pid] for pid in sorted(workers))
    assert len(first) == len(second) == 1 and not first & second, listening
    held = _hold_connections(served.port, 40)
    try:
        owners = connection_owners(workers, served.port)
        counts = {pid: 0 for pid in workers}
        for s in held:
            counts[owners[s.getsockname()[1]]] += 1
        assert sum(counts.values()) == 40 and min(counts.values()) >= 5, counts
    finally:
        for s in held:
            s.close()


def test_sigterm_stops_every_worker_and_exits_0(served: Served) -> None:
    workers = children(served.proc.pid)
    held = _hold_connections(served.port, 4)  # idle keep-alive connections do not block it
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    for s in held:
        s.close()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the parent"
        time.sleep(0.1)


def test_a_killed_worker_stops_the_service_with_exit_1(served: Served) -> None:
    victim, other = sorted(children(served.proc.pid))
    os.kill(victim, signal.SIGKILL)
    assert served.proc.wait(timeout=60) == 1
    text = served.log.read_text()
    assert f"worker {victim} was killed by SIGKILL while serving; stopped the others" in text
    deadline = time.monotonic() + 10
    while Path(f"/proc/{other}").exists():
        assert time.monotonic() < deadline, "the other worker kept running"
        time.sleep(0.1)


def test_a_worker_whose_parent_was_killed_exits(served: Served) -> None:
    workers = children(served.proc.pid)
    os.kill(served.proc.pid, signal.SIGKILL)
    served.proc.wait()
    deadline = time.monotonic() + 15
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived its killed parent"
        time.sleep(0.1)
