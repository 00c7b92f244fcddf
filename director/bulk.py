"""Fleet-sized inventory: registering vehicles in bulk from CSV or JSON (Uptane 2.1 5.4.2.2).

``uptane director import FILE`` registers many vehicles in batches, each one
transaction (vehicles, ECUs and every new vehicle's first signed metadata).
It is idempotent: a vehicle registered already with the same ECUs, hardware
ids and keys is left alone, so an interrupted import is simply run again; a
vehicle that differs from what is registered, or an ECU serial that belongs
to another vehicle, is a conflict, reported and not changed.

File formats:

- JSON: a list of ``{"vin": ..., "ecus": [{"serial", "hardware_id",
  "public_key" (a TUF ed25519 key dict), "primary"}]}``, as ``POST /api/vehicles``;
- CSV with a header ``vin,serial,hardware_id,public_key,primary``, one row
  per ECU, ``public_key`` the ed25519 public key in hex, ``primary`` 1/0.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import SSlibKey
from sqlalchemy import Table, insert, select
from sqlalchemy.orm import Session, selectinload

from director.db import Ecu, Vehicle
from director.errors import InvalidRequestError
from director.inventory import MAX_ECUS, Inventory, check_ecu_key
from director.records import EcuSpec
from director.signing import _IDENT_RE
from uptane.keys import public_key_dict

logger = logging.getLogger("director.service")

CSV_COLUMNS = ("vin", "serial", "hardware_id", "public_key", "primary")
DEFAULT_BATCH = 500


@dataclass(frozen=True)
class VehicleRecord:
    """One vehicle to register: its VIN and ECUs (exactly one primary)."""

    vin: str
    ecus: tuple[EcuSpec, ...]


@dataclass
class ImportResult:
    added: int = 0
    unchanged: int = 0
    conflicts: list[str] = field(default_factory=list)


def _check(record: VehicleRecord) -> None:
    names = [record.vin, *(e.serial for e in record.ecus), *(e.hardware_id for e in record.ecus)]
    if any(_IDENT_RE.match(n) is None for n in names):
        raise InvalidRequestError(f"{record.vin[:130]!r}: identifiers are letters, digits, ._:-")
    if not 1 <= len(record.ecus) <= MAX_ECUS:
        raise InvalidRequestError(f"{record.vin}: a vehicle needs 1-{MAX_ECUS} ECUs")
    if sum(1 for e in record.ecus if e.primary) != 1:
        raise InvalidRequestError(f"{record.vin}: exactly one ECU must be the primary")
    if len({e.serial for e in record.ecus}) != len(record.ecus):
        raise InvalidRequestError(f"{record.vin}: ECU serials repeat")
    if len({e.public_key.keyid for e in record.ecus}) != len(record.ecus):
        raise InvalidRequestError(f"{record.vin}: every ECU needs its own key")


def parse_vehicles(data: bytes, fmt: str) -> list[VehicleRecord]:
    """Vehicles from a JSON or CSV document (``fmt``: ``json`` or ``csv``); checked."""
    records: list[VehicleRecord] = []
    if fmt == "json":
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise InvalidRequestError(f"not JSON: {e}") from e
        if not isinstance(doc, list):
            raise InvalidRequestError("a JSON import is a list of vehicles")
        for i, v in enumerate(doc):
            try:
                ecus = tuple(
                    EcuSpec(
                        str(e["serial"]),
                        str(e["hardware_id"]),
                        check_ecu_key(e["public_key"]),
                        bool(e.get("primary", False)),
                    )
                    for e in v["ecus"]
                )
                records.append(VehicleRecord(str(v["vin"]), ecus))
            except (KeyError, TypeError, AttributeError) as e:
                raise InvalidRequestError(f"vehicle {i + 1}: missing or bad field {e}") from e
    elif fmt == "csv":
        try:
            reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"not UTF-8: {e}") from e
        if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
            raise InvalidRequestError(f"CSV header must be {','.join(CSV_COLUMNS)}")
        by_vin: dict[str, list[EcuSpec]] = {}
        for row in reader:
            line = reader.line_num
            if None in row or any(row[c] is None for c in CSV_COLUMNS):
                raise InvalidRequestError(f"line {line}: expected {len(CSV_COLUMNS)} fields")
            key = check_ecu_key(
                {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": row["public_key"]}}
            )
            primary = row["primary"].strip().lower() in ("1", "true", "yes")
            by_vin.setdefault(row["vin"], []).append(
                EcuSpec(row["serial"], row["hardware_id"], key, primary)
            )
        records = [VehicleRecord(vin, tuple(ecus)) for vin, ecus in by_vin.items()]
    else:
        raise InvalidRequestError(f"unknown import format {fmt!r} (json or csv)")
    vins: set[str] = set()
    serials: set[str] = set()
    for r in records:
        _check(r)
        if r.vin in vins:
            raise InvalidRequestError(f"vehicle {r.vin} is listed twice")
        vins.add(r.vin)
        for ecu in r.ecus:
            if ecu.serial in serials:
                raise InvalidRequestError(f"ECU serial {ecu.serial} is listed twice")
            serials.add(ecu.serial)
    return records


def load_vehicles(path: str | Path) -> list[VehicleRecord]:
    """``parse_vehicles`` of a ``.json`` or ``.csv`` file."""
    p = Path(path)
    fmt = p.suffix.lower().lstrip(".")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {p}: {e}") from e
    return parse_vehicles(data, fmt)


def _batches(items: Sequence[VehicleRecord], size: int) -> Iterator[Sequence[VehicleRecord]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _same(record: VehicleRecord, ecus: Iterable[Ecu]) -> bool:
    have = {(e.serial, e.hardware_id, e.is_primary, e.public_key.get("keyid")) for e in ecus}
    want = {(e.serial, e.hardware_id, e.primary, e.public_key.keyid) for e in record.ecus}
    return have == want


class BulkImport(Inventory):
    """Registering vehicles in batches (``uptane director import``)."""

    def _insert_fresh(
        self, session: Session, fresh: Sequence[VehicleRecord], now: datetime
    ) -> None:
        """Insert new vehicles and their ECUs (Core, a few statements) and sign their metadata."""
        vehicles = Vehicle.__table__
        ecus = Ecu.__table__
        assert isinstance(vehicles, Table) and isinstance(ecus, Table)
        ids = (
            session.execute(
                insert(vehicles).returning(vehicles.c.id, sort_by_parameter_order=True),
                [
                    {
                        "vin": r.vin,
                        "created_at": now,
                        "root_version": 0,
                        "targets_version": 0,
                        "metadata_stale": False,
                    }
                    for r in fresh
                ],
            )
            .scalars()
            .all()
        )
        session.execute(
            insert(ecus),
            [
                {
                    "vehicle_id": vid,
                    "serial": spec.serial,
                    "hardware_id": spec.hardware_id,
                    "public_key": public_key_dict(
                        SSlibKey(
                            spec.public_key.keyid,
                            spec.public_key.keytype,
                            spec.public_key.scheme,
                            {"public": spec.public_key.keyval["public"]},
                        )
                    ),
                    "is_primary": spec.primary,
                }
                for vid, r in zip(ids, fresh, strict=True)
                for spec in r.ecus
            ],
        )
        signed = self._sign_vehicles(
            session, [(vid, r.vin, 0) for vid, r in zip(ids, fresh, strict=True)], now, new=True
        )
        self._record_signed(session, signed)

    def import_vehicles(
        self, records: Sequence[VehicleRecord], *, batch: int = DEFAULT_BATCH
    ) -> ImportResult:
        """Register ``records`` in batches of ``batch`` vehicles, one transaction each.

        Already registered identical vehicles are skipped; conflicting ones
        are reported in ``conflicts`` and left alone.
        """
        result = ImportResult()
        seen: set[str] = set()
        for r in records:
            _check(r)
            for e in r.ecus:
                if e.serial in seen:
                    raise InvalidRequestError(f"ECU serial {e.serial} is listed twice")
                seen.add(e.serial)
        for chunk in _batches(records, max(1, batch)):
            now = self.clock()
            with self.db.transaction(write=True) as session:
                self._current_root(session)  # refuse before writing if nothing can be signed
                vins = [r.vin for r in chunk]
                existing = {
                    v.vin: v
                    for v in session.scalars(
                        select(Vehicle)
                        .where(Vehicle.vin.in_(vins))
                        .options(selectinload(Vehicle.ecus))
                    )
                }
                serials = [e.serial for r in chunk for e in r.ecus]
                owners = dict(
                    session.execute(
                        select(Ecu.serial, Vehicle.vin)
                        .join(Vehicle, Ecu.vehicle_id == Vehicle.id)
                        .where(Ecu.serial.in_(serials))
                    ).all()
                )
                fresh: list[VehicleRecord] = []
                for r in chunk:
                    if r.vin in existing:
                        if _same(r, existing[r.vin].ecus):
                            result.unchanged += 1
                        else:
                            result.conflicts.append(f"{r.vin}: registered with other ECUs")
                        continue
                    taken = sorted(e.serial for e in r.ecus if e.serial in owners)
                    if taken:
                        result.conflicts.append(f"{r.vin}: ECU serials of other vehicles {taken}")
                        continue
                    fresh.append(r)
                if fresh:
                    self._insert_fresh(session, fresh, now)
                result.added += len(fresh)
        logger.info(
            "imported %d vehicles (%d unchanged, %d conflicts)",
            result.added,
            result.unchanged,
            len(result.conflicts),
        )
        return result


def records_to_json(records: Sequence[VehicleRecord]) -> list[dict[str, Any]]:
    """The JSON import form of ``records`` (exports, benchmarks, tests)."""
    return [
        {
            "vin": r.vin,
            "ecus": [
                {
                    "serial": e.serial,
                    "hardware_id": e.hardware_id,
                    "public_key": public_key_dict(e.public_key),
                    "primary": e.primary,
                }
                for e in r.ecus
            ],
        }
        for r in records
    ]
