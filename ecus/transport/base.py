"""Request/response links between the primary and its secondaries (DESIGN 4).

Messages are opaque bytes here: the orchestrators put one DER-encoded
``SecondaryMessage`` in each. This layer only moves them, exactly one
response per request, in order (``request()``, or ``post()`` several and
``collect()`` their answers: image chunks in flight), and enforces what
nothing above it can:
size limits (checked before sending and on receipt, so a peer cannot make
us buffer endless data) and timeouts. Nothing from the bus is trusted;
integrity and freshness are the job of the signed messages above.

``SecondaryLink`` is the primary's side, ``SecondaryEndpoint`` the
secondary's: it hands each request to a handler ``Callable[[bytes], bytes]``
and sends back what it returns, either stepped (``poll_once``) or from a
background thread (``start``/``stop``).
"""

from __future__ import annotations

import abc
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from uptane.errors import MessageTooLarge, TransportError

logger = logging.getLogger(__name__)

Handler = Callable[[bytes], bytes]

#: Largest request by default: a 64 KiB image chunk plus its DER envelope.
DEFAULT_MAX_REQUEST = 64 * 1024 + 1024
#: Largest response by default: info, version reports, acks and results are small.
DEFAULT_MAX_RESPONSE = 8 * 1024
#: Seconds one whole exchange (send request, receive response) may take by default.
DEFAULT_TIMEOUT = 5.0


def _check_limits(max_request: int, max_response: int, timeout: float) -> None:
    if max_request < 1 or max_response < 1:
        raise ValueError("message size limits must be at least 1 byte")
    if not timeout > 0:
        raise ValueError("timeout must be positive")


