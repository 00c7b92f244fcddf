"""The Director's inventory: SQLAlchemy 2 models, engine and transactions (DESIGN 6).

Everything the Director knows lives here, so several app processes can share
one PostgreSQL database: vehicles, their ECUs (serial, hardware id, public key,
primary or not, last report counter), vehicle version manifests as received,
assignments, install results, detected attacks, the Director root chain, and
each vehicle's signed metadata files. The schema is created and upgraded by
the Alembic migrations in ``director/migrations`` (``Database.migrate``).

Write transactions lock what they change: on PostgreSQL the vehicle rows
(``SELECT ... FOR UPDATE``), on SQLite the whole database (``BEGIN
IMMEDIATE``), so check-then-write sequences such as the report counter check
are atomic across threads and processes.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Connection,
    DateTime,
    Dialect,
    Engine,
    Executable,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    Row,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    false,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# Arbitrary constant key of the PostgreSQL advisory lock held while migrating.
_MIGRATION_LOCK = 0x5550_7461_6E65


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite has no zones)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Vehicle(Base):
    __tablename__ = "vehicles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vin: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # Per-vehicle metadata state: the earliest expiry of targets/snapshot/
    # timestamp, the root version they were signed under, the targets version.
    metadata_expires: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    root_version: Mapped[int] = mapped_column(Integer, default=0)
    targets_version: Mapped[int] = mapped_column(Integer, default=0)
    # the last accepted vehicle version manifest as verified (canonical JSON),
    # received at ``last_seen``; not loaded with the vehicle unless asked for
    last_manifest: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # assignments changed since the metadata was signed: a signer re-signs it
    # (director.metadata_signer; migration 0006); until then the old files are served
    metadata_stale: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())

    __table_args__ = (
        Index(
            "ix_vehicles_metadata_stale",
            "vin",
            postgresql_where=text("metadata_stale"),
            sqlite_where=text("metadata_stale"),
        ),
    )

    ecus: Mapped[list[Ecu]] = relationship(
        back_populates="vehicle", order_by="Ecu.serial", cascade="all, delete-orphan"
    )


class Ecu(Base):
    __tablename__ = "ecus"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), index=True
    )
    serial: Mapped[str] = mapped_column(String(128), unique=True)
    hardware_id: Mapped[str] = mapped_column(String(128), index=True)
    # TUF key dict including "keyid"
    public_key: Mapped[dict[str, Any]] = mapped_column(JSON)
    is_primary: Mapped[bool] = mapped_column(Boolean, default=False)
    last_report_counter: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    last_report_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # the ECU's own time in its last accepted report, capped at the Director's clock
    last_report_time: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    # InstalledImage as reported: filename, length, hashes, release_counter
    installed: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    last_result: Mapped[str | None] = mapped_column(String(32), nullable=True)
    last_result_text: Mapped[str | None] = mapped_column(Text, nullable=True)

    vehicle: Mapped[Vehicle] = relationship(back_populates="ecus")


class VehicleManifestRecord(Base):
    """A vehicle version manifest that changed what the Director records (5.4.2.2).

    The verified signed part and signature, canonical JSON: a vehicle's first
    manifest and each one that reports another image, install result or
    health, an attack, or a report left out (``director.intake``). The latest
    manifest of every vehicle is ``Vehicle.last_manifest``.
    """

    __tablename__ = "manifests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), index=True
    )
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    body: Mapped[bytes] = mapped_column(LargeBinary)


class Assignment(Base):
    """An image the Director wants one ECU to install."""

    __tablename__ = "assignments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ecu_id: Mapped[int] = mapped_column(ForeignKey("ecus.id", ondelete="CASCADE"), index=True)
    image: Mapped[str] = mapped_column(String(255))
    length: Mapped[int] = mapped_column(BigInteger)
    hashes: Mapped[dict[str, str]] = mapped_column(JSON)
    # the Director target's custom: SHALL-match fields + ecu_serial
    custom: Mapped[dict[str, Any]] = mapped_column(JSON)
    # pending -> installed | superseded
    status: Mapped[str] = mapped_column(String(16), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    ecu: Mapped[Ecu] = relationship()


class InstallResult(Base):
    """An install outcome an ECU reported (its ``lastResult``), or a completion."""

    __tablename__ = "install_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ecu_id: Mapped[int] = mapped_column(ForeignKey("ecus.id", ondelete="CASCADE"), index=True)
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id", ondelete="CASCADE"))
    assignment_id: Mapped[int | None] = mapped_column(
        ForeignKey("assignments.id", ondelete="SET NULL"), nullable=True
    )
    result: Mapped[str] = mapped_column(String(32))
    text: Mapped[str] = mapped_column(Text)
    image: Mapped[str | None] = mapped_column(String(255), nullable=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class DetectedAttack(Base):
    """An attack an ECU named in its version report (5.4.2.1)."""

    __tablename__ = "attacks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), index=True
    )
    ecu_id: Mapped[int] = mapped_column(ForeignKey("ecus.id", ondelete="CASCADE"))
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id", ondelete="CASCADE"))
    attack: Mapped[str] = mapped_column(String(64))
    report_counter: Mapped[int] = mapped_column(BigInteger)
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime())


class MetadataFile(Base):
    """One signed per-vehicle metadata file (``N.targets.json``, ``timestamp.json``, ...).

    Each file once (migration 0008): ``N.targets.json``, ``N.targets.der``,
    ``N.snapshot.json`` (the current and the previous version) and
    ``timestamp.json``; ``targets.json``, ``targets.der`` and ``snapshot.json``
    are served as the highest stored version (``director.store.ALIASES``).
    """

    __tablename__ = "metadata_files"

    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), primary_key=True
    )
    filename: Mapped[str] = mapped_column(String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RootMetadata(Base):
    """One version of the Director root, shared by every vehicle (JSON and DER)."""

    __tablename__ = "root_metadata"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    der: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AuditEntry(Base):
    """An operator action that weakened or changed a check (who, what, when, why)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(64))
    vin: Mapped[str | None] = mapped_column(String(128), nullable=True)
    ecu_serial: Mapped[str | None] = mapped_column(String(128), nullable=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON)


