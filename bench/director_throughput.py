"""Director check-in throughput against the bare signature work (DESIGN 6, 9).

Starts an Image repository (static HTTP) and a Director (`uptane director
serve`, its own process) on loopback, registers N simulated vehicles of 5 ECUs
each (ed25519 keys), assigns each vehicle an image, and drives every vehicle
through R check-ins: PUT a signed vehicle version manifest (5 signed ECU
version reports), then refresh its Director metadata (timestamp, snapshot,
targets). Manifests are signed before the clock starts, so the figure is the
Director's work plus HTTP.

The baseline, in this process, is the bare signature verification one
check-in needs (1 primary + 5 ECU ed25519 signatures). The last line is
``ratio=<check-ins per second / bare verifications per second>``.

    .venv/bin/python bench/director_throughput.py --vehicles 20 [--db URL]
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from securesystemslib.signer import CryptoSigner, Key
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from tuf.api.metadata import TargetFile

from director.cli import init_director
from uptane.keys import public_key_dict
from uptane.manifest import (
    EcuVersionReport,
    SignedEcuVersionReport,
    SignedVehicleManifest,
    VehicleVersionManifest,
)
from uptane.metadata import build_custom
from uptane.repository import DirectoryStore, SigningRepository

ECUS_PER_VEHICLE = 5


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def image_repository(directory: Path) -> tuple[str, bytes, http.server.ThreadingHTTPServer]:
    repo = SigningRepository(store=DirectoryStore(directory / "metadata"))
    signers = {
        r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
    }
    repo.add_signers(signers.values())
    with repo.edit_root() as root:
        for role, signer in signers.items():
            root.add_key(signer.public_key, role)
    with repo.edit_targets() as targets:
        tf = TargetFile.from_data("bench-app.wasm", b"\0asm\1\0\0\0" * 64, ["sha256"])
        tf.unrecognized_fields["custom"] = build_custom(
            hardware_ids=["bench-hw"], release_counter=1
        )
        targets.targets[tf.path] = tf
    repo.publish()
    handler = functools.partial(_Quiet, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root_bytes = repo.store.read("1.root.json")
    assert root_bytes is not None
    return f"http://127.0.0.1:{server.server_address[1]}", root_bytes, server


@dataclass
class Vehicle:
    vin: str
    signers: dict[str, CryptoSigner]
    hardware: dict[str, str]
    manifests: list[bytes] = field(default_factory=list)

    @property
    def primary(self) -> str:
        return f"{self.vin}-0"

    def body(self) -> dict[str, Any]:
        return {
            "vin": self.vin,
            "ecus": [
                {
                    "serial": serial,
                    "hardware_id": self.hardware[serial],
                    "public_key": public_key_dict(signer.public_key),
                    "primary": serial == self.primary,
                }
                for serial, signer in self.signers.items()
            ],
        }

    def sign_rounds(self, rounds: int) -> None:
        now = datetime.now(UTC).replace(microsecond=0)
        for counter in range(1, rounds + 1):
            reports = {
                serial: SignedEcuVersionReport.sign(
                    EcuVersionReport(serial, self.hardware[serial], None, counter, now), signer
                )
                for serial, signer in self.signers.items()
            }
            manifest = VehicleVersionManifest(self.vin, self.primary, reports)
            self.manifests.append(manifest.sign(self.signers[self.primary]))


def new_vehicle(i: int) -> Vehicle:
    vin = f"BENCH{i:06d}"
    serials = [f"{vin}-{k}" for k in range(ECUS_PER_VEHICLE)]
    hardware = {
        s: ("gateway" if k == 0 else "bench-hw" if k == 1 else f"hw-{k}")
        for k, s in enumerate(serials)
    }
    return Vehicle(vin, {s: CryptoSigner.generate_ed25519() for s in serials}, hardware)


def fresh_postgres_schema(url: str) -> tuple[str, str]:
    """A new schema in the PostgreSQL database ``url`` names; returns (url, schema)."""
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    engine = create_engine(u)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    engine.dispose()
    u = u.update_query_dict({"options": f"-csearch_path={schema}"})
    return u.render_as_string(hide_password=False), schema


def drop_postgres_schema(url: str, schema: str) -> None:
    engine = create_engine(make_url(url).difference_update_query(["options"]))
    with engine.begin() as conn:
        conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def client(url: str, token: str | None = None) -> httpx.Client:
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, timeout=60, transport=transport, headers=headers)


def check_in(http: httpx.Client, vehicle: Vehicle, manifest: bytes) -> None:
    """One vehicle cycle: manifest upload, then the Director metadata a client fetches."""
    r = http.put(f"/vehicles/{vehicle.vin}/manifest", content=manifest)
    if r.status_code != 200:
        raise RuntimeError(f"{vehicle.vin}: manifest refused: {r.text}")
    base = f"/vehicles/{vehicle.vin}/metadata"
    ts = http.get(f"{base}/timestamp.json")
    snapshot_version = json.loads(ts.content)["signed"]["meta"]["snapshot.json"]["version"]
    snap = http.get(f"{base}/{snapshot_version}.snapshot.json")
    targets_version = json.loads(snap.content)["signed"]["meta"]["targets.json"]["version"]
    targets = http.get(f"{base}/{targets_version}.targets.json")
    if targets.status_code != 200:
        raise RuntimeError(f"{vehicle.vin}: no targets: {targets.text}")


def bare_verification_rate(vehicles: list[Vehicle], min_seconds: float = 1.0) -> float:
    """Check-ins per second if a check-in cost only its 6 signature verifications."""
    work: list[tuple[Key, Any, bytes]] = []
    for v in vehicles:
        keys = {s: signer.public_key for s, signer in v.signers.items()}
        for data in v.manifests:
            parsed = SignedVehicleManifest.from_bytes(data)
            work.append((keys[v.primary], parsed.signatures[0], parsed.signed_bytes))
            for serial, report in parsed.manifest.reports.items():
                work.append((keys[serial], report.signatures[0], report.report_der))
    checkins = sum(len(v.manifests) for v in vehicles)
    done = 0
    start = time.perf_counter()
    while True:
        for key, sig, data in work:
            key.verify_signature(sig, data)
        done += checkins
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vehicles", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5, help="check-ins per vehicle")
    parser.add_argument("--concurrency", type=int, default=4, help="vehicles checking in at once")
    parser.add_argument("--workers", type=int, default=1, help="Director app processes")
    parser.add_argument("--db", default=None, help="database URL (default: SQLite in a temp dir)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="director-bench-"))
    image_url, image_root, image_server = image_repository(tmp / "image")
    (tmp / "image-root.json").write_bytes(image_root)
    db_url, schema = args.db or "", None
    if db_url and make_url(db_url).get_backend_name() == "postgresql":
        db_url, schema = fresh_postgres_schema(db_url)
    config = init_director(
        tmp / "director",
        image_repo_url=image_url,
        image_repo_root=tmp / "image-root.json",
        db_url=db_url,
    )
    port = free_port()
    log = (tmp / "server.log").open("wb")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uptane.cli",
            "director",
            "serve",
            "--dir",
            str(tmp / "director"),
            "--port",
            str(port),
            "--workers",
            str(args.workers),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {(tmp / 'server.log').read_text()}")
            try:
                httpx.get(f"{url}/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise SystemExit("server did not start") from None
                time.sleep(0.1)

        vehicles = [new_vehicle(i) for i in range(args.vehicles)]
        with client(url, config.token) as op:
            for v in vehicles:
                r = op.post("/api/vehicles", json=v.body())
                r.raise_for_status()
            r = op.post(
                "/api/assignments", json={"image": "bench-app.wasm", "hardware_id": "bench-hw"}
            )
            r.raise_for_status()
        for v in vehicles:
            v.sign_rounds(args.rounds)

        local = threading.local()

        def drive(v: Vehicle) -> None:
            if not hasattr(local, "http"):
                local.http = client(url)
            for manifest in v.manifests:
                check_in(local.http, v, manifest)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            list(pool.map(drive, vehicles))
        elapsed = time.perf_counter() - start
        checkins = args.vehicles * args.rounds
        rate = checkins / elapsed

        with client(url, config.token) as op:
            listed = op.get("/api/vehicles").json()
        assert all(e["report_counter"] == args.rounds for v in listed for e in v["ecus"])

        bare = bare_verification_rate(vehicles)
        backend = make_url(config.db_url).get_backend_name()
        print(
            f"director ({backend}, {args.workers} process(es), {args.concurrency} concurrent): {args.vehicles} vehicles x "
            f"{ECUS_PER_VEHICLE} ECUs x {args.rounds} rounds = {checkins} check-ins "
            f"(PUT manifest + GET timestamp/snapshot/targets) in {elapsed:.2f} s: "
            f"{rate:.1f} check-ins/s"
        )
        print(
            f"bare signature verification in this process "
            f"({1 + ECUS_PER_VEHICLE} ed25519 per check-in): {bare:.1f} check-ins/s"
        )
        print(f"director check-ins/s vs bare verification: ratio={rate / bare:.4f}")
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        image_server.shutdown()
        if schema is not None:
            drop_postgres_schema(db_url, schema)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