class SecondaryLink(abc.ABC):
    """The primary's link to one secondary: ``request()`` sends, then awaits one response.

    ``timeout`` bounds the whole exchange (sending the request and receiving
    the complete response); it defaults to ``default_timeout``. A request
    larger than ``max_request`` is refused before anything is sent, a
    response larger than ``max_response`` is refused on receipt (implementations
    refuse it as soon as its announced length is known). Requests on one link
    are serialized. Failures raise ``TransportError`` leaves:
    ``TransportTimeout``, ``MessageTooLarge``, ``BusOffError``, ``FramingError``.
    """

    def __init__(
        self,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_response: int = DEFAULT_MAX_RESPONSE,
        default_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        _check_limits(max_request, max_response, default_timeout)
        self.max_request = max_request
        self.max_response = max_response
        self.default_timeout = default_timeout
        self._lock = threading.Lock()
        self._closed = False
        self._posted_responses: collections.deque[bytes] = collections.deque()

    @property
    def closed(self) -> bool:
        return self._closed

    def request(self, data: bytes, timeout: float | None = None) -> bytes:
        """Send one request and return the one response to it.

        Answers to posted requests not collected yet are dropped first.
        """
        self._posted_responses.clear()
        return self._request(data, timeout)

    def _request(self, data: bytes, timeout: float | None) -> bytes:
        timeout = self._check_request(data, timeout)
        with self._lock:
            if self._closed:
                raise TransportError("link is closed")
            response = self._exchange(bytes(data), timeout)
        return self._check_response(response)

    def _check_request(self, data: bytes, timeout: float | None) -> float:
        """The timeout to use; raises on an empty or too large request."""
        if not data:
            raise ValueError("a request must not be empty")
        if timeout is None:
            timeout = self.default_timeout
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if len(data) > self.max_request:
            raise MessageTooLarge(
                f"request of {len(data)} bytes exceeds the limit of {self.max_request} bytes"
            )
        return timeout

    def _check_response(self, response: bytes) -> bytes:
        if len(response) > self.max_response:
            raise MessageTooLarge(
                f"response of {len(response)} bytes exceeds the limit of {self.max_response} bytes"
            )
        return response

    @abc.abstractmethod
    def _exchange(self, data: bytes, timeout: float) -> bytes:
        """Send ``data`` and return the response within ``timeout`` seconds."""

    # --- pipelined requests -----------------------------------------------------

    def post(self, data: bytes, timeout: float | None = None) -> None:
        """Send one request whose response ``collect()`` returns later (in order).

        A link that can have several requests in flight (``IsoTpLink``)
        returns as soon as ``data`` is on the wire, so the next request can
        follow while the peer handles this one. This default runs the whole
        exchange now and keeps the response for ``collect()``: the same
        answers, without the overlap. Raises what ``request()`` raises.
        """
        self._posted_responses.append(self._request(data, timeout))

    def collect(self, timeout: float | None = None) -> bytes:
        """The response to the oldest posted request not collected yet."""
        posted = self._posted_responses
        if not posted:
            raise TransportError("no posted request awaits a response")
        return posted.popleft()

    @property
    def in_flight(self) -> int:
        """Posted requests whose response was not collected yet."""
        return len(self._posted_responses)

    def abandon(self) -> None:
        """Forget every posted request; their late responses are never returned."""
        self._posted_responses.clear()

    def close(self) -> None:
        """Release the link; later requests raise ``TransportError``."""
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class EndpointStats:
    """Counters of one ``SecondaryEndpoint``."""

    requests: int = 0
    responses: int = 0
    refused: int = 0
    handler_errors: int = 0
    transport_errors: int = 0


class SecondaryEndpoint(abc.ABC):
    """The secondary's side: answer each request with ``handler(request)``.

    ``poll_once(timeout)`` handles at most one request in the caller's thread
    (deterministic stepping for tests and the simulator) and lets handler and
    transport errors propagate. ``start()`` runs ``serve_forever()`` in a
    background thread that logs and counts errors and keeps serving until
    ``stop()``. A request larger than ``max_request`` is refused without
    calling the handler; a response larger than ``max_response`` is never sent.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        max_request: int = DEFAULT_MAX_REQUEST,
        max_response: int = DEFAULT_MAX_RESPONSE,
        send_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        _check_limits(max_request, max_response, send_timeout)
        self.handler = handler
        self.max_request = max_request
        self.max_response = max_response
        self.send_timeout = send_timeout
        self.stats = EndpointStats()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False

    @abc.abstractmethod
    def _receive(self, timeout: float | None) -> bytes | None:
        """Return the next complete request, or None when none came in ``timeout``."""

    @abc.abstractmethod
    def _send(self, data: bytes) -> None:
        """Send one response or raise ``TransportError``."""

    def _refuse(self) -> None:  # noqa: B027 - optional hook
        """Tell the peer its request was too large, where the transport can."""

    def _wake(self) -> None:  # noqa: B027 - optional hook
        """Make a blocked ``_receive`` return now (called by ``stop()``)."""

    def poll_once(self, timeout: float | None = 0.0) -> bool:
        """Handle at most one request; return True if one was received."""
        if self._closed:
            raise TransportError("endpoint is closed")
        request = self._receive(timeout)
        if request is None:
            return False
        self.stats.requests += 1
        if len(request) > self.max_request:
            self.stats.refused += 1
            logger.warning("refused a request of %d bytes", len(request))
            self._refuse()
            return True
        try:
            response = self.handler(request)
        except Exception:
            self.stats.handler_errors += 1
            raise
        if len(response) > self.max_response:
            self.stats.refused += 1
            raise MessageTooLarge(
                f"response of {len(response)} bytes exceeds the limit of {self.max_response} bytes"
            )
        try:
            self._send(response)
        except TransportError:
            self.stats.transport_errors += 1
            raise
        self.stats.responses += 1
        return True

    def serve_forever(self, poll_interval: float = 0.25) -> None:
        """Serve requests until ``stop()``; errors are logged and counted, not raised."""
        while not self._stop.is_set() and not self._closed:
            try:
                self.poll_once(poll_interval)
            except TransportError as exc:
                if self._closed:
                    break
                logger.warning("secondary endpoint could not answer: %s", exc)
                time.sleep(poll_interval)  # a failing bus must not make us spin
            except Exception:
                logger.exception("secondary endpoint handler failed")

    def start(self) -> None:
        """Serve in a background daemon thread."""
        if self._thread is not None:
            raise RuntimeError("endpoint is already started")
        if self._closed:
            raise RuntimeError("endpoint is closed")
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"{type(self).__name__}-serve", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop the background thread started by ``start()`` (no-op if not started)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            self._wake()
            thread.join(timeout)

    @property
    def serving(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        """Stop serving and release the endpoint."""
        self.stop()
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
