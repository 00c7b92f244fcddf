"""Prometheus telemetry of the Director: ``GET /metrics`` (issue 14).

Names follow the fleet OTA metric set: ``iot_device_payload_version``,
``iot_device_payload_health``, ``iot_ota_attempts_total``,
``iot_ota_rollback_total``, ``iot_attestation_reports_total``,
``iot_wasm_runtime_crashes_total``, ``iot_capability_denied_total``; plus
``uptane_campaign_*`` gauges per campaign and phase and
``uptane_director_requests_total`` per endpoint and status code.

Label cardinality: by default ``device_id`` is the ECU's hardware id (a
device class), so a fleet of 1M ECUs of 20 kinds yields series per kind,
not per ECU; the values are ECU counts (gauges) and sums (counters).
``per_ecu=True`` (``UPTANE_DIRECTOR_METRICS_PER_ECU=1``) makes ``device_id``
the ECU serial, one series per ECU: only for small fleets or debugging.

Everything but the request and attestation counters is read from the
database (so every worker process serves the same figures), at most once per
``cache_seconds``; those two count what this process handled.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from director.db import Assignment, Ecu, InstallResult
from director.fleet_db import EcuHealthRecord

PER_ECU_ENV = "UPTANE_DIRECTOR_METRICS_PER_ECU"
# ECU result codes as OTA attempt outcomes
OUTCOMES = {
    "trialFailed": "rolled_back",
    "rolledBack": "rolled_back",
    "deferred": "deferred",
    "declined": "declined",
    "ok": "installed",
}


class FleetMetrics:
    """The counters this process increments, in a registry of their own."""

    def __init__(self, per_ecu: bool) -> None:
        self.per_ecu = per_ecu
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "uptane_director_requests",
            "HTTP requests by endpoint and status code.",
            ["endpoint", "code"],
            registry=self.registry,
        )
        self.attestations = Counter(
            "iot_attestation_reports",
            "Signed ECU version reports the Director verified (accepted) or refused.",
            ["device_id", "status"],
            registry=self.registry,
        )

    def device(self, serial: str, hardware_id: str) -> str:
        return serial if self.per_ecu else hardware_id


class FleetCollector(Collector):
    """Gauges and counters read from the database, cached for ``cache_seconds``."""

    def __init__(self, director: Any, per_ecu: bool, cache_seconds: float = 15.0) -> None:
        self.director = director
        self.per_ecu = per_ecu
        self.cache_seconds = cache_seconds
        self._cache: tuple[float, list[Metric]] | None = None
        self._lock = threading.Lock()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: nothing to describe up front

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            if self._cache is None or time.monotonic() - self._cache[0] > self.cache_seconds:
                self._cache = (time.monotonic(), self._read())
            return iter(self._cache[1])

    def _device(self) -> Any:
        return Ecu.serial if self.per_ecu else Ecu.hardware_id

    def _read(self) -> list[Metric]:
        dev = self._device()
        db = self.director.db
        version = GaugeMetricFamily(
            "iot_device_payload_version",
            "ECUs running each payload (per ECU: its release counter).",
            labels=["device_id", "payload_id"],
        )
        filename = Ecu.installed["filename"].as_string()
        # ECUs choose what they report: only images the Director assigned get a
        # series of their own, anything else is "unknown" (quarantine names them)
        known = {str(i) for (i,) in db.read_all(select(Assignment.image).distinct())}
        if self.per_ecu:
            counter = Ecu.installed["release_counter"].as_integer()
            for d, p, v in db.read_all(
                select(dev, filename, counter).where(Ecu.installed.is_not(None))
            ):
                version.add_metric([d, p or "none"], float(v or 0))
        else:
            counts: dict[tuple[str, str], int] = defaultdict(int)
            for d, p, n in db.read_all(select(dev, filename, func.count()).group_by(dev, filename)):
                payload = "none" if p is None else p if p in known else "unknown"
                counts[(d, payload)] += int(n)
            for (d, p), n in sorted(counts.items()):
                version.add_metric([d, p], float(n))
        health = GaugeMetricFamily(
            "iot_device_payload_health",
            "ECUs by the health their last report gave.",
            labels=["device_id", "status"],
        )
        crashes: dict[tuple[str, str], int] = defaultdict(int)
        denied: dict[tuple[str, str], int] = defaultdict(int)
        rollbacks: dict[tuple[str, str], int] = defaultdict(int)
        statuses: dict[tuple[str, str], int] = defaultdict(int)
        rows = db.read_all(
            select(
                dev,
                EcuHealthRecord.status,
                EcuHealthRecord.traps,
                EcuHealthRecord.capability_denials,
                EcuHealthRecord.rollbacks,
                EcuHealthRecord.payload,
            ).join(Ecu, Ecu.id == EcuHealthRecord.ecu_id)
        )
        for d, status, traps, caps, rbs, payload in rows:
            statuses[(d, status)] += 1
            if not self.per_ecu and payload is not None and payload not in known:
                payload = "unknown"
            crashes[(d, payload or "none")] += int(traps)
            for cap, n in (caps or {}).items():
                denied[(d, cap)] += int(n)
            for reason, n in (rbs or {}).items():
                rollbacks[(d, reason)] += int(n)
        for (d, s), n in sorted(statuses.items()):
            health.add_metric([d, s], float(n))
        attempts = CounterMetricFamily(
            "iot_ota_attempts",
            "Install outcomes ECUs reported (installed, failed, rolled_back, deferred, declined).",
            labels=["device_id", "outcome"],
        )
        for d, result, n in db.read_all(
            select(dev, InstallResult.result, func.count())
            .join(Ecu, Ecu.id == InstallResult.ecu_id)
            .group_by(dev, InstallResult.result)
        ):
            attempts.add_metric([d, OUTCOMES.get(result, "failed")], float(n))
            if OUTCOMES.get(result) == "rolled_back" and (d, result) not in rollbacks:
                rollbacks[(d, result)] += int(n)
        rollback = CounterMetricFamily(
            "iot_ota_rollback",
            "Rollbacks by reason (as the ECUs report them).",
            labels=["device_id", "reason"],
        )
        for (d, r), n in sorted(rollbacks.items()):
            rollback.add_metric([d, r], float(n))
        crash = CounterMetricFamily(
            "iot_wasm_runtime_crashes",
            "WebAssembly traps the ECUs report, by payload.",
            labels=["device_id", "payload_id"],
        )
        for (d, p), n in sorted(crashes.items()):
            crash.add_metric([d, p], float(n))
        cap = CounterMetricFamily(
            "iot_capability_denied",
            "Host calls the sandbox denied, by capability.",
            labels=["device_id", "capability"],
        )
        for (d, c), n in sorted(denied.items()):
            cap.add_metric([d, c], float(n))
        return [version, health, attempts, rollback, crash, cap, *self._campaigns()]

    def _campaigns(self) -> list[Metric]:
        phase = GaugeMetricFamily(
            "uptane_campaign_phase", "Current phase index of each campaign.", labels=["campaign"]
        )
        status = GaugeMetricFamily(
            "uptane_campaign_status", "1 for the campaign's status.", labels=["campaign", "status"]
        )
        vehicles = GaugeMetricFamily(
            "uptane_campaign_vehicles",
            "Vehicles of each campaign phase by state.",
            labels=["campaign", "phase", "state"],
        )
        for c in self.director.list_campaigns():
            phase.add_metric([c.name], float(c.phase))
            status.add_metric([c.name, c.status], 1.0)
            for p in c.progress:
                for state in (
                    "target",
                    "assigned",
                    "installed",
                    "install_failures",
                    "rollbacks",
                    "health_failures",
                    "deferred",
                    "declined",
                ):
                    vehicles.add_metric([c.name, p.name, state], float(getattr(p, state)))
        return [phase, status, vehicles]


def _endpoint(path: str) -> str:
    if path.startswith("/vehicles/"):
        return "manifest" if path.endswith("/manifest") else "metadata"
    if path.startswith("/root/"):
        return "root"
    if path == "/metrics":
        return "metrics"
    if path.startswith("/api/"):
        return "operator"
    return "other"


class RequestCounter:
    """ASGI middleware: counts requests by endpoint kind and status code (bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: FleetMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = _endpoint(scope.get("path", ""))

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
                if endpoint == "manifest" and message["status"] >= 400:
                    self.metrics.attestations.labels("unknown", "refused").inc()
            await send(message)

        await self.app(scope, receive, counted)


class ReadCacheCollector(Collector):
    """This process's read cache (``director.read_cache``): hits, misses, size, channel."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        stats = self.cache.stats
        lookups = CounterMetricFamily(
            "uptane_director_read_cache_lookups",
            "Metadata GETs answered from this process's read cache (hit) or not (miss).",
            labels=["result"],
        )
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield lookups
        events = CounterMetricFamily(
            "uptane_director_read_cache_events",
            "Fills, fills refused (a read raced a change), vehicles evicted, whole clears.",
            labels=["event"],
        )
        for name in ("fills", "refused_fills", "evictions", "clears"):
            events.add_metric([name], getattr(stats, name))
        yield events
        yield GaugeMetricFamily(
            "uptane_director_read_cache_bytes", "Bytes the read cache holds.", self.cache.size
        )
        yield GaugeMetricFamily(
            "uptane_director_read_cache_vehicles", "Vehicles in the read cache.", len(self.cache)
        )
        yield GaugeMetricFamily(
            "uptane_director_read_cache_live",
            "1 while the invalidation channel is up (else the cache is bypassed).",
            1 if self.cache.live else 0,
        )


def metrics_router(director: Any, *, per_ecu: bool | None = None) -> APIRouter:
    """``GET /metrics`` over this Director; sets ``director.fleet_metrics``."""
    if per_ecu is None:
        per_ecu = os.environ.get(PER_ECU_ENV, "") == "1"
    metrics = FleetMetrics(per_ecu)
    metrics.registry.register(FleetCollector(director, per_ecu))
    director.fleet_metrics = metrics
    router = APIRouter(tags=["telemetry"])

    @router.get("/metrics", response_class=Response)
    def scrape() -> Response:
        """Prometheus text exposition of fleet, campaign and request metrics."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
