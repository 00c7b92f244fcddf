"""Campaign assignments: assigning a phase's vehicles, withdrawing, rolling back (issue 14).

Campaigns assign with ``Director.assign`` (Uptane 2.1, 5.2.3: the same checks
as an operator's assignment) in batches of vehicles; a batch a vehicle
refuses (e.g. it runs a newer release) is assigned one vehicle at a time so
one refusal does not hold back the rest. A halt or abort withdraws what is
not installed; a halt of a campaign with ``rollback`` images assigns them to
the vehicles that installed (a previous release re-published with a higher
release counter, so the ECUs' rollback protection accepts it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from director.assignments import Assignments
from director.campaign_outcomes import ASSIGNED, ASSIGNING, CANCELLED, INSTALLED_V, REFUSED
from director.db import Assignment, Ecu, Vehicle
from director.errors import DirectorError, NoMatchingEcuError
from director.fleet_db import Campaign, CampaignVehicle, FleetAuditEntry
from director.records import PENDING, SUPERSEDED

logger = logging.getLogger("director.campaigns")

ACTIVE = "active"
_BATCH = 500


class CampaignAssigning(Assignments):
    """How campaigns create and withdraw assignments."""

    def _assign_batches(self, images: Mapping[str, str], vins: Sequence[str]) -> dict[str, str]:
        """Assign ``images`` (by hardware id) to ``vins``; return the refused VINs and why."""
        refused: dict[str, str] = {}
        for i in range(0, len(vins), _BATCH):
            batch = list(vins[i : i + _BATCH])
            for hw, image in sorted(images.items()):
                todo = [v for v in batch if v not in refused]
                if not todo:
                    continue
                try:
                    self.assign(image, hardware_id=hw, vins=todo)
                except NoMatchingEcuError:
                    continue
                except DirectorError:  # one vehicle refused: assign the rest one by one
                    for vin in todo:
                        try:
                            self.assign(image, hardware_id=hw, vins=[vin])
                        except NoMatchingEcuError:
                            pass
                        except DirectorError as e:
                            refused[vin] = f"{e.reason}: {e}"
        return refused

    def _assign_selected(self, campaign_id: int) -> None:
        """Assign the bundle to the campaign's ``assigning`` vehicles (if still active).

        Runs after the selecting transaction; a crash in between leaves the rows
        ``assigning`` and the next ``tick`` assigns them (assigning twice only
        replaces a pending assignment with the same one).
        """
        with self.db.transaction() as session:
            c = session.get(Campaign, campaign_id)
            if c is None or c.status != ACTIVE:
                return
            bundle = {hw: e["image"] for hw, e in c.bundle.items()}
            vins = list(
                session.scalars(
                    select(Vehicle.vin)
                    .join(CampaignVehicle, CampaignVehicle.vehicle_id == Vehicle.id)
                    .where(
                        CampaignVehicle.campaign_id == campaign_id,
                        CampaignVehicle.status == ASSIGNING,
                    )
                    .order_by(Vehicle.vin)
                )
            )
        refused = self._assign_batches(bundle, vins)
        now = self.clock()
        with self.db.transaction(write=True) as session:
            ids = dict(
                session.execute(select(Vehicle.vin, Vehicle.id).where(Vehicle.vin.in_(vins))).all()
            )
            for vin in vins:
                session.execute(
                    update(CampaignVehicle)
                    .where(
                        CampaignVehicle.campaign_id == campaign_id,
                        CampaignVehicle.vehicle_id == ids[vin],
                        CampaignVehicle.status == ASSIGNING,
                    )
                    .values(status=REFUSED if vin in refused else ASSIGNED, updated_at=now)
                )
        for vin, why in refused.items():
            logger.warning("campaign %d: vehicle %s refused: %s", campaign_id, vin, why)

    def _withdraw(self, session: Session, c: Campaign, now: datetime) -> None:
        """Supersede the campaign's assignments that are not installed; re-sign those vehicles."""
        images = {hw: e["image"] for hw, e in c.bundle.items()}
        vehicle_ids = list(
            session.scalars(
                select(CampaignVehicle.vehicle_id).where(
                    CampaignVehicle.campaign_id == c.id,
                    CampaignVehicle.status.in_([ASSIGNING, ASSIGNED]),
                )
            )
        )
        touched: set[int] = set()
        for i in range(0, len(vehicle_ids), _BATCH):
            batch = vehicle_ids[i : i + _BATCH]
            # by vehicle, the status checked here (a status predicate lets PostgreSQL
            # walk every pending row of the fleet through the status index, per batch)
            for a, hw, vid in session.execute(
                select(Assignment, Ecu.hardware_id, Ecu.vehicle_id)
                .join(Ecu, Assignment.ecu_id == Ecu.id)
                .where(Ecu.vehicle_id.in_(batch))
            ):
                if a.status == PENDING and images.get(hw) == a.image:
                    a.status = SUPERSEDED
                    a.updated_at = now
                    touched.add(vid)
            session.execute(
                update(CampaignVehicle)
                .where(
                    CampaignVehicle.campaign_id == c.id,
                    CampaignVehicle.vehicle_id.in_(batch),
                    CampaignVehicle.status.in_([ASSIGNING, ASSIGNED]),
                )
                .values(status=CANCELLED, updated_at=now)
            )
        session.flush()
        # re-sign at once (a withdrawn image must leave the vehicles' targets), in batches
        ids = sorted(touched)
        for i in range(0, len(ids), _BATCH):
            locked = [
                (vid, vin, tv)
                for vid, vin, tv in session.execute(
                    select(Vehicle.id, Vehicle.vin, Vehicle.targets_version)
                    .where(Vehicle.id.in_(ids[i : i + _BATCH]))
                    .order_by(Vehicle.vin)
                    .with_for_update()
                )
            ]
            self._record_signed(session, self._sign_vehicles(session, locked, now))

    def _roll_back(self, campaign_id: int) -> None:
        """After a halt: assign the campaign's ``rollback`` images to the vehicles that installed."""
        with self.db.transaction() as session:
            c = session.get(Campaign, campaign_id)
            if c is None or not c.on_halt:
                return
            images = {hw: e["image"] for hw, e in c.on_halt.get("rollback", {}).items()}
            vins = list(
                session.scalars(
                    select(Vehicle.vin)
                    .join(CampaignVehicle, CampaignVehicle.vehicle_id == Vehicle.id)
                    .where(
                        CampaignVehicle.campaign_id == campaign_id,
                        CampaignVehicle.status == INSTALLED_V,
                    )
                    .order_by(Vehicle.vin)
                )
            )
            name = c.name
        if not images or not vins:
            return
        refused = self._assign_batches(images, vins)
        now = self.clock()
        detail = (
            f"assigned {', '.join(sorted(images.values()))} to {len(vins) - len(refused)} "
            f"vehicles that installed; refused: {sorted(refused)[:20]}"
        )
        with self.db.transaction(write=True) as session:
            session.add(
                FleetAuditEntry(
                    at=now,
                    actor="director",
                    action="campaign_rollback",
                    subject=name,
                    detail=detail,
                )
            )
        logger.warning("campaign %s rolled back: %s", name, detail)
