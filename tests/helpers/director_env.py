"""The Director test environment: a Director over real HTTP (SQLite and PostgreSQL),
an Image repository, vehicles and their manifests.

A pytest plugin (``tests/conftest.py``): its fixtures (``db_url``, ``image_repo``,
``env``) reach every test module without imports; helpers are imported by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import itertools
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from securesystemslib.signer import CryptoSigner, Signer
from sqlalchemy import select
from tuf.api.metadata import TargetFile, Targets
from tuf.ngclient import Updater

from director.app import create_app
from director.config import DirectorConfig
from director.db import Base, Database
from director.service import Director
from director.setup import init_director
from uptane.keys import public_key_dict
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    VehicleVersionManifest,
)
from uptane.metadata import build_custom
from uptane.repository import DirectoryStore, SigningRepository

PG_DSN = os.environ.get("UPTANE_TEST_PG", "host=127.0.0.1 port=5432 dbname=test")
_counter = itertools.count(1)


# --- Image repository: SigningRepository on disk + static HTTP server ----------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class ImageRepoSim:
    directory: Path
    url: str = ""
    images: dict[str, bytes] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.signers = {
            r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
        }
        self.repo = SigningRepository(store=DirectoryStore(self.directory / "metadata"))
        self.repo.add_signers(self.signers.values())
        with self.repo.edit_root() as root:
            for role, signer in self.signers.items():
                root.add_key(signer.public_key, role)
        with self.repo.edit_targets():
            pass
        self.repo.publish()

    @property
    def root_bytes(self) -> bytes:
        data = self.repo.store.read("1.root.json")
        assert data is not None
        return data

    def add(
        self, name: str, hardware_ids: list[str], release_counter: int, **custom: Any
    ) -> TargetFile:
        data = f"{name} {release_counter}".encode() * 7
        tf = TargetFile.from_data(name, data, ["sha256", "sha512"])
        tf.unrecognized_fields["custom"] = build_custom(
            hardware_ids=hardware_ids, release_counter=release_counter, **custom
        )
        with self.repo.edit_targets() as targets:
            targets.targets[name] = tf
        self.repo.publish()
        self.images[name] = data
        self.counters[name] = release_counter
        return tf


def _serve_static(directory: Path) -> tuple[str, Callable[[], None]]:
    handler = partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return f"http://127.0.0.1:{server.server_address[1]}", stop


def _serve_asgi(app: Any, **config: Any) -> tuple[str, Callable[[], None]]:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread (``config``: more of
    ``uvicorn.Config``); its URL and a function that stops it."""
    # proto=IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets that
    # say they are TCP; without it every keep-alive request stalls ~40 ms.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def http_client(url: str, token: str | None = None) -> httpx.Client:
    """An httpx client with TCP_NODELAY (no Nagle/delayed-ACK stalls on loopback)."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=url, timeout=30, transport=transport, headers=headers)


# --- databases ---------------------------------------------------------------


def _pg_user() -> str:
    import psycopg

    errors = []
    for user in ("postgres", "root"):
        try:
            with psycopg.connect(f"{PG_DSN} user={user}", connect_timeout=3):
                return user
        except psycopg.Error as e:
            errors.append(f"{user}: {e}")
    raise ConnectionError("; ".join(errors))


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh, empty database: a SQLite file, or a new schema in PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'director.db'}"
        return
    import psycopg

    try:
        user = _pg_user()
    except ConnectionError as e:
        msg = f"PostgreSQL at {PG_DSN!r} unreachable: {e}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg)
        pytest.skip(msg + " (skipped locally; CI=true makes this a failure)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{PG_DSN} user={user}", autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    params = dict(p.split("=", 1) for p in PG_DSN.split())
    yield (
        f"postgresql+psycopg://{user}@{params.get('host', '127.0.0.1')}:{params.get('port', '5432')}"
        f"/{params.get('dbname', 'test')}?options=-csearch_path%3D{schema}"
    )
    with psycopg.connect(f"{PG_DSN} user={user}", autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


# --- the Director under test -----------------------------------------------------


class MovableClock:
    """Real time plus an offset the test moves forward (never patches globals)."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


@dataclass
class Env:
    director: Director
    config: DirectorConfig
    url: str
    image: ImageRepoSim
    clock: MovableClock
    http: httpx.Client
    op: httpx.Client
    tmp: Path

    @property
    def db(self) -> Database:
        return self.director.db


@pytest.fixture(scope="module")
def image_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageRepoSim]:
    sim = ImageRepoSim(tmp_path_factory.mktemp("image"))
    sim.add("brake-1.wasm", ["brake-ecu"], 1)
    sim.add("brake-2.wasm", ["brake-ecu"], 2, capabilities=["log", "sensor.read"])
    sim.add("brake-0.wasm", ["brake-ecu"], 0)
    sim.add("door-1.wasm", ["door-ecu"], 1)
    sim.add("apps/infotainment.wasm", ["infotainment", "head-unit"], 3)
    sim.add("primary-1.wasm", ["gateway"], 1)
    sim.url, stop = _serve_static(sim.directory)
    yield sim
    stop()


