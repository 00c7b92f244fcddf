"""Per-vehicle metadata in the database: a ``MetadataStore`` for ``SigningRepository``.

Every vehicle has its own Director targets, snapshot and timestamp (Uptane
2.1, 5.2), signed once and kept as bytes in ``metadata_files`` (one row per
file name) so any app process can serve them. The root chain is shared by
all vehicles and read from ``root_metadata``; the online Director never
writes root (its keys are offline).

Each file is stored once (issue 12, migration 0008): ``N.targets.json``,
``N.targets.der``, ``N.snapshot.json`` and ``timestamp.json``. The
unversioned ``targets.json``, ``targets.der`` and ``snapshot.json`` are not
rows: each names the vehicle's highest stored version of that file
(``ALIASES``), which is what the copy of it held before.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

from sqlalchemy import ColumnElement, ScalarSelect, Table, bindparam, delete, func, insert, select
from sqlalchemy.orm import QueryableAttribute, Session

from director.db import MetadataFile, RootMetadata, metadata_changed
from director.metadata_build import latest_versioned

# What a vehicle's metadata URL may name (consistent snapshots; JSON and DER).
FILENAME_RE: Final = re.compile(
    r"^(?:([1-9][0-9]{0,9})\.)?(root|timestamp|snapshot|targets)\.(json|der)\Z"
)
# The unversioned names served as the vehicle's highest ``N.<name>`` (not stored).
ALIASES: Final = frozenset({"targets.json", "targets.der", "snapshot.json"})


def stored_name(filename: str) -> tuple[bool, str]:
    """How a vehicle file is looked up: (alias, the ``filename`` parameter of ``file_data``).

    An alias (``targets.json``, ...) is the ``LIKE`` pattern of its versioned
    names (``%.targets.json``); any other name is itself.
    """
    if filename in ALIASES:
        return True, f"%.{filename}"
    return False, filename


def file_data(
    vehicle_id: ColumnElement[Any] | QueryableAttribute[Any], *, alias: bool
) -> ScalarSelect[Any]:
    """The bytes of one of a vehicle's files, as a scalar subquery (bind ``filename``).

    ``alias``: ``filename`` is the pattern of ``stored_name``; the highest
    version wins (versions have no leading zeros: a longer name is a higher
    version). Either way a range of the primary key (vehicle id, file name).
    """
    f = MetadataFile.__table__.c
    if not alias:
        return (
            select(f.data)
            .where(f.vehicle_id == vehicle_id, f.filename == bindparam("filename"))
            .scalar_subquery()
        )
    return (
        select(f.data)
        .where(f.vehicle_id == vehicle_id, f.filename.like(bindparam("filename")))
        .order_by(func.length(f.filename).desc(), f.filename.desc())
        .limit(1)
        .scalar_subquery()
    )


def latest_root(session: Session) -> RootMetadata | None:
    return session.scalars(
        select(RootMetadata).order_by(RootMetadata.version.desc()).limit(1)
    ).first()


def read_root_file(session: Session, filename: str) -> bytes | None:
    """``root.json``/``root.der`` (latest) or ``N.root.json``/``N.root.der``."""
    m = FILENAME_RE.match(filename)
    if m is None or m.group(2) != "root":
        return None
    version, _, ext = m.groups()
    row = latest_root(session) if version is None else session.get(RootMetadata, int(version))
    if row is None:
        return None
    return row.data if ext == "json" else row.der


class DBMetadataStore:
    """``uptane.repository.MetadataStore`` over one vehicle's rows, in one transaction.

    The vehicle's files are read once (none for a ``new`` vehicle) and kept in
    memory. Writes go to the database at once, or with ``buffered`` only on
    ``flush`` (two statements), so signing a vehicle costs a fixed, small
    number of round trips. An alias (``targets.json``, ...) reads the highest
    stored version; writing one stores nothing, after checking that it is
    that version (``SigningRepository`` writes ``N.<role>.json`` first).
    """

    def __init__(
        self,
        session: Session,
        vehicle_id: int,
        now: datetime,
        *,
        new: bool = False,
        buffered: bool = False,
        roots: dict[str, bytes | None] | None = None,
    ) -> None:
        self.session = session
        self.buffered = buffered
        self.vehicle_id = vehicle_id
        self.now = now
        self._files: dict[str, bytes] = {}
        if not new:
            rows = session.execute(
                select(MetadataFile.filename, MetadataFile.data).where(
                    MetadataFile.vehicle_id == vehicle_id
                )
            )
            self._files = {name: bytes(data) for name, data in rows}
        # root files read in this transaction (may be shared by several stores)
        self._roots: dict[str, bytes | None] = {} if roots is None else roots
        self._changed: set[str] = set()
        self._removed: set[str] = set()

    def read(self, filename: str) -> bytes | None:
        if FILENAME_RE.match(filename) and filename.split(".")[-2] == "root":
            if filename not in self._roots:
                self._roots[filename] = read_root_file(self.session, filename)
            return self._roots[filename]
        if filename in ALIASES:
            latest = latest_versioned(self._files, filename)
            return None if latest is None else self._files[latest[1]]
        return self._files.get(filename)

    def write(self, filename: str, data: bytes) -> None:
        if filename.split(".")[-2] == "root":
            raise RuntimeError("the online Director never writes root metadata")
        if filename in ALIASES:
            if self.read(filename) != data:
                raise RuntimeError(f"{filename} is not a copy of its latest versioned file")
            return  # served as that file: nothing stored (issue 12)
        self._files[filename] = data
        self._changed.add(filename)
        self._removed.discard(filename)
        if not self.buffered:
            self.flush()

    def prune(self, role: str, keep_from: int) -> None:
        """Drop versioned files of ``role`` older than version ``keep_from``."""
        for name in list(self._files):
            m = FILENAME_RE.match(name)
            if m and m.group(2) == role and m.group(1) is not None and int(m.group(1)) < keep_from:
                del self._files[name]
                self._changed.discard(name)
                self._removed.add(name)
        if not self.buffered:
            self.flush()

    def flush(self) -> None:
        """Write the changed files and delete the pruned ones."""
        table = MetadataFile.__table__  # Core: no ORM session synchronisation
        assert isinstance(table, Table)
        gone = self._removed | self._changed
        if gone:
            metadata_changed(self.session, (self.vehicle_id,))  # read caches (issue 12)
            self.session.execute(
                delete(table).where(
                    table.c.vehicle_id == self.vehicle_id, table.c.filename.in_(sorted(gone))
                )
            )
        if self._changed:
            self.session.execute(
                insert(table),
                [
                    {
                        "vehicle_id": self.vehicle_id,
                        "filename": name,
                        "data": self._files[name],
                        "updated_at": self.now,
                    }
                    for name in sorted(self._changed)
                ],
            )
        self._changed.clear()
        self._removed.clear()
