"""Receiving vehicle version manifests: every check first, then one recording transaction.

Uptane 2.1 5.3.2.1 / 5.4.2: vehicle version manifests are checked against the
inventory (known vehicle, primary signature, every ECU present and no other,
every ECU report signed by that ECU's key, report counters strictly
increasing, report times never going backwards and not too far ahead of the
Director's clock) and recorded in one transaction, or refused with a
``ManifestError`` whose ``reason`` says why and nothing is changed.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.signer import Key
from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.orm import Session

from director.db import (
    Assignment,
    DetectedAttack,
    Ecu,
    InstallResult,
    Vehicle,
    VehicleManifestRecord,
)
from director.envelope import ManifestEnvelope, verify_report
from director.records import (
    INSTALLED,
    PENDING,
    AssignmentInfo,
    AttackInfo,
    ManifestReceipt,
    _assignment_info,
)
from director.signing import _IDENT_RE, _LATEST_ROOT, DirectorRepository
from uptane.errors import ATTACK_REPLAYED_REPORT, ManifestError
from uptane.keys import public_key_from_dict
from uptane.manifest import EcuVersionReport

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")

# Statements of the check-in path, built once (see ``director.signing``).
# a vehicle's ECUs and keys (manifest checks before the lock)
_ECU_KEYS = (
    select(Ecu.serial, Ecu.hardware_id, Ecu.is_primary, Ecu.public_key)
    .join(Vehicle, Ecu.vehicle_id == Vehicle.id)
    .where(Vehicle.vin == bindparam("vin"))
)
# the vehicle, locked, and the latest root version (manifest recording)
_LOCK_VEHICLE = (
    select(Vehicle, _LATEST_ROOT).where(Vehicle.vin == bindparam("vin")).with_for_update(of=Vehicle)
)
# each ECU's report state and pending assignment (at most one), under the lock
_ECU_STATE = (
    select(
        Ecu.id,
        Ecu.serial,
        Ecu.public_key,
        Ecu.last_report_counter,
        Ecu.last_report_time,
        Ecu.last_result,
        Ecu.last_result_text,
        Assignment,
    )
    .outerjoin(Assignment, (Assignment.ecu_id == Ecu.id) & (Assignment.status == PENDING))
    .where(Ecu.vehicle_id == bindparam("vehicle_id"))
)


@dataclass(frozen=True)
class _EcuKey:
    serial: str
    hardware_id: str
    primary: bool
    key: Key


@dataclass
class _Verified:
    """A manifest that passed every check that needs no lock."""

    data: bytes
    keyids: dict[str, str]
    primary: str
    reports: dict[str, EcuVersionReport] = field(default_factory=dict)
    # secondaries' reports left out (not fresh), with why: recorded as attacks
    dropped: dict[str, ManifestError] = field(default_factory=dict)
    dropped_reports: dict[str, EcuVersionReport] = field(default_factory=dict)


def _hashes_match(installed: Mapping[str, Any], assigned: Mapping[str, str]) -> bool:
    """The reported hashes equal the assigned target's, for every function both name.

    At least one function must be in common; an ECU may report fewer hash
    functions than the target lists (the ASN.1 report carries at most four).
    """
    reported = installed.get("hashes")
    if not isinstance(reported, Mapping):
        return False
    common = set(reported) & set(assigned)
    return bool(common) and all(reported[name] == assigned[name] for name in common)


def _db_text(value: str) -> str:
    """Text an ECU chose, made storable everywhere (PostgreSQL refuses NUL)."""
    return value.replace("\x00", "\ufffd")


def _installed_dict(report: EcuVersionReport) -> dict[str, Any] | None:
    if report.installed is None:
        return None
    img = report.installed
    return {
        "filename": _db_text(img.filename),
        "length": img.length,
        "hashes": dict(img.hashes),
        "release_counter": img.release_counter,
    }


_KEY_CACHE: OrderedDict[tuple[str, ...], Key] = OrderedDict()
_KEY_CACHE_MAX = 100_000
_KEY_CACHE_LOCK = threading.Lock()


def _parsed_key(key_dict: Mapping[str, Any]) -> Key:
    """``public_key_from_dict`` of a stored ECU key, cached per process (LRU).

    ECU keys never change, so a parsed key can be reused; the cache is keyed by
    everything that defines the key (keyid, type, scheme, public value), and
    the least recently used entry is evicted when it is full.
    """
    keyval = key_dict.get("keyval")
    public = keyval.get("public") if isinstance(keyval, Mapping) else None
    cache_key = tuple(
        str(v)
        for v in (key_dict.get("keyid"), key_dict.get("keytype"), key_dict.get("scheme"), public)
    )
    with _KEY_CACHE_LOCK:
        key = _KEY_CACHE.get(cache_key)
        if key is not None:
            _KEY_CACHE.move_to_end(cache_key)
            return key
    key = public_key_from_dict(dict(key_dict))
    with _KEY_CACHE_LOCK:
        _KEY_CACHE[cache_key] = key
        while len(_KEY_CACHE) > _KEY_CACHE_MAX:
            _KEY_CACHE.popitem(last=False)
    return key


class ManifestIntake(DirectorRepository):
    """Checks and records vehicle version manifests (5.4.2, 5.3.2.1)."""

    max_manifest: int
    report_time_tolerance: timedelta

    def observe_fleet(
        self,
        session: Session,
        vehicle: Vehicle,
        reports: Mapping[str, EcuVersionReport],
        now: datetime,
    ) -> None:
        """Campaigns, quarantine and health see each accepted manifest (``director.fleet``)."""

    def receive_manifest(self, vin: str, data: bytes) -> ManifestReceipt:
        """Check and record a vehicle version manifest, or raise ``ManifestError``.

        Cheapest refusal first: size and shape, the VIN, the number of
        reports, then the primary signature, and only then is each ECU report
        decoded (once). Nothing is written unless the manifest is accepted
        (one transaction). A secondary's report that is not fresh (counter not
        above its last, time going backwards or too far ahead) does not refuse
        a manifest whose primary signature and primary report are good: it is
        left out and recorded as an attack on that ECU, so one ECU cannot
        silence the vehicle.
        """
        envelope = ManifestEnvelope.from_bytes(data, self.max_manifest)
        if envelope.vin != vin:
            raise ManifestError(
                f"manifest is for vehicle {envelope.vin!r}, sent for {vin!r}", "vin_mismatch"
            )
        keys = self._ecu_keys(vin)
        if len(envelope.reports) > len(keys):
            raise ManifestError(
                f"{len(envelope.reports)} reports for a vehicle of {len(keys)} ECUs",
                "unknown_ecu",
            )
        verified = self._verify(envelope, keys)
        now = self.clock()
        with self.db.transaction(write=True) as session:
            found = session.execute(_LOCK_VEHICLE, {"vin": vin}).first()
            if found is None:
                raise ManifestError(f"no vehicle {vin!r} is registered", "unknown_vehicle")
            vehicle, latest_root_version = found
            ecus: dict[str, Any] = {}
            pending: dict[int, Assignment] = {}
            for row in session.execute(_ECU_STATE, {"vehicle_id": vehicle.id}):
                ecus[row.serial] = row
                if row.Assignment is not None:
                    pending[row.id] = row.Assignment
            if {s: str(e.public_key.get("keyid")) for s, e in ecus.items()} != verified.keyids:
                raise ManifestError("the vehicle's ECUs changed while checking", "unknown_ecu")
            for serial, report in sorted(verified.reports.items()):
                problem = self._stale(serial, report, ecus[serial], now)
                if problem is None:
                    continue
                if serial == verified.primary:  # the manifest itself is not fresh
                    raise problem
                verified.dropped[serial] = problem
            for serial in verified.dropped:
                verified.dropped_reports[serial] = verified.reports.pop(serial)
            return self._record(session, vehicle, ecus, pending, verified, now, latest_root_version)

    def _stale(
        self, serial: str, report: EcuVersionReport, ecu: Any, now: datetime
    ) -> ManifestError | None:
        """Why ``report`` is not fresh for this ECU, or None (5.4.2.1).

        The counter must be above the last accepted one; the ECU's clock never
        goes backwards (equal times are fine: ECUs report whole seconds and
        may share a clock) and is not far ahead of ours.
        """
        last = ecu.last_report_counter
        if last is not None and report.report_counter <= last:
            return ManifestError(
                f"ECU {serial} report counter {report.report_counter} is not above "
                f"{last}: replayed report",
                "replayed_report",
            )
        last_time = ecu.last_report_time
        if last_time is not None and report.latest_time < last_time:
            return ManifestError(
                f"ECU {serial} report time {report.latest_time.isoformat()} is before its "
                f"last report's {last_time.isoformat()}: replayed or tampered clock",
                "report_time_in_past",
            )
        if report.latest_time > now + self.report_time_tolerance:
            return ManifestError(
                f"ECU {serial} report time {report.latest_time.isoformat()} is more than "
                f"{self.report_time_tolerance} ahead of the Director's clock",
                "report_time_in_future",
            )
        return None

    def _ecu_keys(self, vin: str) -> dict[str, _EcuKey]:
        if _IDENT_RE.match(vin) is None:
            raise ManifestError(f"no vehicle {vin[:130]!r} is registered", "unknown_vehicle")
        rows = self.db.read_all(_ECU_KEYS, {"vin": vin})
        if not rows:
            raise ManifestError(f"no vehicle {vin!r} is registered", "unknown_vehicle")
        return {
            r.serial: _EcuKey(r.serial, r.hardware_id, r.is_primary, _parsed_key(r.public_key))
            for r in rows
        }

    def _verify(self, envelope: ManifestEnvelope, keys: dict[str, _EcuKey]) -> _Verified:
        """Every check that needs no lock: signatures, ECU set, report contents.

        The primary signature and the set of ECU serials are checked before
        any report is decoded; each report is decoded once.
        """
        primary = next(k for k in keys.values() if k.primary)
        signature = envelope.verify(primary.key)  # bad_primary_signature
        if envelope.primary_ecu_serial != primary.serial:
            raise ManifestError(
                f"manifest names primary {envelope.primary_ecu_serial!r}, the registered "
                f"primary is {primary.serial!r}",
                "unknown_ecu",
            )
        missing = set(keys) - set(envelope.reports)
        if missing:
            raise ManifestError(f"no report from ECUs {sorted(missing)}", "missing_ecu")
        unknown = set(envelope.reports) - set(keys)
        if unknown:
            names = sorted(str(s)[:130] for s in unknown)
            raise ManifestError(f"ECUs {names} are not in this vehicle", "unknown_ecu")
        verified = _Verified(
            data=envelope.verified_bytes(signature),
            keyids={s: k.key.keyid for s, k in keys.items()},
            primary=primary.serial,
        )
        for serial, text in sorted(envelope.reports.items()):
            ecu = keys[serial]
            report = verify_report(serial, text, ecu.key)  # bad_ecu_signature
            if report.ecu_serial != serial:
                raise ManifestError(
                    f"report filed under {serial!r} is for ECU {report.ecu_serial!r}",
                    "unknown_ecu",
                )
            if report.hardware_id != ecu.hardware_id:
                raise ManifestError(
                    f"ECU {serial} reports hardware id {report.hardware_id!r}, registered "
                    f"{ecu.hardware_id!r}",
                    "unknown_ecu",
                )
            # the ASN.1 module bounds the counter to 0..2**63-1: it fits a BIGINT
            verified.reports[serial] = report
        return verified

    def _record(
        self,
        session: Session,
        vehicle: Vehicle,
        ecus: Mapping[str, Any],
        pending: Mapping[int, Assignment],
        verified: _Verified,
        now: datetime,
        latest_root_version: int | None,
    ) -> ManifestReceipt:
        """Write an accepted manifest: counters, installed images, attacks, results.

        ``pending`` is each ECU's pending assignment by ECU id; ``latest_root_version``
        the newest Director root, both read under the vehicle's lock.
        """
        vehicle.last_seen = now  # flushed with the record: one unit-of-work flush
        record = VehicleManifestRecord(vehicle_id=vehicle.id, received_at=now, body=verified.data)
        session.add(record)
        session.flush()
        self.observe_fleet(session, vehicle, verified.reports, now)  # director.fleet
        completed: list[AssignmentInfo] = []
        attacks: list[AttackInfo] = []
        updates: list[dict[str, Any]] = []
        # An ECU time ahead of ours (within the tolerance) is stored as our time, so an
        # ECU whose fast clock is corrected is not refused until it catches up again.
        cap = now.replace(microsecond=0)
        for serial, report in sorted(verified.reports.items()):
            ecu = ecus[serial]
            installed = _installed_dict(report)
            text = _db_text(report.last_result_text)
            report_time = min(report.latest_time, cap)
            if ecu.last_report_time is not None:
                report_time = max(report_time, ecu.last_report_time)
            updates.append(
                {
                    "ecu_id": ecu.id,
                    "counter": report.report_counter,
                    "at": now,
                    "time": report_time,
                    "b_installed": installed,
                    "result": report.last_result,
                    "text": text,
                }
            )
            for attack in report.attacks_detected:
                session.add(
                    DetectedAttack(
                        vehicle_id=vehicle.id,
                        ecu_id=ecu.id,
                        manifest_id=record.id,
                        attack=attack,
                        report_counter=report.report_counter,
                        detected_at=now,
                    )
                )
                attacks.append(AttackInfo(serial, attack, report.report_counter, now))
            assignment = pending.get(ecu.id)
            done = (
                assignment is not None
                and installed is not None
                and installed["filename"] == assignment.image
                and installed["length"] == assignment.length
                and _hashes_match(installed, assignment.hashes)
            )
            if done and assignment is not None:
                assignment.status = INSTALLED
                assignment.updated_at = now
                completed.append(_assignment_info(assignment, vehicle.vin, serial))
            result_changed = (report.last_result, text) != (ecu.last_result, ecu.last_result_text)
            if done or (result_changed and report.last_result != "ok"):
                session.add(
                    InstallResult(
                        ecu_id=ecu.id,
                        manifest_id=record.id,
                        assignment_id=assignment.id if done and assignment is not None else None,
                        result=report.last_result,
                        text=text,
                        image=installed["filename"] if installed else None,
                        received_at=now,
                    )
                )
        for serial, problem in sorted(verified.dropped.items()):
            dropped = verified.dropped_reports[serial]
            name = ATTACK_REPLAYED_REPORT if problem.reason == "replayed_report" else problem.reason
            session.add(
                DetectedAttack(
                    vehicle_id=vehicle.id,
                    ecu_id=ecus[serial].id,
                    manifest_id=record.id,
                    attack=name,
                    report_counter=dropped.report_counter,
                    detected_at=now,
                )
            )
            attacks.append(AttackInfo(serial, name, dropped.report_counter, now))
            logger.warning(
                "vehicle %s: report of ECU %s left out: %s", vehicle.vin, serial, problem
            )
        ecu_table = Ecu.__table__
        assert isinstance(ecu_table, Table)
        session.execute(
            update(ecu_table)
            .where(ecu_table.c.id == bindparam("ecu_id"))
            .values(
                last_report_counter=bindparam("counter"),
                last_report_at=bindparam("at"),
                last_report_time=bindparam("time"),
                installed=bindparam("b_installed"),
                last_result=bindparam("result"),
                last_result_text=bindparam("text"),
            ),
            updates,
        )
        if completed or self._due(
            vehicle.metadata_expires,
            vehicle.targets_version,
            vehicle.root_version,
            latest_root_version,
            now,
        ):
            self._sign_vehicle(session, vehicle, now)
        if attacks:
            logger.warning(
                "vehicle %s reports attacks: %s",
                vehicle.vin,
                ", ".join(f"{a.ecu_serial}:{a.attack}" for a in attacks),
            )
        return ManifestReceipt(
            vin=vehicle.vin,
            metadata_version=vehicle.targets_version,
            completed=tuple(completed),
            attacks=tuple(attacks),
            refused_reports={s: p.reason for s, p in verified.dropped.items()},
        )
