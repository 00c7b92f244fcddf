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
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

from .accounting import CanTiming, PacedBus
from .base import (
    DEFAULT_MAX_REQUEST,
    DEFAULT_MAX_RESPONSE,
    DEFAULT_TIMEOUT,
    Handler,
    SecondaryEndpoint,
    SecondaryLink,
)
from .faults import BusOffCanError

logger = logging.getLogger(__name__)

_STACK_READ_TIMEOUT = 0.25
_POLL = 0.02  # seconds between checks for errors while awaiting a response
_READER_TIMEOUT = 0.05  # bus reader wake-up period; bounds how long close() waits for it


@dataclass(frozen=True)
class CanBusConfig:
    """How to open a node's python-can bus: any interface python-can knows.

    ``bitrate``/``data_bitrate`` are passed to the interface (ignored by the
    virtual one) and used for bus accounting and pacing.
    """

    interface: str = "virtual"
    channel: str = "uptane"
    fd: bool = False
    bitrate: int = 500_000
    data_bitrate: int = 2_000_000
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def timing(self) -> CanTiming:
        return CanTiming(self.bitrate, self.data_bitrate if self.fd else None)

    def open(self) -> can.BusABC:
        """Open one bus object (one per node; frames it sends are not echoed to it)."""
        kwargs: dict[str, Any] = {"receive_own_messages": False, "bitrate": self.bitrate}
        if self.fd:
            kwargs.update(fd=True, data_bitrate=self.data_bitrate)
        kwargs.update(self.options)
        try:
            return can.Bus(interface=self.interface, channel=self.channel, **kwargs)
        except (can.CanError, ImportError, ValueError) as exc:
            raise ConfigError(
                f"cannot open CAN bus {self.interface}:{self.channel}: {exc}"
            ) from exc


