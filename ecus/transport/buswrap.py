"""A python-can bus that wraps another one, so fault injection and pacing can sit
between a node and the real (or virtual) bus without the node noticing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import can


class BusWrapper(can.BusABC):
    """Forward everything to ``inner``; subclasses override ``send``/``_recv_internal``.

    Shutting the wrapper down shuts the wrapped bus down too.
    """

    def __init__(self, inner: can.BusABC, **kwargs: Any) -> None:
        self.inner = inner
        super().__init__(channel=inner.channel_info, **kwargs)
        self.channel_info = f"{type(self).__name__}({inner.channel_info})"
        self._can_protocol = inner.protocol

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        self.inner.send(msg, timeout)

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        return self.inner.recv(timeout), False

    @property
    def state(self) -> can.BusState:
        return self.inner.state

    @state.setter
    def state(self, new_state: can.BusState) -> None:
        self.inner.state = new_state

    def shutdown(self) -> None:
        super().shutdown()
        self.inner.shutdown()


def wrappers(bus: can.BusABC) -> Iterator[BusWrapper]:
    """The ``BusWrapper``s around a bus, outermost first."""
    while isinstance(bus, BusWrapper):
        yield bus
        bus = bus.inner
