"""A primary-side sender and three secondaries on one virtual CAN bus (DESIGN 2, 4, 5).

Director metadata comes from ``helpers.director_sim`` (JSON + DER signed on
demand), so no HTTP server is needed. Classic CAN and CAN FD. Also: tampered
image bytes on the bus, and transfers that resume after a dropped frame, a
timeout and a restart of the secondary.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.director_sim import T0, VIN, DirectorSim, target_file, wasm_from_wat
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from ecus.primary.can_link import CanSecondaryClient, TransferFailedError
from ecus.secondary import Secondary
from ecus.secondary.slots import COMMITTED
from ecus.secondary.wasm_host import SimPeripherals
from ecus.transport.faults import FaultyBus, FrameFault
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig, IsoTpEndpoint
from uptane import codec
from uptane.errors import ATTACK_ARBITRARY_SOFTWARE, MessageTooLarge, TransportError
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import Limits

REPO = Path(__file__).resolve().parents[1]
HW = "blink-hw"
V1_CAPS = ("actuator.write", "health", "log")
V2_CAPS = ("actuator.write", "health", "log", "sensor.read")
LIMITS = Limits(confirm_ticks=3)


@functools.cache
def blink(version: int, pad_to: int | None = None) -> bytes:
    return wasm_from_wat(REPO / "demo" / "apps" / f"blink_v{version}.wat", pad_to=pad_to)


def ids(index: int) -> tuple[int, int]:
    return 0x710 + index, 0x720 + index


@dataclass
class Node:
    """One secondary ECU on the bus: its Secondary, CAN node, endpoint and the primary's client."""

    serial: str
    index: int
    signer: CryptoSigner
    slot_dir: Path
    node: CanNode
    faults: FaultyBus
    config: IsoTpConfig
    peripherals: SimPeripherals
    secondary: Secondary | None = None
    endpoint: IsoTpEndpoint | None = None
    client: CanSecondaryClient | None = None

    def report(self) -> EcuVersionReport:
        assert self.client is not None
        nonce = os.urandom(16)
        report = self.client.get_report(nonce).verify(self.signer.public_key)
        assert report.nonce == nonce and report.ecu_serial == self.serial
        return report


@dataclass
class Vehicle:
    fd: bool
    tmp: Path
    sim: DirectorSim = field(default_factory=DirectorSim)
    clock: Any = field(default=lambda: T0)
    channel: str = field(default_factory=lambda: f"e2e-{uuid.uuid4().hex}")
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    ecus: dict[str, Node] = field(default_factory=dict)
    primary_faults: FaultyBus | None = None
    primary: CanNode | None = None

    @property
    def bus(self) -> CanBusConfig:
        return CanBusConfig(channel=self.channel, fd=self.fd)

    def open_node(self) -> tuple[CanNode, FaultyBus]:
        faulty = FaultyBus(self.bus.open())
        return self.stack.enter_context(CanNode(faulty)), faulty

    def start(self, serials: list[str], **iso: Any) -> None:
        self.primary, self.primary_faults = self.open_node()
        for index, serial in enumerate(serials):
            node, faults = self.open_node()
            request_id, response_id = ids(index)
            config = IsoTpConfig(request_id, response_id, fd=self.fd, **iso)
            ecu = Node(
                serial,
                index,
                CryptoSigner.generate_ed25519(),
                self.tmp / serial,
                node,
                faults,
                config,
                SimPeripherals(sensors={0: 5}),
            )
            self.ecus[serial] = ecu
            self.boot(serial)
            ecu.client = CanSecondaryClient(
                self.stack.enter_context(self.primary.link(config)), serial, chunk_size=1024
            )

    def boot(self, serial: str) -> Secondary:
        """Start (or restart) a secondary over its slot directory."""
        ecu = self.ecus[serial]
        if ecu.endpoint is not None:
            ecu.endpoint.close()
        ecu.secondary = Secondary(
            ecu_serial=serial,
            hardware_id=HW,
            vin=VIN,
            signer=ecu.signer,
            director_root=self.sim.root_ders[1],
            slot_dir=ecu.slot_dir,
            clock=self.clock,
            peripherals=ecu.peripherals,
        )
        ecu.endpoint = self.stack.enter_context(ecu.node.endpoint(ecu.config, ecu.secondary.handle))
        ecu.endpoint.start()
        return ecu.secondary

    def target(self, serial: str, version: int, pad_to: int | None = None) -> TargetFile:
        return target_file(
            f"blink/{serial}/blink_v{version}.wasm",
            blink(version, pad_to),
            ecu_serial=serial,
            hardware_ids=[HW],
            release_counter=version,
            capabilities=V1_CAPS if version == 1 else V2_CAPS,
            limits=LIMITS,
        )

    def image_file(self, target: TargetFile, data: bytes) -> Path:
        path = self.tmp / "primary-images" / target.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


