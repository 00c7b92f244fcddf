"""ISO-TP (ISO 15765-2:2016) links over a python-can bus, using can-isotp (DESIGN 4).

One ``CanNode`` per ECU owns one python-can bus object and one ``can.Notifier``
reading it; it routes each received frame by arbitration id to the
``isotp.TransportLayer`` of the link or endpoint listening on that id, so
a primary with many secondaries runs one reader for all of them and no stack
sees another's frames. Normal 11-bit physical addressing, one request id
(primary -> secondary) and one response id (secondary -> primary) per
secondary; classic CAN (8-byte frames) or CAN FD (64-byte frames, bit-rate
switch). Messages above 4095 bytes use the first-frame escape sequence.

Each stack's receive limit (``max_frame_size``) is the link's ``max_response``
or the endpoint's ``max_request``: a first frame announcing more is answered
with an overflow flow control before any data is buffered, and the sender gets
``MessageTooLarge``.

Example (virtual bus)::

    bus = CanBusConfig(channel="car-1").open()
    primary = CanNode(bus)
    link = primary.link(IsoTpConfig(request_id=0x701, response_id=0x709))
    response = link.request(b"...")
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import can
import isotp

from uptane.errors import (
    BusOffError,
    ConfigError,
    FramingError,
    MessageTooLarge,
    TransportError,
    TransportTimeout,
)

from .accounting import PacedBus
from .base import (
    Handler,
    SecondaryEndpoint,
    SecondaryLink,
)
from .buswrap import wrappers
from .faults import BusOffCanError, FaultyBus
from .isotp_config import CanBusConfig, IsoTpConfig
from .scheduler import TX_BUDGET, CanScheduler, drive, pacers_of, timer_deadline

logger = logging.getLogger(__name__)


# ISO-TP errors that say nothing about the exchange at hand (stray frames).
_NOISE = (
    isotp.errors.UnexpectedFlowControlError,
    isotp.errors.UnexpectedConsecutiveFrameError,
    isotp.errors.ReceptionInterruptedWithSingleFrameError,
    isotp.errors.ReceptionInterruptedWithFirstFrameError,
)
# ISO-TP errors of the sending side.
_TX_ERRORS = (
    isotp.errors.OverflowError,
    isotp.errors.FlowControlTimeoutError,
    isotp.errors.UnsupportedWaitFrameError,
    isotp.errors.MaximumWaitFrameReachedError,
    isotp.errors.BadGeneratorError,
)


class _Port:
    """One can-isotp stack bound to one (rx id, tx id) pair on a node.

    The stack is can-isotp's thread-free ``TransportLayerLogic``; only the
    node's ``CanScheduler`` calls its ``process()`` (under ``lock``), fed
    with the frames the node routed to ``inbox``.
    """

    def __init__(self, node: CanNode, rxid: int, txid: int, params: dict[str, Any]) -> None:
        self.node = node
        self.rxid = rxid
        self.inbox: collections.deque[isotp.CanMessage] = collections.deque()
        self.lock = threading.Lock()
        self.pending = False  # queued in the scheduler's ready list
        self.deadline: float | None = None  # earliest armed scheduler timer
        self._errors: collections.deque[Exception] = collections.deque(maxlen=64)
        self._errors_lock = threading.Lock()
        self.on_error: Callable[[Exception], None] | None = None
        self.on_message: Callable[[], None] | None = None
        self._closing = False
        self.stack = isotp.TransportLayerLogic(
            rxfn=self._rx,
            txfn=self._tx,
            address=isotp.Address(isotp.AddressingMode.Normal_11bits, txid=txid, rxid=rxid),
            error_handler=self._on_error,
            params=params,
            post_send_callback=lambda _request: node.scheduler.port_ready(self),
        )

    # can-isotp callbacks (scheduler thread, inside process())
    def _rx(self, _timeout: float) -> isotp.CanMessage | None:
        try:
            return self.inbox.popleft()
        except IndexError:
            return None

    def _tx(self, msg: isotp.CanMessage) -> None:
        frame = can.Message(
            arbitration_id=msg.arbitration_id,
            data=msg.data,
            is_extended_id=msg.is_extended_id,
            is_fd=msg.is_fd,
            bitrate_switch=msg.bitrate_switch,
        )
        try:
            self.node.bus.send(frame)
        except can.CanError as exc:  # must not stop the scheduler
            self._on_error(exc)

    def _on_error(self, exc: Exception) -> None:
        if not isinstance(exc, _NOISE):  # stray frames must not crowd out real errors
            with self._errors_lock:
                self._errors.append(exc)
            self.stack.rx_queue.put(bytearray())  # wakes a link awaiting its response
        if self.on_error is not None:
            self.on_error(exc)

    def feed(self, msg: can.Message) -> None:
        self.inbox.append(
            isotp.CanMessage(
                arbitration_id=msg.arbitration_id,
                data=bytes(msg.data),
                extended_id=msg.is_extended_id,
                is_fd=msg.is_fd,
                bitrate_switch=msg.bitrate_switch,
            )
        )

    def run(self) -> float | None:
        """One ``process()`` pass (scheduler thread); returns the stack's next deadline."""
        with self.lock:
            if self._closing:
                self.inbox.clear()
                return None
            received, more, resume = drive(self.stack, TX_BUDGET, self.node.pacer)
            deadline = timer_deadline(self.stack)
            if resume is not None and (deadline is None or resume < deadline):
                deadline = resume
        if more:
            self.node.scheduler.port_ready(self)  # behind the other ready stacks
        if received and self.on_message is not None:
            self.on_message()
        return deadline

    # user side
    def take_errors(self, *, keep: bool = False) -> list[Exception]:
        with self._errors_lock:
            errors = list(self._errors)
            if not keep:
                self._errors.clear()
        return errors

    def failure(self, errors: list[Exception], *, sending: bool) -> TransportError | None:
        """The first error that breaks the exchange, as a ``TransportError`` leaf."""
        for exc in errors:
            if isinstance(exc, can.CanError):
                if isinstance(exc, BusOffCanError) or self.node.bus_off:
                    return BusOffError(f"CAN controller is bus-off: {exc}")
                return TransportError(f"CAN send failed: {exc}")
            if sending and not isinstance(exc, _TX_ERRORS):
                continue
            if isinstance(exc, isotp.errors.OverflowError):
                return MessageTooLarge("the peer refused the message as too large (overflow)")
            if isinstance(exc, isotp.errors.FrameTooLongError):
                return MessageTooLarge(f"response refused before reception: {exc}")
            if isinstance(
                exc,
                isotp.errors.FlowControlTimeoutError | isotp.errors.ConsecutiveFrameTimeoutError,
            ):
                return TransportTimeout(f"ISO-TP timeout: {exc}{self.node.bus_hint()}")
            return FramingError(f"ISO-TP error: {exc}")
        return None

    def reset(self) -> None:
        """Abandon any transfer in progress in either direction."""
        with self.lock:
            self.stack.stop_receiving()
            self.stack.stop_sending()

    def check_open(self) -> None:
        if self._closing:
            raise TransportError("CAN node or link is closed")

    def send(self, data: bytes, timeout: float) -> None:
        """Blocking ISO-TP send; raises a ``TransportError`` leaf on failure."""
        self.check_open()
        if self.node.bus_off:
            raise BusOffError("CAN controller is bus-off")
        try:
            self.stack.send(data, send_timeout=timeout)
        except isotp.errors.BlockingSendTimeout as exc:
            self.reset()
            failure = self.failure(self.take_errors(), sending=True)
            raise failure or TransportTimeout(
                f"sending took longer than {timeout:.3f} s{self.node.bus_hint()}"
            ) from exc
        except isotp.errors.BlockingSendFailure as exc:
            failure = self.failure(self.take_errors(), sending=True)
            raise failure or TransportError("ISO-TP send failed") from exc
        # errors of the receiving side stay for the caller to judge
        failure = self.failure(self.take_errors(keep=True), sending=True)
        if failure is not None:
            self.take_errors()
            self.reset()
            raise failure

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        with self.lock:
            self.stack.stop_sending()  # a blocked send() returns now
            self.stack.stop_receiving()
        self.stack.rx_queue.put(bytearray())  # and so does a blocked recv()


