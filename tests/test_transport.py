"""Transport core: link/endpoint rules (in-memory pair), bus accounting formula,
CAN fault injection and pacing (DESIGN 4, 9)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import can
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ecus.transport.accounting import (
    BusAccounting,
    BusStats,
    CanTiming,
    FrameBits,
    IsoTpFrames,
    PacedBus,
    _crc15,
    classic_frame_bits,
    fd_frame_bits,
    fd_length,
    frame_bits,
    isotp_frames,
)
from ecus.transport.base import SecondaryEndpoint
from ecus.transport.faults import BusOffCanError, FaultyBus, FrameFault
from ecus.transport.memory import memory_pair
from uptane.errors import MessageTooLarge, TransportError, TransportTimeout


class Recorder:
    """A handler that remembers what it got and answers b"re:" + request."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []

    def __call__(self, request: bytes) -> bytes:
        self.seen.append(request)
        return b"re:" + request


def serve_one(endpoint: SecondaryEndpoint) -> threading.Thread:
    """Answer exactly one request from a helper thread."""
    thread = threading.Thread(target=endpoint.poll_once, args=(5.0,), daemon=True)
    thread.start()
    return thread


# --- in-memory link: the rules every link follows -----------------------------


def test_memory_round_trip() -> None:
    handler = Recorder()
    link, endpoint = memory_pair(handler)
    thread = serve_one(endpoint)
    assert link.request(b"hello", timeout=5.0) == b"re:hello"
    thread.join()
    assert handler.seen == [b"hello"]
    assert endpoint.stats.requests == 1
    assert endpoint.stats.responses == 1


def test_memory_oversize_request_refused_before_sending() -> None:
    handler = Recorder()
    link, endpoint = memory_pair(handler, max_request=10)
    with pytest.raises(MessageTooLarge):
        link.request(b"x" * 11)
    assert endpoint.poll_once(0.0) is False  # nothing was sent
    assert handler.seen == []


def test_memory_oversize_response_refused_on_receipt() -> None:
    link, endpoint = memory_pair(lambda _: b"y" * 101, max_response=100, endpoint_max_response=1000)
    thread = serve_one(endpoint)
    with pytest.raises(MessageTooLarge):
        link.request(b"q", timeout=5.0)
    thread.join()


def test_memory_secondary_refuses_oversize_request() -> None:
    handler = Recorder()
    link, endpoint = memory_pair(handler, max_request=1000, endpoint_max_request=10)
    thread = serve_one(endpoint)
    with pytest.raises(MessageTooLarge, match="refused"):
        link.request(b"z" * 11, timeout=5.0)
    thread.join()
    assert handler.seen == []
    assert endpoint.stats.refused == 1


def test_endpoint_never_sends_oversize_response() -> None:
    link, endpoint = memory_pair(lambda _: b"y" * 11, max_response=10)
    result: list[BaseException] = []

    def ask() -> None:
        try:
            link.request(b"q", timeout=0.2)
        except TransportError as exc:
            result.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    with pytest.raises(MessageTooLarge):
        endpoint.poll_once(5.0)
    asker.join()
    assert isinstance(result[0], TransportTimeout)  # nothing was sent back


def test_memory_timeout_when_endpoint_does_not_answer() -> None:
    link, _endpoint = memory_pair(Recorder())
    with pytest.raises(TransportTimeout):
        link.request(b"anyone?", timeout=0.05)


def test_memory_late_answer_is_not_taken_for_the_next() -> None:
    handler = Recorder()
    link, endpoint = memory_pair(handler)
    with pytest.raises(TransportTimeout):
        link.request(b"one", timeout=0.05)
    assert endpoint.poll_once(0.0) is True  # answers "one", too late
    thread = serve_one(endpoint)
    assert link.request(b"two", timeout=5.0) == b"re:two"
    thread.join()


def test_request_argument_and_state_checks() -> None:
    link, endpoint = memory_pair(Recorder())
    with pytest.raises(ValueError):
        link.request(b"")
    with pytest.raises(ValueError):
        link.request(b"x", timeout=0)
    link.close()
    with pytest.raises(TransportError, match="closed"):
        link.request(b"x")
    endpoint.close()
    with pytest.raises(TransportError, match="closed"):
        endpoint.poll_once()


