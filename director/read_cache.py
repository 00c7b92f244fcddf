"""Per-process cache of the metadata a Director worker serves (issue 12, DESIGN 6).

A poll that changed nothing (``GET N+1.root.json`` 404, conditional ``GET
timestamp.json`` 304) is answered on the event loop from this cache, without
the database or the thread pool. Each worker process keeps, per vehicle, the
answers it served (bytes and ETag, or the vehicle's own 404s) and the
vehicle's metadata state (when it is due for re-signing), in an LRU bounded
by ``read_cache_bytes``; and the answers of ``/root/...``.

Never stale after a commit, beyond the notification delay:

- Every write of served metadata calls ``director.db.metadata_changed`` in
  its transaction. On PostgreSQL the commit delivers a ``NOTIFY`` to every
  process; each worker LISTENs on its own connection (``PostgresListener``,
  a thread) and evicts the vehicles named (a root change clears all). While
  that connection is down nothing is cached or served from the cache; when
  it drops, the cache is cleared before it reconnects, so no notification
  is ever missed silently. A ping every ``PING_SECONDS`` and TCP keep-alives
  find a silently dead connection.
- On SQLite (one host) ``PRAGMA data_version`` on a connection of its own is
  read before every lookup: it changes when any other connection of any
  process commits, and the whole cache is then cleared.
- The writer's own process evicts at once after its commit (``Database.commit_hooks``).
- A fill from a read that began before an eviction of the same vehicle is
  dropped (sequence numbers), so a slow read cannot put back what a
  notification removed.

A vehicle's answers are served from the cache only until its metadata is
due for re-signing (``metadata_expires - refresh_margin``); then the request
goes to ``DirectorRepository.metadata``, which signs.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import Integer, bindparam, func, select

from director.db import CHANNEL_SQL, ROOT_CHANGED, Database, RootMetadata, Vehicle
from director.errors import DirectorError, NotFoundError, UnknownVehicleError
from director.signing import _IDENT_RE, _MAX_INT32
from director.store import FILENAME_RE, file_data, stored_name

if TYPE_CHECKING:
    from director.service import Director

logger = logging.getLogger("director.read_cache")

PING_SECONDS: Final = 5.0  # how often the listener checks its connection
_WAIT_SECONDS: Final = 1.0  # longest wait for a notification (stop() waits at most this)
_ENTRY_OVERHEAD: Final = 1000  # bytes of Python objects per answer (measured) + headers + body
_MAX_FILES_PER_VEHICLE: Final = 32
_MAX_ROOT_ANSWERS: Final = 64
_MAX_RECENT: Final = 10_000  # evictions remembered for in-flight reads
_ROOT_NAME_RE: Final = re.compile(r"^(?:([1-9][0-9]{0,9})\.)?root\.(json|der)\Z")


# --- reads on a miss (thread pool) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Loaded:
    """A file read for the cache: its bytes, or the 404 to answer; whose it is
    (``vehicle_id``, ``ROOT_CHANGED`` for ``/root/...``; None: not cacheable, e.g.
    just signed) and until when it may be served (vehicle files)."""

    data: bytes | None
    error: DirectorError | None = None
    vehicle_id: int | None = None
    fresh_until: datetime | None = None

    @property
    def cacheable(self) -> bool:
        return self.vehicle_id is not None


_LATEST_ROOT = select(func.max(RootMetadata.version)).scalar_subquery()
_STATE = (
    Vehicle.id,
    Vehicle.metadata_expires,
    Vehicle.targets_version,
    Vehicle.root_version,
    _LATEST_ROOT.label("latest_root"),
)
# by alias (``targets.json``: the highest ``N.targets.json``) or not (``director.store``)
_VEHICLE_FILE = {
    alias: select(*_STATE, file_data(Vehicle.id, alias=alias).label("data")).where(
        Vehicle.vin == bindparam("vin")
    )
    for alias in (False, True)
}


def _root_statement(column: Any) -> Any:
    wanted = func.coalesce(bindparam("version", type_=Integer), _LATEST_ROOT)
    return select(
        *_STATE,
        select(column).where(RootMetadata.version == wanted).scalar_subquery().label("data"),
    ).where(Vehicle.vin == bindparam("vin"))


_VEHICLE_ROOT = {
    "json": _root_statement(RootMetadata.data),
    "der": _root_statement(RootMetadata.der),
}


def load_vehicle_file(director: Director, vin: str, filename: str) -> Loaded:
    """What ``director.metadata(vin, filename)`` answers, with the vehicle's state.

    One statement, as ``DirectorRepository.metadata``; a name it would refuse,
    an unknown vehicle or a vehicle due for signing goes through it unchanged
    (raising its ``DirectorError``), and is not cacheable.
    """
    m = FILENAME_RE.match(filename)
    valid = m is not None and _IDENT_RE.match(vin) is not None
    if m is None or not valid or (m.group(1) is not None and int(m.group(1)) > _MAX_INT32):
        return Loaded(director.metadata(vin, filename))
    version, role, ext = m.groups()
    if role == "root":
        params = {"vin": vin, "version": None if version is None else int(version)}
        row = director.db.read_one(_VEHICLE_ROOT[ext], params)
    else:
        alias, name = stored_name(filename)
        row = director.db.read_one(_VEHICLE_FILE[alias], {"vin": vin, "filename": name})
    if row is None:
        raise UnknownVehicleError(f"no vehicle {vin!r} is registered")
    now = director.clock()
    if director._due(
        row.metadata_expires, row.targets_version, row.root_version, row.latest_root, now
    ):
        return Loaded(director.metadata(vin, filename))  # signs first
    fresh_until = row.metadata_expires - director.refresh_margin
    if row.data is None:
        error = NotFoundError(f"{vin} has no metadata file {filename!r}")
        return Loaded(None, error, row.id, fresh_until)
    return Loaded(bytes(row.data), None, row.id, fresh_until)


def load_root_file(director: Director, filename: str) -> Loaded:
    """What ``director.root_file(filename)`` answers; cacheable until the next root change."""
    if _ROOT_NAME_RE.match(filename) is None:
        return Loaded(director.root_file(filename))
    try:
        return Loaded(director.root_file(filename), None, ROOT_CHANGED)
    except NotFoundError as e:
        return Loaded(None, e, ROOT_CHANGED)


# --- the cache -------------------------------------------------------------------


@dataclass(slots=True)
class _Vehicle:
    vehicle_id: int
    fresh_until: datetime
    answers: dict[str, Any] = field(default_factory=dict)
    size: int = 0


@dataclass
class CacheStats:
    """Counters of one cache (tests and docs; per process)."""

    hits: int = 0
    misses: int = 0
    fills: int = 0
    refused_fills: int = 0  # a read that raced an eviction, or the channel was down
    evictions: int = 0  # vehicles evicted by a change
    clears: int = 0


class ReadCache:
    """Answers served per vehicle (and of the root chain), bounded, invalidated on change.

    ``answer`` objects are opaque here (``director.http_layer`` builds them);
    ``size`` is what each one counts against ``max_bytes``. Thread-safe: the
    event loop looks up, thread-pool reads fill, the listener evicts.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.stats = CacheStats()
        self.live = False  # the invalidation channel is up: lookups and fills allowed
        self._lock = threading.Lock()
        self._vehicles: OrderedDict[str, _Vehicle] = OrderedDict()
        self._vin_of: dict[int, str] = {}
        self._roots: dict[str, Any] = {}
        self._bytes = 0
        self._seq = 0  # bumped by every eviction
        self._floor = 0  # reads begun before this sequence number may not fill
        self._recent: dict[int, int] = {}  # vehicle id -> sequence number of its last eviction
        self._changed: Callable[[], bool] | None = None  # SQLite: data_version moved
        self._listener: PostgresListener | None = None
        self._sqlite: sqlite3.Connection | None = None
        self._started = False

    # --- wiring ---------------------------------------------------------------

    @classmethod
    def for_database(cls, db: Database, max_bytes: int) -> ReadCache | None:
        """A cache invalidated by ``db``'s backend, or None (``max_bytes`` 0, other backends)."""
        if max_bytes <= 0:
            return None
        cache = cls(max_bytes)
        if db.is_postgresql:
            url = db.engine.url.set(drivername="postgresql")
            cache._listener = PostgresListener(cache, url.render_as_string(hide_password=False))
        elif db.engine.dialect.name == "sqlite":
            path = db.engine.url.database
            if not path or path == ":memory:" or path.startswith("file:"):
                return None
            cache._sqlite = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            cache._changed = cache._sqlite_changed
        else:
            return None
        db.commit_hooks.append(cache.invalidate)
        db.dispose_hooks.append(cache.close)
        return cache

    def start(self) -> None:
        """Begin serving: connect the listener (PostgreSQL) or go live (SQLite). Idempotent."""
        if self._started:
            return
        self._started = True
        if self._listener is not None:
            self._listener.start()
        else:
            self.set_live(True)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.stop()
        self.set_live(False)
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
                self._sqlite = None
                self._changed = None

    _last_version: int | None = None

    def _sqlite_changed(self) -> bool:
        """Whether another connection committed since the last look (under the lock)."""
        if self._sqlite is None:
            return True
        version = self._sqlite.execute("PRAGMA data_version").fetchone()[0]
        moved = version != self._last_version
        self._last_version = version
        return bool(moved)

    # --- lookups (event loop) ---------------------------------------------------

    def _usable(self) -> bool:
        if not self.live:
            return False
        if self._changed is not None and self._changed():
            self._clear()
        return True

    def vehicle(self, vin: str, filename: str, now: datetime) -> Any | None:
        """The cached answer to ``vin``'s ``filename`` if still current, else None."""
        with self._lock:
            if self._usable():
                entry = self._vehicles.get(vin)
                if entry is not None and now < entry.fresh_until:
                    answer = entry.answers.get(filename)
                    if answer is not None:
                        self._vehicles.move_to_end(vin)
                        self.stats.hits += 1
                        return answer
            self.stats.misses += 1
            return None

    def root(self, filename: str) -> Any | None:
        with self._lock:
            if self._usable():
                answer = self._roots.get(filename)
                if answer is not None:
                    self.stats.hits += 1
                    return answer
            self.stats.misses += 1
            return None

    def begin(self) -> int:
        """A read is about to start: its fill is refused if anything is evicted meanwhile."""
        return self._seq

    # --- fills (after a read) ------------------------------------------------------

    def _refused(self, seq: int, vehicle_id: int) -> bool:
        if not self.live or seq < self._floor or self._recent.get(vehicle_id, -1) > seq:
            self.stats.refused_fills += 1
            return True
        return False

    def fill_vehicle(
        self,
        seq: int,
        vin: str,
        vehicle_id: int,
        fresh_until: datetime,
        filename: str,
        answer: Any,
        size: int,
    ) -> None:
        size += _ENTRY_OVERHEAD
        with self._lock:
            if self._refused(seq, vehicle_id) or size > self.max_bytes:
                return
            entry = self._vehicles.get(vin)
            if entry is not None and (
                entry.vehicle_id != vehicle_id or entry.fresh_until != fresh_until
            ):
                self._drop(vin)  # re-signed since: the older answers go
                entry = None
            if entry is None:
                entry = self._vehicles[vin] = _Vehicle(vehicle_id, fresh_until)
                self._vin_of[vehicle_id] = vin
            elif len(entry.answers) >= _MAX_FILES_PER_VEHICLE and filename not in entry.answers:
                return
            old = entry.answers.get(filename)
            if old is not None:
                return  # the same read raced another: keep the first
            entry.answers[filename] = answer
            entry.size += size
            self._bytes += size
            self._vehicles.move_to_end(vin)
            self.stats.fills += 1
            while self._bytes > self.max_bytes and self._vehicles:
                self._drop(next(iter(self._vehicles)))

    def fill_root(self, seq: int, filename: str, answer: Any) -> None:
        with self._lock:
            if self._refused(seq, ROOT_CHANGED):
                return
            if len(self._roots) >= _MAX_ROOT_ANSWERS:
                self._roots.clear()
            self._roots[filename] = answer
            self.stats.fills += 1

    # --- invalidation ------------------------------------------------------------

    def _drop(self, vin: str) -> None:
        entry = self._vehicles.pop(vin)
        self._vin_of.pop(entry.vehicle_id, None)
        self._bytes -= entry.size

    def invalidate(self, vehicle_ids: frozenset[int]) -> None:
        """Evict these vehicles (``ROOT_CHANGED``: everything)."""
        with self._lock:
            if ROOT_CHANGED in vehicle_ids:
                self._clear()
                return
            self._seq += 1
            for vid in vehicle_ids:
                self._recent[vid] = self._seq
                vin = self._vin_of.get(vid)
                if vin is not None:
                    self._drop(vin)
                    self.stats.evictions += 1
            if len(self._recent) > _MAX_RECENT:  # forget them: refuse every read in flight
                self._seq += 1
                self._floor = self._seq
                self._recent.clear()

    def _clear(self) -> None:
        self._seq += 1
        self._floor = self._seq
        self._recent.clear()
        self._vehicles.clear()
        self._vin_of.clear()
        self._roots.clear()
        self._bytes = 0
        self.stats.clears += 1

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def set_live(self, live: bool) -> None:
        """The invalidation channel came up or went down: clear either way."""
        with self._lock:
            self._clear()
            self.live = live

    @property
    def listener(self) -> PostgresListener | None:
        """The PostgreSQL listener (None on SQLite)."""
        return self._listener

    @property
    def size(self) -> int:
        """Bytes counted against ``max_bytes``."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._vehicles)


def parse_payload(payload: str) -> frozenset[int]:
    """A notification's vehicle ids (``ROOT_CHANGED`` for ``r``, and for anything malformed)."""
    if payload == "r":
        return frozenset({ROOT_CHANGED})
    try:
        return frozenset(int(p) for p in payload.split(","))
    except ValueError:
        return frozenset({ROOT_CHANGED})  # unknown: forget everything