class CanNode:
    """One ECU's attachment to a CAN bus: one bus object, many ISO-TP stacks.

    ``bus`` may be any python-can bus, including ``FaultyBus``/``PacedBus``
    wrappers; the node shuts it down in ``close()``. The process-wide
    ``CanScheduler`` reads the bus and drives the stacks (no thread per node).
    """

    def __init__(
        self,
        bus: can.BusABC,
        *,
        config: CanBusConfig | None = None,
        scheduler: CanScheduler | None = None,
    ) -> None:
        self.bus = bus
        self.config = config
        self.scheduler = scheduler or CanScheduler.shared()
        self.pending = False  # queued in the scheduler's ready list
        self.fileno: int | None = None
        self.inbox: collections.deque[can.Message] = collections.deque()  # reader thread only
        self.pacer = pacers_of(bus)  # not slept in send: the scheduler holds the sender
        self._rx_holds = [w for w in wrappers(bus) if isinstance(w, FaultyBus)]
        self._ports: dict[int, _Port] = {}
        self._members: list[IsoTpLink | IsoTpEndpoint] = []
        self._lock = threading.Lock()
        self._closed = False
        self.scheduler.attach(self)

    @classmethod
    def open(cls, config: CanBusConfig, *, paced: bool = False) -> CanNode:
        """Open a bus from config; ``paced`` sleeps each send to its wire time (demo)."""
        bus = config.open()
        if paced:
            bus = PacedBus(bus, config.timing)
        return cls(bus, config=config)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bus_off(self) -> bool:
        try:
            return self.bus.state == can.BusState.ERROR
        except NotImplementedError:
            return False

    def bus_hint(self) -> str:
        """What to check when nothing answers: the bus this node is on."""
        config = self.config
        if config is None:
            return ""
        hint = f" (bus {config.interface}:{config.channel}"
        if config.interface == "virtual":
            hint += (
                "; 'virtual' is in-process only: ECUs in other processes need a "
                "cross-process bus such as 'udp_multicast' or 'socketcan'"
            )
        return hint + ")"

    def drain(self) -> None:
        """Route every frame waiting on the bus to its port (scheduler thread)."""
        if self._closed:
            return
        ready = self.scheduler.port_ready
        while self.inbox:
            self._route(self.inbox.popleft(), ready)
        while True:
            try:
                msg = self.bus.recv(0.0)
            except can.CanError:
                return
            if msg is None:
                break
            self._route(msg, ready)
        for faulty in self._rx_holds:  # a delayed frame is held there: come back for it
            due = faulty.rx_due_at()
            if due is not None:
                self.scheduler.drain_at(self, due)

    def _route(self, msg: can.Message, ready: Callable[[_Port], None]) -> None:
        if msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id:
            return
        port = self._ports.get(msg.arbitration_id)
        if port is not None:
            port.feed(msg)
            ready(port)

    def _open_port(
        self, member: IsoTpLink | IsoTpEndpoint, rxid: int, txid: int, params: dict[str, Any]
    ) -> _Port:
        with self._lock:
            if self._closed:
                raise TransportError("CAN node is closed")
            if rxid in self._ports:
                raise ConfigError(f"this node already listens on CAN id {rxid:#x}")
            port = _Port(self, rxid, txid, params)
            self._ports[rxid] = port
            self._members.append(member)
        return port

    def _close_port(self, member: IsoTpLink | IsoTpEndpoint, port: _Port) -> None:
        with self._lock:
            if self._ports.get(port.rxid) is port:
                del self._ports[port.rxid]
            if member in self._members:
                self._members.remove(member)
        port.close()

    def link(self, config: IsoTpConfig) -> IsoTpLink:
        """The primary's link to the secondary at ``config``'s id pair."""
        return IsoTpLink(self, config)

    def endpoint(self, config: IsoTpConfig, handler: Handler) -> IsoTpEndpoint:
        """A secondary's endpoint answering on ``config``'s id pair."""
        return IsoTpEndpoint(self, config, handler)

    def close(self) -> None:
        """Close every link and endpoint, detach from the scheduler and shut the bus down."""
        with self._lock:
            if self._closed:
                return
            members = list(self._members)
        for member in members:
            member.close()
        with self._lock:
            self._closed = True
            ports = list(self._ports.values())
            self._ports.clear()
        for port in ports:
            port.close()
        self.scheduler.detach(self)
        self.bus.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class IsoTpLink(SecondaryLink):
    """Primary side: requests on ``config.request_id``, responses on ``config.response_id``.

    A response that arrives after its request timed out is discarded when the
    next request starts; one that arrives later still would be taken for the
    next answer, so the messages above carry their own correlation (nonces,
    offsets).
    """

    def __init__(self, node: CanNode, config: IsoTpConfig) -> None:
        super().__init__(
            max_request=config.max_request,
            max_response=config.max_response,
            default_timeout=config.timeout,
        )
        self.config = config
        self.node = node
        self._in_flight = 0  # posted requests not collected yet
        self._port = node._open_port(
            self, config.response_id, config.request_id, config.stack_params(config.max_response)
        )

    def _exchange(self, data: bytes, timeout: float) -> bytes:
        port = self._port
        deadline = time.monotonic() + timeout
        try:  # answers to posted requests not collected come first: read and drop them
            while self._in_flight:
                self._await_response(deadline, timeout)
                self._in_flight -= 1
        finally:
            self._in_flight = 0
        port.stack.clear_rx_queue()  # stale answers to timed-out requests
        port.take_errors()
        port.send(data, timeout)
        return self._await_response(deadline, timeout)

    # pipelined requests: the request id carries request k+1 while the peer
    # handles request k and answers it on the response id (can-isotp's sending
    # and receiving state machines are independent)

    def post(self, data: bytes, timeout: float | None = None) -> None:
        """Send a request and return once its last frame is sent (see the base class)."""
        timeout = self._check_request(data, timeout)
        with self._lock:
            port = self._port
            if self._closed:
                raise TransportError("link is closed")
            if not self._in_flight:
                port.stack.clear_rx_queue()  # stale answers to timed-out requests
                port.take_errors()
            try:
                port.send(bytes(data), timeout)
            except TransportError:
                self._in_flight = 0
                port.reset()
                raise
            self._in_flight += 1

    def collect(self, timeout: float | None = None) -> bytes:
        """The response to the oldest posted request, within ``timeout`` from now."""
        timeout = self.default_timeout if timeout is None else timeout
        with self._lock:
            if not self._in_flight:
                raise TransportError("no posted request awaits a response")
            try:
                response = self._await_response(time.monotonic() + timeout, timeout)
            except TransportError:
                self._in_flight = 0
                raise
            self._in_flight -= 1
        return self._check_response(response)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def abandon(self) -> None:
        with self._lock:
            self._in_flight = 0
            self._port.reset()
            self._port.stack.clear_rx_queue()

    def _await_response(self, deadline: float, timeout: float) -> bytes:
        port = self._port
        while True:
            remaining = deadline - time.monotonic()
            # woken by the response, by an error of the stack, or at the deadline
            response = port.stack.recv(block=True, timeout=max(0.0, remaining))
            if response:
                return bytes(response)
            failure = port.failure(port.take_errors(), sending=False)
            if failure is None and self.node.bus_off:
                failure = BusOffError("CAN controller went bus-off")
            if failure is None and deadline - time.monotonic() <= 0:
                failure = TransportTimeout(
                    f"no complete response within {timeout:.3f} s{self.node.bus_hint()}"
                )
            if failure is None:
                port.check_open()
            if failure is not None:
                port.reset()
                raise failure

    def close(self) -> None:
        if not self._closed:
            super().close()
            self.node._close_port(self, self._port)


