"""The Director service: inventory, assignments, manifests, per-vehicle metadata.

No HTTP here (``director.app`` wraps it). Uptane 2.1 sections:

- 5.2 / 5.3.2: per-vehicle Director repository. All vehicles share one root
  (offline keys, imported from files the CLI signs); each vehicle has its own
  targets, snapshot and timestamp signed with the online keys, stored as bytes
  in the database and re-signed only when its assignments change, when they
  near expiry, or when a new root is imported, never per request.
- 5.3.2.1 / 5.4.2: vehicle version manifests are checked against the
  inventory (known vehicle, primary signature, every ECU present and no other,
  every ECU report signed by that ECU's key, report counters strictly
  increasing, report times never going backwards and not too far ahead of the
  Director's clock) and recorded in one transaction, or refused with a
  ``ManifestError`` whose ``reason`` says why and nothing is changed.
- 5.2.3: assignments copy length, hashes and the SHALL-match custom fields
  from the Image repository's signed targets and add ``ecu_serial``.

All state is in the database; several ``Director`` objects (processes) can
share one PostgreSQL database.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from securesystemslib.signer import Key, Signer, SSlibKey
from sqlalchemy import Table, bindparam, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from director.config import DEFAULT_REPORT_TIME_TOLERANCE, DirectorConfig
from director.db import (
    Assignment,
    Database,
    DetectedAttack,
    Ecu,
    InstallResult,
    MetadataFile,
    RootMetadata,
    Vehicle,
    VehicleManifestRecord,
)
from director.errors import (
    AlreadyRegisteredError,
    DuplicateTargetError,
    HardwareMismatchError,
    InvalidImageError,
    InvalidRequestError,
    NoMatchingEcuError,
    NotFoundError,
    NotInitialisedError,
    ReleaseCounterError,
    UnknownEcuSerialError,
    UnknownVehicleError,
)
from director.store import FILENAME_RE, DBMetadataStore, latest_root, read_root_file
from uptane import codec
from uptane.errors import ConfigError, KeyLoadError, ManifestError, UptaneError
from uptane.keys import public_key_dict, public_key_from_dict
from uptane.manifest import MAX_MANIFEST_SIZE, EcuVersionReport, SignedVehicleManifest
from uptane.metadata import (
    ECU_SERIAL,
    UptaneTarget,
    check_identifier,
    check_target_path,
    set_vehicle_id,
    shall_match,
)
from uptane.repository import Clock, ExpiryPolicy, SigningRepository, utc_now

logger = logging.getLogger(__name__)

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
MAX_ECUS = 256
# Key of the PostgreSQL advisory lock that serializes root imports.
_ROOT_LOCK = 0x5550_526F_6F74
PENDING = "pending"
INSTALLED = "installed"
SUPERSEDED = "superseded"
_ROOT_FILE_RE = re.compile(r"^([1-9][0-9]{0,9})\.root\.json$")
_IDENT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")

# Statements of the check-in path, built once: a statement object memoises its
# SQL cache key, so reusing it saves building and hashing it per request.
_LATEST_ROOT = select(func.max(RootMetadata.version)).scalar_subquery()
# a vehicle's metadata state and one of its (non-root) files
_METADATA_FILE = select(
    Vehicle.metadata_expires,
    Vehicle.targets_version,
    Vehicle.root_version,
    _LATEST_ROOT.label("latest_root"),
    select(MetadataFile.data)
    .where(MetadataFile.vehicle_id == Vehicle.id, MetadataFile.filename == bindparam("filename"))
    .scalar_subquery()
    .label("data"),
).where(Vehicle.vin == bindparam("vin"))
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


class ImageLookup(Protocol):
    """Where the Director finds Image repository targets (``ImageRepoReader``)."""

    def lookup(self, name: str) -> TargetFile: ...

    def close(self) -> None: ...


# --- values returned to callers ------------------------------------------------


@dataclass(frozen=True)
class EcuSpec:
    """An ECU to register: serial, hardware id, its public key, primary or not."""

    serial: str
    hardware_id: str
    public_key: Key
    primary: bool = False


@dataclass(frozen=True)
class AssignmentInfo:
    id: int
    vin: str
    ecu_serial: str
    image: str
    length: int
    hashes: Mapping[str, str]
    custom: Mapping[str, Any]
    status: str
    created_at: datetime


@dataclass(frozen=True)
class EcuStatus:
    serial: str
    hardware_id: str
    primary: bool
    keyid: str
    installed: Mapping[str, Any] | None
    report_counter: int | None
    last_report_at: datetime | None
    last_result: str | None
    last_result_text: str | None
    last_report_time: datetime | None = None


@dataclass(frozen=True)
class AttackInfo:
    ecu_serial: str
    attack: str
    report_counter: int
    detected_at: datetime


@dataclass(frozen=True)
class InstallResultInfo:
    ecu_serial: str
    result: str
    text: str
    image: str | None
    received_at: datetime


@dataclass(frozen=True)
class VehicleStatus:
    """What the operator API lists for one vehicle."""

    vin: str
    created_at: datetime
    last_seen: datetime | None
    metadata_version: int
    metadata_expires: datetime | None
    ecus: tuple[EcuStatus, ...]
    pending: tuple[AssignmentInfo, ...]
    attacks: tuple[AttackInfo, ...]
    results: tuple[InstallResultInfo, ...]


@dataclass(frozen=True)
class ManifestReceipt:
    """An accepted manifest: the targets version to fetch and what it changed."""

    vin: str
    metadata_version: int
    completed: tuple[AssignmentInfo, ...] = ()
    attacks: tuple[AttackInfo, ...] = ()


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
    reports: dict[str, EcuVersionReport] = field(default_factory=dict)


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


def _assignment_info(a: Assignment, vin: str, serial: str) -> AssignmentInfo:
    return AssignmentInfo(
        id=a.id,
        vin=vin,
        ecu_serial=serial,
        image=a.image,
        length=a.length,
        hashes=dict(a.hashes),
        custom=dict(a.custom),
        status=a.status,
        created_at=a.created_at,
    )


_KEY_CACHE: dict[str, Key] = {}
_KEY_CACHE_MAX = 100_000


def _parsed_key(key_dict: Mapping[str, Any]) -> Key:
    """``public_key_from_dict`` of a stored ECU key, cached per process.

    ECU keys never change, so a parsed key can be reused; the cache is keyed by
    the whole stored key dict (canonical JSON), not only by its keyid.
    """
    cache_key = json.dumps(key_dict, sort_keys=True, separators=(",", ":"))
    key = _KEY_CACHE.get(cache_key)
    if key is None:
        key = public_key_from_dict(dict(key_dict))
        if len(_KEY_CACHE) >= _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
        _KEY_CACHE[cache_key] = key
    return key


def check_ecu_key(key_dict: object) -> Key:
    """Parse an ECU public key (a TUF ed25519 key dict; ``keyid`` checked if given)."""
    if not isinstance(key_dict, Mapping):
        raise InvalidRequestError("public_key must be a TUF key object")
    given = key_dict.get("keyid")
    rest = {k: v for k, v in key_dict.items() if k != "keyid"}
    try:
        key = public_key_from_dict(rest)
    except (KeyLoadError, AttributeError, ValueError, TypeError, KeyError) as e:
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


class Director:
    """The Director repository and inventory (DESIGN 6), without HTTP.

    ``signers`` are the online keys (targets, snapshot, timestamp); root keys
    are never given to this class. ``clock`` is the reference time for
    signing and expiry decisions, and for ECU report times, which may be at
    most ``report_time_tolerance`` ahead of it.
    """

    def __init__(
        self,
        db: Database,
        signers: Iterable[Signer],
        image_repo: ImageLookup | None = None,
        *,
        metadata_expiry: timedelta = timedelta(days=1),
        refresh_margin: timedelta = timedelta(hours=6),
        clock: Clock = utc_now,
        max_manifest: int = MAX_MANIFEST_SIZE,
        report_time_tolerance: timedelta = DEFAULT_REPORT_TIME_TOLERANCE,
    ) -> None:
        if refresh_margin >= metadata_expiry:
            raise ConfigError("refresh_margin must be shorter than metadata_expiry")
        if report_time_tolerance <= timedelta(0):
            raise ConfigError("report_time_tolerance must be positive")
        self.db = db
        self._signers: dict[str, Signer] = {s.public_key.keyid: s for s in signers}
        if image_repo is None:
            from director.imagerepo import NoImageRepo

            image_repo = NoImageRepo()
        self.image_repo: ImageLookup = image_repo
        self.metadata_expiry = metadata_expiry
        self.refresh_margin = refresh_margin
        self.clock = clock
        self.max_manifest = max_manifest
        self.report_time_tolerance = report_time_tolerance

    @classmethod
    def from_config(
        cls, config: DirectorConfig, *, clock: Clock = utc_now, migrate: bool = True
    ) -> Director:
        """Open the database (migrating it), import the root chain, load online keys."""
        from director.imagerepo import ImageRepoReader

        db = Database(config.db_url)
        if migrate:
            db.migrate()
        image_repo: ImageLookup | None = None
        root_bytes = config.image_repo_root_bytes()
        if config.image_repo_url and root_bytes is not None:
            cache = config.image_repo_cache
            image_repo = ImageRepoReader(
                config.image_repo_url,
                root_bytes,
                None if cache is None else config.directory / cache,
            )
        director = cls(
            db,
            config.online_signers(),
            image_repo,
            metadata_expiry=config.metadata_expiry,
            refresh_margin=config.refresh_margin,
            clock=clock,
            max_manifest=config.max_body,
            report_time_tolerance=config.report_time_tolerance,
        )
        director.import_root_dir(config.root_dir)
        return director

    def close(self) -> None:
        self.image_repo.close()
        self.db.dispose()

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
                der_md = Metadata.from_bytes(der, codec.DERMetadataDeserializer())
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
                            Root.type, codec.der_signed_bytes(der_md.signed), der_md.signatures
                        )
            except UnsignedMetadataError as e:
                raise ConfigError(f"root version {new.version} is not properly signed: {e}") from e
            session.add(RootMetadata(version=new.version, data=data, der=der, created_at=now))
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

    def _sign_vehicle(self, session: Session, vehicle: Vehicle, now: datetime) -> None:
        """Sign new targets, snapshot and timestamp for ``vehicle`` (5.2, 5.3.2)."""
        root_version, root = self._current_root(session)
        store = DBMetadataStore(session, vehicle.id, now)
        e = self.metadata_expiry
        repo = SigningRepository(
            store=store,
            signers=dict(self._signers),
            expiry=ExpiryPolicy(targets=e, snapshot=e, timestamp=e),
            clock=lambda: now,
        )
        pending = session.execute(
            select(Assignment, Ecu.serial)
            .join(Ecu, Assignment.ecu_id == Ecu.id)
            .where(Ecu.vehicle_id == vehicle.id, Assignment.status == PENDING)
            .order_by(Assignment.id)
        ).all()
        with repo.edit_targets() as targets:
            targets.targets = {}
            for a, serial in pending:
                if a.image in targets.targets:  # guarded at assignment time
                    raise RuntimeError(f"{vehicle.vin}: two pending assignments of {a.image}")
                custom = dict(a.custom)
                custom[ECU_SERIAL] = serial
                targets.targets[a.image] = TargetFile(
                    length=a.length,
                    hashes=dict(a.hashes),
                    path=a.image,
                    unrecognized_fields={"custom": custom},
                )
            targets.delegations = None  # Uptane 5.2.3: no delegations on the Director
            set_vehicle_id(targets, vehicle.vin)
        repo.do_snapshot(force=True)
        repo.do_timestamp(force=True)

        targets_md = repo.open(Targets.type)
        targets_signers = [
            self._signers[k] for k in root.roles[Targets.type].keyids if k in self._signers
        ]
        der = codec.to_der_metadata(targets_md, targets_signers)
        version = targets_md.signed.version
        store.write(f"{version}.targets.der", der)
        store.write("targets.der", der)
        snapshot_version = repo.snapshot().version
        # keep the previous version for clients that fetched the old timestamp
        store.prune(Targets.type, version - 1)
        store.prune(Snapshot.type, snapshot_version - 1)

        vehicle.targets_version = version
        vehicle.root_version = root_version
        vehicle.metadata_expires = min(
            targets_md.signed.expires, repo.snapshot().expires, repo.timestamp().expires
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
            row = self.db.read_one(_METADATA_FILE, {"vin": vin, "filename": filename})
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
        with self.db.transaction() as session:
            data = read_root_file(session, filename)
        if data is None:
            raise NotFoundError(f"no root file {filename!r}")
        return data

    def refresh_expiring(self) -> int:
        """Re-sign every vehicle whose metadata nears expiry; returns how many."""
        now = self.clock()
        with self.db.transaction() as session:
            vins = session.scalars(select(Vehicle.vin).order_by(Vehicle.vin)).all()
        count = 0
        for vin in vins:
            with self.db.transaction(write=True) as session:
                vehicle = self._vehicle(session, vin, lock=True)
                if self._needs_signing(session, vehicle, now):
                    self._sign_vehicle(session, vehicle, now)
                    count += 1
        return count

    # --- inventory -----------------------------------------------------------

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
                self._sign_vehicle(session, vehicle, now)
                status = self._statuses(session, [vehicle])[0]
        except IntegrityError as e:  # a concurrent registration won the race
            raise AlreadyRegisteredError(f"vehicle {vin!r} or one of its ECUs exists") from e
        logger.info("registered vehicle %s with %d ECUs", vin, len(ecus))
        return status

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

    # --- assignments (5.2.3) ---------------------------------------------------

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
            self._current_root(session)
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
            vehicles = {v: self._vehicle(session, v, lock=True) for v in vehicle_vins}
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
            for vin, count in per_vehicle.items():
                others = session.scalars(
                    select(Ecu.serial)
                    .join(Assignment, Assignment.ecu_id == Ecu.id)
                    .where(
                        Ecu.vehicle_id == vehicles[vin].id,
                        Assignment.status == PENDING,
                        Assignment.image == image,
                        Ecu.id.not_in(chosen_ids),
                    )
                ).all()
                if count > 1 or others:
                    raise DuplicateTargetError(
                        f"vehicle {vin}: {image} would be listed for more than one ECU"
                    )

            session.execute(
                update(Assignment)
                .where(Assignment.ecu_id.in_(chosen_ids), Assignment.status == PENDING)
                .values(status=SUPERSEDED, updated_at=now)
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
            for vin in vehicle_vins:
                self._sign_vehicle(session, vehicles[vin], now)
            infos = [_assignment_info(a, vin, serial) for a, vin, serial in created]
        logger.info("assigned %s to %d ECUs", image, len(infos))
        return infos

    # --- vehicle version manifests (5.4.2, 5.3.2.1) -------------------------------

    def receive_manifest(self, vin: str, data: bytes) -> ManifestReceipt:
        """Check and record a vehicle version manifest, or raise ``ManifestError``.

        Nothing is written unless every check passes (one transaction).
        """
        signed = SignedVehicleManifest.from_bytes(data, self.max_manifest)
        manifest = signed.manifest
        if manifest.vin != vin:
            raise ManifestError(
                f"manifest is for vehicle {manifest.vin!r}, sent for {vin!r}", "vin_mismatch"
            )
        keys = self._ecu_keys(vin)
        verified = self._verify(signed, keys, data)
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
                last = ecus[serial].last_report_counter
                if last is not None and report.report_counter <= last:
                    raise ManifestError(
                        f"ECU {serial} report counter {report.report_counter} is not above "
                        f"{last}: replayed report",
                        "replayed_report",
                    )
                self._check_report_time(serial, report, ecus[serial].last_report_time, now)
            return self._record(session, vehicle, ecus, pending, verified, now, latest_root_version)

    def _check_report_time(
        self, serial: str, report: EcuVersionReport, last: datetime | None, now: datetime
    ) -> None:
        """The ECU's clock never goes backwards and is not far ahead of ours (5.4.2.1).

        Equal times are fine: ECUs report whole seconds and may share a clock.
        """
        if last is not None and report.latest_time < last:
            raise ManifestError(
                f"ECU {serial} report time {report.latest_time.isoformat()} is before its "
                f"last report's {last.isoformat()}: replayed or tampered clock",
                "report_time_in_past",
            )
        if report.latest_time > now + self.report_time_tolerance:
            raise ManifestError(
                f"ECU {serial} report time {report.latest_time.isoformat()} is more than "
                f"{self.report_time_tolerance} ahead of the Director's clock",
                "report_time_in_future",
            )

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

    def _verify(
        self, signed: SignedVehicleManifest, keys: dict[str, _EcuKey], data: bytes
    ) -> _Verified:
        """Every check that needs no lock: signatures, ECU set, report contents."""
        manifest = signed.manifest
        primary = next(k for k in keys.values() if k.primary)
        signed.verify(primary.key)  # bad_primary_signature
        if manifest.primary_ecu_serial != primary.serial:
            raise ManifestError(
                f"manifest names primary {manifest.primary_ecu_serial!r}, the registered "
                f"primary is {primary.serial!r}",
                "unknown_ecu",
            )
        missing = set(keys) - set(manifest.reports)
        if missing:
            raise ManifestError(f"no report from ECUs {sorted(missing)}", "missing_ecu")
        unknown = set(manifest.reports) - set(keys)
        if unknown:
            raise ManifestError(f"ECUs {sorted(unknown)} are not in this vehicle", "unknown_ecu")
        verified = _Verified(data=data, keyids={s: k.key.keyid for s, k in keys.items()})
        for serial, signed_report in sorted(manifest.reports.items()):
            ecu = keys[serial]
            report = signed_report.verify(ecu.key)  # bad_ecu_signature
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
        )
