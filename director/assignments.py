"""Assigning Image repository targets to ECUs (Uptane 2.1 5.2.3).

Assignments copy length, hashes and the SHALL-match custom fields from the
Image repository's signed targets and add ``ecu_serial``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Table, bindparam, insert, select, text, update
from sqlalchemy.orm import Session
from tuf.api.metadata import TargetFile

from director.db import Assignment, Ecu, UTCDateTime, Vehicle
from director.errors import (
    DuplicateTargetError,
    HardwareMismatchError,
    InvalidImageError,
    InvalidRequestError,
    NoMatchingEcuError,
    ReleaseCounterError,
    UnknownEcuSerialError,
    UnknownVehicleError,
)
from director.metadata_signer import MetadataSigner
from director.quarantine import exclude_quarantined
from director.records import PENDING, SUPERSEDED, AssignmentInfo
from director.signing import in_list, prefer_indexes
from uptane.errors import UptaneError
from uptane.metadata import (
    ECU_SERIAL,
    UptaneTarget,
    check_identifier,
    check_target_path,
    shall_match,
)

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")


# IN lists of at most this many values (PostgreSQL takes at most 65535 parameters)
_CHUNK = 1000
# vehicles per assignment transaction
DEFAULT_ASSIGN_BATCH = 1000


# PostgreSQL: a batch of new pending assignments from arrays (ECU ids, customs)
_INSERT_PG = text(
    "INSERT INTO assignments (ecu_id, image, length, hashes, custom, status, created_at, "
    "updated_at) SELECT u.ecu_id, :image, :length, CAST(:hashes AS json), CAST(u.custom AS json), "
    ":status, :now, :now FROM unnest(CAST(:ecu_ids AS integer[]), CAST(:customs AS text[])) "
    "AS u(ecu_id, custom) RETURNING ecu_id, id"
).bindparams(bindparam("now", type_=UTCDateTime()))


class ImageLookup(Protocol):
    """Where the Director finds Image repository targets (``ImageRepoReader``)."""

    def lookup(self, name: str) -> TargetFile: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class _Chosen:
    """An ECU an assignment chooses, with what the checks need."""

    ecu_id: int
    vehicle_id: int
    vin: str
    serial: str
    hardware_id: str
    installed: Mapping[str, Any] | None


class Assignments(MetadataSigner):
    """Which image each ECU is to install: new assignments re-sign the vehicles."""

    image_repo: ImageLookup
    # vehicles per assignment transaction (issue 12: short write locks)
    assign_batch: int = DEFAULT_ASSIGN_BATCH

    def assign(
        self,
        image: str,
        *,
        ecu_serials: Sequence[str] | None = None,
        hardware_id: str | None = None,
        vins: Sequence[str] | None = None,
        sign: bool = True,
    ) -> list[AssignmentInfo]:
        """Assign ``image`` to ECUs by serial, or by hardware id (optionally within ``vins``).

        The image must be listed by the Image repository and fit every chosen
        ECU's hardware id; its release counter must not be below what the ECU
        reports installed. A new assignment replaces the ECU's pending one.
        One refused ECU refuses the whole assignment: every batch is checked
        before the first is written, and again under its vehicles' locks.

        Issue 12: rows are written in batches of ``assign_batch`` vehicles,
        one short transaction each, and the vehicles are marked stale; with
        ``sign`` they are then re-signed here in batches (``sign_stale``),
        else by signers running meanwhile: the server's ``StaleSigner``
        (woken after each batch commits) or ``SignerProcesses``. A vehicle
        polling meanwhile gets its previous metadata.
        """
        try:
            check_target_path(image)
            if (ecu_serials is None) == (hardware_id is None):
                raise InvalidRequestError("give either ecu_serials or hardware_id")
            if vins is not None and hardware_id is None:
                raise InvalidRequestError("vins only narrows an assignment by hardware_id")
            if ecu_serials is not None:
                if not ecu_serials or len(set(ecu_serials)) != len(ecu_serials):
                    raise InvalidRequestError("ecu_serials must be non-empty and unique")
                for s in ecu_serials:
                    check_identifier(s, "ecu serial")
            if hardware_id is not None:
                check_identifier(hardware_id, "hardware id")
            for v in vins or ():
                check_identifier(v, "vin")
        except InvalidRequestError:
            raise
        except UptaneError as e:
            raise InvalidRequestError(str(e)) from e

        target = self.image_repo.lookup(image)
        try:
            image_target = UptaneTarget.from_target_file(target)
        except UptaneError as e:
            raise InvalidImageError(f"{image}: {e}") from e
        base_custom = {k: v for k, v in shall_match(target.custom or {}).items() if v is not None}

        now = self.clock()
        with self.db.transaction() as session:
            self._current_root(session)  # refuse before writing if nothing can be signed
            vehicle_vins = self._choose_vehicles(session, ecu_serials, hardware_id, vins)
        batch = max(1, self.assign_batch)
        if len(vehicle_vins) > batch:
            # validate the whole assignment before writing any batch (all or nothing
            # unless a vehicle changes in between: each batch checks again under lock)
            for i in range(0, len(vehicle_vins), batch):
                with self.db.transaction() as session:
                    prefer_indexes(session)
                    self._chosen_ecus(
                        session,
                        vehicle_vins[i : i + batch],
                        image,
                        image_target,
                        ecu_serials,
                        hardware_id,
                        lock=False,
                    )
        infos: list[AssignmentInfo] = []
        stale: list[int] = []
        # signed here at the end, or by signers running meanwhile (woken per batch)
        here = sign and (
            self.defer_signing_above is None or len(vehicle_vins) <= self.defer_signing_above
        )
        for i in range(0, len(vehicle_vins), batch):
            with self.db.transaction(write=True) as session:
                prefer_indexes(session)
                chosen = self._chosen_ecus(
                    session,
                    vehicle_vins[i : i + batch],
                    image,
                    image_target,
                    ecu_serials,
                    hardware_id,
                    lock=True,
                )
                infos.extend(
                    self._write_assignments(session, chosen, image, target, base_custom, now)
                )
                ids = sorted({c.vehicle_id for c in chosen})
                self._mark_stale(session, ids)
                stale.extend(ids)
            if not here and self.wake_signer is not None:
                self.wake_signer()  # this batch is committed: sign it while the next is written
        logger.info("assigned %s to %d ECUs", image, len(infos))
        if here:
            self.sign_stale(stale)
        return infos

    def _choose_vehicles(
        self,
        session: Session,
        ecu_serials: Sequence[str] | None,
        hardware_id: str | None,
        vins: Sequence[str] | None,
    ) -> list[str]:
        """The VINs (sorted) an assignment names, quarantined ones left out or refused."""
        if ecu_serials is not None:
            found: list[tuple[str, str]] = []
            serials = list(ecu_serials)
            for i in range(0, len(serials), _CHUNK):
                found.extend(
                    (s, v)
                    for s, v in session.execute(
                        select(Ecu.serial, Vehicle.vin)
                        .join(Vehicle, Ecu.vehicle_id == Vehicle.id)
                        .where(in_list(session, Ecu.serial, serials[i : i + _CHUNK]))
                    )
                )
            missing = set(ecu_serials) - {s for s, _ in found}
            if missing:
                raise UnknownEcuSerialError(f"no ECU with serial {sorted(missing)}")
            vehicle_vins = sorted({v for _, v in found})
        else:
            stmt = (
                select(Vehicle.vin)
                .join(Ecu, Ecu.vehicle_id == Vehicle.id)
                .where(Ecu.hardware_id == hardware_id)
            )
            if vins is not None:
                wanted = list(vins)
                known: set[str] = set()
                matching: set[str] = set()
                for i in range(0, len(wanted), _CHUNK):
                    chunk = wanted[i : i + _CHUNK]
                    known.update(
                        session.scalars(
                            select(Vehicle.vin).where(in_list(session, Vehicle.vin, chunk))
                        )
                    )
                    matching.update(
                        session.scalars(stmt.where(in_list(session, Vehicle.vin, chunk)))
                    )
                unknown = set(vins) - known
                if unknown:
                    raise UnknownVehicleError(f"no vehicle {sorted(unknown)}")
                vehicle_vins = sorted(matching)
            else:
                vehicle_vins = sorted(set(session.scalars(stmt)))
            if not vehicle_vins:
                raise NoMatchingEcuError(f"no ECU with hardware id {hardware_id!r}")
        # quarantined vehicles: refused when named, skipped fleet-wide (director.quarantine)
        vehicle_vins = exclude_quarantined(
            session, vehicle_vins, named=ecu_serials is not None or vins is not None
        )
        if not vehicle_vins:
            raise NoMatchingEcuError("every matching vehicle is quarantined")
        return vehicle_vins

    def _chosen_ecus(
        self,
        session: Session,
        vehicle_vins: Sequence[str],
        image: str,
        image_target: UptaneTarget,
        ecu_serials: Sequence[str] | None,
        hardware_id: str | None,
        *,
        lock: bool,
    ) -> list[_Chosen]:
        """The ECUs of ``vehicle_vins`` the assignment chooses, checked (5.2.3); set operations.

        With ``lock`` the vehicles are locked first (VIN order, so no deadlocks).
        """
        vehicle_ids: dict[int, str] = {}
        for i in range(0, len(vehicle_vins), _CHUNK):
            stmt = (
                select(Vehicle.id, Vehicle.vin)
                .where(in_list(session, Vehicle.vin, vehicle_vins[i : i + _CHUNK]))
                .order_by(Vehicle.vin)
            )
            if lock:
                stmt = stmt.with_for_update()
            vehicle_ids.update((vid, vin) for vid, vin in session.execute(stmt))
        missing = set(vehicle_vins) - set(vehicle_ids.values())
        if missing:  # removed while we looked
            raise UnknownVehicleError(f"no vehicle {sorted(missing)[:10]}")
        ids = sorted(vehicle_ids)
        wanted = None if ecu_serials is None else set(ecu_serials)
        chosen: list[_Chosen] = []
        pending_elsewhere: dict[int, set[int]] = {}
        ecu_vehicle: dict[int, int] = {}
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i : i + _CHUNK]
            for ecu_id, vid, serial, hw, installed in session.execute(
                select(Ecu.id, Ecu.vehicle_id, Ecu.serial, Ecu.hardware_id, Ecu.installed).where(
                    in_list(session, Ecu.vehicle_id, chunk)
                )
            ):
                ecu_vehicle[ecu_id] = vid
                if (wanted is None and hw == hardware_id) or (wanted and serial in wanted):
                    chosen.append(_Chosen(ecu_id, vid, vehicle_ids[vid], serial, hw, installed))
        # the ECUs of these vehicles the image is pending for already: by ECU id and
        # image, the status checked here (a status predicate lets PostgreSQL pick the
        # status index on stale statistics and walk every pending row, per batch)
        all_ecus = sorted(ecu_vehicle)
        for i in range(0, len(all_ecus), _CHUNK):
            for ecu_id, status in session.execute(
                select(Assignment.ecu_id, Assignment.status).where(
                    in_list(session, Assignment.ecu_id, all_ecus[i : i + _CHUNK]),
                    Assignment.image == image,
                )
            ):
                if status == PENDING:
                    pending_elsewhere.setdefault(ecu_vehicle[ecu_id], set()).add(ecu_id)
        chosen.sort(key=lambda c: (c.vin, c.serial))
        for c in chosen:
            if c.hardware_id not in image_target.hardware_ids:
                raise HardwareMismatchError(
                    f"{image} is for hardware {list(image_target.hardware_ids)}, "
                    f"ECU {c.serial} is {c.hardware_id!r}"
                )
            installed_counter = (c.installed or {}).get("release_counter")
            if isinstance(installed_counter, int) and (
                installed_counter > image_target.release_counter
            ):
                raise ReleaseCounterError(
                    f"ECU {c.serial} runs release {installed_counter}, "
                    f"{image} is release {image_target.release_counter}"
                )
        chosen_ids = {c.ecu_id for c in chosen}
        per_vehicle: dict[int, int] = {}
        for c in chosen:
            per_vehicle[c.vehicle_id] = per_vehicle.get(c.vehicle_id, 0) + 1
        for c in chosen:
            elsewhere = pending_elsewhere.get(c.vehicle_id, set()) - chosen_ids
            if per_vehicle[c.vehicle_id] > 1 or elsewhere:
                raise DuplicateTargetError(
                    f"vehicle {c.vin}: {image} would be listed for more than one ECU"
                )
        return chosen

    def _write_assignments(
        self,
        session: Session,
        chosen: Sequence[_Chosen],
        image: str,
        target: TargetFile,
        base_custom: Mapping[str, Any],
        now: datetime,
    ) -> list[AssignmentInfo]:
        """Supersede the chosen ECUs' pending assignments and add the new ones (set operations)."""
        table = Assignment.__table__
        assert isinstance(table, Table)
        # the chosen ECUs' pending assignments, found by ECU and updated by id (a status
        # predicate lets PostgreSQL walk every pending row through the status index)
        ecu_ids = sorted(c.ecu_id for c in chosen)
        replaced: list[int] = []
        for i in range(0, len(ecu_ids), _CHUNK):
            replaced.extend(
                aid
                for aid, status in session.execute(
                    select(table.c.id, table.c.status).where(
                        in_list(session, table.c.ecu_id, ecu_ids[i : i + _CHUNK])
                    )
                )
                if status == PENDING
            )
        for i in range(0, len(replaced), _CHUNK):
            session.execute(
                update(table)
                .where(
                    in_list(session, table.c.id, replaced[i : i + _CHUNK]),
                    table.c.status == PENDING,
                )
                .values(status=SUPERSEDED, updated_at=now)
            )
        rows: list[dict[str, Any]] = []
        customs: list[dict[str, Any]] = []
        for c in chosen:
            custom = dict(base_custom)
            custom[ECU_SERIAL] = c.serial
            tf = TargetFile(
                length=target.length,
                hashes=dict(target.hashes),
                path=image,
                unrecognized_fields={"custom": custom},
            )
            UptaneTarget.from_target_file(tf, director=True)  # what vehicles will parse
            customs.append(custom)
            rows.append(
                {
                    "ecu_id": c.ecu_id,
                    "image": image,
                    "length": target.length,
                    "hashes": dict(target.hashes),
                    "custom": custom,
                    "status": PENDING,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        ids: Sequence[int] = []
        if rows and session.get_bind().dialect.name == "postgresql":
            # one statement of a few parameters per batch: the rows' varying columns
            # as arrays (an INSERT of a thousand VALUES rows costs the driver more
            # than the server); ids matched back by ECU (one row per chosen ECU)
            by_ecu: dict[int, int] = {
                ecu_id: aid
                for ecu_id, aid in session.execute(
                    _INSERT_PG,
                    {
                        "ecu_ids": [c.ecu_id for c in chosen],
                        "customs": [json.dumps(c) for c in customs],
                        "image": image,
                        "length": target.length,
                        "hashes": json.dumps(dict(target.hashes)),
                        "status": PENDING,
                        "now": now,
                    },
                )
            }
            ids = [by_ecu[c.ecu_id] for c in chosen]
        elif rows:
            ids = (
                session.execute(
                    insert(table).returning(table.c.id, sort_by_parameter_order=True), rows
                )
                .scalars()
                .all()
            )
        return [
            AssignmentInfo(
                id=aid,
                vin=c.vin,
                ecu_serial=c.serial,
                image=image,
                length=target.length,
                hashes=dict(target.hashes),
                custom=dict(custom),
                status=PENDING,
                created_at=now,
            )
            for aid, c, custom in zip(ids, chosen, customs, strict=True)
        ]
