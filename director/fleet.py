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

from sqlalchemy import bindparam, exists, select, update
from sqlalchemy.orm import Session

from director.campaign_outcomes import OBSERVED
from director.campaigns import Campaigns
from director.db import Ecu, Vehicle
from director.fleet_db import CampaignVehicle, EcuHealthRecord
from director.intake import _db_text
from director.metrics import FleetMetrics
from director.quarantine import QuarantineControl
from uptane.manifest import EcuVersionReport

# each ECU's stored report state and last health, before this manifest is recorded
# (one query per manifest), and whether the vehicle is in a campaign
_PREVIOUS = (
    select(
        Ecu.id,
        Ecu.serial,
        Ecu.hardware_id,
        Ecu.installed,
        Ecu.last_result,
        Ecu.last_result_text,
        Ecu.last_report_counter,
        EcuHealthRecord.status.label("health_status"),
        EcuHealthRecord.traps.label("health_traps"),
        EcuHealthRecord.capability_denials.label("health_denials"),
        EcuHealthRecord.rollbacks.label("health_rollbacks"),
        EcuHealthRecord.payload.label("health_payload"),
        exists()
        .where(
            CampaignVehicle.vehicle_id == Ecu.vehicle_id,
            CampaignVehicle.status.in_(OBSERVED),
        )
        .label("in_campaign"),
    )
    .outerjoin(EcuHealthRecord, EcuHealthRecord.ecu_id == Ecu.id)
    .where(Ecu.vehicle_id == bindparam("vehicle_id"))
)


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
        previous: Mapping[str, Any] | None = None,
    ) -> None:
        if previous is None:  # else the caller read these columns (``director.intake_sql``)
            previous = {r.serial: r for r in session.execute(_PREVIOUS, {"vehicle_id": vehicle.id})}
        unhealthy = self.record_health(session, previous, reports, now)
        self.observe_quarantine(session, vehicle, previous, reports, now)
        if any(r.in_campaign for r in previous.values()):
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
            prev = previous[serial]
            payload = report.installed.filename if report.installed is not None else None
            values = {
                "status": h.status,
                "traps": h.traps,
                "capability_denials": dict(h.capability_denials),
                "rollbacks": dict(h.rollbacks),
                "payload": _db_text(payload) if payload is not None else None,
            }
            stored = {
                "status": prev.health_status,
                "traps": prev.health_traps,
                "capability_denials": prev.health_denials,
                "rollbacks": prev.health_rollbacks,
                "payload": prev.health_payload,
            }
            if values == stored:
                continue  # written only when it changes: no statement per check-in
            if prev.health_status is None:
                session.add(EcuHealthRecord(ecu_id=prev.id, reported_at=now, **values))
            else:
                session.execute(
                    update(EcuHealthRecord)
                    .where(EcuHealthRecord.ecu_id == prev.id)
                    .values(reported_at=now, **values)
                )
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
