"""Group commit: requests of many threads written in one transaction by one of them.

Issue 12: a check-in's database work is a few statements and a commit, and
each statement costs the Director more CPU than the database's own work; so
the check-ins that arrive while one is being written are written together,
by the thread that leads (no thread of its own: the first waiting request
leads, and hands the lead to the next waiting one when its own item is done).
Every request still returns only after the transaction holding its item
committed: a 2xx answer means the manifest is stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar, cast

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    key: Hashable
    event: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    outcome: object = None


@dataclass(eq=False)
class Arrival:
    """A request being checked that will submit (``GroupCommit.arriving``)."""

    submitted: bool = False


class GroupCommit(Generic[T, R]):
    """Batches of up to ``max_batch`` items, with distinct keys, given to ``write`` together.

    ``write(items)`` runs one transaction and returns one outcome per item
    (a result, or an exception for an item it refused without failing the
    others); if it raises, each item of the batch is written alone, so one
    bad item cannot fail the others. A leader waits up to ``max_wait``
    seconds for the requests announced with ``arriving`` (being checked
    now) to submit, like PostgreSQL's ``commit_delay``: only when there are
    some, so a lone request is never delayed.
    """

    def __init__(
        self,
        write: Callable[[Sequence[T]], Sequence[R | BaseException]],
        key: Callable[[T], Hashable],
        max_batch: int = 32,
        max_wait: float = 0.005,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._write = write
        self._key = key
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._lock = threading.Condition()
        self._queue: list[_Entry[T, R]] = []
        self._leading = False
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
        entry: _Entry[T, R] = _Entry(item, self._key(item))
        with self._lock:
            self._queue.append(entry)
            if arrival is not None and not arrival.submitted:
                arrival.submitted = True
                self._arriving -= 1
                self._lock.notify_all()
            lead = not self._leading
            self._leading = True
        while True:
            if lead:
                self._lead(entry)
            entry.event.wait()
            if entry.done:
                break
            lead = True  # the previous leader handed the lead to this request
        if isinstance(entry.outcome, BaseException):
            raise entry.outcome
        return cast(R, entry.outcome)  # the writer's result when not an exception

    def _take(self) -> list[_Entry[T, R]]:
        """The next batch: oldest first, one item per key (the others wait their turn)."""
        with self._lock:
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
            return batch

    def _lead(self, own: _Entry[T, R]) -> None:
        try:
            while not own.done:
                self._run(self._take())
        finally:
            with self._lock:
                if self._queue:
                    self._queue[0].event.set()  # it leads next (it is not done)
                else:
                    self._leading = False

    def _run(self, batch: list[_Entry[T, R]]) -> None:
        try:
            outcomes: Sequence[object] = self._write([e.item for e in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(batch)} items")
        except Exception as e:
            if len(batch) == 1:
                outcomes = [e]
            else:
                logger.warning("a batch of %d failed (%s): writing each alone", len(batch), e)
                outcomes = []
                for entry in batch:
                    try:
                        outcomes.extend(self._write([entry.item]))
                    except Exception as alone:
                        outcomes.append(alone)
        for entry, outcome in zip(batch, outcomes, strict=True):
            entry.outcome = outcome
            entry.done = True
            entry.event.set()
