"""In-memory primary <-> secondary link for unit tests (DESIGN 4).

Same rules as the CAN transport: size limits before sending and on receipt,
a request the secondary finds too large is refused (the primary gets
``MessageTooLarge``, as with an ISO-TP overflow flow control), a secondary
that does not answer makes the request time out. Requests carry a sequence
number, so a late answer to a timed-out request is never taken for the
answer to the next one.
"""

from __future__ import annotations

import itertools
import queue
import time
from dataclasses import dataclass

from uptane.errors import MessageTooLarge, TransportError, TransportTimeout

from .base import (
    DEFAULT_MAX_REQUEST,
    DEFAULT_MAX_RESPONSE,
    DEFAULT_TIMEOUT,
    Handler,
    SecondaryEndpoint,
    SecondaryLink,
)

_WAKE = 0  # sequence number of stop()'s wake-up; requests count from 1


@dataclass(frozen=True)
class _Envelope:
    seq: int
    data: bytes
    refused: bool = False


class _Wire:
    """The two directions between one link and one endpoint."""

    def __init__(self) -> None:
        self.requests: queue.Queue[_Envelope] = queue.Queue()
        self.responses: queue.Queue[_Envelope] = queue.Queue()


class MemoryLink(SecondaryLink):
    """Primary side of an in-memory pair; see ``memory_pair``."""

    def __init__(
        self,
        wire: _Wire,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_response: int = DEFAULT_MAX_RESPONSE,
        default_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(
            max_request=max_request, max_response=max_response, default_timeout=default_timeout
        )
        self._wire = wire
        self._seq = itertools.count(1)

    def _exchange(self, data: bytes, timeout: float) -> bytes:
        seq = next(self._seq)
        deadline = time.monotonic() + timeout
        self._wire.requests.put(_Envelope(seq, data))
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportTimeout(f"no response within {timeout:.3f} s")
            try:
                envelope = self._wire.responses.get(timeout=remaining)
            except queue.Empty:
                continue
            if envelope.seq != seq:
                continue  # late answer to an earlier, timed-out request
            if envelope.refused:
                raise MessageTooLarge("the secondary refused the request as too large")
            return envelope.data  # the base class checks its size


class MemoryEndpoint(SecondaryEndpoint):
    """Secondary side of an in-memory pair; see ``memory_pair``."""

    def __init__(
        self,
        wire: _Wire,
        handler: Handler,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_response: int = DEFAULT_MAX_RESPONSE,
    ) -> None:
        super().__init__(handler, max_request=max_request, max_response=max_response)
        self._wire = wire
        self._current = 0

    def _receive(self, timeout: float | None) -> bytes | None:
        try:
            envelope = self._wire.requests.get(timeout=timeout)
        except queue.Empty:
            return None
        if envelope.seq == _WAKE:
            return None
        self._current = envelope.seq
        return envelope.data  # the base class checks its size

    def _wake(self) -> None:
        self._wire.requests.put(_Envelope(_WAKE, b""))

    def _refuse(self) -> None:
        # what an ISO-TP overflow flow control tells the sender
        self._wire.responses.put(_Envelope(self._current, b"", refused=True))

    def _send(self, data: bytes) -> None:
        if self._closed:
            raise TransportError("endpoint is closed")
        self._wire.responses.put(_Envelope(self._current, data))


def memory_pair(
    handler: Handler,
    *,
    max_request: int = DEFAULT_MAX_REQUEST,
    max_response: int = DEFAULT_MAX_RESPONSE,
    timeout: float = DEFAULT_TIMEOUT,
    endpoint_max_request: int | None = None,
    endpoint_max_response: int | None = None,
) -> tuple[MemoryLink, MemoryEndpoint]:
    """Return a connected (link, endpoint) pair.

    The endpoint's limits default to the link's; give them separately to
    model a peer that disagrees (e.g. one that sends oversized responses).
    """
    wire = _Wire()
    link = MemoryLink(
        wire, max_request=max_request, max_response=max_response, default_timeout=timeout
    )
    endpoint = MemoryEndpoint(
        wire,
        handler,
        max_request=max_request if endpoint_max_request is None else endpoint_max_request,
        max_response=max_response if endpoint_max_response is None else endpoint_max_response,
    )
    return link, endpoint
