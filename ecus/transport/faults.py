"""Deterministic CAN fault injection for tests and the simulator (DESIGN 9).

``FaultyBus`` wraps one node's python-can bus. A plan of ``FrameFault``
entries says what happens to which frame: drop it, flip one bit of it, delay
it, or go bus-off at it. Frames are counted per fault (1-based ``nth``) among
the frames that match its direction (``"tx"``: sent by this node, ``"rx"``:
received by it) and, optionally, its arbitration id; each fault fires once.
While bus-off the node cannot send (``BusOffCanError``, and the bus state is
``can.BusState.ERROR``) and receives nothing, until ``clear_bus_off()``.

A delayed frame holds up the frames behind it in the same direction (a CAN
controller's queues are FIFO). With ``blocking`` (plain python-can use) the
delay is slept in ``send``/``recv``. A ``CanNode`` clears ``blocking``: frames
are then held, never slept, so the one scheduler thread that drives every
ECU of a process goes on with the others. Held sends leave when the
scheduler asks ``ready_at()`` (it holds the sending stack back until then);
held receptions are returned once due, and ``rx_due_at()`` tells the
scheduler when to read again.
"""

from __future__ import annotations

import collections
import copy
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import can

from .buswrap import BusWrapper

Action = Literal["drop", "corrupt", "delay", "bus_off"]
Direction = Literal["tx", "rx"]


class BusOffCanError(can.CanOperationError):
    """python-can level error: the (simulated) controller is bus-off."""


@dataclass(frozen=True)
class FrameFault:
    """One planned fault: ``action`` on the ``nth`` matching frame (1-based).

    ``corrupt`` flips bit ``bit`` of data byte ``byte`` (byte 0 is the ISO-TP
    protocol control information); ``delay`` holds the frame ``delay`` seconds;
    ``bus_off`` swallows the frame and takes the node off the bus.
    """

    action: Action
    nth: int
    direction: Direction = "tx"
    arbitration_id: int | None = None
    byte: int = 0
    bit: int = 0
    delay: float = 0.0

    def __post_init__(self) -> None:
        if self.action not in ("drop", "corrupt", "delay", "bus_off"):
            raise ValueError(f"unknown fault action {self.action!r}")
        if self.direction not in ("tx", "rx"):
            raise ValueError(f"unknown direction {self.direction!r}")
        if self.nth < 1:
            raise ValueError("nth counts from 1")
        if not 0 <= self.bit <= 7 or self.byte < 0:
            raise ValueError("corrupt needs a byte index >= 0 and a bit 0..7")
        if self.delay < 0:
            raise ValueError("delay must not be negative")

    def matches(self, msg: can.Message, direction: Direction) -> bool:
        return direction == self.direction and (
            self.arbitration_id is None or msg.arbitration_id == self.arbitration_id
        )


@dataclass
class FaultCounters:
    """What a ``FaultyBus`` has done so far."""

    tx_frames: int = 0
    rx_frames: int = 0
    dropped: int = 0
    corrupted: int = 0
    delayed: int = 0
    bus_off_events: int = 0
    refused_while_bus_off: int = 0
    discarded_while_bus_off: int = 0


