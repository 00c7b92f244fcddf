"""One secondary over an in-memory link that runs release 1 and gets release 2 as a delta."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from ecus.primary.can_link import CanSecondaryClient
from ecus.primary.deltas import DeltaUpdate
from ecus.primary.links import EcuUpdate
from ecus.secondary import Secondary
from ecus.secondary.slots import PowerCut
from ecus.secondary.wasm_host import SimPeripherals
from ecus.transport.memory import MemoryEndpoint, memory_pair
from helpers.delta_images import release
from helpers.director_sim import T0, VIN, DirectorSim, target_file
from image_repo.delta import make_delta
from uptane.delta import DELTA_FORMAT, DeltaOffer
from uptane.manifest import EcuVersionReport, InstalledImage

SERIAL, HW = "ecu-1", "blink-hw"
CAPS = ("actuator.write", "health", "log", "sensor.read")
NAME = "apps/blink.wasm"


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass
class DeltaEcu:
    """A secondary, its Director metadata and the primary-side client."""

    tmp: Path
    sim: DirectorSim = field(default_factory=DirectorSim)
    signer: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    clock: Clock = field(default_factory=Clock)
    chunk_size: int = 1024
    secondary: Secondary = field(init=False)
    client: CanSecondaryClient = field(init=False)
    endpoint: MemoryEndpoint | None = None
    #: cut the power at the n-th (1-based) time the slot store reaches this write point
    cut_at: tuple[str, int] | None = None
    cuts: list[str] = field(default_factory=list)
    _seen: int = 0

    def __post_init__(self) -> None:
        self.boot()

    def _fault(self, point: str) -> None:
        if self.cut_at is not None and point == self.cut_at[0]:
            self._seen += 1
            if self._seen == self.cut_at[1]:
                self.cut_at, self._seen = None, 0
                self.cuts.append(point)
                raise PowerCut(point)

    def _handle(self, ecu: Secondary, request: bytes) -> bytes:
        try:
            return ecu.handle(request)
        except PowerCut:
            return b""  # a dead ECU says nothing the client can decode

    def boot(self, **kw: Any) -> Secondary:
        """(Re)start the ECU over the same slot directory with a fresh link."""
        if self.endpoint is not None:
            self.endpoint.close()
        self.secondary = Secondary(
            ecu_serial=SERIAL,
            hardware_id=HW,
            vin=VIN,
            signer=self.signer,
            director_root=self.sim.root_ders[1],
            slot_dir=self.tmp / "slots",
            clock=self.clock,
            peripherals=SimPeripherals(sensors={0: 5}),
            fault=self._fault,
            **kw,
        )
        handler = functools.partial(self._handle, self.secondary)
        link, self.endpoint = memory_pair(handler, timeout=10.0)
        self.endpoint.start()
        self.client = CanSecondaryClient(link, SERIAL, chunk_size=self.chunk_size)
        return self.secondary

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    def target(self, version: int, data: bytes | None = None) -> TargetFile:
        data = release(version) if data is None else data
        return target_file(
            NAME,
            data,
            ecu_serial=SERIAL,
            hardware_ids=[HW],
            release_counter=version,
            capabilities=CAPS,
        )

    def update(self, version: int, data: bytes | None = None) -> EcuUpdate:
        """Publish ``version`` in the Director metadata; the full-image update for it."""
        data = release(version) if data is None else data
        target = self.target(version, data)
        path = self.tmp / "images" / f"v{version}-{hashlib.sha256(data).hexdigest()[:8]}.wasm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.sim.publish_targets([target])
        return self.sim.update_for(target, path)

    def with_delta(
        self, update: EcuUpdate, patch: bytes, base: InstalledImage | None = None
    ) -> EcuUpdate:
        """``update`` carrying ``patch`` as a delta from ``base`` (default: release 1)."""
        path = self.tmp / "images" / f"delta-{hashlib.sha256(patch).hexdigest()[:8]}"
        path.write_bytes(patch)
        base = base if base is not None else self.installed(1)
        offer = DeltaOffer(DELTA_FORMAT, base, len(patch))
        return dataclasses.replace(update, delta=DeltaUpdate("delta", path, offer))

    @staticmethod
    def installed(version: int) -> InstalledImage:
        data = release(version)
        return InstalledImage(
            filename=NAME,
            length=len(data),
            hashes={
                "sha256": hashlib.sha256(data).hexdigest(),
                "sha512": hashlib.sha512(data).hexdigest(),
            },
            release_counter=version,
        )

    def install_v1(self) -> None:
        self.client.send_update(self.update(1))
        assert self.report().installed == self.installed(1)

    def report(self) -> EcuVersionReport:
        nonce = os.urandom(16)
        return self.client.get_report(nonce).verify(self.signer.public_key)

    def active_bytes(self) -> bytes:
        store = self.secondary.store
        assert store.active is not None
        return store.slot_path(store.active).read_bytes()


def patch_v1_v2() -> bytes:
    return make_delta(release(1), release(2))


def running_v1(tmp: Path) -> Iterator[DeltaEcu]:
    """A ``DeltaEcu`` with release 1 installed and no attack reported yet (for a fixture)."""
    e = DeltaEcu(tmp)
    e.install_v1()
    e.report()  # a clean slate of attacks
    yield e
    e.close()
