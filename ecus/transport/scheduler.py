"""One thread that drives every ISO-TP stack of a process (DESIGN 4).

can-isotp's ``TransportLayerLogic`` is the thread-free ISO 15765-2 state
machine: ``process()`` consumes the frames handed to it, sends what is due and
arms its timers (N_Bs, N_Cr, STmin). A ``CanScheduler`` runs ``process()`` of
each stack only when there is something to do:

- a frame arrived for one of its nodes. In-process ``virtual`` buses wake the
  scheduler from the sender's ``put`` into the node's receive queue; buses with
  a file descriptor (``socketcan``, ``udp_multicast``) are watched with one
  ``selectors`` call; any other interface gets one small reader thread per node;
- a stack was given a message to send (can-isotp's ``post_send_callback``);
- a stack's own next deadline passed (its flow control or consecutive frame
  timeout, or its STmin before the next consecutive frame).

Nothing polls: the thread sleeps in ``select`` until a wake-up or the earliest
deadline. A stack sends at most ``TX_BUDGET`` frames per pass before the other
ready stacks get theirs (a receiver's N_Cr timer must not run out while its
sender holds the thread), and a stack on a ``PacedBus`` is held back, not
slept, while the bus is ahead of the clock. Complete requests of a served endpoint are handed to a small,
bounded pool of handler threads, so a process runs ``1 + HANDLER_THREADS``
threads for the CAN side however many ECUs it simulates.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import can
from can.interfaces import virtual
from can.interfaces.virtual import VirtualBus

from .accounting import PacedBus
from .buswrap import BusWrapper, wrappers
from .faults import FaultyBus

if TYPE_CHECKING:
    from .isotp import CanNode, _Port

logger = logging.getLogger(__name__)

#: Threads that run endpoint handlers (request -> response) for every served endpoint.
HANDLER_THREADS = 8
#: Frames one stack sends per pass before the other ready stacks get a turn.
TX_BUDGET = 64
#: How far a paced bus may run ahead of the clock before its sender is held back: the
#: last frames of a message reach the receiver up to this much before their wire time.
PACE_SLACK = 0.002
#: is_timed_out() in can-isotp is strict (elapsed > timeout): wake a little after.
_TIMER_SLACK = 0.0005


class _WakingQueue(queue.Queue[can.Message]):
    """A virtual bus's receive queue that tells the scheduler when a frame is put."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self._on_put = on_put

    def put(self, item: can.Message, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._on_put()


class Pacer(Protocol):
    """A bus wrapper that may hold its node's sender back (``PacedBus``, ``FaultyBus``)."""

    blocking: bool

    def ready_at(self) -> float: ...


class Pacers:
    """Every ``Pacer`` in a node's chain of bus wrappers: the sender waits for the last."""

    def __init__(self, members: list[Pacer]) -> None:
        self.members = tuple(members)

    def ready_at(self) -> float:
        return max(p.ready_at() for p in self.members)


def pacers_of(bus: can.BusABC) -> Pacers | None:
    """The pacers wrapping ``bus``, now non-blocking: the scheduler holds senders instead."""
    found: list[Pacer] = []
    for wrapper in wrappers(bus):
        if isinstance(wrapper, PacedBus | FaultyBus):
            wrapper.blocking = False
            found.append(wrapper)
    return Pacers(found) if found else None


def innermost(bus: can.BusABC) -> can.BusABC:
    """The bus a chain of ``BusWrapper``s (faults, pacing) ends in."""
    while isinstance(bus, BusWrapper):
        bus = bus.inner
    return bus


class CanScheduler:
    """Drive ISO-TP stacks from one thread, woken by frames, sends and deadlines."""

    _shared: CanScheduler | None = None
    _shared_lock = threading.Lock()

    def __init__(self, handler_threads: int = HANDLER_THREADS) -> None:
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._signaled = False
        self._ready_nodes: collections.deque[CanNode] = collections.deque()
        self._ready_ports: collections.deque[_Port] = collections.deque()
        self._timers: list[tuple[float, int, _Port]] = []
        self._alarms: list[tuple[float, int, CanNode]] = []  # drain a node again then
        self._seq = itertools.count()
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        self._readers: dict[CanNode, threading.Thread] = {}
        self._stopped = False
        self.handlers = ThreadPoolExecutor(handler_threads, thread_name_prefix="can-handler")
        self._thread = threading.Thread(target=self._run, name="can-scheduler", daemon=True)
        self._thread.start()

    @classmethod
    def shared(cls) -> CanScheduler:
        """The process-wide scheduler (started on first use, and anew in a forked child)."""
        with cls._shared_lock:
            if cls._shared is None or cls._shared._stopped:
                cls._shared = cls()
            return cls._shared

    @classmethod
    def _forget_after_fork(cls) -> None:
        cls._shared = None
        cls._shared_lock = threading.Lock()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # --- wake-ups (any thread) --------------------------------------------------

    def _signal(self) -> None:
        if self._signaled:
            return
        self._signaled = True
        with contextlib.suppress(OSError):  # already full of wake-ups, or closed
            self._wake_w.send(b"\0")

    def node_ready(self, node: CanNode) -> None:
        """Frames are waiting on ``node``'s bus."""
        if not node.pending:
            node.pending = True
            self._ready_nodes.append(node)
            self._signal()

    def port_ready(self, port: _Port) -> None:
        """``port``'s stack has something to do now (a send was queued, a frame routed)."""
        if not port.pending:
            port.pending = True
            self._ready_ports.append(port)
            self._signal()

    def drain_at(self, node: CanNode, when: float) -> None:
        """Drain ``node`` again at ``when`` (scheduler thread): a held frame is due then."""
        if any(alarm[0] == when and alarm[2] is node for alarm in self._alarms):
            return
        heapq.heappush(self._alarms, (when, next(self._seq), node))

    def call(self, fn: Callable[[], Any], timeout: float = 5.0) -> None:
        """Run ``fn`` in the scheduler thread and wait for it (or run it now if we are it)."""
        if threading.current_thread() is self._thread or self._stopped:
            fn()
            return
        done = threading.Event()

        def wrapped() -> None:
            try:
                fn()
            finally:
                done.set()

        self._calls.append(wrapped)
        self._signal()
        done.wait(timeout)

    # --- nodes ------------------------------------------------------------------

    def attach(self, node: CanNode) -> None:
        """Start delivering ``node``'s frames: hook, selector or (last resort) a reader."""
        bus = innermost(node.bus)
        if isinstance(bus, VirtualBus):
            hooked = _WakingQueue(lambda: self.node_ready(node))
            with virtual.channels_lock:
                old = bus.queue
                while True:  # frames already queued stay queued
                    try:
                        hooked.queue.append(old.get_nowait())
                    except queue.Empty:
                        break
                bus.channel[bus.channel.index(old)] = hooked
                bus.queue = hooked
            if hooked.qsize():
                self.node_ready(node)
            return
        fileno = _fileno(bus)
        if fileno is not None:
            self.call(lambda: self._selector.register(fileno, selectors.EVENT_READ, node))
            node.fileno = fileno
            self.node_ready(node)
            return
        reader = threading.Thread(target=self._read, args=(node,), name="can-reader", daemon=True)
        self._readers[node] = reader
        reader.start()

    def detach(self, node: CanNode) -> None:
        fileno = node.fileno
        if fileno is not None:
            node.fileno = None

            def unregister() -> None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(fileno)

            self.call(unregister)
        reader = self._readers.pop(node, None)
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=2.0)

    def _read(self, node: CanNode) -> None:
        """Reader of a bus with neither an in-process hook nor a file descriptor."""
        while not node.closed and not self._stopped:
            try:
                msg = node.bus.recv(0.1)
            except can.CanError:
                if node.closed:
                    return
                time.sleep(0.1)
                continue
            if msg is not None:
                node.inbox.append(msg)
                self.node_ready(node)

    # --- the scheduler thread -----------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            try:
                self._step()
            except Exception:  # the loop must survive a bug in one stack
                logger.exception("CAN scheduler step failed")

    def _step(self) -> None:
        timeout: float | None = None
        if self._ready_nodes or self._ready_ports or self._calls:
            timeout = 0.0
        elif self._timers or self._alarms:
            first = min(heap[0][0] for heap in (self._timers, self._alarms) if heap)
            timeout = max(0.0, first - time.monotonic())
        events = self._selector.select(timeout)
        for key, _ in events:
            if key.data is None:
                # drain first, then re-arm: a wake-up sent in between is not lost
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                self._signaled = False
            else:
                self.node_ready(key.data)
        while self._calls:
            self._calls.popleft()()
        while self._alarms and self._alarms[0][0] <= time.monotonic():
            self.node_ready(heapq.heappop(self._alarms)[2])
        while self._ready_nodes:
            node = self._ready_nodes.popleft()
            node.pending = False
            node.drain()
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            deadline, _, port = heapq.heappop(self._timers)
            if port.deadline == deadline:
                port.deadline = None
                self.port_ready(port)
        for _ in range(len(self._ready_ports)):  # ports queued again wait for the next pass
            port = self._ready_ports.popleft()
            port.pending = False
            due = port.run()
            if due is not None and (port.deadline is None or due < port.deadline):
                port.deadline = due
                heapq.heappush(self._timers, (due, next(self._seq), port))

    def stop(self) -> None:
        """Stop the thread (tests; the shared scheduler lives as long as its process)."""
        self._stopped = True
        self._signal()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self.handlers.shutdown(wait=False)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def _fileno(bus: can.BusABC) -> int | None:
    try:
        fileno = bus.fileno()
    except (NotImplementedError, AttributeError, OSError):
        return None  # no pollable socket (e.g. 'virtual', many vendor interfaces): a reader thread

    return fileno if isinstance(fileno, int) and fileno >= 0 else None


