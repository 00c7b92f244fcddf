"""Quarantine: vehicles that report images the Director never assigned, or keep reporting attacks.

Issue 14. A vehicle is quarantined when an ECU's signed report shows an
image that is neither one the Director assigned to that ECU nor one the ECU
ran before (its first reported image, or an earlier assigned one: a
rollback returns to one of those), or when manifests reported attacks from
inside the vehicle (``spoofed_message``, ``replayed_report``: a rogue node on
its CAN bus) in ``attack_manifests`` manifests (default 3) since it was last
released. Attacks on the network path or the repositories (freeze,
rollback, drop request, mix-and-match...) do not count: the vehicle
defeated them and is not suspect, and counting them would let a network
attacker keep a fleet from its (security) updates by quarantining it.

A quarantined vehicle gets no new assignments (``Director.assign`` refuses
it when named and skips it in fleet-wide assignments; campaigns skip it),
is listed by the operator API and CLI, and stays so until an operator
releases it, which writes an audit entry.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, and_, exists, func, select
from sqlalchemy.orm import Session

from director.db import Assignment, DetectedAttack, Vehicle
from director.errors import DirectorError, InvalidRequestError
from director.fleet_db import FleetAuditEntry, QuarantineEntry, SeenImage
from director.signing import DirectorRepository
from uptane.errors import ATTACK_REPLAYED_REPORT, ATTACK_SPOOFED_MESSAGE
from uptane.manifest import EcuVersionReport, InstalledImage

logger = logging.getLogger("director.quarantine")

UNEXPECTED_IMAGE = "unexpected_image"
REPEATED_ATTACKS = "repeated_attacks"
# attacks only a node inside the vehicle can make
VEHICLE_ATTACKS = frozenset({ATTACK_SPOOFED_MESSAGE, ATTACK_REPLAYED_REPORT})


class QuarantinedError(DirectorError):
    """The vehicle is quarantined: no new assignments until an operator releases it."""

    reason: ClassVar[str] = "quarantined"
    status: ClassVar[int] = 409


@dataclass(frozen=True)
class QuarantineInfo:
    vin: str
    reason: str
    detail: str
    since: datetime
    released_at: datetime | None = None
    released_by: str | None = None


def active_quarantine(vehicle_id: Any) -> ColumnElement[bool]:
    """SQL: the vehicle ``vehicle_id`` (a column or value) is quarantined now."""
    return exists().where(
        QuarantineEntry.vehicle_id == vehicle_id, QuarantineEntry.released_at.is_(None)
    )


def quarantined_vins(session: Session, vins: Sequence[str]) -> set[str]:
    """Which of ``vins`` are quarantined."""
    out: set[str] = set()
    for i in range(0, len(vins), 1000):
        out.update(
            session.scalars(
                select(Vehicle.vin).where(
                    Vehicle.vin.in_(list(vins[i : i + 1000])), active_quarantine(Vehicle.id)
                )
            )
        )
    return out


def exclude_quarantined(session: Session, vins: list[str], *, named: bool) -> list[str]:
    """``vins`` without quarantined vehicles; ``QuarantinedError`` if ``named`` and any is."""
    held = quarantined_vins(session, vins)
    if held and named:
        raise QuarantinedError(f"vehicles {sorted(held)[:20]} are quarantined")
    return [v for v in vins if v not in held]


def image_digest(img: InstalledImage | Mapping[str, Any]) -> str:
    """``function:hex`` of an image's sha256 (or its first hash by name)."""
    hashes = img.hashes if isinstance(img, InstalledImage) else img.get("hashes", {})
    name = "sha256" if "sha256" in hashes else min(hashes)
    return f"{name}:{hashes[name]}"


def _same_image(img: InstalledImage, hashes: Mapping[str, str]) -> bool:
    common = set(img.hashes) & set(hashes)
    return bool(common) and all(img.hashes[h] == hashes[h] for h in common)


