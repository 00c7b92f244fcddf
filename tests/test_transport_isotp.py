"""ISO-TP links over a real python-can virtual bus with can-isotp (DESIGN 4, 9)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pytest

from ecus.transport.accounting import BusAccounting, BusStats, CanTiming, PacedBus, Stuffing
from ecus.transport.base import Handler
from ecus.transport.faults import FaultyBus, FrameFault
from ecus.transport.isotp import CanBusConfig, CanNode, IsoTpConfig, IsoTpEndpoint, IsoTpLink
from uptane.errors import (
    BusOffError,
    ConfigError,
    FramingError,
    MessageTooLarge,
    TransportError,
    TransportTimeout,
)

REQ, RESP = 0x701, 0x709


def digest(request: bytes) -> bytes:
    """Small answer that proves the whole request arrived intact."""
    return len(request).to_bytes(4, "big") + hashlib.sha256(request).digest()


def recording(seen: list[bytes], answer: bytes) -> Handler:
    def handler(request: bytes) -> bytes:
        seen.append(request)
        return answer

    return handler


def tagged(tag: bytes) -> Handler:
    return lambda request: tag + digest(request)


def payload(n: int) -> bytes:
    return bytes((i * 7 + i // 251) & 0xFF for i in range(n))


@dataclass
class Rig:
    """Nodes on one private virtual bus; everything is closed at the end of the test."""

    fd: bool = False
    channel: str = field(default_factory=lambda: f"isotp-{uuid.uuid4().hex}")
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def bus_config(self) -> CanBusConfig:
        return CanBusConfig(channel=self.channel, fd=self.fd)

    def node(self, faults: Iterable[FrameFault] | None = None, paced: bool = False) -> CanNode:
        bus = self.bus_config.open()
        if faults is not None:
            bus = FaultyBus(bus, faults)
        if paced:
            bus = PacedBus(bus, self.bus_config.timing)
        return self.stack.enter_context(CanNode(bus))

    def observer(self, stuffing: Stuffing = "none") -> BusAccounting:
        acct = BusAccounting(self.bus_config.timing, stuffing=stuffing)
        acct.observe(self.bus_config.open())
        self.stack.callback(acct.close)
        return acct

    def config(self, request_id: int = REQ, response_id: int = RESP, **kw: object) -> IsoTpConfig:
        return IsoTpConfig(request_id, response_id, fd=self.fd, **kw)  # type: ignore[arg-type]

    def pair(
        self,
        handler: Handler = digest,
        *,
        config: IsoTpConfig | None = None,
        secondary_config: IsoTpConfig | None = None,
        primary: CanNode | None = None,
        serve: bool = True,
    ) -> tuple[IsoTpLink, IsoTpEndpoint]:
        config = config or self.config()
        link = (primary or self.node()).link(config)
        endpoint = self.node().endpoint(secondary_config or config, handler)
        if serve:
            endpoint.start()
        return link, endpoint


@pytest.fixture(params=[False, True], ids=["classic", "fd"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        yield Rig(fd=request.param, stack=stack)


@pytest.fixture
def classic() -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        yield Rig(fd=False, stack=stack)


def ask(link: IsoTpLink, data: bytes, timeout: float = 5.0) -> concurrent.futures.Future[bytes]:
    """Run one request in a helper thread (so the test thread can step the endpoint)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    future = pool.submit(link.request, data, timeout)
    pool.shutdown(wait=False)
    return future


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 4095, 4096, 64 * 1024 + 5])
def test_round_trip(rig: Rig, size: int) -> None:
    link, endpoint = rig.pair(config=rig.config(max_request=70_000))
    data = payload(size)
    assert link.request(data) == digest(data)
    assert endpoint.stats.requests == 1


def test_large_response_uses_escape_sequence(rig: Rig) -> None:
    link, _ = rig.pair(lambda request: request * 1100, config=rig.config(max_response=5000))
    assert link.request(b"abcd") == b"abcd" * 1100  # 4400 bytes > 4095


def test_poll_once_steps_the_endpoint(classic: Rig) -> None:
    link, endpoint = classic.pair(serve=False)
    assert endpoint.poll_once(0.0) is False
    future = ask(link, b"step")
    assert endpoint.poll_once(5.0) is True
    assert future.result() == digest(b"step")


# --- size limits -------------------------------------------------------------------


def test_oversize_request_refused_before_sending(rig: Rig) -> None:
    acct = rig.observer()
    link, endpoint = rig.pair(config=rig.config(max_request=100))
    with pytest.raises(MessageTooLarge):
        link.request(payload(101))
    acct.drain(0.05)
    assert acct.stats().frames == 0
    assert endpoint.stats.requests == 0


