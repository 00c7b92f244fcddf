"""CAN bus accounting: frames, bits and wire time per transfer (DESIGN 4).

Frame length (bits on the wire, data frames, ISO 11898-1:2015 field sizes)
--------------------------------------------------------------------------
Classic CAN, ``n`` data bytes (0..8), 11-bit identifier::

    SOF 1 + ID 11 + RTR 1 + IDE 1 + r0 1 + DLC 4 + data 8n + CRC 15   (g = 34, stuffed)
    + CRC delimiter 1 + ACK slot 1 + ACK delimiter 1 + EOF 7 + IFS 3  (13, not stuffed)
    = 47 + 8n bits            (111 bits for 8 bytes)

A 29-bit identifier adds SRR 1 + 18 identifier bits + r1 1 (g = 54): 67 + 8n.
Worst-case bit stuffing adds ``floor((g + 8n - 1) / 4)`` bits (one stuff bit
after the first five equal bits, then one per four: R. I. Davis, A. Burns,
R. J. Bril, J. J. Lukkien, "Controller Area Network (CAN) schedulability
analysis: Refuted, revisited and revised", Real-Time Systems 35(3), 2007,
eq. (3)): 135 bits for 8 bytes, 11-bit identifier.

CAN FD, ``n`` data bytes rounded up to a valid length (0..8, 12, 16, 20, 24,
32, 48, 64), 11-bit identifier, with bit-rate switch (BRS)::

    arbitration phase, nominal rate: SOF 1 + ID 11 + RRS 1 + IDE 1 + FDF 1 + res 1 + BRS 1 = 17
    data phase, data rate:           ESI 1 + DLC 4 + data 8n + stuff count 4
                                     + CRC 17 (n <= 16) or 21 (n > 16)
                                     + fixed stuff bits 6 (CRC-17) or 7 (CRC-21)
                                     = 32 + 8n (n <= 16) or 37 + 8n (n > 16)
    end, nominal rate:               CRC delimiter 1 + ACK 1 + ACK delimiter 1 + EOF 7 + IFS 3 = 13

(29-bit identifier: the arbitration phase is SOF 1 + ID 11 + SRR 1 + IDE 1 +
ID 18 + RRS 1 + FDF 1 + res 1 + BRS 1 = 36.) The switch back happens at the
CRC delimiter's sample point; it is counted at the nominal rate here, which is
slightly conservative. Without BRS every bit is at the nominal rate. Dynamic
stuffing covers SOF up to the end of the data field; the worst case adds
``floor((A + 5 + 8n - 1) / 4)`` bits, ``floor((A - 1) / 4)`` of them in the
arbitration phase (A = 17 or 36) and the rest in the data phase.

Exact stuffing (the default of ``BusAccounting`` and ``PacedBus``) builds each
frame's bit sequence (identifier, control field, data and, on classic CAN, its
CRC-15) and counts the stuff bits a transmitter inserts after every five equal
bits (a stuff bit counts towards the next run). On CAN FD the dynamic stuff
bits before the BRS sample point are at the nominal rate, the rest at the data
rate; the stuff count and CRC field use the fixed stuff bits above, so the CRC
value does not change the length. FD data shorter than its DLC length is
padded with zero bytes here. ``stuffing="none"`` counts the unstuffed frame,
``"worst"`` the bound above.

Wire time is ``nominal_bits / bitrate + data_bits / data_bitrate``.
Error frames are counted but carry no bits here (their length depends on the
error); overload frames and bus idle are not modelled.

``BusAccounting`` is a ``can.Listener``: attach it to a ``can.Notifier`` or
let it read a dedicated observer bus object (``observe`` + ``drain``) so that
every frame on the wire is counted, both directions, flow control included.
``PacedBus`` makes a sender's wall time follow the computed wire time (demo).
"""

from __future__ import annotations

import contextlib
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import can

from .buswrap import BusWrapper

FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)
Stuffing = Literal["none", "exact", "worst"]


def fd_length(n: int) -> int:
    """The CAN FD data length a payload of ``n`` bytes occupies (DLC rounding)."""
    if not 0 <= n <= 64:
        raise ValueError(f"CAN FD frames carry 0..64 bytes, not {n}")
    return FD_LENGTHS[bisect_left(FD_LENGTHS, n)]


@dataclass(frozen=True)
class FrameBits:
    """Bits of one frame at the nominal rate and at the data rate."""

    nominal: int
    data: int = 0

    @property
    def total(self) -> int:
        return self.nominal + self.data


def _worst_stuffing(stuffed_bits: int) -> int:
    return (stuffed_bits - 1) // 4


