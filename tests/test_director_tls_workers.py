"""``uptane director serve --tls --workers 2``: both mutual-TLS listeners served by two
worker processes over one PostgreSQL database (issue 12, ``director.tls_serve``).

Real OS processes: the parent binds the vehicle and operator sockets and supervises two
workers; which worker answered a connection is read from the kernel (``/proc``: the
worker holding the server end of the connection's socket).
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers.director_env import Car, new_car
from helpers.proc_sockets import children, connection_owners, listening_sockets

from director.setup import init_director
from director.tls import (
    REFUSED_BODY,
    REVOKED_BODY,
    IssuedCertificate,
    issue_vehicle_certificate,
)
from director.workers import reuseport_available

TOKEN = "tls-workers-operator-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server end of the loopback connection from ``client_port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                local, remote, inode = fields[1], fields[2], fields[9]
                if (
                    int(local.rsplit(":", 1)[1], 16) == server_port
                    and int(remote.rsplit(":", 1)[1], 16) == client_port
                ):
                    return inode
    return None


def _owner(pids: set[int], server_port: int, client_port: int) -> int | None:
    """Which of ``pids`` holds the server end of the connection from ``client_port``."""
    inode = _socket_inode(server_port, client_port)
    if inode is None:
        return None
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with_link = f"/proc/{pid}/fd/{fd}"
            try:
                if os.readlink(with_link) == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


@dataclass
class Served:
    directory: Path
    proc: subprocess.Popen[bytes]
    log: Path
    port: int
    operator_port: int
    ca: Path

    @property
    def workers(self) -> set[int]:
        return children(self.proc.pid)

    def ctx(
        self, issued: IssuedCertificate | None = None, tmp: Path | None = None
    ) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if issued is not None:
            assert tmp is not None
            cert, key, _ = issued.write(tmp, "client")
            ctx.load_cert_chain(cert, key)
        return ctx

    def vehicle(self, issued: IssuedCertificate | None, tmp: Path) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.port}",
            verify=self.ctx(issued, tmp),
            timeout=10,
            trust_env=False,
        )

    def operator(self) -> httpx.Client:
        return httpx.Client(
            base_url=f"https://127.0.0.1:{self.operator_port}",
            verify=self.ctx(),
            timeout=10,
            trust_env=False,
            headers={"Authorization": f"Bearer {TOKEN}"},
        )

    def register(self, car: Car) -> None:
        with self.operator() as op:
            r = op.post("/api/vehicles", json=car.body())
            assert r.status_code == 201, r.text


def _start(directory: Path, tmp_path: Path) -> Served:
    port, operator_port = _free_port(), _free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "uptane.cli", "director", "serve", str(directory)),
                *("--tls", "--workers", "2"),
                *("--port", str(port), "--operator-port", str(operator_port)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(directory, proc, log, port, operator_port, directory / "tls" / "ca.pem")
    deadline = time.monotonic() + 90
    while True:  # both workers answer /health on the operator listener
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "serve --tls --workers 2 did not start"
        if len(served.workers) == 2:
            try:
                with served.operator() as op:
                    if op.get("/health").status_code == 200:
                        break
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    return served


def _stop(served: Served) -> None:
    if served.proc.poll() is None:
        os.killpg(served.proc.pid, signal.SIGKILL)
        served.proc.wait()


@pytest.fixture(scope="module")
def director_dir(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Director (directory and database schema) for the module's servers."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several workers are for PostgreSQL (SQLite serializes the writers)")
    directory = tmp_path_factory.mktemp("tls-workers") / "d"
    init_director(directory, db_url=db_url, token=TOKEN)
    return directory


@pytest.fixture
def served(director_dir: Path, tmp_path: Path) -> Iterator[Served]:
    s = _start(director_dir, tmp_path)
    try:
        yield s
    finally:
        _stop(s)


def _answer(
    served: Served, workers: set[int], ctx: ssl.SSLContext, path: str
) -> tuple[int, int, bytes]:
    """GET ``path`` on a new vehicle-listener connection: the PID of the worker holding
    the connection, the status and the body."""
    conn = http.client.HTTPSConnection("127.0.0.1", served.port, context=ctx, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert conn.sock is not None
        owner = _owner(workers, served.port, conn.sock.getsockname()[1])
        assert owner is not None, "no worker holds the connection"
        return owner, response.status, body
    finally:
        conn.close()


def _every_worker_answers(
    served: Served, ctx: ssl.SSLContext, path: str, status: int, body: bytes | None = None
) -> None:
    """New connections until each worker answered one; every answer is ``status``."""
    workers = served.workers
    assert len(workers) == 2
    seen = set()
    for _ in range(300):
        owner, got, content = _answer(served, workers, ctx, path)
        assert got == status and (body is None or content == body), (got, content)
        seen.add(owner)
        if seen == workers:
            return
    raise AssertionError(f"only workers {seen} of {workers} answered")


def test_two_tls_workers_serve_both_listeners_and_stop_on_sigterm(
    served: Served, tmp_path: Path
) -> None:
    mine, theirs = new_car(1), new_car(1)
    served.register(mine)  # the operator listener, through either worker
    served.register(theirs)
    issued = issue_vehicle_certificate(served.directory, mine.vin)
    with served.vehicle(issued, tmp_path) as http:
        for _ in range(4):  # new connections: either worker may take each
            close = {"Connection": "close"}
            ts = http.get(f"/vehicles/{mine.vin}/metadata/timestamp.json", headers=close)
            assert ts.status_code == 200, ts.text
            r = http.put(
                f"/vehicles/{mine.vin}/manifest",
                content=mine.manifest(),
                headers={"Content-Type": "application/json", **close},
            )
            assert r.status_code == 200 and r.json()["accepted"] is True, r.text
        # another vehicle's resources and an unknown VIN's: the same 404, as in one process
        answers = set()
        for vin in (theirs.vin, "UNKNOWN-VIN-0001"):
            for r in (
                http.get(f"/vehicles/{vin}/metadata/timestamp.json"),
                http.put(f"/vehicles/{vin}/manifest", content=theirs.manifest()),
            ):
                answers.add((r.status_code, r.content))
        r = http.get("/api/vehicles", headers={"Authorization": f"Bearer {TOKEN}"})
        answers.add((r.status_code, r.content))
        assert answers == {(404, REFUSED_BODY)}, answers
    # no client certificate: refused at the handshake
    with (
        httpx.Client(verify=served.ctx(), trust_env=False) as http,
        pytest.raises(httpx.TransportError),
    ):
        http.get(f"https://127.0.0.1:{served.port}/health")
    with served.operator() as op:  # the operator listener sees what either worker stored
        status = op.get(f"/api/vehicles/{mine.vin}").json()
        assert {e["report_counter"] for e in status["ecus"]} == {4}
        assert op.get(f"/api/vehicles/{theirs.vin}").json()["last_seen"] is None
        assert b"uptane_director_requests_total" in op.get("/metrics").content
    # both worker processes answer vehicles (the kernel spreads new connections)
    workers = served.workers
    ctx = served.ctx(issued, tmp_path / "again")
    _every_worker_answers(served, ctx, f"/vehicles/{mine.vin}/metadata/1.root.json", 200)
    # SIGTERM to the parent: every worker stops, exit code 0
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0, served.log.read_text()
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, "a worker outlived the parent"
        time.sleep(0.1)


def test_a_killed_tls_worker_makes_the_parent_exit_nonzero(served: Served) -> None:
    workers = served.workers
    victim, other = sorted(workers)
    os.kill(victim, signal.SIGKILL)
    assert served.proc.wait(timeout=60) == 1
    text = served.log.read_text()
    assert f"worker {victim} was killed by SIGKILL while serving; stopped the others" in text, text
    deadline = time.monotonic() + 10
    while Path(f"/proc/{other}").exists():
        assert time.monotonic() < deadline, "the other worker kept running"
        time.sleep(0.1)


def test_a_certificate_revoked_by_the_command_is_refused_by_every_worker(
    served: Served, tmp_path: Path
) -> None:
    car = new_car(1)
    served.register(car)
    with served.operator() as op:  # issued (and recorded) through the operator listener
        r = op.post(f"/api/vehicles/{car.vin}/certificate")
        assert r.status_code == 201, r.text
        body = r.json()
    issued = IssuedCertificate(
        body["certificate"].encode(), body["key"].encode(), body["ca"].encode()
    )
    ctx = served.ctx(issued, tmp_path)
    path = f"/vehicles/{car.vin}/metadata/timestamp.json"
    _every_worker_answers(served, ctx, path, 200)
    revoke = subprocess.run(
        [
            *(sys.executable, "-m", "uptane.cli", "director", "revoke-cert"),
            *(str(served.directory), "--vin", car.vin, "--reason", "stolen"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert revoke.returncode == 0, revoke.stderr
    deadline = time.monotonic() + 60  # each worker refreshes its list within seconds
    while True:
        try:
            _every_worker_answers(served, ctx, path, 403, REVOKED_BODY)
            break
        except AssertionError:
            assert time.monotonic() < deadline, "a worker kept accepting the certificate"
            time.sleep(0.5)
    # another vehicle's certificate is untouched
    other = new_car(1)
    served.register(other)
    other_ctx = served.ctx(issue_vehicle_certificate(served.directory, other.vin), tmp_path / "o")
    _every_worker_answers(served, other_ctx, f"/vehicles/{other.vin}/metadata/timestamp.json", 200)


def test_each_tls_worker_has_its_own_sockets_and_serves_its_share(served: Served) -> None:
    """Each worker listens on its own SO_REUSEPORT socket per listener: 40 new
    connections to the operator listener (no client certificate needed), each worker
    holds at least 5 (a worker's count is Binomial(40, 1/2) if the kernel's hash is
    uniform: one of two below 5 has probability 1.9e-7)."""
    if not reuseport_available():
        pytest.skip("SO_REUSEPORT spreading is Linux's")
    workers = served.workers
    assert len(workers) == 2
    for port in (served.port, served.operator_port):
        listening = listening_sockets({served.proc.pid, *workers}, port)
        assert set(listening) == workers, listening  # the parent holds none
        first, second = (listening[pid] for pid in sorted(workers))
        assert len(first) == len(second) == 1 and not first & second, listening
    ctx = served.ctx()
    held = []
    try:
        for _ in range(40):
            conn = http.client.HTTPSConnection(
                "127.0.0.1", served.operator_port, context=ctx, timeout=10
            )
            held.append(conn)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            assert response.status == 200
        owners = connection_owners(workers, served.operator_port)
        counts = {pid: 0 for pid in workers}
        for conn in held:
            assert conn.sock is not None
            counts[owners[conn.sock.getsockname()[1]]] += 1
        assert sum(counts.values()) == 40 and min(counts.values()) >= 5, counts
    finally:
        for conn in held:
            conn.close()