class FaultyBus(BusWrapper):
    """A python-can bus that applies a deterministic fault plan to another bus."""

    def __init__(self, inner: can.BusABC, plan: Iterable[FrameFault] = (), **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self.counters = FaultCounters()
        self._faults_lock = threading.Lock()
        self._pending: list[tuple[FrameFault, list[int]]] = []
        self._bus_off = False
        #: sleep delays in send/recv; a ``CanNode`` clears it (frames are held instead)
        self.blocking = True
        self._held_lock = threading.Lock()
        self._tx_held: collections.deque[tuple[float, can.Message]] = collections.deque()
        self._rx_held: collections.deque[tuple[float, can.Message]] = collections.deque()
        for fault in plan:
            self.add(fault)

    # --- plan -------------------------------------------------------------

    def add(self, fault: FrameFault) -> None:
        """Arm one more fault; its frame count starts now."""
        with self._faults_lock:
            self._pending.append((fault, [0]))

    def clear_plan(self) -> None:
        with self._faults_lock:
            self._pending.clear()

    @property
    def pending(self) -> tuple[FrameFault, ...]:
        """Faults that have not fired yet."""
        with self._faults_lock:
            return tuple(fault for fault, _ in self._pending)

    def go_bus_off(self) -> None:
        with self._faults_lock:
            self._enter_bus_off()

    def clear_bus_off(self) -> None:
        with self._faults_lock:
            self._bus_off = False

    @property
    def is_bus_off(self) -> bool:
        return self._bus_off

    @property
    def state(self) -> can.BusState:
        return can.BusState.ERROR if self._bus_off else self.inner.state

    @state.setter
    def state(self, new_state: can.BusState) -> None:
        self.inner.state = new_state

    def _enter_bus_off(self) -> None:
        if not self._bus_off:
            self._bus_off = True
            self.counters.bus_off_events += 1

    def _due(self, msg: can.Message, direction: Direction) -> list[FrameFault]:
        """Count ``msg`` against every armed fault; return (and disarm) those due now."""
        due: list[FrameFault] = []
        keep: list[tuple[FrameFault, list[int]]] = []
        for fault, seen in self._pending:
            if fault.matches(msg, direction):
                seen[0] += 1
                if seen[0] == fault.nth:
                    due.append(fault)
                    continue
            keep.append((fault, seen))
        self._pending = keep
        return due

    def _apply(self, msg: can.Message, direction: Direction) -> tuple[can.Message | None, float]:
        """The frame as it goes on (possibly altered) or None if it is lost, and its delay."""
        delay = 0.0
        with self._faults_lock:
            if direction == "tx":
                self.counters.tx_frames += 1
            else:
                self.counters.rx_frames += 1
            if self._bus_off:
                if direction == "tx":
                    self.counters.refused_while_bus_off += 1
                    raise BusOffCanError("controller is bus-off")
                self.counters.discarded_while_bus_off += 1
                return None, 0.0
            for fault in self._due(msg, direction):
                if fault.action == "bus_off":
                    self._enter_bus_off()
                    if direction == "tx":
                        self.counters.refused_while_bus_off += 1
                        raise BusOffCanError("controller went bus-off")
                    self.counters.discarded_while_bus_off += 1
                    return None, 0.0
                if fault.action == "drop":
                    self.counters.dropped += 1
                    return None, 0.0
                if fault.action == "corrupt":
                    if fault.byte < len(msg.data):
                        msg = copy.copy(msg)
                        data = bytearray(msg.data)
                        data[fault.byte] ^= 1 << fault.bit
                        msg.data = data
                        self.counters.corrupted += 1
                elif fault.action == "delay":
                    self.counters.delayed += 1
                    delay += fault.delay
        return msg, delay

    # --- held frames (non-blocking delays) ----------------------------------

    @staticmethod
    def _hold(
        queue: collections.deque[tuple[float, can.Message]], msg: can.Message, delay: float
    ) -> None:
        release = time.monotonic() + delay
        if queue:
            release = max(release, queue[-1][0])  # FIFO: never overtakes a held frame
        queue.append((release, msg))

    def ready_at(self) -> float:
        """Send the held frames that are due; the time the next one is (0.0: none held).

        The scheduler holds the sending stack back until then (``drive``), so
        frames behind a delayed one wait for it, as on a real controller.
        """
        now = time.monotonic()
        with self._held_lock:
            while self._tx_held and self._tx_held[0][0] <= now:
                self.inner.send(self._tx_held.popleft()[1])
            return self._tx_held[0][0] if self._tx_held else 0.0

    def rx_due_at(self) -> float | None:
        """When the first held received frame is due (None: none held)."""
        with self._held_lock:
            return self._rx_held[0][0] if self._rx_held else None

    # --- bus --------------------------------------------------------------

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        out, delay = self._apply(msg, "tx")
        if out is None:
            return
        if self.blocking:
            if delay:
                time.sleep(delay)
            self.inner.send(out, timeout)
            return
        if delay or self.ready_at():
            with self._held_lock:
                self._hold(self._tx_held, out, delay)
            return
        self.inner.send(out, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._held_lock:
                now = time.monotonic()
                if self._rx_held and self._rx_held[0][0] <= now:
                    return self._rx_held.popleft()[1], False
                due = self._rx_held[0][0] if self._rx_held else None
            wait = None if deadline is None else max(0.0, deadline - now)
            if due is not None:
                wait = due - now if wait is None else min(wait, due - now)
            msg = self.inner.recv(wait)
            if msg is None:
                if due is None or (deadline is not None and time.monotonic() >= deadline):
                    with self._held_lock:
                        if self._rx_held and self._rx_held[0][0] <= time.monotonic():
                            return self._rx_held.popleft()[1], False
                    return None, False
            else:
                out, delay = self._apply(msg, "rx")
                if out is not None:
                    with self._held_lock:
                        passes = not self._rx_held and (not delay or self.blocking)
                        if not passes:
                            self._hold(self._rx_held, out, delay)
                    if passes:
                        if delay:
                            time.sleep(delay)
                        return out, False