def classic_frame_bits(
    n: int, *, extended: bool = False, worst_case_stuffing: bool = False
) -> FrameBits:
    """Bits of a classic CAN data frame with ``n`` data bytes (see module doc)."""
    if not 0 <= n <= 8:
        raise ValueError(f"classic CAN frames carry 0..8 bytes, not {n}")
    g = 54 if extended else 34
    stuffed = g + 8 * n
    bits = stuffed + 13
    if worst_case_stuffing:
        bits += _worst_stuffing(stuffed)
    return FrameBits(nominal=bits)


def fd_frame_bits(
    n: int, *, extended: bool = False, brs: bool = True, worst_case_stuffing: bool = False
) -> FrameBits:
    """Bits of a CAN FD data frame with ``n`` data bytes (see module doc)."""
    n = fd_length(n)
    arbitration = 36 if extended else 17
    data_phase = (32 if n <= 16 else 37) + 8 * n
    nominal = arbitration + 13
    if worst_case_stuffing:
        total_stuff = _worst_stuffing(arbitration + 5 + 8 * n)
        arbitration_stuff = _worst_stuffing(arbitration)
        nominal += arbitration_stuff
        data_phase += total_stuff - arbitration_stuff
    if brs:
        return FrameBits(nominal=nominal, data=data_phase)
    return FrameBits(nominal=nominal + data_phase)


def _bits(value: int, width: int) -> list[int]:
    return [(value >> (width - 1 - i)) & 1 for i in range(width)]


def _crc15(bits: list[int]) -> int:
    """Classic CAN's CRC-15 (polynomial 0x4599) over SOF .. data."""
    crc = 0
    for bit in bits:
        feedback = bit ^ ((crc >> 14) & 1)
        crc = (crc << 1) & 0x7FFF
        if feedback:
            crc ^= 0x4599
    return crc


def _stuff_bits(bits: list[int], switch_at: int | None = None) -> tuple[int, int]:
    """Stuff bits a transmitter inserts into ``bits`` (after five equal bits).

    Returns (stuff bits before, stuff bits after) the bit at index
    ``switch_at`` has been sent (all "before" when ``switch_at`` is None).
    """
    before = after = 0
    last, run = -1, 0
    for i, bit in enumerate(bits):
        if bit == last:
            run += 1
        else:
            last, run = bit, 1
        if run == 5:
            if switch_at is not None and i >= switch_at:
                after += 1
            else:
                before += 1
            last, run = 1 - bit, 1  # the stuff bit starts the next run
    return before, after


def _id_field(msg: can.Message, *, fd: bool) -> list[int]:
    """SOF .. the last arbitration/control bit before DLC (FD: up to and including BRS)."""
    ident = msg.arbitration_id
    rtr = 0 if fd else int(bool(msg.is_remote_frame))
    if msg.is_extended_id:
        bits = [0, *_bits(ident >> 18, 11), 1, 1, *_bits(ident & 0x3FFFF, 18), rtr]
        bits += [0, 1, 0, int(bool(msg.bitrate_switch))] if fd else [0, 0]  # r1 r0 / FDF res BRS
    else:
        bits = [0, *_bits(ident, 11), rtr, 0]  # SOF, ID, RTR/RRS, IDE
        bits += [1, 0, int(bool(msg.bitrate_switch))] if fd else [0]  # FDF res BRS / r0
    return bits


def exact_frame_bits(msg: can.Message) -> FrameBits:
    """Bits of one frame with its actual stuff bits (see module doc)."""
    if msg.is_fd:
        n = fd_length(len(msg.data))
        data = bytes(msg.data) + bytes(n - len(msg.data))
        head = _id_field(msg, fd=True)
        body = [0, *_bits(FD_LENGTHS.index(n), 4)]  # ESI, DLC
        for byte in data:
            body += _bits(byte, 8)
        before, after = _stuff_bits(head + body, switch_at=len(head) - 1)
        plain = fd_frame_bits(n, extended=msg.is_extended_id, brs=msg.bitrate_switch)
        if msg.bitrate_switch:
            return FrameBits(nominal=plain.nominal + before, data=plain.data + after)
        return FrameBits(nominal=plain.nominal + before + after)
    n = 0 if msg.is_remote_frame else len(msg.data)
    bits = _id_field(msg, fd=False) + _bits(len(msg.data), 4)
    for byte in bytes(msg.data)[:n]:
        bits += _bits(byte, 8)
    bits += _bits(_crc15(bits), 15)
    stuffed, _ = _stuff_bits(bits)
    return FrameBits(nominal=len(bits) + stuffed + 13)