def test_background_serving_survives_handler_errors() -> None:
    calls: list[bytes] = []

    def handler(request: bytes) -> bytes:
        calls.append(request)
        if request == b"boom":
            raise RuntimeError("handler bug")
        return b"ok"

    link, endpoint = memory_pair(handler)
    endpoint.start()
    try:
        assert endpoint.serving
        with pytest.raises(TransportTimeout):
            link.request(b"boom", timeout=0.3)
        assert link.request(b"fine", timeout=5.0) == b"ok"
    finally:
        endpoint.close()
    assert not endpoint.serving
    assert endpoint.stats.handler_errors == 1
    assert calls == [b"boom", b"fine"]


# --- frame-length formula -------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "bits", "worst"),
    [
        # 47 + 8n; worst case adds floor((34 + 8n - 1) / 4)
        (0, 47, 47 + 8),
        (1, 55, 55 + 10),
        (2, 63, 63 + 12),
        (3, 71, 71 + 14),
        (8, 111, 111 + 24),
    ],
)
def test_classic_frame_bits(n: int, bits: int, worst: int) -> None:
    assert classic_frame_bits(n) == FrameBits(nominal=bits, data=0)
    assert classic_frame_bits(n, worst_case_stuffing=True).total == worst


def test_classic_extended_frame_bits() -> None:
    assert classic_frame_bits(8, extended=True).total == 131  # 67 + 64
    assert classic_frame_bits(8, extended=True, worst_case_stuffing=True).total == 131 + 29


def test_fd_length_rounding() -> None:
    assert [fd_length(n) for n in (0, 8, 9, 12, 13, 17, 21, 25, 33, 49, 64)] == [
        0,
        8,
        12,
        12,
        16,
        20,
        24,
        32,
        48,
        64,
        64,
    ]
    with pytest.raises(ValueError):
        fd_length(65)


def test_crc15_matches_the_can_check_value() -> None:
    bits = [(byte >> (7 - i)) & 1 for byte in b"123456789" for i in range(8)]
    assert _crc15(bits) == 0x059E  # CRC-15/CAN check value


def test_exact_stuffing_of_known_frames() -> None:
    # id 0, no data: SOF + 11 + RTR + IDE + r0 + DLC = 19 zero bits, CRC-15 of zeros = 0:
    # 34 zeros, one stuff bit after every five (a stuff bit starts the next run) = 6
    zeros = can.Message(arbitration_id=0, data=b"", is_extended_id=False)
    assert frame_bits(zeros, stuffing="exact") == FrameBits(nominal=34 + 6 + 13)
    assert frame_bits(zeros, stuffing="none").total == 47
    # alternating bits need no stuffing until the CRC
    alternating = can.Message(arbitration_id=0x2AA, data=b"\x55" * 8, is_extended_id=False)
    assert 111 <= frame_bits(alternating, stuffing="exact").total < 135
    # CAN FD: 64 zero bytes; stuff bits before the BRS sample point stay nominal
    fd = can.Message(
        arbitration_id=0, data=bytes(64), is_extended_id=False, is_fd=True, bitrate_switch=True
    )
    bits = frame_bits(fd, stuffing="exact")
    # SOF, id, RRS, IDE = 14 zeros, then FDF=1 res=0 BRS=1: 2 stuff bits, at the nominal rate
    assert bits.nominal == 30 + 2
    # ESI + DLC 1111 + 512 zero bits: the run continues from res/BRS (0, 1)
    assert bits.data > 549 and bits.data < 678


@given(
    ident=st.integers(0, 0x7FF),
    data=st.binary(min_size=0, max_size=64),
    brs=st.booleans(),
)
def test_exact_stuffing_lies_between_none_and_worst(ident: int, data: bytes, brs: bool) -> None:
    fd = len(data) > 8
    msg = can.Message(
        arbitration_id=ident, data=data, is_extended_id=False, is_fd=fd, bitrate_switch=brs
    )
    none, exact, worst = (frame_bits(msg, stuffing=k) for k in ("none", "exact", "worst"))
    assert none.nominal <= exact.nominal <= worst.nominal
    assert none.data <= exact.data <= worst.data


