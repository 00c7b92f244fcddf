"""The per-vehicle Director repository: root chain, signing and serving metadata.

Uptane 2.1 5.2 / 5.3.2: all vehicles share one root (offline keys, imported
from files the CLI signs); each vehicle has its own targets, snapshot and
timestamp signed with the online keys, stored as bytes in the database and
re-signed only when its assignments change, when they near expiry, or when a
new root is imported, never per request.

``DirectorRepository`` holds the state every part of the ``Director`` shares
(``director.service`` sets it) and the vehicle lookup they all use.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from sqlalchemy import (
    ColumnElement,
    Table,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import QueryableAttribute, Session
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from director.db import (
    Assignment,
    Database,
    Ecu,
    MetadataFile,
    RootMetadata,
    Vehicle,
    metadata_changed,
)
from director.errors import NotFoundError, NotInitialisedError, UnknownVehicleError
from director.metadata_build import (
    PendingTarget,
    RoleSigners,
    VehicleFiles,
    build_vehicle_files,
    named_versions,
    stored_versions,
)
from director.records import PENDING
from director.store import FILENAME_RE, DBMetadataStore, file_data, latest_root, stored_name
from uptane import der_metadata
from uptane.codec import shared_member_encodings
from uptane.errors import ConfigError
from uptane.repository import Clock

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
# Key of the PostgreSQL advisory lock that serializes root imports.
_ROOT_LOCK = 0x5550_526F_6F74
_ROOT_FILE_RE = re.compile(r"^([1-9][0-9]{0,9})\.root\.json\Z")
# ``N.root.json`` / ``N.root.der`` / ``root.json``; versions are 32-bit columns
_ROOT_NAME_RE = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?root\.(json|der)\Z")
_MAX_INT32 = 2**31 - 1
# IN lists of at most this many values (PostgreSQL takes at most 65535 parameters)
_CHUNK = 1000
# the tables a batch's signing reads, as Core (no ORM row processing per row)
_A_TABLE, _E_TABLE = Assignment.__table__, Ecu.__table__
_A, _E, _F = _A_TABLE.c, _E_TABLE.c, MetadataFile.__table__.c
# the stored file whose content gives its version (the others' are in their names)
_TIMESTAMP_FILE = "timestamp.json"
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


# Statements of the check-in path, built once: a statement object memoises its
# SQL cache key, so reusing it saves building and hashing it per request.
_LATEST_ROOT = select(func.max(RootMetadata.version)).scalar_subquery()
# a vehicle's metadata state and one of its (non-root) files
# (by alias or not: ``director.store.stored_name``)
_METADATA_FILE = {
    alias: select(
        Vehicle.metadata_expires,
        Vehicle.targets_version,
        Vehicle.root_version,
        _LATEST_ROOT.label("latest_root"),
        file_data(Vehicle.id, alias=alias).label("data"),
    ).where(Vehicle.vin == bindparam("vin"))
    for alias in (False, True)
}


class DirectorRepository:
    """Per-vehicle Director metadata over the inventory database (5.2, 5.3.2).

    The attributes are set by ``Director.__init__``; ``_signers`` are the
    online keys (targets, snapshot, timestamp), by keyid.
    """

    db: Database
    clock: Clock
    metadata_expiry: timedelta
    refresh_margin: timedelta
    _signers: dict[str, Signer]

    def _vehicle(self, session: Session, vin: str, *, lock: bool = False) -> Vehicle:
        if not isinstance(vin, str) or _IDENT_RE.match(vin) is None:
            raise UnknownVehicleError(f"no vehicle {vin[:130]!r} is registered")
        stmt = select(Vehicle).where(Vehicle.vin == vin)
        if lock:
            stmt = stmt.with_for_update()
        vehicle = session.scalars(stmt).first()
        if vehicle is None:
            raise UnknownVehicleError(f"no vehicle {vin!r} is registered")
        return vehicle

    # --- root chain (offline keys; imported, never signed here) -------------

    def import_root(self, data: bytes, der: bytes | None = None) -> bool:
        """Add the next Director root version (TUF 5.3.4 chain rules).

        Returns False if this exact version is there already. A new version
        must be signed by a threshold of the previous root's keys and of its
        own; its DER form, if given, must say the same and verify the same way.
        """
        try:
            md = Metadata[Root].from_bytes(data)
        except DeserializationError as e:
            raise ConfigError(f"root metadata does not parse: {e}") from e
        if not isinstance(md.signed, Root):
            raise ConfigError("not root metadata")
        new = md.signed
        der_md: Metadata[Any] | None = None
        if der is not None:
            try:
                der_md = Metadata.from_bytes(der, der_metadata.DERMetadataDeserializer())
            except DeserializationError as e:
                raise ConfigError(f"DER root does not parse: {e}") from e
            if der_md.signed.to_dict() != new.to_dict():
                raise ConfigError("DER root says something else than the JSON root")
        now = self.clock()
        with self.db.transaction(write=True) as session:
            if self.db.is_postgresql:
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ROOT_LOCK})
            existing = session.get(RootMetadata, new.version)
            if existing is not None:
                if existing.data != data:
                    raise ConfigError(f"a different root version {new.version} is installed")
                if der is not None and existing.der is None:
                    existing.der = der
                    self.db.metadata_changed(session, root=True)  # read caches (issue 12)
                return False
            current = latest_root(session)
            expected = 1 if current is None else current.version + 1
            if new.version != expected:
                raise ConfigError(f"root version {new.version} given, {expected} expected")
            delegators = [new]
            if current is not None:
                delegators.insert(0, Metadata[Root].from_bytes(current.data).signed)
            try:
                for delegator in delegators:
                    delegator.verify_delegate(Root.type, md.signed_bytes, md.signatures)
                    if der_md is not None:
                        delegator.verify_delegate(
                            Root.type,
                            der_metadata.der_signed_bytes(der_md.signed),
                            der_md.signatures,
                        )
            except UnsignedMetadataError as e:
                raise ConfigError(f"root version {new.version} is not properly signed: {e}") from e
            session.add(RootMetadata(version=new.version, data=data, der=der, created_at=now))
            self.db.metadata_changed(session, root=True)  # read caches (issue 12)
        logger.info("imported Director root version %d", new.version)
        return True

    def import_root_dir(self, directory: str | Path) -> int:
        """Import ``N.root.json`` (+ ``N.root.der``) files newer than the database's."""
        d = Path(directory)
        if not d.is_dir():
            return 0
        versions = sorted(
            int(m.group(1)) for p in d.iterdir() if (m := _ROOT_FILE_RE.match(p.name))
        )
        imported = 0
        for v in versions:
            der_path = d / f"{v}.root.der"
            der = der_path.read_bytes() if der_path.exists() else None
            if self.import_root((d / f"{v}.root.json").read_bytes(), der):
                imported += 1
        return imported

    def root_version(self) -> int:
        with self.db.transaction() as session:
            row = latest_root(session)
            return 0 if row is None else row.version

    # --- per-vehicle metadata ------------------------------------------------

    def _current_root(self, session: Session) -> tuple[int, Root]:
        row = latest_root(session)
        if row is None:
            raise NotInitialisedError("no Director root imported: run `uptane director init`")
        root = Metadata[Root].from_bytes(row.data).signed
        for role in ONLINE_ROLES:
            r = root.roles[role]
            have = [k for k in r.keyids if k in self._signers]
            if len(have) < r.threshold:
                raise NotInitialisedError(
                    f"the online keys cannot sign {role}: root v{root.version} lists "
                    f"{sorted(r.keyids)} (threshold {r.threshold}); restart with the new keys"
                )
        return row.version, root

    def _due(
        self,
        expires: datetime | None,
        targets_version: int,
        signed_under_root: int,
        latest_root_version: int | None,
        now: datetime,
    ) -> bool:
        """Whether a vehicle's metadata must be signed (again) before it is served."""
        if expires is None or targets_version == 0:
            return True
        if expires - now <= self.refresh_margin:
            return True
        return latest_root_version is not None and latest_root_version != signed_under_root

    def _needs_signing(self, session: Session, vehicle: Vehicle, now: datetime) -> bool:
        row = latest_root(session)
        return self._due(
            vehicle.metadata_expires,
            vehicle.targets_version,
            vehicle.root_version,
            None if row is None else row.version,
            now,
        )

    def _role_signers(self, session: Session) -> RoleSigners:
        """The online signers of the latest root, kept per root version (roots never change)."""
        version = session.scalar(select(func.max(RootMetadata.version)))
        cache: dict[int, RoleSigners] = self.__dict__.setdefault("_role_signers_cache", {})
        if version is None or version not in cache:
            root_version, root = self._current_root(session)
            cache[root_version] = RoleSigners.of(root_version, root, self._signers)
            return cache[root_version]
        return cache[version]

    def _sign_vehicles(
        self,
        session: Session,
        vehicles: Sequence[tuple[int, str, int]],
        now: datetime,
        *,
        new: bool = False,
    ) -> dict[int, VehicleFiles]:
        """Sign targets, snapshot and timestamp of locked ``vehicles`` (id, VIN, targets version).

        Uptane 5.2, 5.3.2: the targets list the vehicle's pending assignments;
        every role goes one version above the highest stored (or recorded).
        A few statements per batch, whatever its size. ``new``: just added
        vehicles (no files, no assignments). The vehicles' rows are updated
        by the caller (``_record_signed``), their files here.
        """
        signers = self._role_signers(session)
        ids = [v[0] for v in vehicles]
        pending: dict[int, list[PendingTarget]] = {i: [] for i in ids}
        stored: dict[int, dict[str, bytes]] = {i: {} for i in ids}
        names: dict[int, set[str]] = {i: set() for i in ids}
        by_name: dict[int, dict[str, int]] = {}
        if not new:
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i : i + _CHUNK]
                # the pending assignments: found by vehicle, the status checked here
                # (a status predicate lets PostgreSQL walk every pending row of the
                # fleet through the status index), then read by primary key
                owner: dict[int, tuple[int, str]] = {}
                for aid, vid, serial, status in session.execute(
                    select(_A.id, _E.vehicle_id, _E.serial, _A.status)
                    .join_from(_A_TABLE, _E_TABLE, _A.ecu_id == _E.id)
                    .where(in_list(session, _E.vehicle_id, chunk))
                ):
                    if status == PENDING:
                        owner[aid] = (vid, serial)
                wanted = sorted(owner)
                for j in range(0, len(wanted), _CHUNK):
                    for aid, image, length, hashes, custom in session.execute(
                        select(_A.id, _A.image, _A.length, _A.hashes, _A.custom)
                        .where(in_list(session, _A.id, wanted[j : j + _CHUNK]))
                        .order_by(_A.id)
                    ):
                        vid, serial = owner[aid]
                        pending[vid].append(PendingTarget(image, length, hashes, custom, serial))
                # every file's name, the content of timestamp.json only: the targets and
                # snapshot versions are in their names (stored once, issue 12)
                for vid, name, data in session.execute(
                    select(
                        _F.vehicle_id,
                        _F.filename,
                        case((_F.filename == _TIMESTAMP_FILE, _F.data), else_=None),
                    ).where(in_list(session, _F.vehicle_id, chunk))
                ):
                    names[vid].add(name)
                    if data is not None:
                        stored[vid][name] = bytes(data)
            for vid in ids:
                by_name[vid] = named_versions(names[vid])
        out: dict[int, VehicleFiles] = {}
        with shared_member_encodings():  # the targets' custom members repeat across a batch
            for vid, vin, targets_version in vehicles:
                out[vid] = build_vehicle_files(
                    vin,
                    pending[vid],
                    stored_versions(stored[vid], targets_version, by_name.get(vid)),
                    signers,
                    now,
                    self.metadata_expiry,
                )
        store_vehicle_metadata(session, out, names, now)
        return out

    def _sign_vehicle(
        self,
        session: Session,
        vehicle: Vehicle,
        now: datetime,
        *,
        new: bool = False,
        current_root: tuple[int, Root] | None = None,
        root_files: dict[str, bytes | None] | None = None,
    ) -> None:
        """Sign new targets, snapshot and timestamp for the locked ``vehicle`` (5.2, 5.3.2).

        ``new``: the vehicle was just added (no files, no assignments yet).
        ``current_root``/``root_files`` are accepted for older callers and unused
        (the root's signers are kept per root version).
        """
        session.flush()
        signed = self._sign_vehicles(
            session, [(vehicle.id, vehicle.vin, vehicle.targets_version)], now, new=new
        )[vehicle.id]
        vehicle.targets_version = signed.targets_version
        vehicle.root_version = signed.root_version
        vehicle.metadata_expires = signed.expires
        vehicle.metadata_stale = False

    def _record_signed(self, session: Session, signed: Mapping[int, VehicleFiles]) -> None:
        """Store the new state of vehicles signed by ``_sign_vehicles`` (Core, one statement)."""
        if not signed:
            return
        table = Vehicle.__table__
        assert isinstance(table, Table)
        # one statement per (targets version, expiry, root), not one per vehicle: a
        # batch's vehicles mostly share them; the root is the one whose keys signed
        groups: dict[tuple[int, datetime, int], list[int]] = {}
        for vid, f in signed.items():
            groups.setdefault((f.targets_version, f.expires, f.root_version), []).append(vid)
        for (targets_version, expires, root_version), vids in sorted(groups.items()):
            vids.sort()
            for i in range(0, len(vids), _CHUNK):
                session.execute(
                    update(table)
                    .where(in_list(session, table.c.id, vids[i : i + _CHUNK]))
                    .values(
                        targets_version=targets_version,
                        root_version=root_version,
                        metadata_expires=expires,
                        metadata_stale=False,
                    )
                )

    def metadata(self, vin: str, filename: str) -> bytes:
        """Bytes of one of ``vin``'s metadata files, re-signed first if due.

        The common case is one read-only statement; signing takes the
        vehicle's write lock and checks again.
        """
        m = FILENAME_RE.match(filename)
        if m is None:
            raise NotFoundError(f"no metadata file {filename!r}")
        if _IDENT_RE.match(vin) is None:
            raise UnknownVehicleError(f"no vehicle {vin[:130]!r} is registered")
        version, role, ext = m.groups()
        if version is not None and int(version) > _MAX_INT32:  # versions are 32-bit columns
            raise NotFoundError(f"no metadata file {filename!r}")
        if role == Root.type:
            latest = select(func.max(RootMetadata.version)).scalar_subquery()
            col = RootMetadata.data if ext == "json" else RootMetadata.der
            wanted = latest if version is None else int(version)
            file_q = select(col).where(RootMetadata.version == wanted).scalar_subquery()
            row = self.db.read_one(
                select(
                    Vehicle.metadata_expires,
                    Vehicle.targets_version,
                    Vehicle.root_version,
                    latest.label("latest_root"),
                    file_q.label("data"),
                ).where(Vehicle.vin == vin)
            )
        else:
            alias, name = stored_name(filename)
            row = self.db.read_one(_METADATA_FILE[alias], {"vin": vin, "filename": name})
        if row is None:
            raise UnknownVehicleError(f"no vehicle {vin!r} is registered")
        now = self.clock()
        if not self._due(
            row.metadata_expires, row.targets_version, row.root_version, row.latest_root, now
        ):
            if row.data is None:
                raise NotFoundError(f"{vin} has no metadata file {filename!r}")
            return bytes(row.data)
        with self.db.transaction(write=True) as session:
            vehicle = self._vehicle(session, vin, lock=True)
            if self._needs_signing(session, vehicle, now):
                self._sign_vehicle(session, vehicle, now)
            return self._read_file(session, vehicle, filename)

    def _read_file(self, session: Session, vehicle: Vehicle, filename: str) -> bytes:
        data = DBMetadataStore(session, vehicle.id, self.clock()).read(filename)
        if data is None:
            raise NotFoundError(f"{vehicle.vin} has no metadata file {filename!r}")
        return data

    def root_file(self, filename: str) -> bytes:
        """``N.root.json`` / ``N.root.der`` of the shared Director root chain."""
        m = _ROOT_NAME_RE.match(filename)
        data = None
        if m is not None:
            version, ext = m.groups()
            col = RootMetadata.data if ext == "json" else RootMetadata.der
            wanted = (
                select(func.max(RootMetadata.version)).scalar_subquery()
                if version is None
                else int(version)
            )
            if version is None or int(version) <= _MAX_INT32:
                row = self.db.read_one(select(col).where(RootMetadata.version == wanted))
                data = None if row is None or row[0] is None else bytes(row[0])
        if data is None:
            raise NotFoundError(f"no root file {filename!r}")
        return data


