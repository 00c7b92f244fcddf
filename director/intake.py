"""Receiving vehicle version manifests: every check first, then one recording transaction.

Uptane 2.1 5.3.2.1 / 5.4.2: vehicle version manifests are checked against the
inventory (known vehicle, primary signature, every ECU present and no other,
every ECU report signed by that ECU's key, report counters strictly
increasing, report times never going backwards and not too far ahead of the
Director's clock) and recorded in one transaction, or refused with a
``ManifestError`` whose ``reason`` says why and nothing is changed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.signer import Key
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from director import intake_sql as sql
from director.db import Vehicle
from director.envelope import ManifestEnvelope, verify_report
from director.group_commit import GroupCommit
from director.intake_plan import Plan, Verified, db_text, naive_utc, plan_record
from director.records import ManifestReceipt
from director.signing import _IDENT_RE, DirectorRepository
from uptane.errors import ManifestError
from uptane.keys import public_key_from_dict
from uptane.manifest import EcuVersionReport

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")
# ``director.fleet`` stores ECU text the same way
_db_text = db_text
# most manifests written in one transaction (``director.group_commit``)
MAX_BATCH = 32
# vehicles whose ECU keys a process keeps (``ManifestIntake._ecu_keys``)
_VIN_KEYS_MAX = 10_000


@dataclass(frozen=True)
class _EcuKey:
    serial: str
    hardware_id: str
    primary: bool
    key: Key


class CachedKeyRefusal(Exception):
    """``check_manifest_cached`` refused a manifest with cached keys: ``recheck_manifest`` it."""

    def __init__(
        self, envelope: ManifestEnvelope, keys: dict[str, _EcuKey], refused: ManifestError
    ) -> None:
        super().__init__(str(refused))
        self.envelope = envelope
        self.keys = keys
        self.refused = refused


class _EcusChanged(ManifestError):
    """The vehicle's ECUs or keys are not those the manifest was checked with."""

    def __init__(self) -> None:
        super().__init__("the vehicle's ECUs changed while checking", "unknown_ecu")


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


class _IntakeState:
    """Per ``Director``: the group commit of manifests and the ECU keys of recent VINs."""

    def __init__(self, write: Any) -> None:
        self.group: GroupCommit[Verified, ManifestReceipt] = GroupCommit(
            write, key=lambda v: v.vin, max_batch=MAX_BATCH
        )
        self.keys: OrderedDict[str, dict[str, _EcuKey]] = OrderedDict()
        self.lock = threading.Lock()


