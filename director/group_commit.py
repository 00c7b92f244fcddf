"""Group commit: requests of many threads (or of the event loop) written in one transaction.

Issue 12: a check-in's database work is a few statements and a commit, and
each statement costs the Director more CPU than the database's own work; so
the check-ins that arrive while one is being written are written together.
One writer thread per ``GroupCommit`` writes them (started with the first
item, ended after ``idle`` seconds without one): request threads wait for it
on an event (``submit``), event-loop requests on a future (``submit_async``),
so a request checked on the event loop costs no thread-pool hop and no
thread of its own. Every request still returns only after the transaction
holding its item committed: a 2xx answer means the manifest is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    key: Hashable
    event: threading.Event | None = None  # a waiting thread's (``submit``)
    future: asyncio.Future[R] | None = None  # a waiting coroutine's (``submit_async``)
    outcome: object = None


@dataclass(eq=False)
class Arrival:
    """A request being checked that will submit (``GroupCommit.arriving``)."""

    submitted: bool = False


def _settle(done: Sequence[tuple[asyncio.Future[object], object]]) -> None:
    """On the event loop: each future's outcome (a result, or the exception to raise)."""
    for future, outcome in done:
        if future.cancelled():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class GroupCommit(Generic[T, R]):
    """Batches of up to ``max_batch`` items, with distinct keys, given to ``write`` together.

    ``write(items)`` runs one transaction and returns one outcome per item
    (a result, or an exception for an item it refused without failing the
    others); if it raises, each item of the batch is written alone, so one
    bad item cannot fail the others. The writer waits up to ``max_wait``
    seconds for the requests announced with ``arriving`` (being checked
    now, in request threads) to submit, like PostgreSQL's ``commit_delay``:
    only when there are some, so a lone request is never delayed.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], Sequence[R | BaseException]],
        key: Callable[[T], Hashable],
        max_batch: int = 32,
        max_wait: float = 0.005,
        idle: float = 2.0,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write = write
        self._key = key
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.idle = idle
        self._lock = threading.Condition()
        self._queue: list[_Entry[T, R]] = []
        self._writer: threading.Thread | None = None
        self._writing = False  # a batch is being written now
        self._arriving = 0

    @contextmanager
    def arriving(self) -> Iterator[Arrival]:
        """Announce a request that is being checked and will probably ``submit``."""
        arrival = Arrival()
        with self._lock:
            self._arriving += 1
        try:
            yield arrival
        finally:
            if not arrival.submitted:
                with self._lock:
                    self._arriving -= 1
                    self._lock.notify_all()

    def submit(self, item: T, arrival: Arrival | None = None) -> R:
        """Write ``item`` with whatever else is waiting; return its result once committed."""
        entry: _Entry[T, R] = _Entry(item, self._key(item), event=threading.Event())
        self._enqueue(entry, arrival)
        assert entry.event is not None
        entry.event.wait()
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return cast(R, entry.outcome)  # the writer's result when not an exception

    def submit_async(self, item: T) -> asyncio.Future[R]:
        """``submit`` for the running event loop: a future of the result, set once committed."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._enqueue(_Entry(item, self._key(item), future=future), None)
        return future

    def _enqueue(self, entry: _Entry[T, R], arrival: Arrival | None) -> None:
        with self._lock:
            self._queue.append(entry)
            if arrival is not None and not arrival.submitted:
                arrival.submitted = True
                self._arriving -= 1
            self._lock.notify_all()
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="group-commit", daemon=True
                )
                self._writer.start()

    def _take(self) -> list[_Entry[T, R]] | None:
        """The next batch: oldest first, one item per key (the others wait their turn).

        None when nothing came for ``idle`` seconds: the writer thread ends.
        """
        with self._lock:
            self._writing = False
            idle_until = time.monotonic() + self.idle
            while not self._queue:
                left = idle_until - time.monotonic()
                if left <= 0:
                    self._writer = None
                    return None
                self._lock.wait(left)
            deadline = time.monotonic() + self.max_wait
            while self._arriving > 0 and len(self._queue) < self.max_batch:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            batch: list[_Entry[T, R]] = []
            keys: set[Hashable] = set()
            rest: list[_Entry[T, R]] = []
            for entry in self._queue:
                if len(batch) < self.max_batch and entry.key not in keys:
                    batch.append(entry)
                    keys.add(entry.key)
                else:
                    rest.append(entry)
            self._queue = rest
            self._writing = True
            return batch

    def _write_loop(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            self._run(batch)

    def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            outcomes: Sequence[object] = self._write([e.item for e in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as e:  # handed to the requests; this thread goes on
            if len(batch) == 1:
                outcomes = [e]
            else:
                logger.warning("a batch of %d failed (%s): writing each alone", len(batch), e)
                outcomes = []
                for entry in batch:
                    try:
                        outcomes.extend(self._write([entry.item]))
                    except BaseException as alone:
                        outcomes.append(alone)
        settle: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[object], object]]] = {}
        for entry, outcome in zip(batch, outcomes, strict=True):
            entry.outcome = outcome
            if entry.event is not None:
                entry.event.set()
            elif entry.future is not None:
                future = cast("asyncio.Future[object]", entry.future)
                settle.setdefault(future.get_loop(), []).append((future, outcome))
        for loop, done in settle.items():  # one wake-up of each loop per batch
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_settle, done)
