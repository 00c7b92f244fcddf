"""``PUT /vehicles/{vin}/manifest`` as pure ASGI, under the body guard (issue 12).

A check-in's manifest is the Director's most frequent write; FastAPI's
routing, dependency and response-model layers cost it more CPU than its
answer needs. ``ManifestRoute`` sits inside ``GuardMiddleware`` (body cap,
body timeout, body budget, already applied) and ``RequestCounter``, takes
the body the guard read, checks it on the event loop when the vehicle's keys
are cached (else ``Director.receive_manifest`` in the thread pool), hands the
write to the group-commit writer and answers with the same JSON as the
FastAPI route, which stays for the OpenAPI description.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from director.http_layer import error_response
from director.intake import CachedKeyRefusal
from uptane.errors import ManifestError

if TYPE_CHECKING:
    from director.records import ManifestReceipt
    from director.service import Director

# the app's log name: refusals are logged as they were by its exception handler
logger = logging.getLogger("director.app")

# HTTP status of each manifest refusal reason.
MANIFEST_STATUS: dict[str, int] = {
    "unknown_vehicle": 404,
    "malformed": 400,
    "too_large": 413,
    "vin_mismatch": 400,
    "bad_primary_signature": 403,
    "bad_ecu_signature": 403,
    "missing_ecu": 422,
    "unknown_ecu": 422,
    "replayed_report": 409,
    "report_time_in_past": 409,
    "report_time_in_future": 422,
}

_MANIFEST_PATH = re.compile(r"^/vehicles/([^/]+)/manifest\Z")


def refusal(exc: ManifestError, vin: str, peer: str) -> tuple[int, str, str]:
    """Log one line for a refused manifest; its status, reason and detail for the answer.

    Only what the request itself carried is logged (no tokens, no keys).
    """
    status = MANIFEST_STATUS.get(exc.reason, 400)
    detail = " ".join(str(exc).split())[:500]
    logger.warning(
        "manifest refused: vin=%r peer=%s status=%d reason=%s detail=%s",
        vin[:130],
        peer,
        status,
        exc.reason,
        detail,
    )
    return status, exc.reason, str(exc)


def accepted_body(receipt: ManifestReceipt) -> bytes:
    """The 200 answer: ``ManifestAccepted`` (``refused_reports``, ``unreported`` if any)."""
    if not receipt.refused_reports and not receipt.unreported:  # the usual answer
        return b'{"accepted":true,"metadata_version":%d}' % int(receipt.metadata_version)
    body: dict[str, Any] = {"accepted": True, "metadata_version": receipt.metadata_version}
    if receipt.refused_reports:
        body["refused_reports"] = dict(receipt.refused_reports)
    if receipt.unreported:
        body["unreported"] = list(receipt.unreported)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class ManifestRoute:
    """``PUT /vehicles/{vin}/manifest`` without FastAPI's layers; everything else goes on."""

    def __init__(self, app: ASGIApp, director: Director) -> None:
        self.app = app
        self.director = director

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "PUT":
            await self.app(scope, receive, send)
            return
        match = _MANIFEST_PATH.match(scope["path"])
        if match is None:
            await self.app(scope, receive, send)
            return
        vin = match.group(1)
        chunks: list[bytes] = []
        while True:  # the guard read and capped the body; this takes its replay
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        try:
            receipt = await self._receive(vin, b"".join(chunks))
        except ManifestError as exc:
            client = scope.get("client")
            status, reason, detail = refusal(exc, vin, client[0] if client else "-")
            await error_response(status, reason, detail)(scope, receive, send)
            return
        body = accepted_body(receipt)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode("ascii")),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _receive(self, vin: str, data: bytes) -> ManifestReceipt:
        """``Director.receive_manifest``, its checks on the event loop when it can.

        With the vehicle's ECU keys in this process's cache, every check runs
        here and only the write goes to the group-commit writer thread: no
        thread-pool hop. Without them, or when the cached keys refused the
        manifest (they may be out of date), the database is asked in a thread.
        """
        director = self.director
        try:
            checked = director.check_manifest_cached(vin, data)
        except CachedKeyRefusal as c:
            return await run_in_threadpool(director.recheck_manifest, c.envelope, c.keys, c.refused)
        if checked is None:
            return await run_in_threadpool(director.receive_manifest, vin, data)
        envelope, keys, verified = checked
        try:
            return await director.record_manifest_async(verified)
        except ManifestError as refused:
            return await run_in_threadpool(director.recheck_manifest, envelope, keys, refused)