@pytest.fixture(params=[False, True], ids=["classic", "fd"])
def vehicle(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Vehicle]:
    v = Vehicle(fd=request.param, tmp=tmp_path)
    with v.stack:
        yield v


def info_of(target: TargetFile) -> InstalledImage:
    return InstalledImage(
        target.path, target.length, dict(target.hashes), target.custom["release_counter"]
    )


def test_three_secondaries_install_new_module(vehicle: Vehicle) -> None:
    serials = ["ecu-1", "ecu-2", "ecu-3"]
    vehicle.start(serials)
    sim = vehicle.sim

    def roll_out(version: int) -> None:
        targets = {s: vehicle.target(s, version) for s in serials}
        sim.publish_targets(targets.values())
        for serial, tf in targets.items():
            ecu = vehicle.ecus[serial]
            assert ecu.client is not None
            update = sim.update_for(tf, vehicle.image_file(tf, blink(version)))
            signed = SignedEcuVersionReport.from_der(ecu.client.send_update(update))
            result = signed.verify(ecu.signer.public_key)
            assert result.last_result == "ok", result.last_result_text
            assert result.installed is not None and result.installed.filename == tf.path

    roll_out(1)
    for ecu in vehicle.ecus.values():
        assert ecu.secondary is not None
        assert [ecu.secondary.tick(t) for t in range(4)] == [0, 1, 2, 3]  # blink v1: t

    sim.rotate_root(targets_key=True)  # the v2 bundle also carries a root rotation
    roll_out(2)
    for ecu in vehicle.ecus.values():
        secondary = ecu.secondary
        assert secondary is not None
        report = ecu.report()
        assert report.installed is not None
        assert report.installed.filename == f"blink/{ecu.serial}/blink_v2.wasm"
        assert report.installed.release_counter == 2
        assert report.attacks_detected == ()
        assert [secondary.tick(t) for t in range(4)] == [5, 7, 9, 11]  # blink v2: 2t + 5
        assert secondary.trusted.root.version == 2
        store = secondary.store
        old = store.slot_info(store.inactive_slot())  # the old slot is kept
        assert old.status == COMMITTED
        assert old.target is not None and old.target.name == f"blink/{ecu.serial}/blink_v1.wasm"
        assert store.read_image(old.slot) == blink(1)


def test_tampered_image_bytes_on_the_bus(vehicle: Vehicle) -> None:
    vehicle.start(["ecu-1"])
    ecu = vehicle.ecus["ecu-1"]
    client, secondary = ecu.client, ecu.secondary
    assert client is not None and secondary is not None and vehicle.primary_faults is not None
    v1 = vehicle.target("ecu-1", 1)
    vehicle.sim.publish_targets([v1])
    client.send_update(vehicle.sim.update_for(v1, vehicle.image_file(v1, blink(1))))
    ecu.report()
    active, active_bytes = secondary.store.active, secondary.store.read_image("a")

    v2 = vehicle.target("ecu-1", 2)
    vehicle.sim.publish_targets([v2])
    client.push_metadata([], vehicle.sim.targets_ders[vehicle.sim.targets_version])
    assert client.offer(info_of(v2)) == 0
    # flip one bit in the third frame of the chunk: image bytes, not framing
    request_id = ecu.config.request_id
    vehicle.primary_faults.add(FrameFault("corrupt", nth=3, arbitration_id=request_id, byte=4))
    assert client.send_chunk(0, blink(2), v2.length) == v2.length
    assert vehicle.primary_faults.counters.corrupted == 1
    outcome = client.install(v2.path)
    assert outcome.code == "imageMismatch"
    report = ecu.report()
    assert ATTACK_ARBITRARY_SOFTWARE in report.attacks_detected
    assert report.last_result == "imageMismatch"
    assert report.installed is not None and report.installed.filename == v1.path
    assert secondary.store.active == active
    assert secondary.store.read_image(active) == active_bytes  # type: ignore[arg-type]
    assert secondary.tick(3) == 3


# --- resumable transfers (classic CAN: the most frames) -----------------------------