def in_list(
    session: Session,
    column: ColumnElement[Any] | QueryableAttribute[Any],
    values: Sequence[Any],
) -> ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(:array)`` (issue 12, batch work).

    One array parameter instead of one per value: the statement's text is the
    same for every batch, so the driver does not parse a text of a thousand
    placeholders per statement (psycopg caches the parse of short texts only;
    the profile of a fleet-wide assignment put over half of its rows' time there).
    """
    col = column.expression
    if session.get_bind().dialect.name == "postgresql":
        return col == any_(bindparam(None, list(values), type_=ARRAY(col.type)))
    return col.in_(list(values))


def prefer_indexes(session: Session) -> None:
    """Steer PostgreSQL to the indexes for the rest of this transaction (batch work).

    A fleet-wide assignment or re-signing grows ``assignments`` and
    ``metadata_files`` by many rows within a minute, before ANALYZE has seen
    them: on the old statistics the planner takes a sequential scan of the
    table for each batch, which makes the work quadratic. Every statement of
    these transactions has an index to use. No effect on SQLite.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SET LOCAL enable_seqscan = off"))


def store_vehicle_metadata(
    session: Session,
    signed: Mapping[int, VehicleFiles],
    stored_names: Mapping[int, set[str]],
    now: datetime,
) -> None:
    """Write vehicles' newly signed files and drop the ones they replace (every metadata write).

    Every per-vehicle metadata write of the Director goes through here, in
    the transaction that holds the vehicles' locks: the files of one vehicle
    change together (targets -> snapshot -> timestamp consistent). The
    previous targets and snapshot versions are kept for clients that fetched
    the previous timestamp; older versioned files are dropped, and so are
    unversioned copies an older Director stored (``director.store.ALIASES``).
    """
    metadata_changed(session, signed.keys())  # the read caches of every process drop them
    table = MetadataFile.__table__
    assert isinstance(table, Table)
    gone: list[tuple[int, str]] = []
    rows: list[dict[str, Any]] = []
    for vid, f in signed.items():
        keep = {f"{f.targets_version - 1}.targets.json", f"{f.targets_version - 1}.targets.der"}
        keep.add(f"{f.snapshot_version - 1}.snapshot.json")
        for name in stored_names.get(vid, ()):
            if name in f.files or name not in keep:
                gone.append((vid, name))
        rows.extend(
            {"vehicle_id": vid, "filename": name, "data": data, "updated_at": now}
            for name, data in f.files.items()
        )
    # one statement per file name (a batch's vehicles mostly share their versions),
    # each a primary-key lookup
    by_name: dict[str, list[int]] = {}
    for vid, name in gone:
        by_name.setdefault(name, []).append(vid)
    for name, vids in sorted(by_name.items()):
        for i in range(0, len(vids), _CHUNK):
            session.execute(
                delete(table).where(
                    table.c.filename == name,
                    in_list(session, table.c.vehicle_id, vids[i : i + _CHUNK]),
                )
            )
    if not rows:
        return
    if session.get_bind().dialect.name == "postgresql":
        _copy_files(session, rows, now)
    else:
        session.execute(insert(table), rows)


_COPY_FILES = (
    "COPY metadata_files (vehicle_id, filename, data, updated_at) FROM STDIN (FORMAT BINARY)"
)
_COPY_TYPES = ("int4", "varchar", "bytea", "timestamp")


def _copy_files(session: Session, rows: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """Insert vehicles' signed files (Uptane 2.1 5.2, 5.3.2) with one PostgreSQL ``COPY``.

    A batch's files (several per vehicle) are the bulk of what a fleet-wide
    re-signing writes: ``COPY`` streams them in one round trip, where an
    ``INSERT`` per row costs a statement each in the driver and the server.
    In the session's transaction (its pending changes flushed first); a
    DBAPI error is handed to SQLAlchemy's own handling, as for a statement.
    """
    session.flush()
    conn = session.connection()
    driver = conn.connection.driver_connection
    if driver is None:  # a detached connection: no transaction to run in
        raise RuntimeError("the connection has no DBAPI connection")
    # the column holds UTC without a zone (``UTCDateTime``)
    stamp = now.astimezone(UTC).replace(tzinfo=None)
    cursor = driver.cursor()
    try:
        with cursor.copy(_COPY_FILES) as copy:
            copy.set_types(list(_COPY_TYPES))
            for r in rows:
                copy.write_row((r["vehicle_id"], r["filename"], r["data"], stamp))
    except conn.dialect.loaded_dbapi.Error as e:
        conn._handle_dbapi_exception(e, _COPY_FILES, {}, cursor, None)
    finally:
        cursor.close()