def timer_deadline(stack: Any) -> float | None:
    """The monotonic time a can-isotp stack next needs ``process()`` without new frames."""
    remaining: list[float] = [
        timer.remaining()
        for timer in (stack.timer_rx_fc, stack.timer_rx_cf)
        if not timer.is_stopped()
    ]
    delay = stack.next_cf_delay()
    if delay is not None:
        remaining.append(delay)
    if not remaining:
        return None
    return time.monotonic() + float(min(remaining)) + _TIMER_SLACK


def drive(
    stack: Any, budget: int, pacer: Pacer | Pacers | None = None
) -> tuple[bool, bool, float | None]:
    """One pass of a can-isotp ``TransportLayerLogic``: ``process()`` with a send budget.

    The same steps as can-isotp 2.x's ``process(rx_timeout=0)`` (frames in, timers,
    frames out, until neither side asks the other for an immediate pass), except
    that it stops after ``budget`` frames sent: a stack sends a whole block of
    consecutive frames in one ``process()``, and a 256 KiB message would hold
    the thread (and every other stack's timers) for seconds. With a ``pacer``
    it also stops while the paced bus is more than ``PACE_SLACK`` ahead of the
    clock. Returns (a whole message was received, frames are still to send,
    the time to resume sending at if paced).

    ``process()`` stops receiving at a frame that needs an immediate send (a flow
    control, whose state is a queue of one) and leaves the frames after it to its
    next call: a threaded can-isotp stack calls it again at once, but a stack
    here is run again only on a wake-up. So after such a send the pass receives
    again, until every frame handed to the stack is consumed: a second node on
    the same CAN ids (a duplicate flow control) must not strand the frames behind
    it until the next frame or timer.
    """
    received = False
    sent = 0
    again = True
    rx_idle, tx_idle = stack.RxState.IDLE, stack.TxState.IDLE
    while again:
        again = False
        if stack.tx_queue.empty() or stack.rx_state != rx_idle or stack.tx_state != tx_idle:
            while True:
                msg = stack.rxfn(0.0)
                stack._check_timeouts_rx()
                if msg is None:
                    break
                if stack.address.is_for_me(msg):
                    report = stack._process_rx(msg)
                    received = received or report.frame_received
                    if report.immediate_tx_required:
                        again = True  # send first, then receive the frames behind it
                        break
        else:
            again = True  # start with the new message; receive right after
        stack.rate_limiter.update()
        while True:
            if pacer is not None:
                ready = pacer.ready_at()
                if ready - time.monotonic() > PACE_SLACK:
                    return received, False, ready
            report = stack._process_tx()
            if report.msg is not None:
                stack.txfn(report.msg)
                sent += 1
            if report.immediate_rx_required:
                again = True
                break
            if report.msg is None:
                break
            if sent >= budget:
                return received, True, None
    return received, False, None


os.register_at_fork(after_in_child=CanScheduler._forget_after_fork)
