"""Re-signing vehicles' metadata off the request path, in batches (issue 12).

Uptane 2.1, 5.2 / 5.3.2. A change that touches many vehicles (an assignment
by hardware id, an expiry refresh) marks them ``metadata_stale`` in the
short transaction that changes them; a signer then claims stale vehicles in
batches, re-signs their targets, snapshot and timestamp together and clears
the mark, one short transaction per batch. Until then a vehicle polling is
served its previous files, which are still valid (signed, unexpired: the
expiry refresh of ``DirectorRepository.metadata`` signs a due vehicle on the
spot, stale or not).

Safety with several signers (threads, processes, hosts): a batch is claimed
with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, so two signers
never hold the same vehicle, and a vehicle is re-signed only under its row
lock, the same lock assignments and check-ins take, from the versions stored
in that transaction: versions strictly increase whatever runs at once. On
SQLite every write transaction is exclusive (one writer).

Signers: ``Director.sign_stale`` (what ``assign`` calls for the vehicles it
changed), ``StaleSigner`` (a thread in each server process), and
``sign_stale_in_processes`` (the CLI's process pool, ``uptane director
sign-stale --workers N``).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import Table, func, or_, select, update
from sqlalchemy.orm import Session

from director.db import RootMetadata, Vehicle
from director.signing import _CHUNK, DirectorRepository, in_list, prefer_indexes

if TYPE_CHECKING:
    from fastapi import FastAPI

    from director.config import DirectorConfig

logger = logging.getLogger("director.signer")

# vehicles signed per transaction: short enough that a check-in waiting for one
# of them waits a fraction of a second
DEFAULT_SIGN_BATCH = 200
# seconds a following signer waits for the next batch of a running change
FOLLOW_IDLE = 0.05


class MetadataSigner(DirectorRepository):
    """Marking vehicles stale and re-signing stale vehicles in claimed batches."""

    sign_batch: int = DEFAULT_SIGN_BATCH
    # set while a ``StaleSigner`` runs in this process (``install_signer``)
    defer_signing_above: int | None = None
    wake_signer: Callable[[], None] | None = None

    def _mark_stale(self, session: Session, vehicle_ids: Sequence[int]) -> None:
        """Mark ``vehicle_ids`` (locked by the caller) for re-signing."""
        table = Vehicle.__table__
        assert isinstance(table, Table)
        ids = sorted(vehicle_ids)
        for i in range(0, len(ids), _CHUNK):
            session.execute(
                update(table)
                .where(in_list(session, table.c.id, ids[i : i + _CHUNK]))
                .values(metadata_stale=True)
            )

    def _sign_claimed(
        self,
        vehicle_ids: Sequence[int] | None,
        batch: int,
        now: datetime,
        after: str | None = None,
    ) -> tuple[int, str | None]:
        """Claim and re-sign one batch; (vehicles signed, the last VIN claimed or None)."""
        with self.db.transaction(write=True) as session:
            prefer_indexes(session)
            stmt = select(Vehicle.id, Vehicle.vin, Vehicle.targets_version).where(
                Vehicle.metadata_stale.is_(True)
            )
            if vehicle_ids is None:
                # any stale vehicle nobody else holds (several signers at once), in VIN
                # order from ``after``: the index entries of vehicles signed meanwhile are
                # not walked again (until VACUUM they still point at the old rows)
                if after is not None:
                    stmt = stmt.where(Vehicle.vin > after)
                stmt = stmt.order_by(Vehicle.vin).limit(batch).with_for_update(skip_locked=True)
            else:
                # exactly these: wait for a check-in holding one; VIN order as assign locks
                stmt = stmt.where(in_list(session, Vehicle.id, vehicle_ids)).order_by(Vehicle.vin)
                stmt = stmt.with_for_update()
            rows = [(r[0], r[1], r[2]) for r in session.execute(stmt)]
            if not rows:
                return 0, None
            signed = self._sign_vehicles(session, rows, now)
            self._record_signed(session, signed)
            return len(signed), max(r[1] for r in rows)

    def sign_stale(
        self, vehicle_ids: Sequence[int] | None = None, *, batch: int | None = None
    ) -> int:
        """Re-sign stale vehicles (all, or those of ``vehicle_ids``) in batches; how many.

        Each batch is one short transaction. With ``vehicle_ids`` it waits
        for vehicles another transaction holds; without, it skips them (on
        PostgreSQL), so any number of signers can run at once.
        """
        size = max(1, batch or self.sign_batch)
        total = 0
        if vehicle_ids is not None:
            ids = list(vehicle_ids)
            for i in range(0, len(ids), size):
                total += self._sign_claimed(ids[i : i + size], size, self.clock())[0]
            return total
        after: str | None = None
        while True:
            signed, last = self._sign_claimed(None, size, self.clock(), after)
            total += signed
            if last is None and after is None:
                return total
            # past the last VIN (last None): once more from the start, for vehicles
            # marked stale meanwhile
            after = last

    def sign_following(
        self, done: Flag, *, batch: int | None = None, idle: float = FOLLOW_IDLE
    ) -> int:
        """Re-sign stale vehicles as a running change marks them, until ``done`` is set; how many.

        For a change that marks vehicles in VIN order, batch after batch (a
        fleet-wide ``assign``): the signer keeps up behind it, waiting
        ``idle`` seconds above the last VIN it claimed when it catches up,
        instead of signing only once every row is written. Once ``done`` is
        set (after the change's last batch committed) it makes full passes
        until one finds nothing: every vehicle the change marked is signed,
        as with ``sign_stale``. Several signers may follow at once (``SKIP
        LOCKED``).
        """
        size = max(1, batch or self.sign_batch)
        total = 0
        after: str | None = None
        while True:
            finished = done.is_set()  # before the pass: a pass after the last batch decides
            signed, last = self._sign_claimed(None, size, self.clock(), after)
            total += signed
            if last is not None:
                after = last
            elif finished:
                if after is None:
                    return total
                after = None  # once more from the start, for vehicles marked behind us
            else:
                done.wait(idle)  # caught up: the next batch of the change is not committed yet

    def stale_count(self) -> int:
        """How many vehicles wait for re-signing."""
        row = self.db.read_one(
            select(func.count()).select_from(Vehicle).where(Vehicle.metadata_stale.is_(True))
        )
        return 0 if row is None else int(row[0])

    def refresh_expiring(self) -> int:
        """Re-sign every vehicle whose metadata nears expiry or predates the root; how many.

        Marks them stale (in chunks), then signs the stale vehicles in batches.
        """
        now = self.clock()
        limit = now + self.refresh_margin
        latest = select(func.max(RootMetadata.version)).scalar_subquery()
        table = Vehicle.__table__
        assert isinstance(table, Table)
        with self.db.transaction(write=True) as session:
            session.execute(
                update(table)
                .where(
                    or_(
                        table.c.metadata_expires.is_(None),
                        table.c.metadata_expires <= limit,
                        table.c.targets_version == 0,
                        table.c.root_version != latest,
                    )
                )
                .values(metadata_stale=True)
            )
        return self.sign_stale()


class Flag(Protocol):
    """``threading.Event`` or a ``multiprocessing`` event: what ``sign_following`` waits on."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class StaleSigner:
    """Re-signs stale vehicles every ``interval`` seconds in a daemon thread (server side).

    Every worker process of every host may run one: batches are claimed
    with ``SKIP LOCKED``. ``wake`` starts a round at once.
    """

    def __init__(self, director: MetadataSigner, interval: float) -> None:
        self.director = director
        self.interval = interval
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="metadata-signer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                signed = self.director.sign_stale()
                if signed:
                    logger.info("re-signed %d stale vehicles", signed)
            except Exception:  # keep going; the next round retries
                logger.exception("re-signing stale vehicles failed")
            self._wake.wait(self.interval)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


SIGNER_ENV = "UPTANE_DIRECTOR_SIGNER_SECONDS"
# a server assignment touching more vehicles than this returns before they are
# signed: the server's signer threads sign them
DEFER_ABOVE = 1000


def _signer_seconds() -> float:
    try:
        return max(0.0, float(os.environ.get(SIGNER_ENV, "5")))
    except ValueError:
        return 5.0


def install_signer(
    app: FastAPI, director: MetadataSigner, *, interval: float | None = None
) -> None:
    """Run a ``StaleSigner`` for the app's lifetime (every ``UPTANE_DIRECTOR_SIGNER_SECONDS``).

    With it running, an assignment of more than ``DEFER_ABOVE`` vehicles made
    through the operator API returns once its rows are written and wakes the
    signer instead of signing on the request path. 0 turns the thread off.
    """
    seconds = _signer_seconds() if interval is None else interval
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        signer = StaleSigner(director, seconds)
        if seconds > 0:
            signer.start()
            director.defer_signing_above = DEFER_ABOVE
            director.wake_signer = signer.wake
        try:
            async with inner(a) as state:
                yield state
        finally:
            director.defer_signing_above = None
            director.wake_signer = None
            signer.stop()

    app.router.lifespan_context = lifespan


class _DoneOrOrphaned:
    """The change is done, or the process making it is gone (killed mid-change).

    Either way a following signer finishes what is stale and exits: a
    killed assignment leaves its committed batches stale (never half
    signed), and its signer processes sign them instead of waiting forever.
    """

    def __init__(self, done: Flag) -> None:
        self.done = done
        self.parent = mp.parent_process()

    def _orphaned(self) -> bool:
        return self.parent is not None and not self.parent.is_alive()

    def is_set(self) -> bool:
        return self.done.is_set() or self._orphaned()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout) or self._orphaned()


