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
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import wasmtime
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from director.app import create_app as director_app
from director.cli import init_director
from director.config import DirectorConfig
from director.service import Director, EcuSpec
from ecus.primary import CycleResult, Primary
from ecus.primary.can_link import CanSecondaryClient
from ecus.primary.config import DownloadPolicy, EcuEntry, PrimaryConfig
from ecus.secondary import Secondary
from ecus.secondary.slots import SLOTS, PowerCut
from ecus.secondary.wasm_host import SimPeripherals
from ecus.sim.http import Switchboard
from ecus.transport.accounting import PacedBus
from ecus.transport.faults import FaultyBus
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig, IsoTpEndpoint
from image_repo.repo import ImageRepository
from image_repo.server import create_app as image_app
from image_repo.server import running_app
from uptane.keys import generate_ed25519
from uptane.manifest import EcuVersionReport, SignedEcuVersionReport
from uptane.metadata import Limits
from uptane.repository import ExpiryPolicy, utc_now
from uptane.verification.matching import RepositoryMap

APPS_DIR = Path(__file__).resolve().parents[2] / "demo" / "apps"
TOKEN = "sim-operator-token"
PRIMARY_HW = "gateway"
DEFAULT_HARDWARE_IDS = ("brake-ctl", "body-ctl", "adas-cam", "hvac-ctl", "seat-ctl", "lamp-ctl")
BLINK_CAPS: Mapping[int, tuple[str, ...]] = {
    1: ("actuator.write", "health", "log"),
    2: ("actuator.write", "health", "log", "sensor.read"),
}
# Chunks of 32 KiB keep the update within ~1.5% of a bare ISO-TP transfer (bench/can_transfer.py).
CHUNK_SIZE = 32 * 1024


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


@dataclass
class SimSecondary:
    """One simulated secondary: its ECU object, CAN node, endpoint and the primary's client."""

    serial: str
    hardware_id: str
    signer: CryptoSigner
    slot_dir: Path
    node: CanNode
    faults: FaultyBus
    config: IsoTpConfig
    peripherals: SimPeripherals
    ecu: Secondary | None = None
    endpoint: IsoTpEndpoint | None = None
    client: CanSecondaryClient | None = None
    power_cut_at: str | None = None

    def _fault(self, point: str) -> None:
        if self.power_cut_at == point:
            self.power_cut_at = None
            raise PowerCut(point)

    def _handle(self, ecu: Secondary, request: bytes) -> bytes:
        """The endpoint handler: ``ecu.handle``; a power cut leaves the node silent."""
        try:
            return ecu.handle(request)
        except PowerCut:
            # A powered-off ECU neither answers nor acknowledges frames until
            # ``SimVehicle.boot`` powers it up again over the same slot store.
            self.faults.go_bus_off()
            if self.endpoint is not None:
                self.endpoint.stop()
            return b""

    def slot_snapshot(self) -> dict[str, Any]:
        """Active slot, its target name and the sha256 of both slot files (for assertions)."""
        assert self.ecu is not None
        store = self.ecu.store
        active = store.active_target()
        digests = {}
        for slot in SLOTS:
            path = store.slot_path(slot)
            data = path.read_bytes() if path.exists() else b""
            digests[slot] = hashlib.sha256(data).hexdigest()
        return {
            "active": store.active,
            "target": None if active is None else active.name,
            "slots": digests,
        }


@dataclass
class EcuOutcome:
    """What one ECU ended a cycle with."""

    serial: str
    hardware_id: str
    installed: str | None
    release_counter: int | None
    last_result: str
    attacks: tuple[str, ...]
    error: str | None = None


@dataclass
class VehicleOutcome:
    """A structured result of one vehicle cycle: the primary's, then each ECU's."""

    vin: str
    ok: bool
    cycle: CycleResult
    ecus: dict[str, EcuOutcome]
    errors: dict[str, BaseException] = field(default_factory=dict)
    attacks: tuple[str, ...] = ()
    seconds: float = 0.0

    def installed(self) -> dict[str, str | None]:
        return {s: e.installed for s, e in self.ecus.items()}


