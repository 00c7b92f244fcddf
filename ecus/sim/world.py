"""Whole vehicles against real repositories on loopback (DESIGN 9).

A ``World`` owns one Image repository and one Director, each a real HTTP
server (uvicorn on 127.0.0.1) behind a ``Switchboard`` so that a scenario can
play the network attacker or a compromised server. ``World.add_vehicle``
builds a ``SimVehicle``: a ``Primary`` and N ``Secondary`` ECUs on one
virtual CAN bus (python-can + ISO-TP, classic or FD), each secondary with its
own A/B slot store and WASM host, every ECU with its own ed25519 key
registered in the Director's inventory.

Time is a ``SimClock`` shared by the Director, the Image repository and all
ECUs unless a scenario gives a vehicle its own; freeze attacks move clocks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import wasmtime
from tuf.api.metadata import TargetFile

from director.app import create_app as director_app
from director.config import DirectorConfig
from director.service import Director, EcuSpec
from director.setup import init_director
from ecus.primary.config import TlsFiles
from ecus.sim.http import Switchboard
from ecus.sim.vehicle import CHUNK_SIZE as CHUNK_SIZE  # re-exported: the world builds vehicles
from ecus.sim.vehicle import PRIMARY_HW as PRIMARY_HW
from ecus.sim.vehicle import EcuOutcome as EcuOutcome
from ecus.sim.vehicle import SimSecondary as SimSecondary
from ecus.sim.vehicle import SimVehicle as SimVehicle
from ecus.sim.vehicle import VehicleOutcome as VehicleOutcome
from image_repo.repo import ImageRepository
from image_repo.server import create_app as image_app
from image_repo.server import running_app
from uptane.metadata import Limits
from uptane.repository import ExpiryPolicy, utc_now
from uptane.verification.matching import RepositoryMap

APPS_DIR = Path(__file__).resolve().parents[2] / "demo" / "apps"
TOKEN = "sim-operator-token"
DEFAULT_HARDWARE_IDS = ("brake-ctl", "body-ctl", "adas-cam", "hvac-ctl", "seat-ctl", "lamp-ctl")
BLINK_CAPS: Mapping[int, tuple[str, ...]] = {
    1: ("actuator.write", "health", "log"),
    2: ("actuator.write", "health", "log", "sensor.read"),
}


class SimClock:
    """A settable UTC clock: real time plus an offset scenarios can move."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        with self._lock:
            return utc_now() + self.offset

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self.offset += delta


@functools.cache
def app_module(version: int) -> bytes:
    """The demo WASM app ``blink_v{version}`` compiled from its WAT source."""
    source = (APPS_DIR / f"blink_v{version}.wat").read_text(encoding="utf-8")
    return bytes(wasmtime.wat2wasm(source))


def image_name(hardware_id: str, version: int) -> str:
    return f"apps/{hardware_id}/blink-v{version}.wasm"