def _worker(
    config: DirectorConfig, batch: int, done: Flag | None, results: mp.Queue[int | None]
) -> None:
    from director.service import Director

    signed: int | None = None
    try:
        director = Director.from_config(config, migrate=False)
        try:
            if done is None:
                signed = director.sign_stale(batch=batch)
            else:
                signed = director.sign_following(_DoneOrOrphaned(done), batch=batch)
        finally:
            director.close()
    finally:
        results.put(signed)  # None: this process failed (its exit code says so too)


class SignerProcesses:
    """``workers`` processes re-signing stale vehicles while this process makes a change.

    ``with SignerProcesses(config, 2) as signers: director.assign(..., sign=False)``
    then ``signers.finish()``: the processes sign each batch of vehicles as
    soon as the assignment commits it (``sign_following``), so the rows and
    the signing overlap, and ``finish`` returns once every stale vehicle is
    signed (how many they signed). Leaving the block without ``finish`` (the
    change failed) still lets them sign what was committed. On SQLite (one
    writer) ``finish`` signs in this process.
    """

    def __init__(
        self, config: DirectorConfig, workers: int = 2, *, batch: int = DEFAULT_SIGN_BATCH
    ) -> None:
        self.config = config
        self.workers = max(1, workers)
        self.batch = batch
        self._ctx = mp.get_context("spawn")
        self._done = self._ctx.Event()
        self._results: mp.Queue[int | None] = self._ctx.Queue()
        self._procs: list[Any] = []
        self._total: int | None = None
        self._finished = False

    def __enter__(self) -> SignerProcesses:
        if not self.config.db_url.startswith("sqlite"):
            self._procs = [
                self._ctx.Process(
                    target=_worker, args=(self.config, self.batch, self._done, self._results)
                )
                for _ in range(self.workers)
            ]
            for p in self._procs:
                p.start()
        return self

    def finish(self) -> int:
        """Let the processes finish what is stale; the vehicles they signed."""
        if self._total is not None:
            return self._total
        if self._finished:  # a first call raised: the results are consumed
            raise RuntimeError("a signer process failed")
        self._finished = True
        self._done.set()
        if not self._procs:
            from director.service import Director

            director = Director.from_config(self.config, migrate=False)
            try:
                self._total = director.sign_stale(batch=self.batch)
            finally:
                director.close()
            return self._total
        counts = [self._results.get(timeout=3600) for _ in self._procs]
        for p in self._procs:
            p.join()
        failed = [p.exitcode for p in self._procs if p.exitcode != 0]
        if failed or None in counts:
            raise RuntimeError(f"a signer process failed (exit {failed})")
        self._total = sum(c for c in counts if c is not None)
        return self._total

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            if exc[0] is None:
                self.finish()
            else:  # the change failed: sign what it committed, report its error
                try:
                    self.finish()
                except Exception:
                    logger.exception("re-signing after a failed change failed")


def sign_stale_in_processes(
    config: DirectorConfig, workers: int = 2, *, batch: int = DEFAULT_SIGN_BATCH
) -> int:
    """Re-sign every stale vehicle with ``workers`` processes (one core each); how many.

    On SQLite (one writer), or with one worker, the work runs in this process.
    """
    if workers <= 1 or config.db_url.startswith("sqlite"):
        from director.service import Director

        director = Director.from_config(config)
        try:
            return director.sign_stale(batch=batch)
        finally:
            director.close()
    ctx = mp.get_context("spawn")
    results: mp.Queue[int | None] = ctx.Queue()
    procs = [
        ctx.Process(target=_worker, args=(config, batch, None, results)) for _ in range(workers)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0 or None in counts:
            raise RuntimeError(f"a signer process failed (exit {p.exitcode})")
    return sum(c for c in counts if c is not None)