def frame_bits(
    msg: can.Message, *, worst_case_stuffing: bool = False, stuffing: Stuffing | None = None
) -> FrameBits:
    """Bits a python-can message occupies on the wire (``stuffing``: see module doc;
    ``worst_case_stuffing=True`` is ``stuffing="worst"``, the default ``"none"``)."""
    if msg.is_error_frame:
        return FrameBits(nominal=0)
    if stuffing is None:
        stuffing = "worst" if worst_case_stuffing else "none"
    if stuffing == "exact":
        return exact_frame_bits(msg)
    worst_case_stuffing = stuffing == "worst"
    if msg.is_fd:
        return fd_frame_bits(
            len(msg.data),
            extended=msg.is_extended_id,
            brs=msg.bitrate_switch,
            worst_case_stuffing=worst_case_stuffing,
        )
    n = 0 if msg.is_remote_frame else len(msg.data)
    return classic_frame_bits(
        n, extended=msg.is_extended_id, worst_case_stuffing=worst_case_stuffing
    )


@dataclass(frozen=True)
class CanTiming:
    """Bit rates of a bus: ``bitrate`` (nominal/arbitration) and ``data_bitrate`` (FD BRS)."""

    bitrate: int = 500_000
    data_bitrate: int | None = None

    def __post_init__(self) -> None:
        if self.bitrate <= 0 or (self.data_bitrate is not None and self.data_bitrate <= 0):
            raise ValueError("bit rates must be positive")

    def seconds(self, bits: FrameBits) -> float:
        data_rate = self.bitrate if self.data_bitrate is None else self.data_bitrate
        return bits.nominal / self.bitrate + bits.data / data_rate


@dataclass(frozen=True)
class IsoTpFrames:
    """Frame counts of one ISO-TP message (ISO 15765-2:2016) and its flow control."""

    single: int = 0
    first: int = 0
    consecutive: int = 0
    flow_control: int = 0

    @property
    def total(self) -> int:
        return self.single + self.first + self.consecutive + self.flow_control


def isotp_frames(length: int, *, tx_data_length: int = 8, blocksize: int = 0) -> IsoTpFrames:
    """Frames one ISO-TP message of ``length`` bytes needs (normal addressing).

    Single frame up to 7 bytes (classic) or ``tx_data_length - 2`` (FD, escape
    length byte); otherwise a first frame (2-byte length, or the 6-byte escape
    form above 4095 bytes), consecutive frames of ``tx_data_length - 1`` bytes,
    and one flow control after the first frame plus one after every
    ``blocksize`` consecutive frames that do not end the message.
    """
    if length < 1:
        raise ValueError("an ISO-TP message has at least one byte")
    sf_max = 7 if (tx_data_length == 8 or length <= 7) else tx_data_length - 2
    if length <= sf_max:
        return IsoTpFrames(single=1)
    ff_payload = tx_data_length - (2 if length <= 0xFFF else 6)
    cf_payload = tx_data_length - 1
    cfs = -(-(length - ff_payload) // cf_payload)
    fcs = 1 + ((cfs - 1) // blocksize if blocksize else 0)
    return IsoTpFrames(first=1, consecutive=cfs, flow_control=fcs)


_KINDS = ("single", "first", "consecutive", "flow_control", "other")


@dataclass(frozen=True)
class BusStats:
    """Totals over a set of frames; subtract two snapshots for one transfer."""

    frames: int = 0
    single: int = 0
    first: int = 0
    consecutive: int = 0
    flow_control: int = 0
    other: int = 0
    error_frames: int = 0
    data_bytes: int = 0
    nominal_bits: int = 0
    data_bits: int = 0
    wire_time: float = 0.0

    @property
    def bits(self) -> int:
        return self.nominal_bits + self.data_bits

    def __sub__(self, other: BusStats) -> BusStats:
        return BusStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )

    def __add__(self, other: BusStats) -> BusStats:
        return BusStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )


@dataclass
class _Counter:
    frames: int = 0
    single: int = 0
    first: int = 0
    consecutive: int = 0
    flow_control: int = 0
    other: int = 0
    error_frames: int = 0
    data_bytes: int = 0
    nominal_bits: int = 0
    data_bits: int = 0


def isotp_kind(msg: can.Message) -> str:
    """The ISO-TP frame type of a frame with normal addressing (by its PCI nibble)."""
    if msg.is_error_frame or msg.is_remote_frame or not msg.data:
        return "other"
    pci = msg.data[0] >> 4
    return _KINDS[pci] if pci < 4 else "other"


@dataclass
class Transfer:
    """Filled in when the ``BusAccounting.transfer()`` block exits."""

    stats: BusStats = field(default_factory=BusStats)


