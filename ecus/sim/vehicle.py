"""A simulated vehicle: a primary and its secondaries on a virtual CAN bus (``ecus.sim.world``)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from securesystemslib.signer import CryptoSigner

from director.service import EcuSpec
from ecus.primary import CycleResult, Primary
from ecus.primary.can_link import CanSecondaryClient
from ecus.primary.config import DownloadPolicy, EcuEntry, PrimaryConfig
from ecus.secondary import Secondary
from ecus.secondary.slots import SLOTS, PowerCut
from ecus.secondary.wasm_host import SimPeripherals
from ecus.transport.accounting import PacedBus
from ecus.transport.faults import FaultyBus
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig, IsoTpEndpoint
from uptane.keys import generate_ed25519
from uptane.manifest import EcuVersionReport, SignedEcuVersionReport

if TYPE_CHECKING:
    from ecus.sim.world import World, WorldView

PRIMARY_HW = "gateway"
# Chunks of 32 KiB keep the update within ~1.5% of a bare ISO-TP transfer (bench/can_transfer.py).
CHUNK_SIZE = 32 * 1024


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
            tls=self.world.tls_files(self.vin, self.dir / "tls"),
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
