"""Per-vehicle metadata in the database: a ``MetadataStore`` for ``SigningRepository``.

Every vehicle has its own Director targets, snapshot and timestamp (Uptane
2.1, 5.2), signed once and kept as bytes in ``metadata_files`` (one row per
file name) so any app process can serve them. The root chain is shared by
all vehicles and read from ``root_metadata``; the online Director never
writes root (its keys are offline).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from director.db import MetadataFile, RootMetadata

# What a vehicle's metadata URL may name (consistent snapshots; JSON and DER).
FILENAME_RE: Final = re.compile(
    r"^(?:([1-9][0-9]{0,9})\.)?(root|timestamp|snapshot|targets)\.(json|der)\Z"
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
    """``uptane.repository.MetadataStore`` over one vehicle's rows, in one transaction."""

    def __init__(self, session: Session, vehicle_id: int, now: datetime) -> None:
        self.session = session
        self.vehicle_id = vehicle_id
        self.now = now

    def read(self, filename: str) -> bytes | None:
        if FILENAME_RE.match(filename) and filename.split(".")[-2] == "root":
            return read_root_file(self.session, filename)
        row = self.session.get(MetadataFile, (self.vehicle_id, filename))
        return None if row is None else row.data

    def write(self, filename: str, data: bytes) -> None:
        if filename.split(".")[-2] == "root":
            raise RuntimeError("the online Director never writes root metadata")
        row = self.session.get(MetadataFile, (self.vehicle_id, filename))
        if row is None:
            self.session.add(
                MetadataFile(
                    vehicle_id=self.vehicle_id, filename=filename, data=data, updated_at=self.now
                )
            )
        else:
            row.data = data
            row.updated_at = self.now

    def prune(self, role: str, keep_from: int) -> None:
        """Drop versioned files of ``role`` older than version ``keep_from``."""
        names = self.session.scalars(
            select(MetadataFile.filename).where(MetadataFile.vehicle_id == self.vehicle_id)
        ).all()
        old = []
        for name in names:
            m = FILENAME_RE.match(name)
            if m and m.group(2) == role and m.group(1) is not None and int(m.group(1)) < keep_from:
                old.append(name)
        if old:
            self.session.execute(
                delete(MetadataFile).where(
                    MetadataFile.vehicle_id == self.vehicle_id, MetadataFile.filename.in_(old)
                )
            )
