"""CAN helpers of the CAN attacks and faults: frame arithmetic, message hooks, transfer faults."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

from ecus.sim.world import SimSecondary, SimVehicle, World
from ecus.transport.accounting import PacedBus
from ecus.transport.isotp import IsoTpConfig
from uptane import codec
from uptane.errors import CodecError

from .base import ScenarioOutcome, _play, _Run
from .updates import ensure_updates

# Client limits while a secondary is made to fail (power cut, bus off, dropped
# traffic): a dead ECU is noticed within seconds instead of the normal timeouts.
FAULT_TIMEOUT = 1.5
FAULT_INSTALL_TIMEOUT = 3.0
FAULT_RETRIES = 1


def _single_frame_max(config: IsoTpConfig) -> int:
    return 7 if config.tx_data_length == 8 else config.tx_data_length - 2


def _frame_at(config: IsoTpConfig, length: int, offset: int) -> tuple[int, int]:
    """(1-based frame number, byte index in that frame) of byte ``offset`` of a
    ``length``-byte multi-frame ISO-TP message (first frame, then consecutive frames)."""
    first = config.tx_data_length - (6 if length > 4095 else 2)
    if offset < first:
        return 1, config.tx_data_length - first + offset
    cf = config.tx_data_length - 1
    k = (offset - first) // cf
    return 2 + k, 1 + (offset - first) % cf


def _next_chunk_length(sec: SimSecondary, response: bytes) -> int:
    """Length of the ``imageChunk`` message the primary sends after ``response`` (a chunkAck)."""
    assert sec.ecu is not None and sec.client is not None
    target = sec.ecu.pending_target
    _, ack = codec.decode_message(response, sec.config.max_response)
    offset = int(ack["nextOffset"])
    size = 0 if target is None else min(sec.client.chunk_size, target.length - offset)
    chunk = {"offset": offset, "data": bytes(max(size, 0))}
    return len(codec.encode_message("imageChunk", chunk))


@contextlib.contextmanager
def _after_message(sec: SimSecondary, kind: str, action: Callable[[bytes], None]) -> Iterator[None]:
    """Call ``action(response)`` once, when the secondary has answered a ``kind`` message
    (before the answer goes on the bus)."""
    endpoint = sec.endpoint
    assert endpoint is not None
    inner = endpoint.handler
    fired = False

    def handler(request: bytes) -> bytes:
        nonlocal fired
        response = inner(request)
        if not fired:
            try:
                got, _ = codec.decode_message(request, sec.config.max_request)
            except CodecError:
                got = None
            if got == kind:
                fired = True
                action(response)
        return response

    endpoint.handler = handler
    try:
        yield
    finally:
        endpoint.handler = inner


def _frames_after(sec: SimSecondary, response: bytes) -> int:
    """Frames the primary sends on the request id before its next request:
    a flow control for a multi-frame ``response``."""
    return 1 if len(response) > _single_frame_max(sec.config) else 0


@contextlib.contextmanager
def _fast_failure(vehicle: SimVehicle, sec: SimSecondary) -> Iterator[None]:
    """Short client timeouts and retries while a secondary is made to fail
    (longer on a paced bus, where a chunk takes its wire time)."""
    client = sec.client
    assert client is not None
    saved = (client.timeout, client.install_timeout, client.max_retries)
    scale = 4.0 if isinstance(vehicle.primary_faults.inner, PacedBus) else 1.0
    client.timeout, client.install_timeout, client.max_retries = (
        FAULT_TIMEOUT * scale,
        FAULT_INSTALL_TIMEOUT * scale,
        FAULT_RETRIES,
    )
    try:
        yield
    finally:
        client.timeout, client.install_timeout, client.max_retries = saved


def _transfer_fault(
    name: str,
    fault: Callable[[SimVehicle, SimSecondary, bytes], None],
    *,
    count: int = 1,
    victim: int = 0,
    detail: str,
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """A fault armed when the ``victim``-th secondary with an update accepts the image offer."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        pending = ensure_updates(world, vehicle, count)
        serial = sorted(pending, key=list(vehicle.secondaries).index)[victim]
        sec = vehicle.secondaries[serial]
        stack = contextlib.ExitStack()

        def arm() -> None:
            stack.enter_context(_fast_failure(vehicle, sec))
            stack.enter_context(
                _after_message(sec, "imageOffer", functools.partial(fault, vehicle, sec))
            )

        def disarm() -> None:
            stack.close()
            sec.faults.clear_plan()
            sec.faults.clear_bus_off()
            vehicle.primary_faults.clear_plan()
            vehicle.primary_faults.clear_bus_off()

        return _play(r, arm, disarm, serials=[serial], strict=False, detail=f"{detail} ({serial})")

    return run
