"""Operator API of fleet rollout control: campaigns, vehicle attributes, quarantine, audit.

Issue 14. ``install_fleet(app, director, operator)`` adds the routes below
(all under ``/api``, so behind the operator token) and a background thread
that calls ``Director.tick`` every ``tick_seconds``, so campaigns advance and
halt while the server runs; every worker process may tick (the campaign row
is locked while it changes).

- ``POST /api/campaigns`` (a campaign document, see ``director.campaign_spec``),
  ``GET /api/campaigns``, ``GET /api/campaigns/{name}``, ``GET /api/campaigns/{name}/vehicles``,
  ``POST /api/campaigns/{name}/pause|resume|abort``, ``POST /api/campaigns-tick``
- ``PUT /api/vehicles/{vin}/attributes``, ``GET /api/vehicles/{vin}/health``
- ``GET /api/quarantine``, ``POST /api/quarantine/{vin}/release``
- ``GET /api/audit``
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.params import Depends
from pydantic import BaseModel, ConfigDict, Field

from director.campaigns import CampaignInfo

logger = logging.getLogger("director.fleet_api")

IDENT = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"


class ActorIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    actor: str = Field(default="operator", min_length=1, max_length=128)
    note: str = Field(default="", max_length=1000)


class PhaseOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    index: int
    name: str
    target: int
    assigned: int
    installed: int
    install_failures: int
    rollbacks: int
    health_failures: int
    deferred: int
    declined: int


class CampaignOut(BaseModel):
    id: int
    name: str
    status: str
    phase: int
    phase_name: str
    phase_started_at: datetime
    halt_reason: str | None
    images: dict[str, str]
    target: dict[str, Any]
    phases: list[dict[str, Any]]
    group_size: int
    progress: list[PhaseOut]
    totals: dict[str, int]
    rollback: dict[str, str]
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, c: CampaignInfo) -> CampaignOut:
        return cls(
            id=c.id,
            name=c.name,
            status=c.status,
            phase=c.phase,
            phase_name=c.phase_name,
            phase_started_at=c.phase_started_at,
            halt_reason=c.halt_reason,
            images=dict(c.images),
            target=dict(c.target),
            phases=[dict(p) for p in c.phases],
            group_size=c.group_size,
            progress=[PhaseOut.model_validate(p) for p in c.progress],
            totals=c.totals(),
            rollback=dict(c.rollback),
            created_at=c.created_at,
            updated_at=c.updated_at,
        )


class QuarantineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    vin: str
    reason: str
    detail: str
    since: datetime
    released_at: datetime | None
    released_by: str | None


class FleetAuditOut(BaseModel):
    at: datetime
    actor: str
    action: str
    subject: str
    detail: str


def fleet_router(director: Any) -> APIRouter:
    """The operator routes of campaigns, attributes, quarantine and audit."""
    router = APIRouter(prefix="/api", tags=["fleet"])

    @router.post("/campaigns", response_model=CampaignOut, status_code=201)
    def create_campaign(body: dict[str, Any]) -> CampaignOut:
        """Create a campaign and start its first phase."""
        actor = body.pop("actor", "operator") if isinstance(body.get("actor"), str) else "operator"
        return CampaignOut.of(director.create_campaign(body, actor=actor))

    @router.get("/campaigns", response_model=list[CampaignOut])
    def list_campaigns() -> list[CampaignOut]:
        """Every campaign with its progress per phase."""
        return [CampaignOut.of(c) for c in director.list_campaigns()]

    @router.get("/campaigns/{name}", response_model=CampaignOut)
    def show_campaign(name: str) -> CampaignOut:
        """One campaign with its progress per phase."""
        return CampaignOut.of(director.campaign(name))

    @router.get("/campaigns/{name}/vehicles", response_model=dict[str, dict[str, Any]])
    def campaign_vehicles(name: str) -> dict[str, dict[str, Any]]:
        """Each vehicle the campaign reached, by VIN: phase, state, failures, consent."""
        result: dict[str, dict[str, Any]] = director.campaign_vehicles(name)
        return result

    def control(action: str) -> Callable[[str, ActorIn | None], CampaignOut]:
        method = getattr(director, f"{action}_campaign")

        def handler(name: str, body: ActorIn | None = None) -> CampaignOut:
            return CampaignOut.of(method(name, actor=(body or ActorIn()).actor))

        handler.__doc__ = f"{action.capitalize()} a campaign (written to the audit log)."
        handler.__name__ = f"{action}_campaign"
        return handler

    for action in ("pause", "resume", "abort"):
        router.add_api_route(
            f"/campaigns/{{name}}/{action}",
            control(action),
            methods=["POST"],
            response_model=CampaignOut,
        )

    @router.post("/campaigns-tick", response_model=list[CampaignOut])
    def tick() -> list[CampaignOut]:
        """Advance or halt campaigns now (the server also does this periodically)."""
        return [CampaignOut.of(c) for c in director.tick()]

    @router.put("/vehicles/{vin}/attributes", response_model=dict[str, str])
    def set_attributes(vin: str, body: dict[str, str | None]) -> dict[str, str]:
        """Set (or with null remove) attributes campaign targets filter on."""
        result: dict[str, str] = director.set_vehicle_attributes(vin, body)
        return result

    @router.get("/vehicles/{vin}/health", response_model=dict[str, dict[str, Any]])
    def vehicle_health(vin: str) -> dict[str, dict[str, Any]]:
        """The health each ECU last put in its signed report (WASM module status, counts)."""
        result: dict[str, dict[str, Any]] = director.ecu_health(vin)
        return result

    @router.get("/quarantine", response_model=list[QuarantineOut])
    def quarantined(include_released: bool = False) -> list[QuarantineOut]:
        """Quarantined vehicles (with ``include_released``: past quarantines too)."""
        return [
            QuarantineOut.model_validate(q)
            for q in director.list_quarantined(include_released=include_released)
        ]

    @router.post("/quarantine/{vin}/release", response_model=QuarantineOut)
    def release(vin: str, body: ActorIn) -> QuarantineOut:
        """Release a quarantined vehicle; ``actor`` and ``note`` go to the audit log."""
        return QuarantineOut.model_validate(
            director.release_quarantine(vin, actor=body.actor, note=body.note)
        )

    @router.get("/audit/fleet", response_model=list[FleetAuditOut])
    def audit(limit: int = 100) -> list[FleetAuditOut]:
        """The latest operator and campaign actions, newest first."""
        return [FleetAuditOut(**e) for e in director.fleet_audit_log(max(1, min(limit, 1000)))]

    return router


class Ticker:
    """Calls ``director.tick()`` every ``interval`` seconds in a daemon thread."""

    def __init__(self, director: Any, interval: float) -> None:
        self.director = director
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="campaign-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.director.tick()
            except Exception:  # keep ticking; the next tick retries
                logger.exception("campaign tick failed")


TICK_ENV = "UPTANE_DIRECTOR_TICK_SECONDS"


def _tick_seconds() -> float:
    import os

    try:
        return max(0.0, float(os.environ.get(TICK_ENV, "30")))
    except ValueError:
        return 30.0


def install_fleet(
    app: FastAPI, director: Any, operator: Depends, *, tick_seconds: float | None = None
) -> None:
    """Add the fleet routes and ``/metrics`` to ``app``, and a campaign ticker to its lifespan.

    The ticker runs every ``tick_seconds`` (default ``UPTANE_DIRECTOR_TICK_SECONDS``
    or 30; 0 turns it off, leaving ``POST /api/campaigns-tick`` and the CLI).
    """
    interval = _tick_seconds() if tick_seconds is None else tick_seconds
    from director.metrics import RequestCounter, metrics_router

    app.include_router(fleet_router(director), dependencies=[operator])
    app.include_router(metrics_router(director), dependencies=[operator])
    app.add_middleware(RequestCounter, metrics=director.fleet_metrics)
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        ticker = Ticker(director, interval)
        if interval > 0:
            ticker.start()
        try:
            async with inner(a) as state:
                yield state
        finally:
            ticker.stop()

    app.router.lifespan_context = lifespan
