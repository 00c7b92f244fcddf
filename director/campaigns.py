"""Campaigns: phased rollouts with automatic halt (issue 14; Uptane 2.1 5.2.3 assignments).

A campaign assigns its bundle (one image per hardware id) phase by phase to
a target group: the first phase to its ``vehicles`` or ``percent``, and each
later phase to more, once the phase before it ran for its ``minutes`` while
its halt rules held. Outcomes come from the vehicles' signed reports
(``observe_campaigns``, called while a manifest is recorded): install
failures, rollbacks, health failures, and consent answers (deferred or
declined count, but not as failures). When a rule is broken the campaign
halts: it assigns nothing more and withdraws its assignments that are not
installed yet; vehicles that installed keep their image. Operators pause,
resume and abort; every change is in the audit log.

Time is explicit: ``tick(now)`` advances or halts campaigns at ``now``
(default: the Director's clock), so tests drive phases without sleeping.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, exists, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from director.campaign_assign import CampaignAssigning
from director.campaign_outcomes import (
    ASSIGNED,
    ASSIGNING,
    CANCELLED,
    INSTALLED_V,
    REFUSED,
    CampaignOutcomes,
)
from director.campaign_spec import HALT_RULES, CampaignSpec, Phase, check_attribute, parse_rule
from director.db import Ecu, Vehicle
from director.errors import (
    AlreadyRegisteredError,
    DirectorError,
    HardwareMismatchError,
    InvalidImageError,
    InvalidRequestError,
    NotFoundError,
    ReleaseCounterError,
)
from director.fleet_db import Campaign, CampaignVehicle, FleetAuditEntry, VehicleAttribute
from director.quarantine import active_quarantine
from uptane.errors import UptaneError
from uptane.metadata import UptaneTarget

logger = logging.getLogger("director.campaigns")

ACTIVE, PAUSED, HALTED, ABORTED, COMPLETED = "active", "paused", "halted", "aborted", "completed"
_BATCH = 500


@dataclass(frozen=True)
class PhaseProgress:
    """One phase: its size in all (cumulative) and what its vehicles reported."""

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


@dataclass(frozen=True)
class CampaignInfo:
    id: int
    name: str
    status: str
    phase: int
    phase_name: str
    phase_started_at: datetime
    halt_reason: str | None
    images: Mapping[str, str]
    target: Mapping[str, Any]
    phases: tuple[Mapping[str, Any], ...]
    group_size: int
    progress: tuple[PhaseProgress, ...]
    created_at: datetime
    updated_at: datetime
    # hardware id -> image assigned to vehicles that installed, when the campaign halts
    rollback: Mapping[str, str] = field(default_factory=dict)

    def totals(self) -> dict[str, int]:
        """Counts over every phase (what the halt rules read)."""
        keys = (
            "assigned",
            "installed",
            "install_failures",
            "rollbacks",
            "health_failures",
            "deferred",
            "declined",
        )
        return {k: sum(getattr(p, k) for p in self.progress) for k in keys}


def _phases(c: Campaign) -> list[Phase]:
    return [
        Phase(
            name=p["name"],
            vehicles=p.get("vehicles"),
            percent=p.get("percent"),
            minutes=float(p["minutes"]),
            halt=tuple(parse_rule(n, v) for n, v in p.get("halt", {}).items()),
        )
        for p in c.phases
    ]


class Campaigns(CampaignOutcomes, CampaignAssigning):
    """Campaign creation, phases, halt rules and operator controls."""

    # --- vehicle attributes (what target filters read) ------------------------

    def set_vehicle_attributes(
        self, vin: str, attributes: Mapping[str, str | None]
    ) -> dict[str, str]:
        """Set (or with ``None`` remove) attributes of a vehicle; return all of them."""
        if len(attributes) > 64:
            raise InvalidRequestError("at most 64 attributes at a time")
        clean: dict[str, str | None] = {}
        for name, value in attributes.items():
            if value is not None and (not isinstance(value, str) or len(value) > 255):
                raise InvalidRequestError(f"attribute {name!r}: value must be text of 0-255")
            clean[check_attribute(name)] = value
        with self.db.transaction(write=True) as session:
            vehicle = self._vehicle(session, vin, lock=True)
            for name, value in clean.items():
                session.execute(
                    delete(VehicleAttribute).where(
                        VehicleAttribute.vehicle_id == vehicle.id, VehicleAttribute.name == name
                    )
                )
                if value is not None:
                    session.add(VehicleAttribute(vehicle_id=vehicle.id, name=name, value=value))
            session.flush()
            rows = session.execute(
                select(VehicleAttribute.name, VehicleAttribute.value).where(
                    VehicleAttribute.vehicle_id == vehicle.id
                )
            )
            return {n: v for n, v in rows}

    # --- operator controls ---------------------------------------------------------

    def create_campaign(
        self, spec: CampaignSpec | Mapping[str, Any], *, actor: str = "operator"
    ) -> CampaignInfo:
        """Store a campaign and start its first phase (assigning its vehicles)."""
        if not isinstance(spec, CampaignSpec):
            spec = CampaignSpec.from_dict(spec)
        bundle = {hw: self._bundle_entry(hw, image) for hw, image in sorted(spec.images.items())}
        rollback = {hw: self._bundle_entry(hw, img) for hw, img in sorted(spec.rollback.items())}
        for hw, entry in rollback.items():
            if entry["release_counter"] <= bundle[hw]["release_counter"]:
                raise ReleaseCounterError(
                    f"rollback image {entry['image']} is release {entry['release_counter']}: "
                    f"ECUs running {bundle[hw]['image']} (release "
                    f"{bundle[hw]['release_counter']}) refuse anything not above it"
                )
        now = self.clock()
        try:
            with self.db.transaction(write=True) as session:
                self._current_root(session)
                campaign = Campaign(
                    name=spec.name,
                    bundle=bundle,
                    target=dict(spec.target),
                    phases=[p.to_json() for p in spec.phases],
                    status=ACTIVE,
                    phase=0,
                    phase_started_at=now,
                    on_halt={"rollback": rollback} if rollback else None,
                    created_at=now,
                    updated_at=now,
                )
                session.add(campaign)
                session.flush()
                self._audit(session, now, actor, "campaign_create", spec.name, str(spec.to_dict()))
                self._select_phase_vehicles(session, campaign, now)
                campaign_id = campaign.id
        except IntegrityError as e:
            raise AlreadyRegisteredError(f"campaign {spec.name!r} exists already") from e
        self._assign_selected(campaign_id)
        logger.info("campaign %s created", spec.name)
        return self.campaign(spec.name)

    def _bundle_entry(self, hw: str, image: str) -> dict[str, Any]:
        """An Image repository target for hardware ``hw``: name, length, hashes, counter."""
        target = self.image_repo.lookup(image)
        try:
            info = UptaneTarget.from_target_file(target)
        except UptaneError as e:
            raise InvalidImageError(f"{image}: {e}") from e
        if hw not in info.hardware_ids:
            raise HardwareMismatchError(
                f"{image} is for hardware {list(info.hardware_ids)}, not {hw!r}"
            )
        return {
            "image": image,
            "length": target.length,
            "hashes": dict(target.hashes),
            "release_counter": info.release_counter,
        }

    def pause_campaign(self, name: str, *, actor: str = "operator") -> CampaignInfo:
        """Stop advancing and assigning until ``resume_campaign``."""
        return self._control(name, actor, "campaign_pause", {ACTIVE}, PAUSED)

    def resume_campaign(self, name: str, *, actor: str = "operator") -> CampaignInfo:
        """Resume a paused campaign; its phase runs its full duration again from now."""
        return self._control(name, actor, "campaign_resume", {PAUSED}, ACTIVE)

    def abort_campaign(self, name: str, *, actor: str = "operator") -> CampaignInfo:
        """End a campaign for good, withdrawing its assignments not installed yet."""
        return self._control(name, actor, "campaign_abort", {ACTIVE, PAUSED, HALTED}, ABORTED)

    def _control(
        self, name: str, actor: str, action: str, allowed: set[str], new: str
    ) -> CampaignInfo:
        now = self.clock()
        with self.db.transaction(write=True) as session:
            campaign = self._campaign_row(session, name, lock=True)
            if campaign.status not in allowed:
                raise CampaignStateError(
                    f"campaign {name!r} is {campaign.status}: cannot {action.split('_')[1]}"
                )
            self._audit(session, now, actor, action, name, f"{campaign.status} -> {new}")
            campaign.status = new
            campaign.updated_at = now
            if new == ACTIVE:
                campaign.phase_started_at = now
            if new == ABORTED:
                self._withdraw(session, campaign, now)
        return self.campaign(name)

    # --- reading ------------------------------------------------------------------

    def campaign(self, name: str) -> CampaignInfo:
        with self.db.transaction() as session:
            return self._info(session, self._campaign_row(session, name))

    def list_campaigns(self) -> list[CampaignInfo]:
        with self.db.transaction() as session:
            rows = session.scalars(select(Campaign).order_by(Campaign.id)).all()
            return [self._info(session, c) for c in rows]

    def campaign_vehicles(self, name: str) -> dict[str, dict[str, Any]]:
        """Each vehicle the campaign reached: phase, state, failures, consent (by VIN)."""
        with self.db.transaction() as session:
            c = self._campaign_row(session, name)
            phases = [p["name"] for p in c.phases]
            rows = session.execute(
                select(Vehicle.vin, CampaignVehicle)
                .join(CampaignVehicle, CampaignVehicle.vehicle_id == Vehicle.id)
                .where(CampaignVehicle.campaign_id == c.id)
                .order_by(Vehicle.vin)
            )
            return {
                vin: {
                    "phase": phases[cv.phase],
                    "status": cv.status,
                    "install_failed": cv.install_failed,
                    "rolled_back": cv.rolled_back,
                    "health_failed": cv.health_failed,
                    "consent": cv.consent,
                    "assigned_at": cv.assigned_at,
                }
                for vin, cv in rows
            }

    def _campaign_row(self, session: Session, name: str, *, lock: bool = False) -> Campaign:
        stmt = select(Campaign).where(Campaign.name == name)
        if lock:
            stmt = stmt.with_for_update()
        campaign = session.scalars(stmt).first()
        if campaign is None:
            raise CampaignNotFoundError(f"no campaign {name[:130]!r}")
        return campaign

    def _info(self, session: Session, c: Campaign) -> CampaignInfo:
        cv = CampaignVehicle
        counted = cv.status.in_([ASSIGNED, INSTALLED_V])

        def n(cond: Any) -> Any:
            return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

        rows = session.execute(
            select(
                cv.phase,
                n(counted),
                n(cv.status == INSTALLED_V),
                n(cv.install_failed),
                n(cv.rolled_back),
                n(cv.health_failed),
                n(cv.consent == "deferred"),
                n(cv.consent == "declined"),
            )
            .where(cv.campaign_id == c.id)
            .group_by(cv.phase)
        ).all()
        by_phase = {r[0]: [int(x) for x in r[1:]] for r in rows}
        group = self._group_size(session, c)
        progress = tuple(
            PhaseProgress(i, p.name, p.size(group), *by_phase.get(i, [0] * 7))
            for i, p in enumerate(_phases(c))
        )
        return CampaignInfo(
            id=c.id,
            name=c.name,
            status=c.status,
            phase=c.phase,
            phase_name=c.phases[c.phase]["name"],
            phase_started_at=c.phase_started_at,
            halt_reason=c.halt_reason,
            images={hw: e["image"] for hw, e in c.bundle.items()},
            target=dict(c.target),
            phases=tuple(dict(p) for p in c.phases),
            group_size=group,
            progress=progress,
            created_at=c.created_at,
            updated_at=c.updated_at,
            rollback={hw: e["image"] for hw, e in (c.on_halt or {}).get("rollback", {}).items()},
        )

    # --- target group -------------------------------------------------------------

    def _group(self, c: Campaign) -> Any:  # a Select of (id, vin)
        stmt: Any = select(Vehicle.id, Vehicle.vin).where(
            exists().where(Ecu.vehicle_id == Vehicle.id, Ecu.hardware_id.in_(list(c.bundle)))
        )
        if "vins" in c.target:
            stmt = stmt.where(Vehicle.vin.in_(list(c.target["vins"])))
        for name, value in c.target.get("attributes", {}).items():
            stmt = stmt.where(
                exists().where(
                    VehicleAttribute.vehicle_id == Vehicle.id,
                    VehicleAttribute.name == name,
                    VehicleAttribute.value == value,
                )
            )
        return stmt

    def _group_size(self, session: Session, c: Campaign) -> int:
        return int(session.scalar(select(func.count()).select_from(self._group(c).subquery())) or 0)

    def _select_phase_vehicles(self, session: Session, c: Campaign, now: datetime) -> int:
        """Add the vehicles the current phase reaches (status ``assigning``)."""
        phase = _phases(c)[c.phase]
        have = int(
            session.scalar(
                select(func.count()).where(
                    CampaignVehicle.campaign_id == c.id,
                    CampaignVehicle.status.not_in([CANCELLED, REFUSED]),
                )
            )
            or 0
        )
        want = phase.size(self._group_size(session, c)) - have
        if want <= 0:
            return 0
        stmt = (
            self._group(c)
            .where(
                ~exists().where(
                    CampaignVehicle.campaign_id == c.id, CampaignVehicle.vehicle_id == Vehicle.id
                ),
                ~active_quarantine(Vehicle.id),
                # not while another campaign's update is on its way to it (it would
                # replace that campaign's pending assignment)
                ~exists().where(
                    CampaignVehicle.vehicle_id == Vehicle.id,
                    CampaignVehicle.campaign_id != c.id,
                    CampaignVehicle.status.in_([ASSIGNING, ASSIGNED]),
                    Campaign.id == CampaignVehicle.campaign_id,
                    Campaign.status.in_([ACTIVE, PAUSED]),
                ),
            )
            .order_by(Vehicle.vin)
            .limit(want)
        )
        chosen = session.execute(stmt).all()
        for vehicle_id, _ in chosen:
            session.add(
                CampaignVehicle(
                    campaign_id=c.id,
                    vehicle_id=vehicle_id,
                    phase=c.phase,
                    status=ASSIGNING,
                    install_failed=False,
                    rolled_back=False,
                    health_failed=False,
                    assigned_at=now,
                    updated_at=now,
                )
            )
        session.flush()
        return len(chosen)

    # --- time -----------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> list[CampaignInfo]:
        """Halt, advance or complete every active campaign at ``now``; return those changed."""
        now = now or self.clock()
        with self.db.transaction() as session:
            ids = list(session.scalars(select(Campaign.id).where(Campaign.status == ACTIVE)))
        changed = []
        for campaign_id in ids:
            with self.db.transaction(write=True) as session:
                c = session.scalars(
                    select(Campaign).where(Campaign.id == campaign_id).with_for_update()
                ).first()
                if c is None or c.status != ACTIVE:
                    continue
                before = (c.status, c.phase)
                self._step(session, c, now)
                moved = (c.status, c.phase) != before
                status_after = c.status
                name = c.name
            self._assign_selected(campaign_id)
            if moved and status_after == HALTED:
                self._roll_back(campaign_id)
            if moved:
                changed.append(self.campaign(name))
        return changed

    def _step(self, session: Session, c: Campaign, now: datetime) -> None:
        phases = _phases(c)
        phase = phases[c.phase]
        info = self._info(session, c)
        totals = info.totals()
        for rule in phase.halt:
            failures = totals[rule.name]
            if rule.violated(failures, totals["assigned"]):
                c.status = HALTED
                c.halt_reason = (
                    f"phase {phase.name}: {rule.name} {failures} of {totals['assigned']} "
                    f"vehicles is over the limit {rule.describe()}"
                )
                c.updated_at = now
                self._audit(session, now, "director", "campaign_halt", c.name, c.halt_reason)
                self._withdraw(session, c, now)
                logger.warning("campaign %s halted: %s", c.name, c.halt_reason)
                return
        if now < c.phase_started_at + timedelta(minutes=phase.minutes):
            return
        c.updated_at = now
        if c.phase + 1 >= len(phases):
            c.status = COMPLETED
            self._audit(session, now, "director", "campaign_complete", c.name, "")
            return
        c.phase += 1
        c.phase_started_at = now
        self._audit(session, now, "director", "campaign_advance", c.name, phases[c.phase].name)
        self._select_phase_vehicles(session, c, now)

    def _audit(
        self, session: Session, now: datetime, actor: str, action: str, subject: str, detail: str
    ) -> None:
        session.add(
            FleetAuditEntry(
                at=now, actor=actor[:128], action=action, subject=subject, detail=detail
            )
        )


class CampaignNotFoundError(NotFoundError):
    """No campaign with this name."""


class CampaignStateError(DirectorError):
    """The campaign is not in a state that allows this operation."""

    reason = "campaign_state"
    status = 409


__all__ = [
    "ABORTED",
    "ACTIVE",
    "COMPLETED",
    "HALTED",
    "HALT_RULES",
    "PAUSED",
    "CampaignInfo",
    "CampaignNotFoundError",
    "CampaignStateError",
    "Campaigns",
    "PhaseProgress",
]
