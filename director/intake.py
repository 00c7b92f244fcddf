"""Receiving vehicle version manifests: every check first, then one recording transaction.

Uptane 2.1 5.3.2.1 / 5.4.2: vehicle version manifests are checked against the
inventory (known vehicle, primary signature, every ECU present and no other,
every ECU report signed by that ECU's key, report counters strictly
increasing, report times never going backwards and not too far ahead of the
Director's clock) and recorded in one transaction, or refused with a
``ManifestError`` whose ``reason`` says why and nothing is changed.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from securesystemslib.signer import Key
from sqlalchemy import Connection, Row
from sqlalchemy.orm import Session

from director import intake_sql as sql
from director.db import (
    Vehicle,
)
from director.envelope import ManifestEnvelope, verify_report
from director.records import (
    INSTALLED,
    AssignmentInfo,
    AttackInfo,
    ManifestReceipt,
)
from director.signing import _IDENT_RE, DirectorRepository
from uptane.errors import ATTACK_REPLAYED_REPORT, ManifestError
from uptane.keys import public_key_from_dict
from uptane.manifest import EcuVersionReport

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")


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


def _naive_utc(value: datetime) -> str:
    """``value`` as the database stores it (``director.db.UTCDateTime``): naive UTC, ISO."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat()


def _changes_record(
    report: EcuVersionReport, ecu: Any, installed: Mapping[str, Any] | None, text: str
) -> bool:
    """Whether ``report`` says more than a new counter and time for this ECU.

    Its first report, another installed image or install result, or another
    health than stored: such a manifest is kept in ``manifests`` (5.4.2.2).
    """
    if ecu.last_report_counter is None:
        return True
    if installed != ecu.installed or (report.last_result, text) != (
        ecu.last_result,
        ecu.last_result_text,
    ):
        return True
    h = report.health
    return h is not None and (
        h.status,
        h.traps,
        dict(h.capability_denials),
        dict(h.rollbacks),
    ) != (ecu.health_status, ecu.health_traps, ecu.health_denials, ecu.health_rollbacks)


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
        previous: Mapping[str, Any] | None = None,
    ) -> None:
        """Campaigns, quarantine and health see each accepted manifest (``director.fleet``).

        ``previous``: each ECU's stored state before this manifest, by serial
        (``sql.ECU_STATE`` rows), when the caller read it already.
        """

    def receive_manifest(self, vin: str, data: bytes) -> ManifestReceipt:
        """Check and record a vehicle version manifest, or raise ``ManifestError``.

        Cheapest refusal first: size and shape, the VIN, the number of
        reports, then the primary signature, and only then is each ECU report
        decoded (once). Nothing is written unless the manifest is accepted
        (one transaction, committed before the answer). A secondary's report
        that is not fresh (counter not above its last, time going backwards
        or too far ahead) does not refuse a manifest whose primary signature
        and primary report are good: it is left out and recorded as an attack
        on that ECU, so one ECU cannot silence the vehicle.

        Issue 12: Core statements only; the transaction is the vehicle's
        update (its lock, last check-in and latest manifest), one read of the
        ECUs' state, one write of their new state and, only when the manifest
        changed what is recorded, a ``manifests`` row (``_record``).
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
            conn = session.connection()
            found = conn.execute(
                sql.TOUCH_VEHICLE, {"b_vin": vin, "b_now": now, "b_body": verified.data}
            ).first()
            if found is None:
                raise ManifestError(f"no vehicle {vin!r} is registered", "unknown_vehicle")
            ecus = {
                row.serial: row for row in conn.execute(sql.ECU_STATE, {"vehicle_id": found.id})
            }
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
            return self._record(session, conn, vin, found, ecus, verified, now)

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
        rows = self.db.read_all(sql.ECU_KEYS, {"vin": vin})
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
        conn: Connection,
        vin: str,
        vehicle: Row[Any],
        ecus: Mapping[str, Any],
        verified: _Verified,
        now: datetime,
    ) -> ManifestReceipt:
        """Write an accepted manifest: counters, installed images, attacks, results.

        ``vehicle`` is the locked vehicle's row (``sql.TOUCH_VEHICLE``), ``ecus`` each
        ECU's state and pending assignment read under that lock (``sql.ECU_STATE``).
        The manifest gets a ``manifests`` row only when it changes what is
        recorded (``_changes_record``), reports an attack or a result, or has a
        report left out: a check-in that only moves counters and times is kept
        as the vehicle's ``last_manifest`` alone (issue 12, docs/director-scale.md).
        """
        completed: list[AssignmentInfo] = []
        attacks: list[AttackInfo] = []
        attack_rows: list[dict[str, Any]] = []
        result_rows: list[dict[str, Any]] = []
        updates: list[dict[str, Any]] = []
        changed = bool(verified.dropped)
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
                    "b_ecu_id": ecu.id,
                    "counter": report.report_counter,
                    "at": now,
                    "time": report_time,
                    "b_installed": installed,
                    "result": report.last_result,
                    "text": text,
                }
            )
            changed = changed or _changes_record(report, ecu, installed, text)
            for attack in report.attacks_detected:
                attack_rows.append(
                    {"ecu_id": ecu.id, "attack": attack, "report_counter": report.report_counter}
                )
                attacks.append(AttackInfo(serial, attack, report.report_counter, now))
            done = (
                ecu.a_id is not None
                and installed is not None
                and installed["filename"] == ecu.a_image
                and installed["length"] == ecu.a_length
                and _hashes_match(installed, ecu.a_hashes)
            )
            if done:
                completed.append(
                    AssignmentInfo(
                        id=ecu.a_id,
                        vin=vin,
                        ecu_serial=serial,
                        image=ecu.a_image,
                        length=ecu.a_length,
                        hashes=dict(ecu.a_hashes),
                        custom=dict(ecu.a_custom),
                        status=INSTALLED,
                        created_at=ecu.a_created_at,
                    )
                )
            result_changed = (report.last_result, text) != (ecu.last_result, ecu.last_result_text)
            if done or (result_changed and report.last_result != "ok"):
                result_rows.append(
                    {
                        "ecu_id": ecu.id,
                        "assignment_id": ecu.a_id if done else None,
                        "result": report.last_result,
                        "text": text,
                        "image": installed["filename"] if installed else None,
                        "received_at": now,
                    }
                )
        for serial, problem in sorted(verified.dropped.items()):
            dropped = verified.dropped_reports[serial]
            name = ATTACK_REPLAYED_REPORT if problem.reason == "replayed_report" else problem.reason
            attack_rows.append(
                {
                    "ecu_id": ecus[serial].id,
                    "attack": name,
                    "report_counter": dropped.report_counter,
                }
            )
            attacks.append(AttackInfo(serial, name, dropped.report_counter, now))
            logger.warning("vehicle %s: report of ECU %s left out: %s", vin, serial, problem)
        manifest_id: int | None = None
        if changed or attack_rows or result_rows:
            manifest_id = conn.execute(
                sql.INSERT_MANIFEST,
                {"vehicle_id": vehicle.id, "received_at": now, "body": verified.data},
            ).scalar_one()
        # campaigns, quarantine, health (``director.fleet``) see the state before this manifest
        self.observe_fleet(session, Vehicle(id=vehicle.id, vin=vin), verified.reports, now, ecus)
        if attack_rows:
            conn.execute(
                sql.INSERT_ATTACK,
                [
                    {**r, "vehicle_id": vehicle.id, "manifest_id": manifest_id, "detected_at": now}
                    for r in attack_rows
                ],
            )
        if completed:
            conn.execute(sql.COMPLETE, [{"b_id": a.id, "b_now": now} for a in completed])
        if result_rows:
            conn.execute(
                sql.INSERT_RESULT, [{**r, "manifest_id": manifest_id} for r in result_rows]
            )
        self._write_ecus(conn, updates)
        metadata_version: int = vehicle.targets_version
        if completed or self._due(
            vehicle.metadata_expires,
            vehicle.targets_version,
            vehicle.root_version,
            vehicle.latest_root,
            now,
        ):
            signed = session.get_one(Vehicle, vehicle.id)
            self._sign_vehicle(session, signed, now)
            metadata_version = signed.targets_version
        if attacks:
            logger.warning(
                "vehicle %s reports attacks: %s",
                vin,
                ", ".join(f"{a.ecu_serial}:{a.attack}" for a in attacks),
            )
        return ManifestReceipt(
            vin=vin,
            metadata_version=metadata_version,
            completed=tuple(completed),
            attacks=tuple(attacks),
            refused_reports={s: p.reason for s, p in verified.dropped.items()},
        )

    def _write_ecus(self, conn: Connection, updates: list[dict[str, Any]]) -> None:
        """Every ECU's new report state: one statement on PostgreSQL, one per ECU on SQLite."""
        if not self.db.is_postgresql:
            conn.execute(sql.UPDATE_ECU, updates)
            return
        rows = [
            {
                "id": u["b_ecu_id"],
                "counter": u["counter"],
                "at": _naive_utc(u["at"]),
                "time": _naive_utc(u["time"]),
                "installed": u["b_installed"],
                "result": u["result"],
                "text": u["text"],
            }
            for u in updates
        ]
        written = conn.execute(sql.UPDATE_ECUS_PG, {"rows": json.dumps(rows)}).rowcount
        if written != len(rows):  # the rows were read under the vehicle's lock
            raise RuntimeError(f"{written} of {len(rows)} ECU rows updated")
