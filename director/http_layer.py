"""The Director's HTTP plumbing under the FastAPI routes: guards, fast reads, file answers.

``GuardMiddleware`` caps and times request bodies, keeps a per-process
budget of body bytes in flight and refuses operator paths without the
token; ``MetadataFastPath`` serves metadata files straight from their stored
bytes, or from this process's ``director.read_cache``, with an ``ETag`` (304
on ``If-None-Match``). Both are pure ASGI, so they run before any body is
parsed (DESIGN 6; issue 12).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from director.config import DEFAULT_BODY_BUDGET, DEFAULT_BODY_TIMEOUT
from director.errors import DirectorError
from director.read_cache import ReadCache, load_root_file, load_vehicle_file

if TYPE_CHECKING:
    from director.service import Director


logger = logging.getLogger("director.app")


def error_response(
    status: int, reason: str, detail: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status, headers=headers)


# --- body cap + operator auth (pure ASGI, before any body is parsed) -----------


class GuardMiddleware:
    """Caps request bodies and refuses operator paths without the bearer token.

    The body is read here (at most ``max_body`` bytes, refused by
    Content-Length before reading and again while reading) and replayed to
    the app, so no handler ever sees an oversized body. A body must arrive
    within ``body_timeout`` seconds (408), and the bodies held by all
    requests in flight in this process together stay under ``body_budget``
    bytes (503 ``busy`` past it): slow or parallel uploads cannot grow the
    server's memory without bound.
    """

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        max_body: int,
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
        body_budget: int = DEFAULT_BODY_BUDGET,
    ) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.body_budget = body_budget
        self.in_flight = 0  # body bytes held by requests of this process

    def authorized(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, credential = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(
                    credential.strip(), self.token
                )
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if (path == "/api" or path.startswith("/api/")) and not self.authorized(scope):
            resp = error_response(
                401,
                "unauthorized",
                "operator API needs a bearer token",
                {"WWW-Authenticate": "Bearer"},
            )
            await resp(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response(400, "malformed", "bad Content-Length", _CLOSE)(
                        scope, receive, send
                    )
                    return
                if length > self.max_body:
                    await error_response(
                        413, "too_large", f"body of {length} bytes is over {self.max_body}", _CLOSE
                    )(scope, receive, send)
                    return
        body = bytearray()
        held = 0
        try:
            refusal: JSONResponse | None = None
            try:
                async with asyncio.timeout(self.body_timeout):
                    while True:
                        message = await receive()
                        if message["type"] == "http.disconnect":
                            return
                        chunk = message.get("body", b"")
                        body += chunk
                        held += len(chunk)
                        self.in_flight += len(chunk)
                        if len(body) > self.max_body:
                            refusal = error_response(
                                413, "too_large", f"body is over {self.max_body} bytes", _CLOSE
                            )
                            break
                        if self.in_flight > self.body_budget:
                            refusal = error_response(
                                503, "busy", "too many request bodies in flight", _RETRY
                            )
                            break
                        if not message.get("more_body", False):
                            break
            except TimeoutError:
                refusal = error_response(
                    408, "timeout", f"body not received within {self.body_timeout:g} s", _CLOSE
                )
            if refusal is not None:
                del body[:]
                await refusal(scope, receive, send)
                return
            delivered = False

            async def replay() -> Message:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
        finally:
            self.in_flight -= held


# --- the database did not answer (pure ASGI, outermost) -------------------------


class DatabaseUnavailable:
    """A request the database could not answer gets ``503 database_unavailable``, not a 500.

    A restarted or failed-over PostgreSQL leaves dead connections in the pool:
    the first statement on one fails (SQLAlchemy then drops the pool), and so
    does every statement while the server is down. Such a request is answered
    503 with ``Retry-After`` (the primary tries again next cycle) and logged in
    one line; nothing was committed, the transaction having failed. Other
    errors are not touched.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except (OperationalError, InterfaceError, SQLAlchemyTimeoutError) as e:
            if started:
                raise
            text = " ".join(str(getattr(e, "orig", None) or e).split())[:300]
            logger.warning("database unavailable: %s %s: %s", scope["method"], scope["path"], text)
            await error_response(
                503, "database_unavailable", "the database did not answer; try again", _RETRY
            )(scope, receive, send)


_METADATA_PATH = re.compile(r"^/vehicles/([^/]+)/metadata/([^/]+)\Z")
_ROOT_PATH = re.compile(r"^/root/([^/]+)\Z")


