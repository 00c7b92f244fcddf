"""Fleet rollout control in the Director: what each accepted manifest tells campaigns.

Issue 14. ``ManifestIntake`` calls ``observe_fleet`` inside the transaction
that records a manifest, before the ECU rows are updated, so the previous
report of each ECU is still there to compare with. It stores each ECU's
reported health, checks for quarantine and updates campaign outcomes, all
in that one transaction (a refused manifest changes none of it).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from director.campaigns import Campaigns
from director.db import Ecu, Vehicle
from director.fleet_db import EcuHealthRecord
from director.intake import _db_text
from director.metrics import FleetMetrics
from director.quarantine import QuarantineControl
from uptane.manifest import EcuVersionReport

# each ECU's stored report state, before this manifest is recorded
_PREVIOUS = select(
    Ecu.id,
    Ecu.serial,
    Ecu.hardware_id,
    Ecu.installed,
    Ecu.last_result,
    Ecu.last_result_text,
    Ecu.last_report_counter,
).where(Ecu.vehicle_id == bindparam("vehicle_id"))


class FleetControl(Campaigns, QuarantineControl):
    """Campaigns, quarantine and health, fed by every accepted manifest."""

    # set by ``director.metrics.metrics_router`` when the HTTP app serves /metrics
    fleet_metrics: FleetMetrics | None = None

    def observe_fleet(
        self,
        session: Session,
        vehicle: Vehicle,
        reports: Mapping[str, EcuVersionReport],
        now: datetime,
    ) -> None:
        previous = {r.serial: r for r in session.execute(_PREVIOUS, {"vehicle_id": vehicle.id})}
        unhealthy = self.record_health(session, previous, reports, now)
        self.observe_quarantine(session, vehicle, previous, reports, now)
        self.observe_campaigns(session, vehicle.id, previous, reports, unhealthy, now)
        if self.fleet_metrics is not None:
            for serial in reports:
                device = self.fleet_metrics.device(serial, previous[serial].hardware_id)
                self.fleet_metrics.attestations.labels(device, "accepted").inc()

    def record_health(
        self,
        session: Session,
        previous: Mapping[str, Any],
        reports: Mapping[str, EcuVersionReport],
        now: datetime,
    ) -> list[str]:
        """Store reported health per ECU; return the serials reporting unhealthy."""
        unhealthy: list[str] = []
        for serial, report in sorted(reports.items()):
            h = report.health
            if h is None:
                continue
            if h.status == "unhealthy":
                unhealthy.append(serial)
            ecu_id = previous[serial].id
            payload = report.installed.filename if report.installed is not None else None
            values = {
                "status": h.status,
                "traps": h.traps,
                "capability_denials": dict(h.capability_denials),
                "rollbacks": dict(h.rollbacks),
                "payload": _db_text(payload) if payload is not None else None,
                "reported_at": now,
            }
            row = session.get(EcuHealthRecord, ecu_id)
            if row is None:
                session.add(EcuHealthRecord(ecu_id=ecu_id, **values))
            else:
                for k, v in values.items():
                    setattr(row, k, v)
        return unhealthy

    def ecu_health(self, vin: str) -> dict[str, dict[str, Any]]:
        """The health each ECU of ``vin`` last reported, by serial."""
        with self.db.transaction() as session:
            vehicle = self._vehicle(session, vin)
            rows = session.execute(
                select(Ecu.serial, EcuHealthRecord)
                .join(EcuHealthRecord, EcuHealthRecord.ecu_id == Ecu.id)
                .where(Ecu.vehicle_id == vehicle.id)
            )
            return {
                serial: {
                    "status": h.status,
                    "traps": h.traps,
                    "capability_denials": dict(h.capability_denials),
                    "rollbacks": dict(h.rollbacks),
                    "payload": h.payload,
                    "reported_at": h.reported_at,
                }
                for serial, h in rows
            }