class PostgresListener:
    """LISTENs for ``metadata_changed`` notifications on its own connection, in a thread.

    The cache is live only while the connection is up and listening; a lost
    connection clears it, and the listener reconnects with backoff.
    """

    def __init__(self, cache: ReadCache, conninfo: str) -> None:
        self.cache = cache
        self.conninfo = conninfo
        self.connections = 0  # successful (re)connections, for tests
        self.backend_pid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="director-read-cache", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * _WAIT_SECONDS)

    def _run(self) -> None:
        import psycopg
        from psycopg import sql

        backoff = 0.1
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    self.conninfo,
                    autocommit=True,
                    application_name="uptane-director-read-cache",
                    connect_timeout=10,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                    tcp_user_timeout=20_000,  # ms of unacknowledged data: the peer is gone
                ) as conn:
                    row = conn.execute(f"SELECT {CHANNEL_SQL}, pg_backend_pid()").fetchone()
                    assert row is not None
                    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(row[0])))
                    self.backend_pid = int(row[1])
                    self.cache.set_live(True)  # clears what was read before LISTEN
                    self.connections += 1
                    backoff = 0.1
                    pinged = time.monotonic()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=_WAIT_SECONDS):
                            self.cache.invalidate(parse_payload(notice.payload))
                        if time.monotonic() - pinged >= PING_SECONDS:
                            conn.execute("SELECT 1")
                            pinged = time.monotonic()
            except Exception as e:  # any failure: stop serving from the cache, reconnect
                if not self._stop.is_set():
                    logger.warning("read cache listener lost its connection: %s", e)
            finally:
                self.cache.set_live(False)
                self.backend_pid = None
            self._stop.wait(backoff)
            backoff = min(5.0, backoff * 2)