CHUNK = 1024
PADDED = 4 * CHUNK


@pytest.fixture
def classic(tmp_path: Path) -> Iterator[Vehicle]:
    v = Vehicle(fd=False, tmp=tmp_path)
    with v.stack:
        v.start(["ecu-1"], timeout=1.0, cf_timeout=0.3, fc_timeout=0.3)
        yield v


def prepare(v: Vehicle) -> tuple[Node, CanSecondaryClient, TargetFile]:
    ecu = v.ecus["ecu-1"]
    assert ecu.client is not None
    tf = v.target("ecu-1", 2, pad_to=PADDED)
    v.sim.publish_targets([tf])
    assert ecu.client.push_metadata([], v.sim.targets_ders[v.sim.targets_version]) == "ok"
    return ecu, ecu.client, tf


def finish(ecu: Node, client: CanSecondaryClient, tf: TargetFile) -> None:
    assert client.install(tf.path).ok
    report = ecu.report()
    assert report.installed is not None and report.installed.filename == tf.path
    assert ecu.secondary is not None and ecu.secondary.tick(2) == 2 * 2 + 5


def test_resume_after_dropped_frame(classic: Vehicle) -> None:
    ecu, client, tf = prepare(classic)
    client.window = 1  # stop-and-wait: the fault lands in the chunk after the callback
    faults = classic.primary_faults
    assert faults is not None

    def drop_in_next_chunk(offset: int, length: int) -> None:
        if offset == 2 * CHUNK and faults.counters.dropped == 0 and not faults.pending:
            faults.add(FrameFault("drop", nth=3, arbitration_id=ecu.config.request_id))

    result = client.send_image(blink(2, PADDED), info_of(tf), progress=drop_in_next_chunk)
    assert faults.counters.dropped == 1
    assert result.start_offset == 0
    assert result.retries == 1
    assert result.resumed_at == (2 * CHUNK,)  # the last acknowledged offset
    assert result.resumed_at[0] > 0
    assert result.bytes_sent == PADDED + CHUNK  # only the broken chunk went twice
    finish(ecu, client, tf)


def test_resume_after_timeout(classic: Vehicle) -> None:
    """The chunk arrives but its ack is lost: the re-offer skips what the slot holds."""
    ecu, client, tf = prepare(classic)
    client.window = 1  # stop-and-wait: the fault lands in the chunk after the callback

    def lose_next_ack(offset: int, length: int) -> None:
        if offset == CHUNK and not ecu.faults.pending and ecu.faults.counters.dropped == 0:
            # the secondary's frames for the next chunk: its flow control, then the ack
            ecu.faults.add(FrameFault("drop", nth=2, arbitration_id=ecu.config.response_id))

    result = client.send_image(blink(2, PADDED), info_of(tf), progress=lose_next_ack)
    assert ecu.faults.counters.dropped == 1
    assert result.retries == 1
    assert result.resumed_at == (2 * CHUNK,)
    assert result.bytes_sent == PADDED  # nothing was sent twice
    finish(ecu, client, tf)


def test_pipelined_resume_after_dropped_frame(classic: Vehicle) -> None:
    """Two chunks in flight: a broken chunk and the one behind it go again, from a durable offset."""
    ecu, client, tf = prepare(classic)
    assert client.window == 2
    faults = classic.primary_faults
    assert faults is not None
    durable: list[int] = []

    def drop_in_next_chunk(offset: int, length: int) -> None:
        # the chunk at `offset` is already on the wire: the fault hits the one after it
        if offset == CHUNK and faults.counters.dropped == 0 and not faults.pending:
            faults.add(FrameFault("drop", nth=3, arbitration_id=ecu.config.request_id))
        assert ecu.secondary is not None
        store = ecu.secondary.store
        # an ack never runs ahead of the slot state naming the durable bytes
        assert store.slot_info(store.inactive_slot()).written >= offset
        durable.append(offset)

    result = client.send_image(blink(2, PADDED), info_of(tf), progress=drop_in_next_chunk)
    assert faults.counters.dropped == 1
    assert result.retries == 1
    assert result.resumed_at == (2 * CHUNK,)  # chunk 2 never arrived whole: resume there
    assert result.bytes_sent == PADDED + 2 * CHUNK  # chunks 2 and 3 went twice
    assert durable == sorted(durable)
    finish(ecu, client, tf)


