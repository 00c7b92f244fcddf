"""``uptane director serve --workers 2``: worker processes share one database and apply
the connection limits of ``director.json`` (issue 12). On PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.director_env import (
    new_car,
)

from director.setup import init_director


@pytest.fixture
def served(db_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    if not db_url.startswith("postgresql"):
        pytest.skip("several workers are for PostgreSQL (SQLite serializes the writers)")
    config = init_director(tmp_path / "d", db_url=db_url)
    data = json.loads((tmp_path / "d" / "director.json").read_text())
    data["header_timeout"] = 1.0  # checked below: the workers read it
    (tmp_path / "d" / "director.json").write_text(json.dumps(data))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (tmp_path / "serve.log").open("wb")
    serve = ["director", "serve", "--dir", str(tmp_path / "d"), "--port", str(port)]
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
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve --workers 2 did not start"
            time.sleep(0.2)
        yield url, config.token
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_two_workers_share_the_database_and_the_limits(served: tuple[str, str]) -> None:
    url, token = served
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
