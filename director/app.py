"""The Director's HTTP API: a FastAPI app over ``director.service.Director`` (DESIGN 6).

Vehicle-facing (no token; every piece of trust is in signatures):

- ``GET /vehicles/{vin}/metadata/{file}``: per-vehicle TUF repository with
  consistent snapshots (``N.root.json``, ``timestamp.json``,
  ``N.snapshot.json``, ``N.targets.json``) and DER forms (``N.root.der``,
  ``N.targets.der``, ``root.der``, ``targets.der``); ``GET /root/{file}`` the
  shared root chain.
- ``PUT /vehicles/{vin}/manifest``: a signed vehicle version manifest; 200
  ``{"accepted": true, "metadata_version": N}`` or 4xx
  ``{"error": reason, "detail": text}``.

Operator-facing (``Authorization: Bearer <token>``, 401 without): register
vehicles, assign images, list vehicles. Every request body is capped at
``max_body`` bytes (by Content-Length and while reading) and validated.
"""

from __future__ import annotations

import hmac
import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from director.config import (
    DEFAULT_BODY_BUDGET,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_MAX_BODY,
    DEFAULT_READ_CACHE_BYTES,
)
from director.errors import DirectorError
from director.http_layer import (
    DatabaseUnavailable,
    GuardMiddleware,
    MetadataFastPath,
    error_response,
    file_response,
)
from director.manifest_route import ManifestRoute, refusal
from director.read_cache import ReadCache
from director.service import (
    AssignmentInfo,
    AuditInfo,
    Director,
    EcuSpec,
    VehicleStatus,
    check_ecu_key,
)
from uptane.errors import ConfigError, ManifestError, UptaneError
from uptane.manifest import MANIFEST_TYPE

logger = logging.getLogger(__name__)

IDENT = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


# --- request / response bodies ------------------------------------------------


class EcuIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    serial: str = Field(pattern=IDENT)
    hardware_id: str = Field(pattern=IDENT)
    public_key: dict[str, Any] = Field(description="TUF ed25519 key dict (keyid optional, checked)")
    primary: bool = False


class VehicleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vin: str = Field(pattern=IDENT)
    ecus: list[EcuIn] = Field(min_length=1, max_length=256)


class AssignmentIn(BaseModel):
    """Assign an Image repository target by ECU serials, or by hardware id (optionally per VIN)."""

    model_config = ConfigDict(extra="forbid")

    image: str = Field(min_length=1, max_length=255)
    ecu_serials: list[Annotated[str, Field(pattern=IDENT)]] | None = Field(
        default=None, min_length=1, max_length=10_000
    )
    hardware_id: str | None = Field(default=None, pattern=IDENT)
    vins: list[Annotated[str, Field(pattern=IDENT)]] | None = Field(
        default=None, min_length=1, max_length=100_000
    )

    @model_validator(mode="after")
    def _one_selector(self) -> AssignmentIn:
        if (self.ecu_serials is None) == (self.hardware_id is None):
            raise ValueError("give exactly one of ecu_serials and hardware_id")
        if self.vins is not None and self.hardware_id is None:
            raise ValueError("vins only narrows an assignment by hardware_id")
        return self


class AssignmentOut(BaseModel):
    id: int
    vin: str
    ecu_serial: str
    image: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any]
    status: str
    created_at: datetime

    @classmethod
    def of(cls, a: AssignmentInfo) -> AssignmentOut:
        return cls(
            id=a.id,
            vin=a.vin,
            ecu_serial=a.ecu_serial,
            image=a.image,
            length=a.length,
            hashes=dict(a.hashes),
            custom=dict(a.custom),
            status=a.status,
            created_at=a.created_at,
        )


class EcuOut(BaseModel):
    serial: str
    hardware_id: str
    primary: bool
    keyid: str
    installed: dict[str, Any] | None
    report_counter: int | None
    last_report_at: datetime | None
    last_result: str | None
    last_result_text: str | None


class AttackOut(BaseModel):
    ecu_serial: str
    attack: str
    report_counter: int
    detected_at: datetime


class ResultOut(BaseModel):
    ecu_serial: str
    result: str
    text: str
    image: str | None
    received_at: datetime