class SimVehicle:
    """A primary and its secondaries on one virtual CAN bus (DESIGN 2, 4)."""

    def __init__(
        self,
        world: WorldView,
        vin: str,
        hardware_ids: Sequence[str],
        *,
        fd: bool = False,
        paced: bool = False,
        clock: Callable[[], datetime] | None = None,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        # a WorldView in a worker process of a sharded run, where no scenario runs
        self.world: World = world  # type: ignore[assignment]
        self.vin = vin
        self.fd = fd
        self.clock = clock or world.clock
        self.progress = progress
        self.dir = world.directory / "vehicles" / vin
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stack = contextlib.ExitStack()
        self.bus = CanBusConfig(channel=f"sim-{vin}-{uuid.uuid4().hex[:8]}", fd=fd)
        primary_bus = self.bus.open()
        if paced:
            primary_bus = PacedBus(primary_bus, self.bus.timing)
        self.primary_faults = FaultyBus(primary_bus)  # the primary's controller (bus off, ...)
        self.primary_node = self.stack.enter_context(CanNode(self.primary_faults))
        self.secondaries: dict[str, SimSecondary] = {}
        # provisioned on every secondary like the Director root (DESIGN 7)
        self.primary_key = generate_ed25519(self.dir / "keys", "primary")
        self.primary_signer = self.primary_key.signer()
        for index, hw in enumerate(hardware_ids):
            serial = f"{vin}-{hw}-{index + 1}"
            faulty = FaultyBus(self.bus.open())
            node = self.stack.enter_context(CanNode(faulty))
            config = IsoTpConfig(
                0x600 + 2 * index,
                0x601 + 2 * index,
                fd=fd,
                max_request=CHUNK_SIZE + 4096,
                timeout=10.0,
            )
            self.secondaries[serial] = SimSecondary(
                serial=serial,
                hardware_id=hw,
                signer=CryptoSigner.generate_ed25519(),
                slot_dir=self.dir / serial,
                node=node,
                faults=faulty,
                config=config,
                peripherals=SimPeripherals(sensors={0: 7}),
            )
        self.primary_serial = f"{vin}-primary"
        specs = [EcuSpec(self.primary_serial, PRIMARY_HW, self.primary_key.public, primary=True)]
        specs += [
            EcuSpec(s.serial, s.hardware_id, s.signer.public_key) for s in self.secondaries.values()
        ]
        world.director.register_vehicle(vin, specs)
        for serial in self.secondaries:
            self.boot(serial)
            self._connect(serial)
        self.primary = self._make_primary()

    # --- wiring ---------------------------------------------------------------

    def _connect(self, serial: str) -> None:
        sec = self.secondaries[serial]
        link = self.stack.enter_context(self.primary_node.link(sec.config))
        sec.client = CanSecondaryClient(
            link,
            serial,
            chunk_size=CHUNK_SIZE,
            clock=self.clock,
            install_timeout=30.0,
            signer=self.primary_signer,
        )

    def boot(self, serial: str) -> Secondary:
        """Start (or restart, keeping its slot store) one secondary."""
        sec = self.secondaries[serial]
        if sec.endpoint is not None:
            sec.endpoint.close()
        sec.ecu = Secondary(
            ecu_serial=serial,
            hardware_id=sec.hardware_id,
            vin=self.vin,
            signer=sec.signer,
            director_root=self.world.director_root_der,
            slot_dir=sec.slot_dir,
            clock=self.clock,
            peripherals=sec.peripherals,
            max_message=CHUNK_SIZE + 4096,
            fault=sec._fault,
            primary_key=self.primary_key.public,
        )
        sec.faults.clear_bus_off()  # powered up again (after a power cut)
        handler = functools.partial(sec._handle, sec.ecu)
        sec.endpoint = self.stack.enter_context(sec.node.endpoint(sec.config, handler))
        sec.endpoint.start()
        return sec.ecu

    def _make_primary(self) -> Primary:
        config = PrimaryConfig(
            vin=self.vin,
            ecu_serial=self.primary_serial,
            hardware_id=PRIMARY_HW,
            key=self.primary_key,
            repository_map=self.world.repository_map(),
            director_root=self.world.director_root_json,
            image_root=self.world.image_root,
            state_dir=self.dir / "primary-state",
            download_dir=self.dir / "primary-images",
            secondaries=tuple(
                EcuEntry(s.serial, s.hardware_id, s.signer.public_key)
                for s in self.secondaries.values()
            ),
            download=DownloadPolicy(socket_timeout=5.0, grace_seconds=1.0),
        )
        clients = [s.client for s in self.secondaries.values() if s.client is not None]
        return Primary(config, clients, clock=self.clock)

    def close(self) -> None:
        self.stack.close()

    # --- running ----------------------------------------------------------------

    def report(self, serial: str) -> EcuVersionReport:
        """A fresh, verified version report straight from one secondary."""
        sec = self.secondaries[serial]
        assert sec.client is not None
        nonce = os.urandom(16)
        signed = SignedEcuVersionReport.from_der(sec.client.version_report(nonce))
        return signed.verify(sec.signer.public_key)

    def cycle(self) -> VehicleOutcome:
        """One update cycle: manifest, full verification, downloads, distribution."""
        start = time.monotonic()
        result = self.primary.run_cycle()
        errors: dict[str, BaseException] = {}
        if result.ok and result.updates:
            for serial in result.updates:
                sec = self.secondaries.get(serial)
                if sec is not None and sec.client is not None and self.progress is not None:
                    sec.client.progress = functools.partial(self._progress, serial)
            for serial, outcome in self.primary.distribute(result).items():
                if isinstance(outcome, BaseException):
                    errors[serial] = outcome
        ecus: dict[str, EcuOutcome] = {}
        for serial, sec in self.secondaries.items():
            # Read the ECU's state in process (no extra report counter is used up).
            err: BaseException | None = errors.get(serial)
            if err is None:
                err = next((i.error for i in result.issues if i.ecu_serial == serial), None)
            ecu = sec.ecu
            if ecu is None:
                ecus[serial] = EcuOutcome(serial, sec.hardware_id, None, None, "unreachable", ())
                continue
            active = ecu.store.active_target()
            state = ecu.report_state
            ecus[serial] = EcuOutcome(
                serial=serial,
                hardware_id=sec.hardware_id,
                installed=None if active is None else active.name,
                release_counter=None if active is None else active.release_counter,
                last_result=state.last_result,
                attacks=state.attacks,
                error=None if err is None else f"{type(err).__name__}: {err}",
            )
        attacks = set(result.attacks)
        for e in ecus.values():
            attacks.update(e.attacks)
        return VehicleOutcome(
            vin=self.vin,
            ok=result.ok and not errors,
            cycle=result,
            ecus=ecus,
            errors=errors,
            attacks=tuple(sorted(attacks)),
            seconds=time.monotonic() - start,
        )

    def _progress(self, serial: str, offset: int, length: int) -> None:
        if self.progress is not None:
            self.progress(serial, offset, length)

    def tick(self, serial: str, t: int) -> int | None:
        """The running WASM module's output on one secondary for tick ``t``."""
        ecu = self.secondaries[serial].ecu
        return None if ecu is None else ecu.tick(t)


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
        view.director = _DirectorApi(address.director_url, address.token)
        view.director_url = address.director_url
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
    ) -> None:
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
        self.director_url = self.stack.enter_context(running_app(self.director_board))
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
