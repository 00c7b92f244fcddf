"""Assigning Image repository targets to ECUs (Uptane 2.1 5.2.3).

Assignments copy length, hashes and the SHALL-match custom fields from the
Image repository's signed targets and add ``ecu_serial``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload
from tuf.api.metadata import TargetFile

from director.db import Assignment, Ecu, Vehicle
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
from director.quarantine import exclude_quarantined
from director.records import PENDING, SUPERSEDED, AssignmentInfo, _assignment_info
from director.signing import DirectorRepository
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


def _lock_vehicles(session: Session, vins: Sequence[str]) -> dict[str, Vehicle]:
    """Lock ``vins`` (sorted, so no deadlocks) and load their ECUs, in a few statements."""
    vehicles: dict[str, Vehicle] = {}
    ordered = sorted(vins)
    for i in range(0, len(ordered), _CHUNK):
        stmt = (
            select(Vehicle)
            .where(Vehicle.vin.in_(ordered[i : i + _CHUNK]))
            .order_by(Vehicle.vin)
            .with_for_update(of=Vehicle)
            .options(selectinload(Vehicle.ecus))
        )
        for vehicle in session.scalars(stmt):
            vehicles[vehicle.vin] = vehicle
    missing = set(ordered) - set(vehicles)
    if missing:  # removed while we looked
        raise UnknownVehicleError(f"no vehicle {sorted(missing)[:10]}")
    return vehicles


class ImageLookup(Protocol):
    """Where the Director finds Image repository targets (``ImageRepoReader``)."""

    def lookup(self, name: str) -> TargetFile: ...

    def close(self) -> None: ...


class Assignments(DirectorRepository):
    """Which image each ECU is to install: new assignments re-sign the vehicles."""

    image_repo: ImageLookup

    def assign(
        self,
        image: str,
        *,
        ecu_serials: Sequence[str] | None = None,
        hardware_id: str | None = None,
        vins: Sequence[str] | None = None,
    ) -> list[AssignmentInfo]:
        """Assign ``image`` to ECUs by serial, or by hardware id (optionally within ``vins``).

        The image must be listed by the Image repository and fit every chosen
        ECU's hardware id; its release counter must not be below what the ECU
        reports installed. A new assignment replaces the ECU's pending one.
        All or nothing: one refused ECU refuses the whole assignment.
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
        with self.db.transaction(write=True) as session:
            current_root = self._current_root(session)
            # which vehicles: then lock them (sorted, so no deadlocks), then re-read
            if ecu_serials is not None:
                found = session.execute(
                    select(Ecu.serial, Vehicle.vin)
                    .join(Vehicle, Ecu.vehicle_id == Vehicle.id)
                    .where(Ecu.serial.in_(list(ecu_serials)))
                ).all()
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
                    known = set(
                        session.scalars(select(Vehicle.vin).where(Vehicle.vin.in_(list(vins))))
                    )
                    unknown = set(vins) - known
                    if unknown:
                        raise UnknownVehicleError(f"no vehicle {sorted(unknown)}")
                    stmt = stmt.where(Vehicle.vin.in_(list(vins)))
                vehicle_vins = sorted(set(session.scalars(stmt)))
                if not vehicle_vins:
                    raise NoMatchingEcuError(f"no ECU with hardware id {hardware_id!r}")
            # quarantined vehicles: refused when named, skipped fleet-wide (director.quarantine)
            vehicle_vins = exclude_quarantined(
                session, vehicle_vins, named=ecu_serials is not None or vins is not None
            )
            if not vehicle_vins:
                raise NoMatchingEcuError("every matching vehicle is quarantined")
            vehicles = _lock_vehicles(session, vehicle_vins)
            chosen: list[tuple[Vehicle, Ecu]] = []
            for vin in vehicle_vins:
                vehicle = vehicles[vin]
                for ecu in vehicle.ecus:
                    if (ecu_serials is not None and ecu.serial in ecu_serials) or (
                        ecu_serials is None and ecu.hardware_id == hardware_id
                    ):
                        chosen.append((vehicle, ecu))

            for _, ecu in chosen:
                if ecu.hardware_id not in image_target.hardware_ids:
                    raise HardwareMismatchError(
                        f"{image} is for hardware {list(image_target.hardware_ids)}, "
                        f"ECU {ecu.serial} is {ecu.hardware_id!r}"
                    )
                installed_counter = (ecu.installed or {}).get("release_counter")
                if isinstance(installed_counter, int) and (
                    installed_counter > image_target.release_counter
                ):
                    raise ReleaseCounterError(
                        f"ECU {ecu.serial} runs release {installed_counter}, "
                        f"{image} is release {image_target.release_counter}"
                    )
            chosen_ids = {ecu.id for _, ecu in chosen}
            per_vehicle: dict[str, int] = {}
            for vehicle, _ in chosen:
                per_vehicle[vehicle.vin] = per_vehicle.get(vehicle.vin, 0) + 1
            # the image pending for another ECU of a chosen vehicle (set operations)
            by_id = {vehicles[vin].id: vin for vin in per_vehicle}
            taken: set[str] = set()
            ids = sorted(by_id)
            for i in range(0, len(ids), _CHUNK):
                for vehicle_id, ecu_id in session.execute(
                    select(Ecu.vehicle_id, Ecu.id)
                    .join(Assignment, Assignment.ecu_id == Ecu.id)
                    .where(
                        Ecu.vehicle_id.in_(ids[i : i + _CHUNK]),
                        Assignment.status == PENDING,
                        Assignment.image == image,
                    )
                ):
                    if ecu_id not in chosen_ids:
                        taken.add(by_id[vehicle_id])
            for vin, count in per_vehicle.items():
                if count > 1 or vin in taken:
                    raise DuplicateTargetError(
                        f"vehicle {vin}: {image} would be listed for more than one ECU"
                    )

            ecu_ids = sorted(chosen_ids)
            for i in range(0, len(ecu_ids), _CHUNK):
                session.execute(
                    update(Assignment)
                    .where(
                        Assignment.ecu_id.in_(ecu_ids[i : i + _CHUNK]),
                        Assignment.status == PENDING,
                    )
                    .values(status=SUPERSEDED, updated_at=now)
                    .execution_options(synchronize_session=False)
                )
            created: list[tuple[Assignment, str, str]] = []
            for vehicle, ecu in chosen:
                custom = dict(base_custom)
                custom[ECU_SERIAL] = ecu.serial
                tf = TargetFile(
                    length=target.length,
                    hashes=dict(target.hashes),
                    path=image,
                    unrecognized_fields={"custom": custom},
                )
                UptaneTarget.from_target_file(tf, director=True)  # what vehicles will parse
                a = Assignment(
                    ecu_id=ecu.id,
                    image=image,
                    length=target.length,
                    hashes=dict(target.hashes),
                    custom=custom,
                    status=PENDING,
                    created_at=now,
                    updated_at=now,
                )
                session.add(a)
                created.append((a, vehicle.vin, ecu.serial))
            session.flush()
            root_files: dict[str, bytes | None] = {}
            for vin in vehicle_vins:
                self._sign_vehicle(
                    session, vehicles[vin], now, current_root=current_root, root_files=root_files
                )
            infos = [_assignment_info(a, vin, serial) for a, vin, serial in created]
        logger.info("assigned %s to %d ECUs", image, len(infos))
        return infos