class VehicleOut(BaseModel):
    vin: str
    created_at: datetime
    last_seen: datetime | None
    metadata_version: int
    metadata_expires: datetime | None
    ecus: list[EcuOut]
    pending: list[AssignmentOut]
    attacks: list[AttackOut]
    results: list[ResultOut]

    @classmethod
    def of(cls, v: VehicleStatus) -> VehicleOut:
        return cls(
            vin=v.vin,
            created_at=v.created_at,
            last_seen=v.last_seen,
            metadata_version=v.metadata_version,
            metadata_expires=v.metadata_expires,
            ecus=[
                EcuOut(
                    serial=e.serial,
                    hardware_id=e.hardware_id,
                    primary=e.primary,
                    keyid=e.keyid,
                    installed=None if e.installed is None else dict(e.installed),
                    report_counter=e.report_counter,
                    last_report_at=e.last_report_at,
                    last_result=e.last_result,
                    last_result_text=e.last_result_text,
                )
                for e in v.ecus
            ],
            pending=[AssignmentOut.of(a) for a in v.pending],
            attacks=[AttackOut(**a.__dict__) for a in v.attacks],
            results=[ResultOut(**r.__dict__) for r in v.results],
        )


class ManifestAccepted(BaseModel):
    accepted: bool = True
    metadata_version: int
    refused_reports: dict[str, str] = Field(
        default_factory=dict,
        description="ECU serial -> reason, for secondaries' reports left out and recorded "
        "as attacks (not fresh: replayed_report, report_time_in_past, report_time_in_future)",
    )
    unreported: list[str] = Field(
        default_factory=list,
        description="serials of secondaries the manifest has no report from (unreachable "
        "this cycle): their recorded state is kept, their assignments stay pending",
    )


class CounterResetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500, description="why (e.g. ECU reflashed)")


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    vin: str | None
    ecu_serial: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, a: AuditInfo) -> AuditOut:
        return cls(
            id=a.id,
            at=a.at,
            actor=a.actor,
            action=a.action,
            vin=a.vin,
            ecu_serial=a.ecu_serial,
            detail=dict(a.detail),
        )


class ErrorOut(BaseModel):
    error: str
    detail: str


_MANIFEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A signed vehicle version manifest (Uptane 2.1 5.4.2.2); other top-level "
    "fields are ignored and not stored",
    "required": ["signed", "signatures"],
    "properties": {
        "signed": {
            "type": "object",
            "required": ["_type", "vin", "primary_ecu_serial", "ecu_version_reports"],
            "additionalProperties": False,
            "properties": {
                "_type": {"const": MANIFEST_TYPE},
                "vin": {"type": "string", "pattern": IDENT},
                "primary_ecu_serial": {"type": "string", "pattern": IDENT},
                "ecu_version_reports": {
                    "type": "object",
                    "description": "one report per registered ECU of the vehicle, no more",
                    "maxProperties": 256,
                    "propertyNames": {"pattern": IDENT},
                    "additionalProperties": {
                        "type": "string",
                        "contentEncoding": "base64",
                        "description": "base64 of a DER SignedEcuVersionReport",
                    },
                },
            },
        },
        "signatures": {
            "type": "array",
            "minItems": 1,
            "maxItems": 8,
            "items": {
                "type": "object",
                "required": ["keyid", "sig"],
                "properties": {"keyid": {"type": "string"}, "sig": {"type": "string"}},
            },
        },
    },
}


IfNoneMatch = Annotated[str | None, Header(max_length=1000, description="ETag(s) the client holds")]

_bearer = HTTPBearer(auto_error=False, description="operator token from director.json")


