"""The primary's HTTP fetcher for ngclient: slow-retrieval detection (4.3.1).

A ``tuf.ngclient.Urllib3Fetcher`` that reads what arrives as it arrives
(``read1``) and fails with ``uptane.errors.SlowRetrievalError`` when a
download's average rate stays below the policy's minimum after its grace
period, or when nothing arrives for ``socket_timeout`` seconds. Length caps
(4.3.2 endless data) stay ngclient's: ``download_file(url, max_length)``.

It also remembers the last metadata file it downloaded, so that the primary
can tell a rollback from a mix-and-match when ngclient refuses a version.

Conditional polls (issue 12): per URL of a ``timestamp.json`` it keeps the
last complete body and its strong ``ETag``, sends ``If-None-Match`` and, on
``304 Not Modified`` naming that tag, hands ngclient the kept bytes, which
ngclient verifies as ever and finds unchanged (nothing new). A 304 for a file
it holds no bytes of, or naming another tag, is a download error: a 304 is
never trusted for bytes the primary does not hold.

Mutual TLS (issue 12): with a client ``ssl.SSLContext`` and the Director's
origins, requests to those origins go through a pool presenting the
vehicle's client certificate and trusting only the Director CA; other
origins (the Image repository) keep ngclient's default pool.
"""

from __future__ import annotations

import ssl
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any
from urllib.parse import unquote, urlsplit

import tuf
import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import Urllib3Fetcher

from ecus.primary.config import DownloadPolicy
from uptane.errors import SlowRetrievalError

CONDITIONAL_FILES = frozenset({"timestamp.json"})  # fetched with If-None-Match