def test_oversize_response_refused_on_receipt(rig: Rig) -> None:
    acct = rig.observer()
    link, endpoint = rig.pair(
        lambda _: payload(200),
        config=rig.config(max_response=100),
        secondary_config=rig.config(max_response=1000),
        serve=False,
    )
    future = ask(link, b"q")
    with pytest.raises(MessageTooLarge):  # the secondary's send got an overflow
        endpoint.poll_once(5.0)
    with pytest.raises(MessageTooLarge):
        future.result()
    acct.drain()
    response = acct.stats([RESP])
    # refused on the first frame's announced length: no data frame followed
    assert (response.first, response.consecutive) == (1, 0)
    assert acct.stats([REQ]).flow_control == 1  # the overflow flow control


def test_secondary_refuses_oversize_request(rig: Rig) -> None:
    acct = rig.observer()
    seen: list[bytes] = []
    link, endpoint = rig.pair(
        recording(seen, b"ok"),
        config=rig.config(max_request=1000),
        secondary_config=rig.config(max_request=100),
    )
    with pytest.raises(MessageTooLarge, match="refused"):
        link.request(payload(500))
    acct.drain()
    assert (acct.stats([REQ]).first, acct.stats([REQ]).consecutive) == (1, 0)
    assert seen == []
    assert endpoint.stats.refused == 1
    assert link.request(b"small") == b"ok"


# --- timeouts ------------------------------------------------------------------------


def test_timeout_when_the_endpoint_does_not_answer(rig: Rig) -> None:
    link, _ = rig.pair(serve=False)  # receives, never answers
    with pytest.raises(TransportTimeout):
        link.request(b"hello?", timeout=0.2)
    with pytest.raises(TransportTimeout):
        link.request(payload(300), timeout=0.2)


def test_late_answer_is_not_taken_for_the_next(classic: Rig) -> None:
    link, endpoint = classic.pair(serve=False)
    with pytest.raises(TransportTimeout):
        link.request(b"one", timeout=0.1)
    assert endpoint.poll_once(5.0) is True  # answers "one", too late
    stack = link._port.stack
    for _ in range(100):  # until that answer has been reassembled on the primary
        if stack.available():
            break
        time.sleep(0.02)
    assert stack.available()
    future = ask(link, b"two")
    assert endpoint.poll_once(5.0) is True
    assert future.result() == digest(b"two")


def test_timeout_when_nobody_is_listening(rig: Rig) -> None:
    link = rig.node().link(rig.config(fc_timeout=0.1))
    with pytest.raises(TransportTimeout):
        link.request(payload(300), timeout=2.0)  # no flow control comes back


# --- several secondaries ---------------------------------------------------------------


def test_three_endpoints_on_one_bus_do_not_cross_talk(rig: Rig) -> None:
    primary = rig.node()
    pairs = []
    for k in range(3):
        config = rig.config(0x700 + k, 0x710 + k)
        pairs.append(rig.pair(tagged(bytes([0x41 + k])), config=config, primary=primary))
    data = [payload(300 + k) for k in range(3)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = [
            pool.submit(link.request, data[k])
            for k, (link, _) in enumerate(pairs)
            for _ in range(3)
        ]
        results = [f.result() for f in futures]
    for i, result in enumerate(results):
        k = i // 3
        assert result == bytes([0x41 + k]) + digest(data[k])
    assert [endpoint.stats.requests for _, endpoint in pairs] == [3, 3, 3]
    with pytest.raises(ConfigError):
        primary.link(rig.config(0x700, 0x710))  # that response id is taken on this node


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError):
        IsoTpConfig(0x800, 0x709)
    with pytest.raises(ConfigError):
        IsoTpConfig(0x701, 0x701)
    with pytest.raises(ConfigError):
        IsoTpConfig(0x701, 0x709, blocksize=256)
    with pytest.raises(ConfigError):
        CanBusConfig(interface="no-such-interface").open()


# --- faults --------------------------------------------------------------------------


def test_dropped_consecutive_frame_in_request(rig: Rig) -> None:
    # frames on REQ sent by the primary: 1 = first frame, 2.. = consecutive frames
    link, endpoint = rig.pair(
        primary=rig.node([FrameFault("drop", nth=3, arbitration_id=REQ)]),
        config=rig.config(cf_timeout=0.1),
    )
    data = payload(300)
    with pytest.raises(TransportTimeout):
        link.request(data, timeout=0.3)
    assert link.request(data) == digest(data)
    assert endpoint.stats.requests == 1  # the broken request never reached the handler