class QuarantineControl(DirectorRepository):
    """Detecting, listing and releasing quarantined vehicles."""

    attack_manifests: int = 3

    def observe_quarantine(
        self,
        session: Session,
        vehicle: Vehicle,
        previous: Mapping[str, Any],
        reports: Mapping[str, EcuVersionReport],
        now: datetime,
    ) -> str | None:
        """Check an accepted manifest; quarantine the vehicle if needed. Return the reason."""
        reasons: list[tuple[str, str]] = []
        for serial, report in sorted(reports.items()):
            img = report.installed
            prev = previous[serial]
            if img is None or not img.hashes:
                continue
            digest = image_digest(img)
            if (
                prev.installed
                and prev.installed.get("hashes")
                and (image_digest(prev.installed) == digest)
            ):
                continue  # unchanged
            seen = session.get(SeenImage, (prev.id, digest))
            if seen is not None:
                continue
            first = prev.last_report_counter is None
            assigned = first or any(
                _same_image(img, h)
                for h in session.scalars(
                    select(Assignment.hashes).where(Assignment.ecu_id == prev.id)
                )
            )
            if assigned:
                session.add(SeenImage(ecu_id=prev.id, digest=digest))
                continue
            reasons.append(
                (
                    UNEXPECTED_IMAGE,
                    f"ECU {serial} reports {img.filename} ({digest[:24]}...), which the "
                    "Director never assigned and the ECU never ran",
                )
            )
        tampering = {a for r in reports.values() for a in r.attacks_detected} & VEHICLE_ATTACKS
        if tampering:
            released = session.scalar(
                select(func.max(QuarantineEntry.released_at)).where(
                    QuarantineEntry.vehicle_id == vehicle.id
                )
            )
            cond = [
                DetectedAttack.vehicle_id == vehicle.id,
                DetectedAttack.attack.in_(sorted(VEHICLE_ATTACKS)),
            ]
            if released is not None:
                cond.append(DetectedAttack.detected_at > released)
            earlier = int(
                session.scalar(
                    select(func.count(func.distinct(DetectedAttack.manifest_id))).where(and_(*cond))
                )
                or 0
            )
            if earlier + 1 >= self.attack_manifests:
                reasons.append(
                    (
                        REPEATED_ATTACKS,
                        f"{earlier + 1} manifests reported attacks (now: {', '.join(sorted(tampering))})",
                    )
                )
        if not reasons:
            return None
        held = session.scalar(select(active_quarantine(vehicle.id)))
        if not held:
            reason, detail = reasons[0]
            session.add(
                QuarantineEntry(vehicle_id=vehicle.id, reason=reason, detail=detail, since=now)
            )
            logger.warning("vehicle %s quarantined (%s): %s", vehicle.vin, reason, detail)
        return reasons[0][0]

    def list_quarantined(self, *, include_released: bool = False) -> list[QuarantineInfo]:
        """Quarantined vehicles (and with ``include_released`` past quarantines)."""
        stmt = select(QuarantineEntry, Vehicle.vin).join(
            Vehicle, Vehicle.id == QuarantineEntry.vehicle_id
        )
        if not include_released:
            stmt = stmt.where(QuarantineEntry.released_at.is_(None))
        with self.db.transaction() as session:
            return [
                QuarantineInfo(vin, q.reason, q.detail, q.since, q.released_at, q.released_by)
                for q, vin in session.execute(stmt.order_by(QuarantineEntry.id))
            ]

    def release_quarantine(self, vin: str, *, actor: str, note: str = "") -> QuarantineInfo:
        """Release a quarantined vehicle (an operator decision, written to the audit log)."""
        if not actor or len(actor) > 128:
            raise InvalidRequestError("name who releases the vehicle (1-128 characters)")
        now = self.clock()
        with self.db.transaction(write=True) as session:
            vehicle = self._vehicle(session, vin, lock=True)
            entry = session.scalars(
                select(QuarantineEntry).where(
                    QuarantineEntry.vehicle_id == vehicle.id, QuarantineEntry.released_at.is_(None)
                )
            ).first()
            if entry is None:
                raise NotQuarantinedError(f"vehicle {vin!r} is not quarantined")
            entry.released_at = now
            entry.released_by = actor
            # what it runs now is accepted from here on
            session.add(
                FleetAuditEntry(
                    at=now,
                    actor=actor,
                    action="quarantine_release",
                    subject=vin,
                    detail=f"{entry.reason}: {entry.detail}; note: {note[:1000]}",
                )
            )
            self._accept_running(session, vehicle)
            return QuarantineInfo(vin, entry.reason, entry.detail, entry.since, now, actor)

    def _accept_running(self, session: Session, vehicle: Vehicle) -> None:
        for ecu in vehicle.ecus:
            if ecu.installed and ecu.installed.get("hashes"):
                digest = image_digest(ecu.installed)
                if session.get(SeenImage, (ecu.id, digest)) is None:
                    session.add(SeenImage(ecu_id=ecu.id, digest=digest))

    def fleet_audit_log(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest ``limit`` audit entries, newest first."""
        with self.db.transaction() as session:
            rows = session.scalars(
                select(FleetAuditEntry).order_by(FleetAuditEntry.id.desc()).limit(limit)
            )
            return [
                {
                    "at": r.at,
                    "actor": r.actor,
                    "action": r.action,
                    "subject": r.subject,
                    "detail": r.detail,
                }
                for r in rows
            ]


class NotQuarantinedError(DirectorError):
    """Release asked for a vehicle that is not quarantined."""

    reason: ClassVar[str] = "not_quarantined"
    status: ClassVar[int] = 409
