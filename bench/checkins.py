"""Check-ins for ``bench/director_throughput.py`` from one cheap client process.

Raw keep-alive HTTP/1.1 over one socket per connection ("lane"), every
request's bytes built before the clock starts, a thread per lane: about a
twentieth of the server's CPU per check-in, so the server and PostgreSQL,
not the client, are what the figures measure. Also the CPU of the
server's PostgreSQL backends (by ``application_name``).
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from proc_cpu import tree_cpu
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url


class _Server(Protocol):
    port: int

    def cpu(self) -> float: ...


def _response(sock: socket.socket, buf: bytearray) -> tuple[int, bytes, bytes | None]:
    """Read one HTTP/1.1 response with a Content-Length from ``sock`` (keep-alive).

    Returns (status, body, ETag); bytes of the next response stay in ``buf``.
    """
    while (end := buf.find(b"\r\n\r\n")) < 0:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk
    head = bytes(buf[:end]).split(b"\r\n")
    status = int(head[0].split(b" ", 2)[1])
    length, etag = 0, None
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"etag":
            etag = value.strip()
    while len(buf) < end + 4 + length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        buf += chunk
    body = bytes(buf[end + 4 : end + 4 + length])
    del buf[: end + 4 + length]
    return status, body, etag


def _lane(port: int, work: list[tuple[str, bytes]], etags: dict[str, bytes | None]) -> int:
    """One connection: each check-in's PUT, then its no-change poll, in order."""
    puts = [
        (
            vin,
            (
                f"PUT /vehicles/{vin}/manifest HTTP/1.1\r\nHost: bench\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            + body,
        )
        for vin, body in work
    ]
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    for vin, put in puts:
        sock.sendall(put)
        status, body, _ = _response(sock, buf)
        if status != 200:
            raise RuntimeError(f"{vin}: manifest refused: {body[:300]!r}")
        base = f"GET /vehicles/{vin}/metadata/"
        sock.sendall(f"{base}2.root.json HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
        status, _, _ = _response(sock, buf)
        if status != 404:
            raise RuntimeError(f"{vin}: 2.root.json answered {status}")
        tag = etags.get(vin)
        sock.sendall(
            f"{base}timestamp.json HTTP/1.1\r\nHost: bench\r\n".encode()
            + (b"If-None-Match: " + tag + b"\r\n" if tag else b"")
            + b"\r\n"
        )
        status, _, etag = _response(sock, buf)
        if status not in (200, 304):
            raise RuntimeError(f"{vin}: timestamp answered {status}")
        etags[vin] = etag or tag
    sock.close()
    return len(puts)


def _checkin_client(
    port: int, lanes: list[list[tuple[str, bytes]]], start: Any, results: Any
) -> None:
    """One client process: a thread per lane (connection); its own CPU time is reported."""
    etags: dict[str, bytes | None] = {}
    done: list[int] = []
    threads = [
        threading.Thread(target=lambda w=w: done.append(_lane(port, w, etags))) for w in lanes
    ]
    start.wait()
    cpu0 = time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if len(done) != len(lanes):
        raise SystemExit("a lane failed")
    results.put((sum(done), time.process_time() - cpu0))


def checkin_cpu(
    server: _Server,
    manifests: dict[str, list[bytes]],
    first: int,
    rounds: int,
    n: int,
    pg: Callable[[], float] = lambda: 0.0,
) -> tuple[int, float, float, float, float]:
    """``rounds`` check-ins per vehicle from its manifest ``first`` on, on ``n`` connections.

    Returns (check-ins, wall s, server CPU s, client CPU s, PostgreSQL CPU s per ``pg``).
    Each vehicle's manifests go over one connection, in order (two would race its counter).
    """
    vins = list(manifests)
    lanes = [
        [(vin, manifests[vin][first + k]) for k in range(rounds) for vin in vins[i::n]]
        for i in range(n)
    ]
    ctx = mp.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_checkin_client, args=(server.port, lanes, start, results))
    proc.start()
    time.sleep(0.3)
    cpu0, pg0, t0 = server.cpu(), pg(), time.perf_counter()
    start.set()
    ops, client_cpu = results.get(timeout=600)
    wall = time.perf_counter() - t0
    cpu, pg_cpu = server.cpu() - cpu0, pg() - pg0
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the check-in client failed (exit {proc.exitcode})")
    return ops, wall, cpu, client_cpu, pg_cpu


def postgres_pids(url: str, name: str) -> Callable[[], list[int]]:
    """The pids of the PostgreSQL backends whose application_name is ``name`` (now open)."""
    engine = create_engine(make_url(url).difference_update_query(["options", "application_name"]))

    def pids() -> list[int]:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"),
                    {"n": name},
                ).scalars()
            )

    return pids


def postgres_cpu(url: str, name: str) -> Callable[[], float]:
    """CPU seconds of the PostgreSQL backends whose application_name is ``name`` (now open)."""
    engine = create_engine(make_url(url).difference_update_query(["options", "application_name"]))

    def cpu() -> float:
        with engine.connect() as conn:
            pids = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :n"), {"n": name}
            ).scalars()
            return sum(tree_cpu(pid) for pid in pids)

    return cpu
