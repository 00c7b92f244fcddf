"""An acknowledged manifest survives ``kill -9`` of the Director (issue 12, group commit).

Vehicles check in concurrently against ``uptane director serve`` (its own
process group, SQLite and PostgreSQL); the server is killed with SIGKILL
while they do; every manifest answered 200 must then be in the database.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from helpers.director_env import (
    Car,
    new_car,
)
from sqlalchemy import select

from director.db import Database, Ecu
from director.setup import init_director


def _serve(directory: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve = ["director", "serve", "--dir", str(directory), "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uptane.cli", *serve],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve did not start"
        time.sleep(0.2)


def test_every_acknowledged_manifest_survives_kill_9(db_url: str, tmp_path: Path) -> None:
    config = init_director(tmp_path / "d", db_url=db_url)
    proc, url = _serve(tmp_path / "d", tmp_path / "serve.log")
    cars = [new_car(n_secondaries=2) for _ in range(6)]
    acknowledged = {car.vin: 0 for car in cars}
    killed = threading.Event()
    try:
        op = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {config.token}"})
        for car in cars:
            assert op.post("/api/vehicles", json=car.body()).status_code == 201

        def check_in(car: Car) -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                while not killed.is_set():
                    sent = car.manifest()
                    counter = car.primary.counter
                    try:
                        r = http.put(f"/vehicles/{car.vin}/manifest", content=sent)
                    except httpx.TransportError:
                        return
                    assert r.status_code == 200, r.text
                    acknowledged[car.vin] = counter

        threads = [threading.Thread(target=check_in, args=(car,)) for car in cars]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(acknowledged.values()) < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        killed.set()
        for t in threads:
            t.join(30)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert sum(acknowledged.values()) >= 40
    db = Database(config.db_url)
    try:
        with db.transaction() as s:
            rows = s.execute(select(Ecu.serial, Ecu.last_report_counter))
            stored = {r.serial: r.last_report_counter for r in rows}
    finally:
        db.dispose()
    for car in cars:
        for serial in car.ecus:  # every ECU's report of an acknowledged manifest is there
            assert (stored[serial] or 0) >= acknowledged[car.vin], (serial, acknowledged)