def test_fd_frame_bits() -> None:
    # 17 + 13 = 30 bits at the nominal rate; data phase 32 + 8n (CRC-17) / 37 + 8n (CRC-21)
    assert fd_frame_bits(64) == FrameBits(nominal=30, data=549)
    assert fd_frame_bits(16) == FrameBits(nominal=30, data=160)
    assert fd_frame_bits(13) == FrameBits(nominal=30, data=160)  # rounded up to 16
    assert fd_frame_bits(20) == FrameBits(nominal=30, data=197)
    assert fd_frame_bits(3) == FrameBits(nominal=30, data=56)
    assert fd_frame_bits(64, brs=False) == FrameBits(nominal=579, data=0)
    assert fd_frame_bits(64, extended=True) == FrameBits(nominal=49, data=549)
    # worst case: floor((17 + 5 + 512 - 1) / 4) = 133 stuff bits, 4 of them in arbitration
    assert fd_frame_bits(64, worst_case_stuffing=True) == FrameBits(nominal=34, data=678)


def test_frame_bits_of_messages_and_wire_time() -> None:
    classic = can.Message(arbitration_id=0x700, data=bytes(8), is_extended_id=False)
    fd = can.Message(
        arbitration_id=0x700, data=bytes(64), is_extended_id=False, is_fd=True, bitrate_switch=True
    )
    assert frame_bits(classic) == FrameBits(111)
    assert frame_bits(fd) == FrameBits(30, 549)
    timing = CanTiming(bitrate=500_000, data_bitrate=2_000_000)
    assert timing.seconds(FrameBits(111)) == pytest.approx(111 / 500_000)
    assert timing.seconds(FrameBits(30, 549)) == pytest.approx(30 / 500_000 + 549 / 2_000_000)
    assert CanTiming(250_000).seconds(FrameBits(30, 549)) == pytest.approx(579 / 250_000)


def test_isotp_frame_counts() -> None:
    assert isotp_frames(7) == IsoTpFrames(single=1)
    assert isotp_frames(8) == IsoTpFrames(first=1, consecutive=1, flow_control=1)
    # classic: FF carries 6 bytes (2 above 4095), CFs 7
    assert isotp_frames(100) == IsoTpFrames(first=1, consecutive=14, flow_control=1)
    assert isotp_frames(100, blocksize=4) == IsoTpFrames(first=1, consecutive=14, flow_control=4)
    assert isotp_frames(4095).consecutive == 585  # ceil(4089 / 7)
    assert isotp_frames(4096).consecutive == 585  # ceil(4094 / 7)
    # FD: SF up to 62 bytes, FF 62 (58 above 4095), CFs 63
    assert isotp_frames(62, tx_data_length=64) == IsoTpFrames(single=1)
    assert isotp_frames(200, tx_data_length=64) == IsoTpFrames(
        first=1, consecutive=3, flow_control=1
    )
    assert isotp_frames(65541, tx_data_length=64).consecutive == 1040  # ceil(65483 / 63)


def test_accounting_counts_kinds_ids_and_bits() -> None:
    acct = BusAccounting(CanTiming(500_000), stuffing="none")
    frames = [
        can.Message(arbitration_id=0x701, data=b"\x10\x64" + bytes(6), is_extended_id=False),
        can.Message(arbitration_id=0x709, data=b"\x30\x00\x00", is_extended_id=False),
        can.Message(arbitration_id=0x701, data=b"\x21" + bytes(7), is_extended_id=False),
        can.Message(arbitration_id=0x709, data=b"\x02\xaa\xbb", is_extended_id=False),
    ]
    for frame in frames:
        acct.on_message_received(frame)
    total = acct.stats()
    assert (total.frames, total.first, total.flow_control, total.consecutive, total.single) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert total.bits == 111 + 71 + 111 + 71
    assert total.wire_time == pytest.approx(364 / 500_000)
    assert acct.stats([0x701]).bits == 222
    assert acct.stats([0x709]).frames == 2
    assert total - acct.stats([0x701]) == acct.stats([0x709])
    assert acct.stats([0x701]) + acct.stats([0x709]) == total
    acct.reset()
    assert acct.stats() == BusStats()