class _DirectorApi:
    """Registers vehicles through the Director's operator API (``POST /api/vehicles``)."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token

    def register_vehicle(self, vin: str, specs: Sequence[EcuSpec]) -> None:
        body = {
            "vin": vin,
            "ecus": [
                {
                    "serial": e.serial,
                    "hardware_id": e.hardware_id,
                    "public_key": e.public_key.to_dict(),
                    "primary": e.primary,
                }
                for e in specs
            ],
        }
        response = httpx.post(
            f"{self.url}/api/vehicles",
            json=body,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60.0,
        )
        if response.status_code != 201:
            raise RuntimeError(f"registering {vin} failed: {response.status_code} {response.text}")


@dataclass(frozen=True)
class WorldAddress:
    """What a process needs to build vehicles against a ``World`` running elsewhere."""

    directory: str
    director_url: str
    image_url: str
    token: str
    director_root_json: bytes
    director_root_der: bytes
    image_root: bytes
    # the operator API (plain HTTP on loopback); the vehicles' URL is TLS when ``tls``
    operator_url: str = ""
    tls: bool = False


class WorldView:
    """The Director and Image repository as vehicles see them: URLs, trust roots, the
    operator API to register vehicles. ``World`` is one (and runs the servers);
    ``WorldView.connect`` gives one to another process (``uptane sim --workers``)."""

    directory: Path
    clock: SimClock
    director: Any
    director_url: str
    image_url: str
    director_root_json: bytes
    director_root_der: bytes
    vehicles: dict[str, SimVehicle]
    tls: bool = False  # vehicles reach the Director over mutual TLS

    _image_root: bytes = b""

    @property
    def image_root(self) -> bytes:
        """The Image repository's version 1 root (the primary's trust anchor)."""
        return self._image_root

    @classmethod
    def connect(cls, address: WorldAddress) -> WorldView:
        view = cls()
        view.directory = Path(address.directory)
        view.clock = SimClock()
        view.director = _DirectorApi(address.operator_url or address.director_url, address.token)
        view.director_url = address.director_url
        view.tls = address.tls
        view.image_url = address.image_url
        view.director_root_json = address.director_root_json
        view.director_root_der = address.director_root_der
        view._image_root = address.image_root
        view.vehicles = {}
        return view

    def repository_map(self) -> RepositoryMap:
        return RepositoryMap.from_dict(
            {
                "repositories": {"director": [self.director_url], "image": [self.image_url]},
                "mapping": [
                    {
                        "paths": ["*"],
                        "repositories": ["director", "image"],
                        "terminating": True,
                        "threshold": 2,
                    }
                ],
            }
        )

    def tls_files(self, vin: str, directory: Path) -> TlsFiles | None:
        """A vehicle's mutual TLS files (written to ``directory``), None over plain HTTP."""
        if not self.tls:
            return None
        from director.tls import issue_vehicle_certificate

        issued = issue_vehicle_certificate(self.directory / "director", vin)
        cert, key, ca = issued.write(directory, vin)
        return TlsFiles(ca=ca, cert=cert, key=key)

    def add_vehicle(self, vin: str, hardware_ids: Sequence[str], **kwargs: Any) -> SimVehicle:
        vehicle = SimVehicle(self, vin, hardware_ids, **kwargs)
        self.vehicles[vin] = vehicle
        return vehicle

    def close(self) -> None:
        for vehicle in self.vehicles.values():
            vehicle.close()
        self.vehicles.clear()