def default_sqlite_url(directory: str | Path) -> str:
    return f"sqlite:///{Path(directory).resolve() / 'director.db'}"


def _sqlite_connect(dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit
    # transactions would leave reads outside the transaction).
    dbapi_connection.isolation_level = None
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
    # In WAL mode NORMAL still never corrupts the database; a power loss may
    # only lose the last commits (no fsync per commit, one per checkpoint).
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def _sqlite_begin(conn: Any) -> None:
    options = conn.get_execution_options()
    if options.get("director_single", False):
        return  # one read-only statement: atomic without BEGIN/ROLLBACK round trips
    conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("director_write", False) else "BEGIN")


def make_engine(url: str) -> Engine:
    """An engine for ``url``: SQLite (file) or PostgreSQL (``postgresql+psycopg://``)."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(u, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if u.get_backend_name() == "postgresql" and u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    return create_engine(u)


def _private_file(database: str | None) -> None:
    """Create a SQLite database file 0600 whatever the umask; never group/world writable.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's mode.
    """
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        mode = path.stat().st_mode
        if mode & 0o022:
            os.chmod(path, mode & 0o7755)
        return
    except FileNotFoundError:  # no such directory: SQLite reports it on connect
        return
    os.close(fd)
    os.chmod(path, 0o600)  # O_CREAT's mode is masked by the umask


_SQLITE_LOCKS: dict[str, threading.Lock] = {}
_SQLITE_LOCKS_GUARD = threading.Lock()


# --- changes of served metadata (issue 12: per-process read caches) -------------

_CHANGED = "director_changed"  # Session.info key: vehicle ids whose served files changed
ROOT_CHANGED = -1  # in a change set: the Director root chain changed
# One NOTIFY channel per database schema (channels are database-wide; the schema
# name is hashed to stay within PostgreSQL's 63-byte identifiers).
CHANNEL_SQL = "'uptane_director_' || md5(current_schema())"
_NOTIFY_PAYLOAD = 7000  # bytes per notification (PostgreSQL's limit is 8000)


def metadata_changed(
    session: Session, vehicle_ids: Iterable[int] = (), *, root: bool = False
) -> None:
    """Record that this transaction changes what the Director serves (issue 12).

    The one call every writer of ``metadata_files`` (``DBMetadataStore.flush``)
    and ``root_metadata`` (root import) makes. At commit ``Database.transaction``
    publishes the change: on PostgreSQL a ``NOTIFY`` sent in the transaction
    (delivered to every listening process when it commits, never if it rolls
    back), then this process's ``commit_hooks`` (``director.read_cache``).
    """
    changed: set[int] = session.info.setdefault(_CHANGED, set())
    changed.update(vehicle_ids)
    if root:
        changed.add(ROOT_CHANGED)


def _notify_payloads(changed: set[int]) -> list[str]:
    """``r`` for a root change, else comma-separated vehicle ids, in chunks."""
    if ROOT_CHANGED in changed:
        return ["r"]
    out: list[str] = []
    chunk: list[str] = []
    size = 0
    for vid in sorted(changed):
        item = str(vid)
        if size + len(item) + 1 > _NOTIFY_PAYLOAD:
            out.append(",".join(chunk))
            chunk, size = [], 0
        chunk.append(item)
        size += len(item) + 1
    if chunk:
        out.append(",".join(chunk))
    return out


class Database:
    """An engine plus short transactions; all Director state goes through here."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sqlite_writer: threading.Lock | None = None
        # called after a commit that changed served metadata (``metadata_changed``)
        # with the changed vehicle ids (``ROOT_CHANGED`` for the root chain)
        self.commit_hooks: list[Callable[[frozenset[int]], None]] = []
        self.dispose_hooks: list[Callable[[], None]] = []  # called by ``dispose``
        if self.engine.dialect.name == "sqlite":
            _private_file(self.engine.url.database)
            with _SQLITE_LOCKS_GUARD:
                key = str(self.engine.url.database)
                self._sqlite_writer = _SQLITE_LOCKS.setdefault(key, threading.Lock())

    metadata_changed = staticmethod(metadata_changed)

    @property
    def is_postgresql(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def transaction(self, *, write: bool = False) -> Iterator[Session]:
        """One database transaction: committed on exit, rolled back on error.

        On SQLite, writers of one process queue on a lock first: SQLite's own
        busy handler sleeps in growing steps, which would stall every thread
        that finds the database locked.
        """
        lock = self._sqlite_writer if write and self._sqlite_writer is not None else nullcontext()
        changed: set[int] = set()
        with lock, self.engine.connect() as conn:
            conn = conn.execution_options(director_write=write)
            with conn.begin():
                session = Session(bind=conn, expire_on_commit=False, autoflush=True)
                try:
                    yield session
                    session.flush()
                    changed = session.info.get(_CHANGED, changed)
                    if changed and self.is_postgresql:
                        session.execute(
                            text(
                                f"SELECT pg_notify({CHANNEL_SQL}, p) FROM unnest(CAST(:ps AS text[])) AS p"
                            ),
                            {"ps": _notify_payloads(changed)},
                        )
                finally:
                    session.close()
        if changed:
            for hook in list(self.commit_hooks):
                hook(frozenset(changed))

    @contextmanager
    def _single(self) -> Iterator[Connection]:
        """A connection for one read-only statement, outside any explicit transaction.

        A single statement sees one consistent snapshot on both backends, so
        BEGIN and ROLLBACK would only add round trips.
        """
        with self.engine.connect() as conn:
            if self.is_postgresql:
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
            else:
                yield conn.execution_options(director_single=True)

    def read_one(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> Row[Any] | None:
        """One row of a single read-only statement."""
        with self._single() as conn:
            return conn.execute(statement, params).first()

    def read_all(
        self, statement: Executable, params: Mapping[str, Any] | None = None
    ) -> Sequence[Row[Any]]:
        """Every row of a single read-only statement."""
        with self._single() as conn:
            return conn.execute(statement, params).all()

    def migrate(self) -> None:
        """Bring the schema to the latest Alembic revision (safe to run concurrently)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with self.engine.connect() as conn:
            conn = conn.execution_options(director_write=True)
            with conn.begin():
                if self.is_postgresql:
                    conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")

    def dispose(self) -> None:
        for hook in list(self.dispose_hooks):
            hook()
        self.engine.dispose()