# --- fault injection and pacing on a real python-can virtual bus ----------------


@pytest.fixture
def buses() -> Iterator[tuple[can.BusABC, can.BusABC]]:
    channel = f"faults-{uuid.uuid4().hex}"
    sender = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    receiver = can.Bus(interface="virtual", channel=channel, receive_own_messages=False)
    yield sender, receiver
    sender.shutdown()
    receiver.shutdown()


def frame(i: int, arbitration_id: int = 0x123) -> can.Message:
    return can.Message(arbitration_id=arbitration_id, data=bytes([i, 0, 0]), is_extended_id=False)


def received(bus: can.BusABC) -> list[can.Message]:
    out = []
    while (msg := bus.recv(0.0)) is not None:
        out.append(msg)
    return out


def test_faulty_bus_drops_and_corrupts_the_planned_frames(
    buses: tuple[can.BusABC, can.BusABC],
) -> None:
    sender, receiver = buses
    plan = [
        FrameFault("drop", nth=2),
        FrameFault("corrupt", nth=2, arbitration_id=0x456, byte=1, bit=3),
        FrameFault("delay", nth=4, delay=0.001),
    ]
    with FaultyBus(sender, plan) as faulty:
        for i in range(1, 5):
            faulty.send(frame(i))
        faulty.send(frame(5, 0x456))
        faulty.send(frame(6, 0x456))
        got = received(receiver)
        assert [m.data[0] for m in got] == [1, 3, 4, 5, 6]
        assert got[-1].data == bytes([6, 0x08, 0])
        assert got[-2].data == bytes([5, 0, 0])
        assert faulty.counters.dropped == 1
        assert faulty.counters.corrupted == 1
        assert faulty.counters.delayed == 1
        assert faulty.counters.tx_frames == 6
        assert faulty.pending == ()


def test_faulty_bus_receive_faults(buses: tuple[can.BusABC, can.BusABC]) -> None:
    sender, receiver = buses
    with FaultyBus(receiver, [FrameFault("drop", nth=1, direction="rx")]) as faulty:
        sender.send(frame(1))
        sender.send(frame(2))
        assert [m.data[0] for m in received(faulty)] == [2]
        assert faulty.counters.rx_frames == 2
        assert faulty.counters.dropped == 1


def test_faulty_bus_off_until_cleared(buses: tuple[can.BusABC, can.BusABC]) -> None:
    sender, receiver = buses
    with FaultyBus(sender, [FrameFault("bus_off", nth=2)]) as faulty:
        faulty.send(frame(1))
        with pytest.raises(BusOffCanError):
            faulty.send(frame(2))
        states = [faulty.state]
        assert faulty.is_bus_off
        with pytest.raises(can.CanOperationError):
            faulty.send(frame(3))
        faulty.clear_bus_off()
        states.append(faulty.state)
        assert states == [can.BusState.ERROR, can.BusState.ACTIVE]
        faulty.send(frame(4))
        assert [m.data[0] for m in received(receiver)] == [1, 4]
        assert faulty.counters.bus_off_events == 1
        assert faulty.counters.refused_while_bus_off == 2


def test_fault_plan_is_validated() -> None:
    with pytest.raises(ValueError):
        FrameFault("drop", nth=0)
    with pytest.raises(ValueError):
        FrameFault("corrupt", nth=1, bit=8)
    with pytest.raises(ValueError):
        FrameFault("explode", nth=1)  # type: ignore[arg-type]


def test_paced_bus_accounts_wire_time(buses: tuple[can.BusABC, can.BusABC]) -> None:
    sender, receiver = buses
    with PacedBus(sender, CanTiming(1_000_000)) as paced:
        frames = [
            can.Message(arbitration_id=0x1, data=bytes([i] * 8), is_extended_id=False)
            for i in range(3)
        ]
        for frame in frames:
            paced.send(frame)
        # 111 bits each before stuffing; these frames carry stuff bits too (exact by default)
        bits = sum(frame_bits(f, stuffing="exact").total for f in frames)
        assert bits > 3 * 111
        assert paced.paced_time == pytest.approx(bits / 1_000_000)
    assert len(received(receiver)) == 3