class MetadataFastPath:
    """``GET`` of a metadata file served straight from its stored bytes (issue 12).

    Most requests of a fleet are polls that find nothing new, so this path
    skips routing, parameter validation and the body guard. With a
    ``director.read_cache.ReadCache`` an answer this process served before
    (and nothing changed since) is sent from memory on the event loop: no
    database, no thread pool. Otherwise one read of the stored file (in the
    thread pool), its ETag, 200 or 304, kept in the cache. Requests with a
    body, and everything else, go on to the app. The FastAPI routes of the
    same paths stay for the OpenAPI description and give the same answers.
    Behind ``director.tls.ListenerGate``: a vehicle only reaches its own paths.
    """

    def __init__(self, app: ASGIApp, director: Director, cache: ReadCache | None = None) -> None:
        self.app = app
        self.director = director
        self.cache = cache

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET":
            path: str = scope["path"]
            vehicle = _METADATA_PATH.match(path)
            root = None if vehicle else _ROOT_PATH.match(path)
            if vehicle or root:
                if_none_match: str | None = None
                bodyless = True
                for name, value in scope["headers"]:
                    if name == b"if-none-match" and len(value) <= 1000:
                        if_none_match = value.decode("latin-1")
                    elif name == b"transfer-encoding" or (
                        name == b"content-length" and value.strip() != b"0"
                    ):
                        bodyless = False
                if bodyless:
                    await self._serve(vehicle, root, if_none_match, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(
        self,
        vehicle: re.Match[str] | None,
        root: re.Match[str] | None,
        if_none_match: str | None,
        send: Send,
    ) -> None:
        cache = self.cache
        answer: Answer | None = None
        if cache is not None:
            cache.start()
            if vehicle is not None:
                answer = cache.vehicle(vehicle[1], vehicle[2], self.director.clock())
            else:
                assert root is not None
                answer = cache.root(root[1])
            if answer is not None:
                await answer.send(send, if_none_match)
                return
        seq = 0 if cache is None else cache.begin()
        try:
            if vehicle is not None:
                vin, filename = vehicle.groups()
                loaded = await run_in_threadpool(load_vehicle_file, self.director, vin, filename)
            else:
                assert root is not None
                filename = root.group(1)
                loaded = await run_in_threadpool(load_root_file, self.director, filename)
            answer = Answer.of(filename, loaded.data, loaded.error)
        except DirectorError as exc:
            loaded = None
            answer = Answer.of("", None, exc)
        if cache is not None and loaded is not None and loaded.cacheable:
            if vehicle is None:
                cache.fill_root(seq, filename, answer)
            elif loaded.vehicle_id is not None and loaded.fresh_until is not None:
                cache.fill_vehicle(
                    seq, vin, loaded.vehicle_id, loaded.fresh_until, filename, answer, answer.size
                )
        await answer.send(send, if_none_match)


class Answer:
    """A prepared answer of ``MetadataFastPath``: the file (and its 304) or a JSON error.

    Built with ``file_response``/``error_response`` once, then sent as raw ASGI
    messages as often as asked.
    """

    __slots__ = ("body", "etag", "not_modified", "size", "start")

    def __init__(
        self, start: Message, body: Message, etag: str | None, not_modified: Message | None
    ) -> None:
        self.start = start
        self.body = body
        self.etag = etag
        self.not_modified = not_modified
        self.size = len(body["body"]) + sum(len(k) + len(v) for k, v in start["headers"])

    @classmethod
    def of(cls, filename: str, data: bytes | None, error: DirectorError | None) -> Answer:
        if data is None:
            assert error is not None
            resp: Response = error_response(error.status, error.reason, str(error))
            return cls(_start(resp), _body(resp), None, None)
        resp = file_response(filename, data)
        etag = etag_of(data)
        return cls(_start(resp), _body(resp), etag, _start(file_response(filename, data, etag)))

    async def send(self, send: Send, if_none_match: str | None) -> None:
        if self.not_modified is not None and _none_match(if_none_match, self.etag or ""):
            await send(self.not_modified)
            await send(_EMPTY_BODY)
            return
        await send(self.start)
        await send(self.body)


_EMPTY_BODY: Message = {"type": "http.response.body", "body": b""}


def _start(resp: Response) -> Message:
    return {"type": "http.response.start", "status": resp.status_code, "headers": resp.raw_headers}


def _body(resp: Response) -> Message:
    return {"type": "http.response.body", "body": bytes(resp.body)}


# Refusals before the whole body is read end the connection (the rest of the
# body would otherwise be parsed as the next request).
_CLOSE = {"Connection": "close"}
_RETRY = {"Connection": "close", "Retry-After": "1"}


def etag_of(data: bytes) -> str:
    """The strong entity tag of a metadata file's bytes (RFC 9110 8.8.3)."""
    return '"' + hashlib.blake2b(data, digest_size=16).hexdigest() + '"'


def _none_match(if_none_match: str | None, etag: str) -> bool:
    """Whether ``If-None-Match`` names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def file_response(filename: str, data: bytes, if_none_match: str | None = None) -> Response:
    """The file's bytes with an ``ETag``, or ``304 Not Modified`` if the client has them.

    ``no-cache``: a client or cache may keep the file but must revalidate it
    every time (the timestamp changes when the vehicle's metadata does).
    """
    etag = etag_of(data)
    headers = {"Cache-Control": "private, no-cache", "ETag": etag}
    if _none_match(if_none_match, etag):
        return Response(status_code=304, headers=headers)
    media = "application/json" if filename.endswith(".json") else "application/octet-stream"
    return Response(content=data, media_type=media, headers=headers)