class PolicyFetcher(Urllib3Fetcher):
    """``Urllib3Fetcher`` with a minimum average rate, a gap timeout and
    conditional timestamp polls."""

    def __init__(
        self,
        policy: DownloadPolicy,
        *,
        timer: Callable[[], float] = time.monotonic,
        tls: ssl.SSLContext | None = None,
        tls_urls: Iterable[str] = (),
    ) -> None:
        super().__init__(socket_timeout=policy.socket_timeout, chunk_size=policy.chunk_size)  # type: ignore[arg-type]
        # the Director's origins (scheme, host:port) and the pool with the client certificate
        self._tls_origins = frozenset(urlsplit(u)[:2] for u in tls_urls) if tls else frozenset()
        self._user_agent = f"python-tuf/{tuf.__version__}"
        self._tls_pool = (
            urllib3.PoolManager(ssl_context=tls, headers={"User-Agent": self._user_agent})
            if tls is not None
            else None
        )
        self.policy = policy
        self._timer = timer
        self.last_metadata: tuple[str, bytes] | None = None
        self._open: list[Iterator[bytes]] = []  # downloads in progress (see download_file)
        # per URL of a conditional file: (ETag, the complete body that carried it)
        self._validated: dict[str, tuple[str, bytes]] = {}
        self.not_modified: Counter[str] = Counter()  # per URL: 304s answered from kept bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            if unquote(urlsplit(url).path.rsplit("/", 1)[-1]) in CONDITIONAL_FILES:
                return self._conditional(url)
            response = self._request(url, None)
            if response.status >= 400:
                response.close()
                raise tuf_exc.DownloadHTTPError(
                    f"HTTP error occurred with status {response.status}", response.status
                )
            return self._chunks(response)
        except tuf_exc.SlowRetrievalError as e:
            raise SlowRetrievalError(
                f"{url}: no response within {self.policy.socket_timeout}s"
            ) from e

    def _request(
        self, url: str, headers: dict[str, str] | None
    ) -> urllib3.response.BaseHTTPResponse:
        """ngclient's GET (body deferred), through the client-certificate pool for the
        Director's origins."""
        options: dict[str, Any] = {
            "preload_content": False,
            "timeout": urllib3.Timeout(self.socket_timeout),
        }
        if headers:
            options["headers"] = {"User-Agent": self._user_agent, **headers}
        try:
            if self._tls_pool is not None and urlsplit(url)[:2] in self._tls_origins:
                return self._tls_pool.request("GET", url, **options)
            return self._proxy_env.request("GET", url, **options)
        except urllib3.exceptions.MaxRetryError as e:
            # connected, request sent, no response within socket_timeout: slow retrieval
            # (4.3.1). A connection refused or not made in time (NewConnectionError and
            # ConnectTimeoutError, also urllib3 TimeoutErrors) is a mirror that cannot be
            # reached: a plain DownloadError, and the primary tries the next one.
            if isinstance(e.reason, urllib3.exceptions.ReadTimeoutError):
                raise tuf_exc.SlowRetrievalError from e
            raise

    def _conditional(self, url: str) -> Iterator[bytes]:
        """GET with ``If-None-Match`` when bytes of ``url`` are held; 304 -> those bytes."""
        kept = self._validated.get(url)
        response = self._request(url, {"If-None-Match": kept[0]} if kept else None)
        if response.status == 304:
            etag = response.headers.get("ETag")
            response.close()
            response.release_conn()
            if kept is None or (etag is not None and etag != kept[0]):
                raise tuf_exc.DownloadHTTPError(
                    f"{url}: 304 Not Modified for bytes this primary does not hold", 304
                )
            self.not_modified[url] += 1
            return iter((kept[1],))
        if response.status >= 400:
            response.close()
            response.release_conn()
            raise tuf_exc.DownloadHTTPError(
                f"HTTP error occurred with status {response.status}", response.status
            )
        etag = response.headers.get("ETag")
        self._validated.pop(url, None)  # a new body: the old tag no longer applies
        chunks = self._chunks(response)
        if etag is None or etag.startswith("W/"):
            return chunks
        return self._keeping(url, etag, chunks)

    def _keeping(self, url: str, etag: str, chunks: Iterator[bytes]) -> Iterator[bytes]:
        """Pass ``chunks`` on; once the body is complete, keep it with its ETag."""
        body: list[bytes] = []
        try:
            for chunk in chunks:
                body.append(chunk)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        self._validated[url] = (etag, b"".join(body))

    def _chunks(self, response: urllib3.response.BaseHTTPResponse) -> Iterator[bytes]:
        start = self._timer()
        received = 0
        complete = False
        url = getattr(response, "url", None) or "download"
        try:
            while True:
                try:
                    chunk = response.read1(self.chunk_size)
                except urllib3.exceptions.TimeoutError as e:
                    raise SlowRetrievalError(
                        f"{url}: nothing received for {self.policy.socket_timeout}s "
                        f"after {received} bytes"
                    ) from e
                except urllib3.exceptions.ProtocolError as e:  # truncated body, reset
                    raise tuf_exc.DownloadError(
                        f"{url}: connection broken after {received} bytes: {e}"
                    ) from e
                if not chunk:
                    complete = True
                    return
                received += len(chunk)
                elapsed = self._timer() - start
                if (
                    elapsed > self.policy.grace_seconds
                    and received < self.policy.min_bytes_per_second * elapsed
                ):
                    raise SlowRetrievalError(
                        f"{url}: {received} bytes in {elapsed:.1f}s is below the minimum "
                        f"of {self.policy.min_bytes_per_second:.0f} bytes/s"
                    )
                yield chunk
        finally:
            if not complete:  # abandoned mid-body (too long, too slow): never reuse it
                response.close()
            response.release_conn()

    def fetch(self, url: str) -> Iterator[bytes]:
        try:
            chunks = super().fetch(url)
        except tuf_exc.DownloadError as e:
            # FetcherInterface.fetch wraps every error of _fetch but a DownloadError in a
            # DownloadError, which would make a server that never answers look like one
            # that cannot be reached (the next mirror is tried): keep it slow retrieval
            cause = e.__cause__
            if isinstance(cause, SlowRetrievalError):
                raise cause from cause.__cause__
            raise
        self._open.append(chunks)
        return chunks

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[Any]]:
        """ngclient's ``download_file``; a download it abandons (too long, too slow)
        is closed at once, so that its connection is dropped, never reused or kept."""
        opened = len(self._open)
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            while len(self._open) > opened:
                close = getattr(self._open.pop(), "close", None)
                if close is not None:
                    close()

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """Download metadata (ngclient calls this for every metadata file).

        ngclient's ``download_bytes`` with the same length cap
        (``DownloadLengthMismatchError`` past ``max_length``) and the same
        closing of an abandoned download as ``download_file``, but the chunks
        are joined in memory instead of going through a temporary file
        (issue 16: a file per metadata download costs more than the rest).
        """
        self.last_metadata = None
        opened = len(self._open)
        received = 0
        chunks: list[bytes] = []
        try:
            for chunk in self.fetch(url):
                received += len(chunk)
                if received > max_length:
                    raise tuf_exc.DownloadLengthMismatchError(
                        f"Downloaded {received} bytes exceeding the maximum allowed length "
                        f"of {max_length}"
                    )
                chunks.append(chunk)
        finally:
            while len(self._open) > opened:
                close = getattr(self._open.pop(), "close", None)
                if close is not None:
                    close()
        data = b"".join(chunks)
        self.last_metadata = (unquote(urlsplit(url).path.rsplit("/", 1)[-1]), data)
        return data