class IsoTpEndpoint(SecondaryEndpoint):
    """Secondary side: requests on ``config.request_id``, responses on ``config.response_id``.

    ``start()`` serves without a thread of its own: each complete request is
    answered in the scheduler's bounded handler pool, one at a time per endpoint.
    """

    def __init__(self, node: CanNode, config: IsoTpConfig, handler: Handler) -> None:
        super().__init__(
            handler,
            max_request=config.max_request,
            max_response=config.max_response,
            send_timeout=config.timeout,
        )
        self.config = config
        self.node = node
        self._port = node._open_port(
            self, config.request_id, config.response_id, config.stack_params(config.max_request)
        )
        self._port.on_error = self._count_error
        self._serving = False
        self._busy = False
        self._serve_lock = threading.Lock()
        self._idle = threading.Condition(self._serve_lock)

    def _count_error(self, exc: Exception) -> None:
        if isinstance(exc, isotp.errors.FrameTooLongError):
            self.stats.refused += 1  # the stack answered with an overflow flow control

    def _receive(self, timeout: float | None) -> bytes | None:
        self._port.check_open()
        if timeout == 0.0:
            request = self._port.stack.recv(block=False)
        else:
            request = self._port.stack.recv(block=True, timeout=timeout)
        return bytes(request) if request else None  # b"" is a wake-up

    def _wake(self) -> None:
        self._port.stack.rx_queue.put(bytearray())

    def _send(self, data: bytes) -> None:
        self._port.take_errors()
        self._port.send(data, self.send_timeout)

    # --- serving from the scheduler's handler pool ---------------------------------

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("endpoint is closed")
        with self._serve_lock:
            if self._serving:
                raise RuntimeError("endpoint is already started")
            self._serving = True
        self._port.on_message = self._dispatch
        if self._port.stack.available():
            self._dispatch()

    def _dispatch(self) -> None:
        with self._serve_lock:
            if not self._serving or self._busy:
                return
            self._busy = True
        self.node.scheduler.handlers.submit(self._serve_pending)

    def _serve_pending(self) -> None:
        try:
            while self._serving and not self._closed and self._port.stack.available():
                try:
                    self.poll_once(0.0)
                except TransportError as exc:
                    if self._closed:
                        break
                    logger.warning("secondary endpoint could not answer: %s", exc)
                except Exception:
                    logger.exception("secondary endpoint handler failed")
        finally:
            with self._serve_lock:
                self._busy = False
                self._idle.notify_all()
                again = self._serving and not self._closed and self._port.stack.available()
            if again:
                self._dispatch()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop serving; waits for a request being answered (unless called from it)."""
        with self._serve_lock:
            self._serving = False
            self._port.on_message = None
            if threading.current_thread().name.startswith("can-handler"):
                return
            self._idle.wait_for(lambda: not self._busy, timeout)

    @property
    def serving(self) -> bool:
        return self._serving

    def close(self) -> None:
        if not self._closed:
            self.stop()
            self._closed = True
            self.node._close_port(self, self._port)


__all__ = ["CanBusConfig", "CanNode", "IsoTpConfig", "IsoTpEndpoint", "IsoTpLink"]