@contextlib.contextmanager
def running_env(
    db_url: str, image_repo: ImageRepoSim, tmp: Path, *, app_env: Mapping[str, str] | None = None
) -> Iterator[Env]:
    """A new Director in ``tmp`` and its app served on loopback (``app_env``: environment
    variables set while the app is made, e.g. no background signer)."""
    root_file = tmp / "image-root.json"
    root_file.write_bytes(image_repo.root_bytes)
    config = init_director(
        tmp / "dir", image_repo_url=image_repo.url, image_repo_root=root_file, db_url=db_url
    )
    clock = MovableClock()
    director = Director.from_config(config, clock=clock)
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (app_env or {}).items():
            patch.setenv(name, value)
        url, stop = _serve_asgi(create_app(director, config.token))
    client = http_client(url)
    op = http_client(url, config.token)
    try:
        yield Env(director, config, url, image_repo, clock, client, op, tmp)
    finally:
        client.close()
        op.close()
        stop()
        director.close()


@pytest.fixture(scope="module")
def env(
    db_url: str, image_repo: ImageRepoSim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    with running_env(db_url, image_repo, tmp_path_factory.mktemp("director")) as running:
        yield running


# --- simulated vehicles ------------------------------------------------------------


@dataclass
class Ecu:
    serial: str
    hardware_id: str
    signer: Signer
    primary: bool = False
    counter: int = 0
    installed: InstalledImage | None = None


@dataclass
class Car:
    vin: str
    ecus: dict[str, Ecu]

    @property
    def primary(self) -> Ecu:
        return next(e for e in self.ecus.values() if e.primary)

    def body(self) -> dict[str, Any]:
        return {
            "vin": self.vin,
            "ecus": [
                {
                    "serial": e.serial,
                    "hardware_id": e.hardware_id,
                    "public_key": public_key_dict(e.signer.public_key),
                    "primary": e.primary,
                }
                for e in self.ecus.values()
            ],
        }

    def report(self, serial: str, *, bump: bool = True, **kw: Any) -> SignedEcuVersionReport:
        ecu = self.ecus[serial]
        if bump:
            ecu.counter += 1
        fields: dict[str, Any] = {
            "ecu_serial": serial,
            "hardware_id": ecu.hardware_id,
            "installed": ecu.installed,
            "report_counter": ecu.counter,
            "latest_time": datetime.now(UTC).replace(microsecond=0),
        }
        fields.update(kw)
        signer = fields.pop("signer", ecu.signer)
        return SignedEcuVersionReport.sign(EcuVersionReport(**fields), signer)

    def manifest(
        self,
        *,
        reports: dict[str, SignedEcuVersionReport] | None = None,
        signer: Signer | None = None,
        vin: str | None = None,
    ) -> bytes:
        if reports is None:
            reports = {s: self.report(s) for s in self.ecus}
        m = VehicleVersionManifest(vin or self.vin, self.primary.serial, reports)
        return m.sign(signer or self.primary.signer)


def new_car(n_secondaries: int = 2, hardware: tuple[str, ...] = ("brake-ecu", "door-ecu")) -> Car:
    k = next(_counter)
    vin = f"VIN{k:05d}{uuid.uuid4().hex[:6].upper()}"
    ecus = {f"{vin}-P": Ecu(f"{vin}-P", "gateway", CryptoSigner.generate_ed25519(), primary=True)}
    for i in range(n_secondaries):
        serial = f"{vin}-S{i}"
        ecus[serial] = Ecu(serial, hardware[i % len(hardware)], CryptoSigner.generate_ed25519())
    return Car(vin, ecus)


def register(env: Env, car: Car) -> Car:
    r = env.op.post("/api/vehicles", json=car.body())
    assert r.status_code == 201, r.text
    return car


def put_manifest(env: Env, car: Car, data: bytes) -> httpx.Response:
    return env.http.put(
        f"/vehicles/{car.vin}/manifest", content=data, headers={"Content-Type": "application/json"}
    )


def dump(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every Director table, ordered: compared before/after refusals."""
    with db.engine.connect() as conn:
        return {
            t.name: [tuple(r) for r in conn.execute(select(t).order_by(*t.primary_key.columns))]
            for t in Base.metadata.sorted_tables
        }


def refresh(env: Env, car: Car, tmp: Path) -> Updater:
    """A plain python-tuf client refresh of ``car``'s Director repository."""
    root = env.http.get("/root/1.root.json").content
    md_dir = tmp / f"ngclient-{uuid.uuid4().hex[:8]}"
    md_dir.mkdir()
    updater = Updater(str(md_dir), f"{env.url}/vehicles/{car.vin}/metadata/", bootstrap=root)
    updater.refresh()
    return updater


def director_targets(updater: Updater) -> Targets:
    targets = updater._trusted_set.targets  # the verified top-level targets
    assert isinstance(targets, Targets)
    return targets


def installed_image(env: Env, name: str, **changes: Any) -> InstalledImage:
    """What an ECU reports after installing ``name`` from the Image repository."""
    data = env.image.images[name]
    fields: dict[str, Any] = {
        "filename": name,
        "length": len(data),
        "hashes": {
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha512": hashlib.sha512(data).hexdigest(),
        },
        "release_counter": env.image.counters[name],
    }
    fields.update(changes)
    return InstalledImage(**fields)