def test_dropped_consecutive_frame_in_response(rig: Rig) -> None:
    # a one-frame request; frames on RESP received by the primary: 1 = FF, 2 = CF 1
    primary = rig.node([FrameFault("drop", nth=2, direction="rx", arbitration_id=RESP)])
    link, _ = rig.pair(lambda _: payload(600), primary=primary)
    with pytest.raises(FramingError):  # wrong sequence number, no need to wait
        link.request(b"abc", timeout=2.0)
    assert link.request(b"abc") == payload(600)


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_a_delayed_frame_is_held_without_stalling_other_exchanges(
    classic: Rig, direction: str
) -> None:
    """One scheduler thread drives every node of a process: a frame a fault delays is
    held (its own exchange waits for it), never slept in that thread (all would wait)."""
    fault = FrameFault(
        "delay",
        nth=1,
        direction="tx" if direction == "tx" else "rx",
        arbitration_id=REQ if direction == "tx" else RESP,
        delay=3.0,
    )
    slow_node = classic.node([fault])
    faulty = slow_node.bus
    assert isinstance(faulty, FaultyBus)
    slow_link, _ = classic.pair(lambda _: b"ok", primary=slow_node)  # single frames
    fast_link, _ = classic.pair(config=classic.config(0x711, 0x719))
    slow = ask(slow_link, b"small", timeout=30.0)
    deadline = time.monotonic() + 10.0
    while faulty.counters.delayed == 0:
        assert time.monotonic() < deadline, "the delayed frame was never sent"
        time.sleep(0.01)
    data = payload(600)
    assert fast_link.request(data, timeout=10.0) == digest(data)  # multi-frame, both ways
    assert not slow.done()  # its frame is still held
    assert slow.result(timeout=30.0) == b"ok"  # and goes once due


def test_corrupted_frame_fails_the_request(rig: Rig) -> None:
    # bit 0 of byte 0 of consecutive frame 1 is in its sequence number
    corrupt = FrameFault("corrupt", nth=2, direction="rx", arbitration_id=RESP, byte=0, bit=0)
    link, _ = rig.pair(lambda _: payload(600), primary=rig.node([corrupt]))
    with pytest.raises(FramingError):
        link.request(b"abc", timeout=2.0)
    assert link.request(b"abc") == payload(600)


def test_corrupted_data_byte_is_not_detected_here(classic: Rig) -> None:
    # CAN's CRC is gone once a frame is altered: integrity is the job of the
    # signed messages above this layer, which is why nothing here is trusted.
    seen: list[bytes] = []
    corrupt = FrameFault("corrupt", nth=2, arbitration_id=REQ, byte=3, bit=7)
    link, _ = classic.pair(recording(seen, b"ok"), primary=classic.node([corrupt]))
    data = payload(100)
    assert link.request(data) == b"ok"
    expected = bytearray(data)
    expected[6 + 2] ^= 0x80  # CF 1 carries bytes 6..12; its byte 3 is data byte 8
    assert seen == [bytes(expected)]


def test_bus_off_is_a_typed_error_until_cleared(rig: Rig) -> None:
    acct = rig.observer()
    primary = rig.node([])
    link, _ = rig.pair(primary=primary)
    bus = primary.bus
    assert isinstance(bus, FaultyBus)
    bus.go_bus_off()
    with pytest.raises(BusOffError):
        link.request(b"x")
    acct.drain(0.05)
    assert acct.stats().frames == 0
    bus.clear_bus_off()
    assert link.request(b"x") == digest(b"x")


def test_going_bus_off_mid_transfer(rig: Rig) -> None:
    primary = rig.node([FrameFault("bus_off", nth=3, arbitration_id=REQ)])
    link, _ = rig.pair(primary=primary)
    with pytest.raises(BusOffError):
        link.request(payload(300), timeout=2.0)
    assert isinstance(primary.bus, FaultyBus)
    primary.bus.clear_bus_off()
    assert link.request(b"again") == digest(b"again")


def test_closed_link_and_node(classic: Rig) -> None:
    primary = classic.node()
    link, _ = classic.pair(primary=primary)
    primary.close()
    with pytest.raises(TransportError):
        link.request(b"x")
    with pytest.raises(TransportError):
        primary.link(classic.config(0x702, 0x70A))


# --- accounting ------------------------------------------------------------------------


def test_accounting_classic_matches_hand_computed_frames(classic: Rig) -> None:
    acct = classic.observer()
    worst = classic.observer("worst")
    exact = classic.observer("exact")
    link, _ = classic.pair(lambda _: b"\x01")
    with acct.transfer() as t, worst.transfer() as tw, exact.transfer() as te:
        assert link.request(payload(100)) == b"\x01"
    # request: FF (8 bytes, 6 data) + ceil(94 / 7) = 14 CFs (13 full, last 1 + 3 bytes)
    # + 1 FC (3 bytes); response: 1 SF (2 bytes). Bits: 47 + 8 * DLC.
    assert t.stats == BusStats(
        frames=17,
        single=1,
        first=1,
        consecutive=14,
        flow_control=1,
        data_bytes=8 + 13 * 8 + 4 + 3 + 2,
        nominal_bits=111 + 13 * 111 + 79 + 71 + 63,
        wire_time=t.stats.wire_time,
    )
    assert t.stats.wire_time == pytest.approx(1767 / 500_000)
    # worst case stuffing: + floor((34 + 8 * DLC - 1) / 4) per frame
    assert tw.stats.bits == 135 + 13 * 135 + 95 + 85 + 75
    # the actual stuff bits lie in between (and are the accounting's default)
    assert t.stats.bits < te.stats.bits < tw.stats.bits
    assert BusAccounting().stuffing == "exact"