@dataclass(frozen=True)
class IsoTpConfig:
    """One primary <-> secondary ISO-TP channel, seen from either side.

    The primary sends requests on ``request_id`` and listens on
    ``response_id``; the secondary does the opposite. ``blocksize``/``stmin``
    are what the receiving side asks for in its flow control frames.
    ``timeout`` bounds one exchange (link) or one response send (endpoint);
    ``fc_timeout`` (N_Bs) and ``cf_timeout`` (N_Cr) are ISO-TP's own.
    """

    request_id: int
    response_id: int
    fd: bool = False
    bitrate_switch: bool = True
    blocksize: int = 0
    stmin: int = 0
    max_request: int = DEFAULT_MAX_REQUEST
    max_response: int = DEFAULT_MAX_RESPONSE
    timeout: float = DEFAULT_TIMEOUT
    fc_timeout: float = 1.0
    cf_timeout: float = 1.0
    tx_padding: int | None = None

    def __post_init__(self) -> None:
        for name in ("request_id", "response_id"):
            value = getattr(self, name)
            if not 0 <= value <= 0x7FF:
                raise ConfigError(f"{name} {value:#x} is not an 11-bit CAN identifier")
        if self.request_id == self.response_id:
            raise ConfigError("request_id and response_id must differ")
        if not 0 <= self.blocksize <= 0xFF or not 0 <= self.stmin <= 0xFF:
            raise ConfigError("blocksize and stmin must be 0..255")
        if self.max_request < 1 or self.max_response < 1:
            raise ConfigError("message size limits must be at least 1 byte")
        if not (self.timeout > 0 and self.fc_timeout > 0 and self.cf_timeout > 0):
            raise ConfigError("timeouts must be positive")
        if self.tx_padding is not None and not 0 <= self.tx_padding <= 0xFF:
            raise ConfigError("tx_padding must be a byte value")

    @property
    def tx_data_length(self) -> int:
        return 64 if self.fd else 8

    def stack_params(self, max_receive: int) -> dict[str, Any]:
        """can-isotp ``TransportLayer`` parameters for a side receiving at most ``max_receive``."""
        return {
            "stmin": self.stmin,
            "blocksize": self.blocksize,
            "tx_data_length": self.tx_data_length,
            "can_fd": self.fd,
            "bitrate_switch": self.fd and self.bitrate_switch,
            "max_frame_size": max_receive,
            "rx_flowcontrol_timeout": max(1, round(self.fc_timeout * 1000)),
            "rx_consecutive_frame_timeout": max(1, round(self.cf_timeout * 1000)),
            "tx_padding": self.tx_padding,
            "wftmax": 0,
            "blocking_send": True,
        }


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
    """One can-isotp stack bound to one (rx id, tx id) pair on a node."""

    def __init__(self, node: CanNode, rxid: int, txid: int, params: dict[str, Any]) -> None:
        self.node = node
        self.rxid = rxid
        self._frames: queue.SimpleQueue[isotp.CanMessage | None] = queue.SimpleQueue()
        self._errors: collections.deque[Exception] = collections.deque(maxlen=64)
        self._errors_lock = threading.Lock()
        self.on_error: Callable[[Exception], None] | None = None
        self._closing = False
        self._stopped = False
        self.stack = isotp.TransportLayer(
            rxfn=self._rx,
            txfn=self._tx,
            address=isotp.Address(isotp.AddressingMode.Normal_11bits, txid=txid, rxid=rxid),
            error_handler=self._on_error,
            params=params,
            # idle wake-up period of the stack's threads: data and sends wake
            # them at once, so this only bounds timer checks and idle CPU
            read_timeout=_STACK_READ_TIMEOUT,
        )

    # can-isotp callbacks (stack threads)
    def _rx(self, timeout: float) -> isotp.CanMessage | None:
        if self._closing:
            return None
        try:
            return self._frames.get(timeout=timeout)
        except queue.Empty:
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
        except can.CanError as exc:  # must not kill the stack's thread
            self._on_error(exc)

    def _on_error(self, exc: Exception) -> None:
        if not isinstance(exc, _NOISE):  # stray frames must not crowd out real errors
            with self._errors_lock:
                self._errors.append(exc)
        if self.on_error is not None:
            self.on_error(exc)

    def feed(self, msg: can.Message) -> None:
        self._frames.put(
            isotp.CanMessage(
                arbitration_id=msg.arbitration_id,
                data=bytes(msg.data),
                extended_id=msg.is_extended_id,
                is_fd=msg.is_fd,
                bitrate_switch=msg.bitrate_switch,
            )
        )

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
                return TransportTimeout(f"ISO-TP timeout: {exc}")
            return FramingError(f"ISO-TP error: {exc}")
        return None

    def reset(self) -> None:
        """Abandon any transfer in progress in either direction."""
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
            raise failure or TransportTimeout(f"sending took longer than {timeout:.3f} s") from exc
        except isotp.errors.BlockingSendFailure as exc:
            failure = self.failure(self.take_errors(), sending=True)
            raise failure or TransportError("ISO-TP send failed") from exc
        # errors of the receiving side stay for the caller to judge
        failure = self.failure(self.take_errors(keep=True), sending=True)
        if failure is not None:
            self.take_errors()
            self.reset()
            raise failure

    def wake_for_close(self) -> None:
        self._closing = True
        self._frames.put(None)  # unblocks _rx

    def close(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.wake_for_close()
        self.stack.stop()


class CanNode:
    """One ECU's attachment to a CAN bus: one bus object, one reader, many ISO-TP stacks.

    ``bus`` may be any python-can bus, including ``FaultyBus``/``PacedBus``
    wrappers; the node shuts it down in ``close()``.
    """

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self._ports: dict[int, _Port] = {}
        self._members: list[IsoTpLink | IsoTpEndpoint] = []
        self._lock = threading.Lock()
        self._closed = False
        self._notifier = can.Notifier(bus, [self._route], timeout=_READER_TIMEOUT)

    @classmethod
    def open(cls, config: CanBusConfig, *, paced: bool = False) -> CanNode:
        """Open a bus from config; ``paced`` sleeps each send to its wire time (demo)."""
        bus = config.open()
        if paced:
            bus = PacedBus(bus, config.timing)
        return cls(bus)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def bus_off(self) -> bool:
        try:
            return self.bus.state == can.BusState.ERROR
        except NotImplementedError:
            return False

    def _route(self, msg: can.Message) -> None:
        if msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id:
            return
        port = self._ports.get(msg.arbitration_id)
        if port is not None:
            port.feed(msg)

    def _open_port(
        self, member: IsoTpLink | IsoTpEndpoint, rxid: int, txid: int, params: dict[str, Any]
    ) -> _Port:
        with self._lock:
            if self._closed:
                raise TransportError("CAN node is closed")
            if rxid in self._ports:
                raise ConfigError(f"this node already listens on CAN id {rxid:#x}")
            port = _Port(self, rxid, txid, params)
            port.stack.start()
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
        """Close every link and endpoint, stop the reader and shut the bus down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = list(self._members)
            ports = list(self._ports.values())
        reader_stop = threading.Thread(target=self._notifier.stop, daemon=True)
        reader_stop.start()  # overlaps with closing the stacks
        for port in ports:
            port.wake_for_close()
        for member in members:
            member.close()
        for port in ports:
            port.close()
        reader_stop.join()
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
        self._port = node._open_port(
            self, config.response_id, config.request_id, config.stack_params(config.max_response)
        )

    def _exchange(self, data: bytes, timeout: float) -> bytes:
        port = self._port
        deadline = time.monotonic() + timeout
        port.stack.clear_rx_queue()  # stale answers to timed-out requests
        port.take_errors()
        port.send(data, timeout)
        while True:
            remaining = deadline - time.monotonic()
            response = port.stack.recv(block=True, timeout=max(0.0, min(_POLL, remaining)))
            if response is not None:
                return bytes(response)
            failure = port.failure(port.take_errors(), sending=False)
            if failure is None and self.node.bus_off:
                failure = BusOffError("CAN controller went bus-off")
            if failure is None and deadline - time.monotonic() <= 0:
                failure = TransportTimeout(f"no complete response within {timeout:.3f} s")
            if failure is not None:
                port.reset()
                raise failure

    def close(self) -> None:
        if not self._closed:
            super().close()
            self.node._close_port(self, self._port)


class IsoTpEndpoint(SecondaryEndpoint):
    """Secondary side: requests on ``config.request_id``, responses on ``config.response_id``."""

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

    def _count_error(self, exc: Exception) -> None:
        if isinstance(exc, isotp.errors.FrameTooLongError):
            self.stats.refused += 1  # the stack answered with an overflow flow control

    def _receive(self, timeout: float | None) -> bytes | None:
        self._port.check_open()
        request = self._port.stack.recv(block=True, timeout=timeout)
        return bytes(request) if request else None  # b"" is stop()'s wake-up

    def _wake(self) -> None:
        self._port.stack.rx_queue.put(bytearray())

    def _send(self, data: bytes) -> None:
        self._port.take_errors()
        self._port.send(data, self.send_timeout)

    def close(self) -> None:
        if not self._closed:
            super().close()
            self.node._close_port(self, self._port)
