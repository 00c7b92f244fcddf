"""Attacks on the CAN bus: impostor ECUs, altered or injected frames, partial bundles (DESIGN 4)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import can
import isotp
from securesystemslib.signer import CryptoSigner

from ecus.sim.world import SimSecondary, SimVehicle, World
from ecus.transport.faults import FrameFault
from ecus.transport.isotp import CanNode, IsoTpConfig
from uptane import codec
from uptane.errors import CodecError
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport

from .base import ScenarioOutcome, _cycle_ok, _play, _Run, default_error, pending_assignments
from .bus import _after_message, _fast_failure, _frame_at, _frames_after, _next_chunk_length
from .updates import ensure_updates


@contextlib.contextmanager
def _impostor(vehicle: SimVehicle, serial: str, report: Callable[[bytes], bytes]) -> Iterator[None]:
    """A node that answers version report requests for ``serial`` with ``report(nonce)``.

    The real ECU is forced off the bus first (as an error-frame attack does),
    so only the impostor answers on its CAN ids.
    """
    sec = vehicle.secondaries[serial]
    sec.faults.go_bus_off()
    node = CanNode(vehicle.bus.open())

    def handle(request: bytes) -> bytes:
        try:
            kind, value = codec.decode_message(request, sec.config.max_request)
        except CodecError:
            kind, value = "", {}
        if kind == "versionReportRequest":
            signed = report(bytes(value["nonce"]))
            return codec.encode_message("versionReportResponse", {"signedReport": signed})
        return codec.encode_message("ack", {"code": "badRequest", "text": "busy"})

    try:
        endpoint = node.endpoint(sec.config, handle)
        endpoint.start()
        yield
    finally:
        node.close()
        sec.faults.clear_bus_off()


def _can_report_attack(
    name: str, forge: Callable[[SimVehicle, str], Callable[[bytes], bytes]], what: str
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        serial = next(iter(vehicle.secondaries))
        stack = contextlib.ExitStack()
        answer = forge(vehicle, serial)
        return _play(
            r,
            lambda: stack.enter_context(_impostor(vehicle, serial, answer)),
            stack.close,
            serials=[serial],
            detail=f"{what} for {serial}",
        )

    return run


def _spoofed(vehicle: SimVehicle, serial: str) -> Callable[[bytes], bytes]:
    """Reports for ``serial`` signed by a key that is not its registered key."""
    sec = vehicle.secondaries[serial]
    key = CryptoSigner.generate_ed25519()
    pending = pending_assignments(vehicle.world, vehicle.vin).get(serial)
    claim = None
    if pending is not None:  # claim the update is done, so the Director stops sending it
        claim = InstalledImage(pending.image, pending.length, dict(pending.hashes), 1 << 30)

    def answer(nonce: bytes) -> bytes:
        report = EcuVersionReport(
            ecu_serial=serial,
            hardware_id=sec.hardware_id,
            installed=claim,
            report_counter=1 << 40,
            latest_time=vehicle.clock().replace(microsecond=0),
            nonce=nonce,
        )
        return SignedEcuVersionReport.sign(report, key).to_der()

    return answer


def _replayed(vehicle: SimVehicle, serial: str) -> Callable[[bytes], bytes]:
    """A genuine report of ``serial`` recorded earlier (another request's nonce)."""
    ecu = vehicle.secondaries[serial].ecu
    assert ecu is not None
    recorded = ecu.signed_report(os.urandom(16))
    return lambda nonce: recorded


def _corrupt_chunk(vehicle: SimVehicle, sec: SimSecondary, response: bytes) -> None:
    """Flip one bit of image data in the chunk that follows the offer (received frames)."""
    length = _next_chunk_length(sec, response)
    frame, byte = _frame_at(sec.config, length, min(40, length - 1))  # past the DER header
    sec.faults.add(
        FrameFault(
            "corrupt",
            nth=_frames_after(sec, response) + frame,
            direction="rx",
            arbitration_id=sec.config.request_id,
            byte=byte,
        )
    )


# A rogue node on the vehicle's bus (Uptane 2.1, 4.3; DESIGN 4: nothing from the bus is
# trusted). It holds the secondary's receiver back for this long at the first frame of
# the primary's chunk (the "delay" frame fault), so that the rogue's own frames, sent as
# soon as it sees that first frame, reach the secondary before the primary's next ones.
ROGUE_WINDOW = 0.3
# The primary's chunk size while the rogue attacks: several chunks per image, so the
# forged one lands mid-transfer.
ROGUE_CHUNK_SIZE = 96
ROGUE_BYTES = b"\x00asm rogue code"


def isotp_frames(data: bytes, config: IsoTpConfig) -> list[can.Message]:
    """The CAN frames of one ISO-TP message on ``config.request_id``, framed by can-isotp
    (first and consecutive frames sent back to back, as after a flow control)."""
    out: list[isotp.CanMessage] = []
    flow = isotp.CanMessage(
        arbitration_id=config.response_id,
        data=isotp.protocol.PDU.craft_flow_control_data(
            isotp.protocol.PDU.FlowStatus.ContinueToSend, 0, 0
        ),
        is_fd=config.fd,
    )
    pending = [flow]

    def rx(timeout: float) -> isotp.CanMessage | None:
        return pending.pop() if pending and logic.transmitting() and out else None

    logic = isotp.TransportLayerLogic(
        rxfn=rx,
        txfn=out.append,
        address=isotp.Address(
            isotp.AddressingMode.Normal_11bits,
            txid=config.request_id,
            rxid=config.response_id,
        ),
        params={**config.stack_params(config.max_request), "blocking_send": False},
    )
    logic.send(bytes(data))
    for _ in range(len(data) + 16):
        logic.process()
        if not logic.transmitting():
            break
    else:
        raise RuntimeError("can-isotp did not frame the message")
    return [
        can.Message(
            arbitration_id=m.arbitration_id,
            data=m.data,
            is_extended_id=False,
            is_fd=m.is_fd,
            bitrate_switch=m.bitrate_switch,
        )
        for m in out
    ]


def _first_frame(msg: can.Message) -> bool:
    """Is ``msg`` the first frame of a multi-frame ISO-TP message (as can-isotp reads it)?"""
    frame = isotp.CanMessage(arbitration_id=msg.arbitration_id, data=bytes(msg.data))
    try:
        return bool(isotp.protocol.PDU(frame).type == isotp.protocol.PDU.Type.FIRST_FRAME)
    except ValueError:
        return False


class RogueNode:
    """An attacker's node on a vehicle's CAN bus: a raw python-can bus object on the same
    channel, no ISO-TP stack and no flow control. Once ``arm``ed it watches the traffic
    and sends its frames right after the first frame of the next multi-frame ISO-TP
    message on the watched id, which makes the receiver drop that message for its own.
    """

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self.injected: list[can.Message] = []
        self._armed: tuple[int, list[can.Message]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sim-rogue", daemon=True)
        self._thread.start()

    def arm(self, arbitration_id: int, frames: Sequence[can.Message]) -> None:
        with self._lock:
            self._armed = (arbitration_id, list(frames))

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(0.05)
            except can.CanError:
                return
            if msg is None or not _first_frame(msg):
                continue
            with self._lock:
                armed = self._armed
                if armed is None or armed[0] != msg.arbitration_id:
                    continue
                self._armed = None
            for frame in armed[1]:
                self.bus.send(frame)
                self.injected.append(frame)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.bus.shutdown()


def _injected_frames(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """A rogue node replaces the primary's next image chunk with a forged one at the same
    offset: under ISO 15765-2 a new first (or single) frame aborts the reception in
    progress, so the secondary takes the rogue's message in place of the primary's."""
    r = _Run(world, vehicle, "can-injected-frames")
    pending = ensure_updates(world, vehicle, 1)
    serial = sorted(pending, key=list(vehicle.secondaries).index)[0]
    sec = vehicle.secondaries[serial]
    client = sec.client
    assert client is not None
    stack = contextlib.ExitStack()
    forged: dict[str, int] = {}
    rogues: list[RogueNode] = []

    def inject(rogue: RogueNode, response: bytes) -> None:
        # The ack the secondary is about to send says which offset it wants next.
        _, ack = codec.decode_message(response, sec.config.max_response)
        offset = int(ack["nextOffset"])
        chunk = codec.encode_message("imageChunk", {"offset": offset, "data": ROGUE_BYTES})
        forged["offset"] = offset
        sec.faults.add(
            FrameFault(
                "delay",
                nth=_frames_after(sec, response) + 1,
                direction="rx",
                arbitration_id=sec.config.request_id,
                delay=ROGUE_WINDOW,
            )
        )
        rogue.arm(sec.config.request_id, isotp_frames(chunk, sec.config))

    def arm() -> None:
        rogue = RogueNode(vehicle.bus.open())
        rogues.append(rogue)
        stack.callback(rogue.close)
        stack.enter_context(_fast_failure(vehicle, sec))
        saved = client.chunk_size
        client.chunk_size = ROGUE_CHUNK_SIZE
        stack.callback(setattr, client, "chunk_size", saved)
        # one chunk in flight, so the next first frame after an ack is the chunk at the
        # offset that ack names (with two, it may be the one after: the rogue would race)
        window, client.window = client.window, 1
        stack.callback(setattr, client, "window", window)
        stack.enter_context(_after_message(sec, "imageChunk", functools.partial(inject, rogue)))

    def disarm() -> None:
        stack.close()
        sec.faults.clear_plan()

    outcome = _play(
        r, arm, disarm, serials=[serial], strict=False, detail=f"rogue node on {serial}'s ids"
    )
    sent = sum(len(rogue.injected) for rogue in rogues)
    if sent and "offset" in forged:
        outcome.detail += (
            f"; {sent} injected frame(s): an imageChunk of {len(ROGUE_BYTES)} other bytes "
            f"at offset {forged['offset']} in place of the primary's"
        )
    else:
        outcome.detail += "; the rogue node injected nothing"
    return outcome


def _drop_traffic(vehicle: SimVehicle, sec: SimSecondary, response: bytes) -> None:
    """Traffic to this secondary is dropped from its next image chunk on."""
    sec.faults.add(
        FrameFault(
            "bus_off",
            nth=_frames_after(sec, response) + 1,
            direction="rx",
            arbitration_id=sec.config.request_id,
        )
    )


def _partial_bundle(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """Two ECUs have updates; traffic to the second is dropped during its transfer."""
    r = _Run(world, vehicle, "partial-bundle")
    pending = ensure_updates(world, vehicle, 2)
    order = sorted(pending, key=list(vehicle.secondaries).index)
    victim = vehicle.secondaries[order[1]]
    stack = contextlib.ExitStack()

    def arm() -> None:
        stack.enter_context(_fast_failure(vehicle, victim))
        stack.enter_context(
            _after_message(victim, "imageOffer", functools.partial(_drop_traffic, vehicle, victim))
        )

    def disarm() -> None:
        stack.close()
        victim.faults.clear_plan()
        victim.faults.clear_bus_off()

    r.mark()
    try:
        arm()
        attack = vehicle.cycle()
    finally:
        disarm()
    unchanged = r.unchanged([victim.serial], strict=False)
    others_done = all(
        attack.ecus[s].installed == a.image for s, a in r.legit.items() if s != victim.serial
    )
    error = default_error(attack, vehicle)
    recovery = vehicle.cycle()  # reports the partial install, completes the bundle
    # the Director saw the others installed and kept the interrupted ECU's assignment
    pending = pending_assignments(world, vehicle.vin)
    kept = victim.serial in pending and not any(
        s in pending
        for s in r.legit
        if s != victim.serial and attack.ecus[s].installed == r.legit[s].image
    )
    confirm = vehicle.cycle()  # the Director sees the whole bundle installed
    done = victim.serial not in pending_assignments(world, vehicle.vin)
    return r.finish(
        attack,
        confirm,
        slots_unchanged=unchanged,
        error=error,
        blocked=unchanged and not r.untrusted() and kept,
        recovered=_cycle_ok(recovery)
        and r.installed_legit(recovery)
        and _cycle_ok(confirm)
        and done,
        detail=(
            f"{'other ECUs installed' if others_done else 'no ECU installed'}, "
            f"{victim.serial} interrupted; the Director kept its assignment pending: {kept}"
        ),
    )