class BusAccounting(can.Listener):
    """Count frames, bits and wire time of everything seen on a bus.

    Thread-safe. Feed it with a ``can.Notifier`` (it is a listener), or give it
    an observer bus object of its own with ``observe(bus)`` and call ``drain()``
    to count what has been sent so far (deterministic on the virtual bus).
    """

    def __init__(
        self,
        timing: CanTiming | None = None,
        *,
        worst_case_stuffing: bool = False,
        stuffing: Stuffing = "exact",
    ):
        self.timing = timing or CanTiming()
        self.stuffing: Stuffing = "worst" if worst_case_stuffing else stuffing
        self._lock = threading.Lock()
        self._by_id: dict[int, _Counter] = {}
        self._bus: can.BusABC | None = None

    # --- counting ---------------------------------------------------------

    def on_message_received(self, msg: can.Message) -> None:
        self.record(msg)

    def record(self, msg: can.Message) -> FrameBits:
        """Count one frame and return its bits."""
        bits = frame_bits(msg, stuffing=self.stuffing)
        with self._lock:
            counter = self._by_id.setdefault(msg.arbitration_id, _Counter())
            if msg.is_error_frame:
                counter.error_frames += 1
                return bits
            counter.frames += 1
            kind = isotp_kind(msg)
            setattr(counter, kind, getattr(counter, kind) + 1)
            counter.data_bytes += len(msg.data)
            counter.nominal_bits += bits.nominal
            counter.data_bits += bits.data
        return bits

    def stats(self, ids: Iterable[int] | None = None) -> BusStats:
        """Totals over all frames, or over the frames with the given arbitration ids."""
        wanted = None if ids is None else set(ids)
        total = _Counter()
        with self._lock:
            for arbitration_id, counter in self._by_id.items():
                if wanted is not None and arbitration_id not in wanted:
                    continue
                for f in fields(_Counter):
                    setattr(total, f.name, getattr(total, f.name) + getattr(counter, f.name))
        values: dict[str, Any] = {f.name: getattr(total, f.name) for f in fields(_Counter)}
        wire = self.timing.seconds(FrameBits(total.nominal_bits, total.data_bits))
        return BusStats(**values, wire_time=wire)

    def reset(self) -> None:
        with self._lock:
            self._by_id.clear()

    # --- observing --------------------------------------------------------

    def observe(self, bus: can.BusABC) -> None:
        """Count what ``bus`` (a dedicated, receive-only bus object) sees on ``drain()``.

        The accounting owns it from now on and shuts it down in ``close()``.
        """
        if self._bus is not None:
            raise RuntimeError("already observing a bus")
        self._bus = bus

    def drain(self, timeout: float = 0.0) -> int:
        """Count every frame the observer bus has received; return how many.

        Waits up to ``timeout`` for the first frame, then reads until none is
        pending.
        """
        if self._bus is None:
            raise RuntimeError("no observer bus: call observe(bus) first")
        count = 0
        msg = self._bus.recv(timeout)
        while msg is not None:
            self.record(msg)
            count += 1
            msg = self._bus.recv(0.0)
        return count

    @contextlib.contextmanager
    def transfer(self, ids: Iterable[int] | None = None) -> Iterator[Transfer]:
        """Measure the frames of the enclosed block (drains the observer bus, if any)."""
        wanted = None if ids is None else tuple(ids)
        if self._bus is not None:
            self.drain()
        before = self.stats(wanted)
        result = Transfer()
        try:
            yield result
        finally:
            if self._bus is not None:
                self.drain()
            result.stats = self.stats(wanted) - before

    def stop(self) -> None:
        """``can.Listener`` hook; the observer bus stays open until ``close()``."""

    def close(self) -> None:
        bus, self._bus = self._bus, None
        if bus is not None:
            bus.shutdown()


class PacedBus(BusWrapper):
    """Sleep on each send so that the sender's wall time follows the wire time.

    Sends are scheduled back to back at the configured bit rates; a sender
    that is slower than the bus is not slowed further. Demo use only.
    """

    def __init__(
        self,
        inner: can.BusABC,
        timing: CanTiming,
        *,
        worst_case_stuffing: bool = False,
        stuffing: Stuffing = "exact",
    ) -> None:
        super().__init__(inner)
        self.timing = timing
        self.stuffing: Stuffing = "worst" if worst_case_stuffing else stuffing
        self.paced_time = 0.0
        #: sleep in ``send``; a ``CanNode`` clears it and lets its scheduler hold the
        #: sending stack back until ``ready_at()`` instead (the thread stays free)
        self.blocking = True
        self._next = 0.0
        self._pace_lock = threading.Lock()

    def ready_at(self) -> float:
        """The monotonic time the frames sent so far are off the (simulated) wire."""
        with self._pace_lock:
            return self._next

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        seconds = self.timing.seconds(frame_bits(msg, stuffing=self.stuffing))
        with self._pace_lock:
            now = time.monotonic()
            self._next = max(self._next, now) + seconds
            self.paced_time += seconds
            ahead = self._next - now
        if self.blocking and ahead > 0.001:  # sleep in chunks the OS can honour
            time.sleep(ahead)
        self.inner.send(msg, timeout)