def create_app(
    director: Director,
    token: str,
    *,
    max_body: int = DEFAULT_MAX_BODY,
    body_timeout: float = DEFAULT_BODY_TIMEOUT,
    body_budget: int = DEFAULT_BODY_BUDGET,
    ca_directory: Path | None = None,
    read_cache_bytes: int = DEFAULT_READ_CACHE_BYTES,
) -> FastAPI:
    """The Director ASGI app; OpenAPI schema at ``/openapi.json``.

    With ``ca_directory`` (the Director directory holding the CA, ``director.tls``)
    the operator API also issues vehicle client certificates. ``read_cache_bytes``:
    the metadata answers this process keeps in memory (``director.read_cache``; 0: none)."""
    if len(token) < 16:
        raise ConfigError("the operator token must be at least 16 characters")
    app = FastAPI(
        title="uptane-wasm Director",
        version="1",
        description="Uptane 2.1 Director repository: per-vehicle metadata, manifests, inventory.",
    )

    def operator(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        # GuardMiddleware already refused requests without the token; this
        # documents the scheme in OpenAPI and checks again.
        ok = creds is not None and hmac.compare_digest(
            creds.credentials.encode("utf-8"), token.encode("utf-8")
        )
        if not ok:
            raise StarletteHTTPException(401, "operator API needs a bearer token")

    @app.exception_handler(ManifestError)
    async def _manifesterror_response(request: Request, exc: ManifestError) -> JSONResponse:
        vin = str(request.path_params.get("vin", ""))
        peer = request.client.host if request.client is not None else "-"
        return error_response(*refusal(exc, vin, peer))

    @app.exception_handler(DirectorError)
    async def _directorerror_response(request: Request, exc: DirectorError) -> JSONResponse:
        return error_response(exc.status, exc.reason, str(exc))

    @app.exception_handler(UptaneError)
    async def _uptaneerror_response(request: Request, exc: UptaneError) -> JSONResponse:
        return error_response(400, "invalid_request", str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validationerror_response(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", ""))} for e in exc.errors()
        ]
        return error_response(422, "malformed", json.dumps(errors)[:2000])

    @app.exception_handler(StarletteHTTPException)
    async def _httperror_response(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code, "http_error"
        )
        headers = dict(exc.headers or {})  # e.g. Allow on a 405 (RFC 9110 15.5.6)
        if exc.status_code == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return error_response(exc.status_code, reason, str(exc.detail), headers or None)

    errors: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorOut} for s in (400, 401, 403, 404, 409, 413, 422, 502, 503)
    }

    file_responses: dict[int | str, dict[str, Any]] = {
        **errors,
        200: {
            "description": "The file: TUF JSON (`.json`) or TUF metadata in DER (`.der`)",
            "headers": {"ETag": {"schema": {"type": "string"}}},
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        304: {"description": "Not modified: the `If-None-Match` tag is the current ETag"},
    }

    @app.get("/health", tags=["vehicle"])
    async def health() -> Response:
        """Liveness for load balancers: answers without touching the database."""
        return Response(b'{"ok":true}', media_type="application/json")

    # --- vehicle API ---

    @app.get(
        "/vehicles/{vin}/metadata/{filename}",
        responses=file_responses,
        tags=["vehicle"],
    )
    def vehicle_metadata(vin: str, filename: str, if_none_match: IfNoneMatch = None) -> Response:
        """A file of the vehicle's Director repository (JSON, or DER for root/targets).

        Served as stored (signed when it changed, never per request), with an
        ``ETag``; ``If-None-Match`` with that tag answers 304 without a body.
        """
        data = director.metadata(vin, filename)
        return file_response(filename, data, if_none_match)

    @app.get("/root/{filename}", tags=["vehicle"], responses=file_responses)
    def root_metadata(filename: str, if_none_match: IfNoneMatch = None) -> Response:
        """The shared Director root chain: ``N.root.json`` / ``N.root.der``."""
        return file_response(filename, director.root_file(filename), if_none_match)

    @app.put(
        "/vehicles/{vin}/manifest",
        response_model=ManifestAccepted,
        response_model_exclude_unset=True,
        responses=errors,
        tags=["vehicle"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _MANIFEST_SCHEMA}},
            }
        },
    )
    async def put_manifest(vin: str, request: Request) -> ManifestAccepted:
        """Upload a signed vehicle version manifest (Uptane 2.1, 5.4.2).

        Served by ``director.manifest_route.ManifestRoute`` (same answers); this
        route describes it in the OpenAPI schema.
        """
        data = await request.body()
        receipt = await run_in_threadpool(director.receive_manifest, vin, data)
        return ManifestAccepted(
            accepted=True,
            metadata_version=receipt.metadata_version,
            refused_reports=dict(receipt.refused_reports),
            unreported=list(receipt.unreported),
        )

    # --- operator API ---

    @app.post(
        "/api/vehicles",
        response_model=VehicleOut,
        status_code=201,
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def register_vehicle(body: VehicleIn) -> VehicleOut:
        """Register a vehicle with its ECUs and their public keys."""
        ecus = [
            EcuSpec(
                serial=e.serial,
                hardware_id=e.hardware_id,
                public_key=check_ecu_key(e.public_key),
                primary=e.primary,
            )
            for e in body.ecus
        ]
        return VehicleOut.of(director.register_vehicle(body.vin, ecus))

    @app.post(
        "/api/assignments",
        response_model=list[AssignmentOut],
        status_code=201,
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def assign(body: AssignmentIn) -> list[AssignmentOut]:
        """Assign an Image repository target to ECUs by serial or by hardware id."""
        infos = director.assign(
            body.image, ecu_serials=body.ecu_serials, hardware_id=body.hardware_id, vins=body.vins
        )
        return [AssignmentOut.of(a) for a in infos]

    @app.get(
        "/api/vehicles",
        response_model=list[VehicleOut],
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def list_vehicles() -> list[VehicleOut]:
        """Every vehicle: installed images, pending assignments, last seen, attacks."""
        return [VehicleOut.of(v) for v in director.list_vehicles()]

    @app.get(
        "/api/vehicles/{vin}",
        response_model=VehicleOut,
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def get_vehicle(vin: str) -> VehicleOut:
        """One vehicle's reported state, pending assignments and detected attacks."""
        return VehicleOut.of(director.vehicle_status(vin))

    # the manifest PUT is served by ManifestRoute, inside the guard and the request counter
    app.add_middleware(ManifestRoute, director=director)
    from director.fleet_api import install_fleet  # campaigns, quarantine, /metrics (issue 14)

    install_fleet(app, director, Depends(operator))
    from director.metadata_signer import install_signer  # stale metadata (issue 12)

    install_signer(app, director)
    if ca_directory is not None:
        from director.tls import install_certificate_api

        install_certificate_api(app, director, ca_directory, Depends(operator))

    @app.post(
        "/api/vehicles/{vin}/ecus/{serial}/reset-counter",
        response_model=AuditOut,
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def reset_counter(vin: str, serial: str, body: CounterResetIn) -> AuditOut:
        """Forget an ECU's report counter (reflashed or jammed ECU); writes an audit entry."""
        return AuditOut.of(director.reset_report_counter(vin, serial, reason=body.reason))

    @app.get(
        "/api/audit",
        response_model=list[AuditOut],
        responses=errors,
        dependencies=[Depends(operator)],
        tags=["operator"],
    )
    def audit_log() -> list[AuditOut]:
        """The latest operator actions on checks (newest first)."""
        return [AuditOut.of(a) for a in director.audit_log()]

    app.add_middleware(
        GuardMiddleware,
        token=token,
        max_body=max_body,
        body_timeout=body_timeout,
        body_budget=body_budget,
    )
    cache = ReadCache.for_database(director.db, read_cache_bytes)
    app.state.read_cache = cache
    if cache is not None and director.fleet_metrics is not None:  # this process's, on /metrics
        from director.metrics import ReadCacheCollector

        director.fleet_metrics.registry.register(ReadCacheCollector(cache))
    app.add_middleware(MetadataFastPath, director=director, cache=cache)
    app.add_middleware(DatabaseUnavailable)  # outermost: every path below it
    return app


def app_from_env() -> FastAPI:
    """App factory for ``uvicorn --factory`` worker processes (``serve --workers N``).

    Reads the director directory from ``UPTANE_DIRECTOR_DIR`` and an optional
    database URL override from ``UPTANE_DIRECTOR_DB``; every worker is an
    independent process over the same database.
    """
    import os

    from director.config import DirectorConfig

    config = DirectorConfig.load(os.environ.get("UPTANE_DIRECTOR_DIR", "director"))
    if os.environ.get("UPTANE_DIRECTOR_DB"):
        config.db_url = os.environ["UPTANE_DIRECTOR_DB"]
    director = Director.from_config(config)
    from director.server import DirectorProtocol

    DirectorProtocol.configure(config.connection_limits())
    return create_app(
        director,
        config.token,
        max_body=config.max_body,
        body_timeout=config.body_timeout,
        body_budget=config.body_budget,
        ca_directory=config.directory,
        read_cache_bytes=config.read_cache_bytes,
    )
