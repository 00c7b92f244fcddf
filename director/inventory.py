"""The vehicle inventory: registering vehicles and their ECU keys, and their status.

Uptane 2.1 5.4.2.2: every ECU is registered with its public key, which never
changes afterwards; exactly one ECU of a vehicle is its primary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import Key, SSlibKey
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from director.db import Assignment, AuditEntry, DetectedAttack, Ecu, InstallResult, Vehicle
from director.errors import AlreadyRegisteredError, InvalidRequestError, UnknownEcuSerialError
from director.records import (
    PENDING,
    AssignmentInfo,
    AttackInfo,
    AuditInfo,
    EcuSpec,
    EcuStatus,
    InstallResultInfo,
    VehicleStatus,
    _assignment_info,
)
from director.signing import _IDENT_RE, DirectorRepository
from uptane.errors import KeyLoadError, UptaneError
from uptane.keys import public_key_dict, public_key_from_dict
from uptane.metadata import check_identifier

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")

MAX_ECUS = 256


def check_ecu_key(key_dict: object) -> Key:
    """Parse an ECU public key (a TUF ed25519 key dict; ``keyid`` checked if given)."""
    if not isinstance(key_dict, Mapping):
        raise InvalidRequestError("public_key must be a TUF key object")
    given = key_dict.get("keyid")
    rest = {k: v for k, v in key_dict.items() if k != "keyid"}
    try:
        key = public_key_from_dict(rest)
    except KeyLoadError as e:  # already says "invalid public key: ..."
        raise InvalidRequestError(str(e)) from e
    except (AttributeError, ValueError, TypeError, KeyError) as e:
        raise InvalidRequestError(f"invalid public key: {e}") from e
    if key.keytype != "ed25519" or key.scheme != "ed25519":
        raise InvalidRequestError("ECU keys must be ed25519 (DESIGN 3)")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(key.keyval.get("public", ""))))
    except ValueError as e:
        raise InvalidRequestError(f"invalid ed25519 public key: {e}") from e
    if given is not None and given != key.keyid:
        raise InvalidRequestError(f"keyid {given!r} does not match the key (expected {key.keyid})")
    # keep only what identifies the key (no unrecognized fields into the inventory)
    return SSlibKey(key.keyid, key.keytype, key.scheme, {"public": key.keyval["public"]})


class Inventory(DirectorRepository):
    """Registration and status of vehicles and their ECUs."""

    def register_vehicle(self, vin: str, ecus: Sequence[EcuSpec]) -> VehicleStatus:
        """Register a vehicle and its ECUs with their public keys (5.4.2.2).

        Exactly one ECU is the primary. Serials and keys are unique; ECU keys
        never change afterwards. The vehicle's first (empty) targets are signed
        in the same transaction.
        """
        try:
            check_identifier(vin, "vin")
            for ecu in ecus:
                check_identifier(ecu.serial, "ecu serial")
                check_identifier(ecu.hardware_id, "hardware id")
        except UptaneError as e:
            raise InvalidRequestError(str(e)) from e
        names = [vin, *(e.serial for e in ecus), *(e.hardware_id for e in ecus)]
        if any(_IDENT_RE.match(name) is None for name in names):  # e.g. a trailing newline
            raise InvalidRequestError("identifiers are letters, digits and ._:- only")
        if not 1 <= len(ecus) <= MAX_ECUS:
            raise InvalidRequestError(f"a vehicle needs 1-{MAX_ECUS} ECUs")
        if sum(1 for e in ecus if e.primary) != 1:
            raise InvalidRequestError("exactly one ECU must be the primary")
        if len({e.serial for e in ecus}) != len(ecus):
            raise InvalidRequestError("ECU serials repeat")
        if len({e.public_key.keyid for e in ecus}) != len(ecus):
            raise InvalidRequestError("every ECU needs its own key")
        now = self.clock()
        try:
            with self.db.transaction(write=True) as session:
                self._current_root(session)
                if session.scalars(select(Vehicle.id).where(Vehicle.vin == vin)).first():
                    raise AlreadyRegisteredError(f"vehicle {vin!r} is registered already")
                taken = session.scalars(
                    select(Ecu.serial).where(Ecu.serial.in_([e.serial for e in ecus]))
                ).all()
                if taken:
                    raise AlreadyRegisteredError(f"ECU serials registered already: {sorted(taken)}")
                vehicle = Vehicle(vin=vin, created_at=now, root_version=0, targets_version=0)
                for spec in ecus:
                    vehicle.ecus.append(
                        Ecu(
                            serial=spec.serial,
                            hardware_id=spec.hardware_id,
                            public_key=public_key_dict(spec.public_key),
                            is_primary=spec.primary,
                        )
                    )
                session.add(vehicle)
                session.flush()
                self._sign_vehicle(session, vehicle, now, new=True)
                status = self._statuses(session, [vehicle])[0]
        except IntegrityError as e:  # a concurrent registration won the race
            raise AlreadyRegisteredError(f"vehicle {vin!r} or one of its ECUs exists") from e
        logger.info("registered vehicle %s with %d ECUs", vin, len(ecus))
        return status

    def reset_report_counter(
        self, vin: str, serial: str, *, reason: str, actor: str = "operator"
    ) -> AuditInfo:
        """Forget an ECU's last report counter, with an audit entry (5.4.2.1).

        For an ECU that was reflashed (its counter starts again) or whose
        counter a compromised ECU jammed (say 2^63-1): until then the Director
        leaves its reports out of every manifest and records them as attacks.
        The ECU's next report sets the counter again; its report time floor
        stays.
        """
        reason = reason.strip()
        if not 1 <= len(reason) <= 500:
            raise InvalidRequestError("give a reason of 1-500 characters")
        now = self.clock()
        with self.db.transaction(write=True) as session:
            vehicle = self._vehicle(session, vin, lock=True)
            ecu = session.scalars(
                select(Ecu).where(Ecu.vehicle_id == vehicle.id, Ecu.serial == serial)
            ).first()
            if ecu is None:
                raise UnknownEcuSerialError(f"vehicle {vin} has no ECU {serial[:130]!r}")
            entry = AuditEntry(
                at=now,
                actor=actor[:64],
                action="reset_report_counter",
                vin=vin,
                ecu_serial=serial,
                detail={"previous_counter": ecu.last_report_counter, "reason": reason},
            )
            ecu.last_report_counter = None
            session.add(entry)
            session.flush()
            info = _audit_info(entry)
        logger.warning(
            "%s reset the report counter of ECU %s of %s (was %s): %s",
            info.actor,
            serial,
            vin,
            info.detail["previous_counter"],
            reason,
        )
        return info

    def audit_log(self, limit: int = 1000) -> list[AuditInfo]:
        """The latest ``limit`` audit entries, newest first."""
        with self.db.transaction() as session:
            rows = session.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit))
            return [_audit_info(e) for e in rows]

    def list_vehicles(self) -> list[VehicleStatus]:
        """Every vehicle's status (a few bulk queries per 500 vehicles)."""
        out: list[VehicleStatus] = []
        with self.db.transaction() as session:
            vehicles = session.scalars(select(Vehicle).order_by(Vehicle.vin)).all()
            for i in range(0, len(vehicles), 500):
                out.extend(self._statuses(session, vehicles[i : i + 500]))
        return out

    def vehicle_status(self, vin: str) -> VehicleStatus:
        with self.db.transaction() as session:
            return self._statuses(session, [self._vehicle(session, vin)])[0]

    def _statuses(
        self, session: Session, vehicles: Sequence[Vehicle], limit: int = 100
    ) -> list[VehicleStatus]:
        """Status of ``vehicles``: the latest ``limit`` attacks and results of each."""
        ids = [v.id for v in vehicles]
        ecus: dict[int, list[Ecu]] = {i: [] for i in ids}
        for ecu in session.scalars(select(Ecu).where(Ecu.vehicle_id.in_(ids)).order_by(Ecu.serial)):
            ecus[ecu.vehicle_id].append(ecu)
        pending: dict[int, list[AssignmentInfo]] = {i: [] for i in ids}
        attacks: dict[int, list[AttackInfo]] = {i: [] for i in ids}
        results: dict[int, list[InstallResultInfo]] = {i: [] for i in ids}
        vins = {v.id: v.vin for v in vehicles}
        for a, vid, serial in session.execute(
            select(Assignment, Ecu.vehicle_id, Ecu.serial)
            .join(Ecu, Assignment.ecu_id == Ecu.id)
            .where(Ecu.vehicle_id.in_(ids), Assignment.status == PENDING)
            .order_by(Assignment.id)
        ):
            pending[vid].append(_assignment_info(a, vins[vid], serial))
        rank = (
            func.row_number()
            .over(partition_by=DetectedAttack.vehicle_id, order_by=DetectedAttack.id.desc())
            .label("rank")
        )
        latest = (
            select(DetectedAttack.id, rank).where(DetectedAttack.vehicle_id.in_(ids)).subquery()
        )
        for at, serial in session.execute(
            select(DetectedAttack, Ecu.serial)
            .join(latest, latest.c.id == DetectedAttack.id)
            .join(Ecu, Ecu.id == DetectedAttack.ecu_id)
            .where(latest.c.rank <= limit)
            .order_by(DetectedAttack.id.desc())
        ):
            attacks[at.vehicle_id].append(
                AttackInfo(serial, at.attack, at.report_counter, at.detected_at)
            )
        rank = (
            func.row_number()
            .over(partition_by=Ecu.vehicle_id, order_by=InstallResult.id.desc())
            .label("rank")
        )
        latest = (
            select(InstallResult.id, Ecu.vehicle_id, rank)
            .join(Ecu, Ecu.id == InstallResult.ecu_id)
            .where(Ecu.vehicle_id.in_(ids))
            .subquery()
        )
        for r, serial, vid in session.execute(
            select(InstallResult, Ecu.serial, latest.c.vehicle_id)
            .join(latest, latest.c.id == InstallResult.id)
            .join(Ecu, Ecu.id == InstallResult.ecu_id)
            .where(latest.c.rank <= limit)
            .order_by(InstallResult.id.desc())
        ):
            results[vid].append(InstallResultInfo(serial, r.result, r.text, r.image, r.received_at))
        return [
            VehicleStatus(
                vin=v.vin,
                created_at=v.created_at,
                last_seen=v.last_seen,
                metadata_version=v.targets_version,
                metadata_expires=v.metadata_expires,
                ecus=tuple(
                    EcuStatus(
                        serial=e.serial,
                        hardware_id=e.hardware_id,
                        primary=e.is_primary,
                        keyid=str(e.public_key.get("keyid", "")),
                        installed=e.installed,
                        report_counter=e.last_report_counter,
                        last_report_at=e.last_report_at,
                        last_result=e.last_result,
                        last_result_text=e.last_result_text,
                        last_report_time=e.last_report_time,
                    )
                    for e in ecus[v.id]
                ),
                pending=tuple(pending[v.id]),
                attacks=tuple(attacks[v.id]),
                results=tuple(results[v.id]),
            )
            for v in vehicles
        ]


def _audit_info(e: AuditEntry) -> AuditInfo:
    return AuditInfo(e.id, e.at, e.actor, e.action, e.vin, e.ecu_serial, dict(e.detail))