@pytest.mark.parametrize("window", [1, 2])
def test_chunks_in_flight_follow_the_window(classic: Vehicle, window: int) -> None:
    """With a window of 2 the next chunk is on the bus before the last one's ack is read."""
    ecu, client, tf = prepare(classic)
    client.window = window
    in_flight: list[int] = []

    def watch(offset: int, length: int) -> None:
        in_flight.append(client.link.in_flight)

    result = client.send_image(blink(2, PADDED), info_of(tf), progress=watch)
    assert result.bytes_sent == PADDED and result.retries == 0
    # after each ack but the last ones, the chunks behind it are still unacknowledged
    assert in_flight == [
        min(window - 1, PADDED // CHUNK - n) for n in range(1, PADDED // CHUNK + 1)
    ]
    assert client.link.in_flight == 0
    finish(ecu, client, tf)


def test_posted_requests_are_answered_in_order(classic: Vehicle) -> None:
    ecu, client, _ = prepare(classic)
    link = client.link
    with pytest.raises(TransportError):
        link.collect(1.0)  # nothing posted
    nonces = [os.urandom(16) for _ in range(2)]
    for nonce in nonces:
        link.post(codec.encode_message("versionReportRequest", {"nonce": nonce}))
    assert link.in_flight == 2
    for nonce in nonces:
        _, answer = codec.decode_message(link.collect(5.0), link.max_response)
        report = SignedEcuVersionReport.from_der(bytes(answer["signedReport"]))
        assert report.report.nonce == nonce
    assert link.in_flight == 0
    # a plain request after a posted one drops that answer and gets its own
    link.post(codec.encode_message("versionReportRequest", {"nonce": nonces[0]}))
    assert ecu.client is not None and ecu.client.get_report(nonces[1]).report.nonce == nonces[1]
    assert link.in_flight == 0


class Abort(Exception):
    pass


def test_resume_after_secondary_restart(classic: Vehicle) -> None:
    ecu, client, tf = prepare(classic)
    client.window = 1  # stop-and-wait: the fault lands in the chunk after the callback

    def die(offset: int, length: int) -> None:
        if offset == 3 * CHUNK:
            raise Abort  # power goes away on both sides

    with pytest.raises(Abort):
        client.send_image(blink(2, PADDED), info_of(tf), progress=die)
    assert classic.primary is not None
    client.link.close()
    classic.boot("ecu-1")  # a new Secondary object over the same slot directory
    new_client = CanSecondaryClient(classic.primary.link(ecu.config), "ecu-1", chunk_size=CHUNK)
    ecu.client = new_client
    result = new_client.send_image(blink(2, PADDED), info_of(tf))
    assert result.start_offset == 3 * CHUNK
    assert result.start_offset > 0
    assert result.bytes_sent == CHUNK
    finish(ecu, new_client, tf)


def test_transfer_gives_up_after_bounded_retries(classic: Vehicle) -> None:
    ecu, client, tf = prepare(classic)
    client.max_retries = 1
    assert ecu.endpoint is not None
    ecu.endpoint.close()  # nobody answers any more
    with pytest.raises(TransferFailedError):
        client.send_image(blink(2, PADDED), info_of(tf))


def test_oversized_request_refused_by_the_secondary_transport(classic: Vehicle) -> None:
    ecu = classic.ecus["ecu-1"]
    assert classic.primary is not None and ecu.secondary is not None
    big = IsoTpConfig(*ids(0), max_request=200_000, timeout=2.0)
    ecu.client.link.close()  # type: ignore[union-attr]
    link = classic.primary.link(big)
    message = codec.encode_message("imageChunk", {"offset": 0, "data": b"\0" * 100_000})
    with pytest.raises(MessageTooLarge):
        link.request(message)
    link.close()
    assert ecu.endpoint is not None and ecu.endpoint.stats.requests == 0


def test_posted_requests_on_a_link_without_overlap() -> None:
    """The base class runs a posted exchange at once and keeps its answer, in order."""
    from ecus.transport.memory import memory_pair

    link, endpoint = memory_pair(lambda request: request[::-1])
    with endpoint:
        endpoint.start()
        link.post(b"ab")
        link.post(b"cd")
        assert link.in_flight == 2
        assert (link.collect(), link.collect()) == (b"ba", b"dc")
        with pytest.raises(TransportError):
            link.collect()
        link.post(b"xy")
        assert link.request(b"12") == b"21"  # the posted answer is dropped
        assert link.in_flight == 0
        link.post(b"xy")
        link.abandon()
        assert link.in_flight == 0
