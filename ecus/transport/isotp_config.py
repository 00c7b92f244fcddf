"""Configuration of CAN buses and ISO-TP channels (DESIGN 4): what ``CanNode`` opens
and what each link or endpoint asks of can-isotp."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import can

from uptane.errors import ConfigError

from .accounting import CanTiming
from .base import DEFAULT_MAX_REQUEST, DEFAULT_MAX_RESPONSE, DEFAULT_TIMEOUT


@dataclass(frozen=True)
class CanBusConfig:
    """How to open a node's python-can bus: any interface python-can knows.

    ``bitrate``/``data_bitrate`` are passed to the interface (ignored by the
    virtual one) and used for bus accounting and pacing. ``virtual`` connects
    the nodes of one process only; ECUs in separate processes share
    ``udp_multicast`` (channel: a multicast group such as ``239.74.163.2``,
    ``options``: ``{"port": ...}``; opened with TTL 0 so that frames stay on
    this host unless ``options`` say otherwise) or, on Linux, ``socketcan``
    (``vcan0`` or a real controller).
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
        if self.interface == "udp_multicast":
            kwargs["hop_limit"] = 0  # TTL 0: the frames never leave this host
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
            "rate_limit_enable": False,
        }