class World(WorldView):
    """An Image repository and a Director on loopback, plus the vehicles built on them."""

    director: Director

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        clock: SimClock | None = None,
        image_threshold: int = 2,
        director_expiry: timedelta = timedelta(days=1),
        tls: bool = False,
    ) -> None:
        self.tls = tls  # the Director over mutual TLS, a client certificate per vehicle
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clock = clock or SimClock()
        self.stack = contextlib.ExitStack()
        self.vehicles: dict[str, SimVehicle] = {}
        try:
            self._start(image_threshold, director_expiry)
        except BaseException:
            self.stack.close()
            raise

    def _start(self, image_threshold: int, director_expiry: timedelta) -> None:
        self.image_repo = ImageRepository.init(
            self.directory / "image",
            root_threshold=image_threshold,
            targets_threshold=image_threshold,
            clock=self.clock,
            expiry=ExpiryPolicy(timestamp=timedelta(days=1), snapshot=timedelta(days=7)),
        )
        self.image_board = Switchboard(image_app(self.directory / "image"))
        self.image_url = self.stack.enter_context(running_app(self.image_board))
        init_director(
            self.directory / "director",
            image_repo_url=self.image_url,
            image_repo_root=self.image_repo.metadata_dir / "1.root.json",
            token=TOKEN,
        )
        config = DirectorConfig.load(self.directory / "director")
        config.metadata_expiry = director_expiry
        config.refresh_margin = min(config.refresh_margin, director_expiry / 4)
        self.director_config = config
        self.director = Director.from_config(config, clock=self.clock)
        self.stack.callback(self.director.close)
        self.director_board = Switchboard(director_app(self.director, TOKEN))
        if self.tls:
            from director.tls import running_vehicle_listener

            # no revocation check: the simulator records none of the certificates it issues
            # (and swaps the Director behind the Switchboard on a restart)
            listener = running_vehicle_listener(
                self.director_board, config.directory, revocations=None
            )
            self.director_url = self.stack.enter_context(listener)
            # the operator API for other processes (``uptane sim --workers``), as the
            # Director's separate operator port is: plain HTTP on loopback
            self.operator_url = self.stack.enter_context(running_app(self.director_board))
        else:
            self.director_url = self.stack.enter_context(running_app(self.director_board))
            self.operator_url = self.director_url
        root_dir = config.root_dir
        self.director_root_json = (root_dir / "1.root.json").read_bytes()
        self.director_root_der = (root_dir / "1.root.der").read_bytes()

    def restart_servers(self) -> Director:
        """Restart the Director and the Image repository: new app objects and a new
        ``Director`` over the same database and repository files (the servers answer
        503 while they are down)."""
        self.director_board.app = None
        self.image_board.app = None
        self.director.close()
        director = Director.from_config(self.director_config, clock=self.clock)
        director.attack_manifests = self.director.attack_manifests  # an operator setting
        self.stack.callback(director.close)
        self.director = director
        self.director_board.app = director_app(director, TOKEN)
        self.image_board.app = image_app(self.image_repo.path)
        return director

    def close(self) -> None:
        for vehicle in self.vehicles.values():
            vehicle.close()
        self.vehicles.clear()
        self.stack.close()

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def image_root(self) -> bytes:
        return self.image_repo.root_bytes(1)

    def address(self) -> WorldAddress:
        """How another process reaches this world (``WorldView.connect``)."""
        return WorldAddress(
            directory=str(self.directory),
            director_url=self.director_url,
            image_url=self.image_url,
            token=TOKEN,
            director_root_json=self.director_root_json,
            director_root_der=self.director_root_der,
            image_root=self.image_root,
            operator_url=self.operator_url,
            tls=self.tls,
        )

    # --- repositories -------------------------------------------------------------

    def publish(
        self,
        version: int,
        hardware_ids: Iterable[str],
        *,
        release_counter: int | None = None,
        data: bytes | None = None,
        limits: Limits | None = None,
        capabilities: Sequence[str] | None = None,
    ) -> dict[str, TargetFile]:
        """Publish ``blink_v{version}`` (or ``data``) for each hardware id; returns name -> target."""
        published = {}
        for hw in hardware_ids:
            name = image_name(hw, version)
            published[name] = self.image_repo.add_target(
                data if data is not None else app_module(version),
                name=name,
                hardware_ids=[hw],
                release_counter=version if release_counter is None else release_counter,
                capabilities=capabilities
                if capabilities is not None
                else BLINK_CAPS.get(version, BLINK_CAPS[2]),
                limits=limits or Limits(confirm_ticks=5),
            )
        return published

    def assign_version(
        self, version: int, hardware_ids: Iterable[str], vins: Sequence[str] | None = None
    ) -> int:
        """Assign ``blink_v{version}`` to every ECU of those hardware ids; returns how many."""
        count = 0
        for hw in hardware_ids:
            count += len(self.director.assign(image_name(hw, version), hardware_id=hw, vins=vins))
        return count


def hardware_ids_for(count: int) -> list[str]:
    """``count`` hardware ids for a vehicle's secondaries (cycling the known list)."""
    return [DEFAULT_HARDWARE_IDS[i % len(DEFAULT_HARDWARE_IDS)] for i in range(count)]


@contextlib.contextmanager
def world(directory: str | os.PathLike[str], **kwargs: Any) -> Iterator[World]:
    w = World(directory, **kwargs)
    try:
        yield w
    finally:
        w.close()