_STATE_LOCK = threading.Lock()


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

    def _intake(self) -> _IntakeState:
        state = self.__dict__.get("_intake_state")
        if state is None:
            with _STATE_LOCK:
                state = self.__dict__.get("_intake_state")
                if state is None:
                    state = self.__dict__["_intake_state"] = _IntakeState(self._write_batch)
        assert isinstance(state, _IntakeState)
        return state

    def receive_manifest(self, vin: str, data: bytes) -> ManifestReceipt:
        """Check and record a vehicle version manifest, or raise ``ManifestError``.

        Cheapest refusal first: size and shape, the VIN, the vehicle (its ECU
        keys), the number of reports, then the primary signature, and only
        then is each ECU report decoded (once). Nothing is written unless the
        manifest is accepted, and it returns only once the transaction that
        wrote it committed. A secondary's report that is not fresh (counter
        not above its last, time going backwards or too far ahead) does not
        refuse a manifest whose primary signature and primary report are
        good: it is left out and recorded as an attack on that ECU, so one ECU
        cannot silence the vehicle.

        Issue 12: the checks that need no lock run in the request's thread;
        the manifests checked meanwhile are then written together, in one
        transaction of Core statements (``_write_batch``).
        """
        envelope = self._envelope(vin, data)
        state = self._intake()
        from_cache = False
        try:
            with state.group.arriving() as arrival:  # the writer may wait for it (group commit)
                keys, from_cache = self._ecu_keys(vin, state, cached=True)
                return state.group.submit(self._verify(envelope, keys, from_cache), arrival)
        except ManifestError as refused:
            if not from_cache:
                raise
            return self.recheck_manifest(envelope, keys, refused)

    def _envelope(self, vin: str, data: bytes) -> ManifestEnvelope:
        envelope = ManifestEnvelope.from_bytes(data, self.max_manifest)
        if envelope.vin != vin:
            raise ManifestError(
                f"manifest is for vehicle {envelope.vin!r}, sent for {vin!r}", "vin_mismatch"
            )
        return envelope

    def check_manifest_cached(
        self, vin: str, data: bytes
    ) -> tuple[ManifestEnvelope, dict[str, _EcuKey], Verified] | None:
        """``receive_manifest``'s checks with no database: on the event loop (issue 12).

        None when the vehicle's ECU keys are not in this process's cache (the
        caller then runs ``receive_manifest`` in a thread). Refusals before
        the keys are needed (size, shape, VIN) are final; a refusal by the
        cached keys is final only after ``recheck_manifest``.
        """
        envelope = self._envelope(vin, data)
        state = self._intake()
        if _IDENT_RE.match(vin) is None:
            raise ManifestError(f"no vehicle {vin[:130]!r} is registered", "unknown_vehicle")
        with state.lock:
            keys = state.keys.get(vin)
            if keys is None:
                return None
            state.keys.move_to_end(vin)
        try:
            return envelope, keys, self._verify(envelope, keys, True)
        except ManifestError as refused:
            raise CachedKeyRefusal(envelope, keys, refused) from refused

    def record_manifest_async(self, verified: Verified) -> asyncio.Future[ManifestReceipt]:
        """Write a manifest ``check_manifest_cached`` verified: its receipt, once committed."""
        return self._intake().group.submit_async(verified)

    def recheck_manifest(
        self, envelope: ManifestEnvelope, keys: dict[str, _EcuKey], refused: ManifestError
    ) -> ManifestReceipt:
        """A manifest refused with cached keys: final if they are still registered.

        Otherwise (a key or ECU changed) it is checked again with what is
        registered, and recorded if it passes. In a thread: it reads the database.
        """
        fresh, _ = self._ecu_keys(envelope.vin, self._intake(), cached=False)
        if fresh == keys and not isinstance(refused, _EcusChanged):
            raise refused
        return self._intake().group.submit(self._verify(envelope, fresh, False))

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

    def _ecu_keys(
        self, vin: str, state: _IntakeState, cached: bool
    ) -> tuple[dict[str, _EcuKey], bool]:
        """The vehicle's ECUs and keys, and whether they came from the cache.

        Kept per process for the last ``_VIN_KEYS_MAX`` vehicles (never for an
        unknown VIN): the recording transaction compares them with the ECU
        rows it locks (``_EcusChanged``), so a changed vehicle is checked again
        with what is registered, never accepted with an old key.
        """
        if _IDENT_RE.match(vin) is None:
            raise ManifestError(f"no vehicle {vin[:130]!r} is registered", "unknown_vehicle")
        if cached:
            with state.lock:
                keys = state.keys.get(vin)
                if keys is not None:
                    state.keys.move_to_end(vin)
                    return keys, True
        rows = self.db.read_all(sql.ECU_KEYS, {"vin": vin})
        if not rows:
            raise ManifestError(f"no vehicle {vin!r} is registered", "unknown_vehicle")
        keys = {
            r.serial: _EcuKey(r.serial, r.hardware_id, r.is_primary, _parsed_key(r.public_key))
            for r in rows
        }
        with state.lock:
            state.keys[vin] = keys
            while len(state.keys) > _VIN_KEYS_MAX:
                state.keys.popitem(last=False)
        return keys, False

    def _verify(
        self, envelope: ManifestEnvelope, keys: dict[str, _EcuKey], cached_keys: bool
    ) -> Verified:
        """Every check that needs no lock: report count, signatures, ECU set, report contents.

        The number of reports, the primary signature and the set of ECU
        serials are checked before any report is decoded; each report is
        decoded once.
        """
        if len(envelope.reports) > len(keys):
            raise ManifestError(
                f"{len(envelope.reports)} reports for a vehicle of {len(keys)} ECUs",
                "unknown_ecu",
            )
        primary = next(k for k in keys.values() if k.primary)
        signature = envelope.verify(primary.key)  # bad_primary_signature
        if envelope.primary_ecu_serial != primary.serial:
            raise ManifestError(
                f"manifest names primary {envelope.primary_ecu_serial!r}, the registered "
                f"primary is {primary.serial!r}",
                "unknown_ecu",
            )
        # A secondary the primary could not reach this cycle does not silence its
        # vehicle: its recorded state is kept and the answer names it (``unreported``).
        # The primary's own report is what makes the manifest this cycle's.
        if primary.serial not in envelope.reports:
            raise ManifestError(f"no report from the primary {primary.serial}", "missing_ecu")
        unreported = tuple(sorted(set(keys) - set(envelope.reports)))
        unknown = set(envelope.reports) - set(keys)
        if unknown:
            names = sorted(str(s)[:130] for s in unknown)
            raise ManifestError(f"ECUs {names} are not in this vehicle", "unknown_ecu")
        reports: dict[str, EcuVersionReport] = {}
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
            reports[serial] = report
        return Verified(
            vin=envelope.vin,
            data=envelope.verified_bytes(signature),
            keyids={s: k.key.keyid for s, k in keys.items()},
            primary=primary.serial,
            reports=reports,
            cached_keys=cached_keys,
            unreported=unreported,
        )

    # --- the recording transaction ---------------------------------------------

    def _write_batch(self, batch: Sequence[Verified]) -> list[ManifestReceipt | ManifestError]:
        """Record checked manifests of distinct vehicles in one transaction (group commit).

        Under the vehicles' locks (taken in VIN order): each vehicle's ECUs must
        be those the manifest was checked with, and each report fresh (a stale
        primary report refuses that manifest, a stale secondary's is left
        out); a refused manifest writes nothing and does not stop the others.
        """
        now = self.clock()
        outcomes: dict[int, ManifestReceipt | ManifestError] = {}
        with self.db.transaction(write=True) as session:
            conn = session.connection()
            vins = [v.vin for v in batch]
            if len(set(vins)) != len(vins):  # they would all pass the same freshness check
                raise ValueError("one manifest per vehicle in a batch")
            if self.db.is_postgresql:
                locked = sql.LOCK_VEHICLES_DRIVER.rows(conn, {"vins": vins})
            else:
                locked = list(conn.execute(sql.LOCK_VEHICLES, {"vins": vins}))
            vehicles = {r.vin: r for r in locked}
            ecus: dict[int, dict[str, Any]] = {r.id: {} for r in vehicles.values()}
            if ecus:
                ids = {"vehicle_ids": list(ecus)}
                if self.db.is_postgresql:
                    rows = sql.ECU_STATE_DRIVER.rows(conn, ids)
                else:
                    rows = list(conn.execute(sql.ECU_STATE, ids))
                for row in rows:
                    ecus[row.vehicle_id][row.serial] = row
            plans: list[tuple[int, Plan]] = []
            for n, verified in enumerate(batch):
                try:
                    plans.append((n, self._plan(verified, vehicles.get(verified.vin), ecus, now)))
                except ManifestError as e:
                    outcomes[n] = e
            if plans:
                self._write_plans(session, conn, [p for _, p in plans], now)
        for n, plan in plans:
            outcomes[n] = plan.receipt()
        return [outcomes[n] for n in range(len(batch))]

    def _plan(
        self, verified: Verified, vehicle: Any, ecus: Mapping[int, Mapping[str, Any]], now: datetime
    ) -> Plan:
        if vehicle is None:
            raise ManifestError(f"no vehicle {verified.vin!r} is registered", "unknown_vehicle")
        state = ecus[vehicle.id]
        if {s: e.keyid for s, e in state.items()} != verified.keyids:
            raise _EcusChanged()
        dropped: dict[str, tuple[ManifestError, EcuVersionReport]] = {}
        for serial, report in sorted(verified.reports.items()):
            problem = self._stale(serial, report, state[serial], now)
            if problem is None:
                continue
            if serial == verified.primary:  # the manifest itself is not fresh
                raise problem
            dropped[serial] = (problem, report)
        return plan_record(verified, vehicle, state, dropped, now)

    def _write_plans(
        self, session: Session, conn: Connection, plans: Sequence[Plan], now: datetime
    ) -> None:
        """The writes of accepted manifests, in the order a single one made them."""
        manifest_ids: dict[int, int] = {}
        for plan in plans:
            if plan.changed:
                manifest_ids[plan.vehicle_id] = conn.execute(
                    sql.INSERT_MANIFEST,
                    {"vehicle_id": plan.vehicle_id, "received_at": now, "body": plan.data},
                ).scalar_one()
        for plan in plans:  # director.fleet sees each ECU's state before this manifest
            vehicle = Vehicle(id=plan.vehicle_id, vin=plan.vin)
            self.observe_fleet(session, vehicle, plan.reports, now, plan.previous)
        attack_rows = [
            {
                **r,
                "vehicle_id": p.vehicle_id,
                "manifest_id": manifest_ids[p.vehicle_id],
                "detected_at": now,
            }
            for p in plans
            for r in p.attack_rows
        ]
        if attack_rows:
            conn.execute(sql.INSERT_ATTACK, attack_rows)
        done = [{"b_id": a.id, "b_now": now} for p in plans for a in p.completed]
        if done:
            conn.execute(sql.COMPLETE, done)
        result_rows = [
            {**r, "manifest_id": manifest_ids[p.vehicle_id]} for p in plans for r in p.result_rows
        ]
        if result_rows:
            conn.execute(sql.INSERT_RESULT, result_rows)
        self._write_state(conn, plans, now)
        for plan in plans:
            plan.metadata_version = self._sign_if_due(session, plan, now)
        attacks = [a for p in plans for a in p.attacks]
        if attacks:
            logger.warning(
                "vehicles report attacks: %s",
                ", ".join(f"{a.ecu_serial}:{a.attack}" for a in attacks),
            )

    def _write_state(self, conn: Connection, plans: Sequence[Plan], now: datetime) -> None:
        """Each vehicle's last check-in and manifest, each ECU's new report state.

        PostgreSQL: one statement for all of them; SQLite: one per row.
        """
        updates = [u for p in plans for u in p.updates]
        if not self.db.is_postgresql:
            conn.execute(
                sql.TOUCH_VEHICLE,
                [{"b_id": p.vehicle_id, "b_now": now, "b_body": p.data} for p in plans],
            )
            conn.execute(sql.UPDATE_ECU, updates)
            return
        at = naive_utc(now)
        vehicle_rows = [{"id": p.vehicle_id, "at": at, "body": p.data.hex()} for p in plans]
        ecu_rows = [
            {
                "id": u["b_ecu_id"],
                "counter": u["counter"],
                "at": at,
                "time": naive_utc(u["time"]),
                "installed": u["b_installed"],
                "result": u["result"],
                "text": u["text"],
            }
            for u in updates
        ]
        written = sql.WRITE_STATE_DRIVER.rowcount(
            conn, {"vehicles": json.dumps(vehicle_rows), "ecus": json.dumps(ecu_rows)}
        )
        if written != len(ecu_rows):  # the rows were read under the vehicles' locks
            raise RuntimeError(f"{written} of {len(ecu_rows)} ECU rows updated")

    def _sign_if_due(self, session: Session, plan: Plan, now: datetime) -> int:
        """Sign the vehicle's metadata if an install completed or it is due; its targets version."""
        v = plan.vehicle
        if not plan.completed and not self._due(
            v.metadata_expires, v.targets_version, v.root_version, v.latest_root, now
        ):
            return int(v.targets_version)
        vehicle = session.get_one(Vehicle, plan.vehicle_id)
        self._sign_vehicle(session, vehicle, now)
        return vehicle.targets_version