def test_accounting_counts_flow_control_per_block(classic: Rig) -> None:
    acct = classic.observer()
    link, _ = classic.pair(lambda _: b"\x01", config=classic.config(blocksize=8))
    size = 4100  # escape sequence: the first frame carries 2 bytes
    with acct.transfer() as t:
        link.request(payload(size))
    cfs = -(-(size - 2) // 7)
    assert cfs == 586
    request = acct.stats([REQ])
    assert (request.first, request.consecutive, request.frames) == (1, cfs, 1 + cfs)
    # the secondary sends one FC after the FF and one after every 8 CFs but the last
    response = acct.stats([RESP])
    assert (response.flow_control, response.single) == (1 + (cfs - 1) // 8, 1)
    assert t.stats.frames == 1 + cfs + 74 + 1


def test_accounting_fd_matches_hand_computed_bits() -> None:
    with contextlib.ExitStack() as stack:
        rig = Rig(fd=True, stack=stack)
        acct = rig.observer()
        link, _ = rig.pair(lambda _: b"\x01")
        with acct.transfer() as t:
            link.request(payload(200))
    # FF 64 (62 data) + CFs 64, 64, 1 + 12 -> 16 bytes; FC 3 bytes; SF 2 bytes.
    # Nominal: 30 bits per frame. Data phase: 37 + 8n (n > 16) or 32 + 8n.
    assert (t.stats.first, t.stats.consecutive, t.stats.flow_control, t.stats.single) == (
        1,
        3,
        1,
        1,
    )
    assert t.stats.nominal_bits == 6 * 30
    assert t.stats.data_bits == 3 * 549 + 160 + 56 + 48
    assert t.stats.wire_time == pytest.approx(180 / 500_000 + 1911 / 2_000_000)


def test_paced_node_sleeps_its_wire_time(classic: Rig) -> None:
    primary = classic.node(paced=True)
    exact = classic.observer("exact")
    link, _ = classic.pair(lambda _: b"\x01", primary=primary)
    assert link.request(payload(100)) == b"\x01"
    assert isinstance(primary.bus, PacedBus)
    # the primary sent FF + 14 CFs: 111 + 13 * 111 + 79 bits at 500 kbit/s, plus the
    # stuff bits they actually need
    exact.drain()
    sent = exact.stats([REQ])
    assert sent.bits > 1633
    assert primary.bus.paced_time == pytest.approx(sent.bits / 500_000)
    assert CanTiming(500_000).bitrate == classic.bus_config.timing.bitrate


# --- one scheduler for every stack ---------------------------------------------------------


def test_thread_count_does_not_grow_with_ecus(rig: Rig) -> None:
    """50 secondaries on 10 buses, all served and asked at once: the CAN side of the
    process runs one scheduler and a bounded handler pool, not threads per stack or bus."""
    import threading

    from ecus.transport.scheduler import HANDLER_THREADS

    rig.pair()[0].request(b"warm-up")  # the shared scheduler and its pool exist now
    before = threading.active_count()
    links = []
    for bus in range(10):
        channel = f"{rig.channel}-{bus}"
        sub = Rig(fd=rig.fd, channel=channel, stack=rig.stack)
        primary = sub.node()
        for k in range(5):
            config = sub.config(0x600 + 2 * k, 0x601 + 2 * k)
            links.append((sub.pair(tagged(bytes([k])), config=config, primary=primary)[0], k))
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda lk: (lk[0].request(payload(200)), lk[1]), links))
    assert all(r == bytes([k]) + digest(payload(200)) for r, k in results)
    # 4 askers, and at most the handler pool's threads started by now
    assert threading.active_count() - before <= 4 + HANDLER_THREADS


def test_timeout_names_the_bus_and_says_virtual_is_in_process_only(rig: Rig) -> None:
    config = rig.bus_config
    node = rig.stack.enter_context(CanNode.open(config))
    link = node.link(rig.config(fc_timeout=0.1))
    with pytest.raises(TransportTimeout) as err:
        link.request(payload(300), timeout=2.0)  # nobody sends flow control
    assert f"virtual:{config.channel}" in str(err.value)
    assert "in-process only" in str(err.value)
    with pytest.raises(TransportTimeout) as err:
        link.request(b"short", timeout=0.2)  # a single frame nobody answers
    assert f"virtual:{config.channel}" in str(err.value)
