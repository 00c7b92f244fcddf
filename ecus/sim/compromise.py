"""Signing as ONE compromised repository (Uptane 2.1, 4.3.4; DESIGN 9).

Uptane's promise is that an attacker needs both the Director and the Image
repository to install arbitrary software. The simulator proves the half it
can: each helper here holds the keys of one repository only.

- ``craft_director_targets`` signs a vehicle's Director targets, snapshot and
  timestamp (and the DER targets the secondaries get) with the Director's
  online keys after ``mutate`` edited the targets, into the Director's own
  database: what an attacker holding those keys and the database can serve.
  ``director_resign`` makes the real Director sign the vehicle's metadata
  again from its inventory (a legitimate new version, or the undo of a
  crafted one: versions only go up).
- ``ImageRepoCompromise`` holds ONE of the Image repository's targets keys
  (below its threshold) plus the online snapshot and timestamp keys, and signs
  metadata that a ``Switchboard`` serves; nothing is written to the repository.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer
from sqlalchemy import select
from tuf.api.metadata import Metadata, MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from director.db import Vehicle
from director.service import Director
from director.store import DBMetadataStore
from image_repo.layout import CONFIG_FILE, METADATA_DIR, RepoConfig
from uptane import der_metadata
from uptane.repository import ExpiryPolicy, SigningRepository


def craft_director_targets(
    director: Director,
    signers: Iterable[Signer],
    vin: str,
    mutate: Callable[[Targets], None],
    *,
    expiry: timedelta,
    now: datetime | None = None,
) -> int:
    """Sign new Director targets/snapshot/timestamp for ``vin``; returns the targets version.

    ``signers`` are the Director's online keys: the targets are signed as the
    Director would sign them (JSON and DER), whatever ``mutate`` put in them.
    """
    moment = now if now is not None else director.clock()
    pool = {s.public_key.keyid: s for s in signers}
    with director.db.transaction(write=True) as session:
        vehicle = session.scalars(select(Vehicle).where(Vehicle.vin == vin)).one()
        store = DBMetadataStore(session, vehicle.id, moment)
        repo = SigningRepository(
            store=store,
            signers=pool,
            expiry=ExpiryPolicy(targets=expiry, snapshot=expiry, timestamp=expiry),
            clock=lambda: moment,
            meta_hashes=True,  # as the Director lists them
        )
        with repo.edit_targets() as targets:
            mutate(targets)
        repo.do_snapshot(force=True)
        repo.do_timestamp(force=True)
        md = repo.open(Targets.type)
        keyids = repo.root().roles[Targets.type].keyids
        der = der_metadata.to_der_metadata(md, [s for k, s in pool.items() if k in keyids])
        store.write(f"{md.signed.version}.targets.der", der)
        store.write("targets.der", der)
        return int(md.signed.version)


def director_resign(director: Director, vin: str) -> int:
    """The real Director signs ``vin``'s metadata again from its inventory; returns the version.

    Uses the Director's own signing step (``Director._sign_vehicle``): the
    targets list exactly the vehicle's pending assignments, under a new version.
    """
    now = director.clock()
    with director.db.transaction(write=True) as session:
        vehicle = director._vehicle(session, vin, lock=True)
        director._sign_vehicle(session, vehicle, now)
        return int(vehicle.targets_version)


@dataclass(frozen=True)
class ServedMetadata:
    """Metadata files to serve in place of the real ones: URL path -> bytes."""

    files: Mapping[str, bytes]
    targets_version: int


class ImageRepoCompromise:
    """An attacker with one Image targets key and the online snapshot/timestamp keys.

    ``repo_dir`` is an Image repository directory (``image_repo.layout``);
    ``targets_keys`` says how many of the targets role's keys were stolen
    (default one: below a threshold of two or more).
    """

    def __init__(self, repo_dir: str | Path, *, targets_keys: int = 1) -> None:
        self.repo_dir = Path(repo_dir)
        config = RepoConfig.from_bytes(
            (self.repo_dir / CONFIG_FILE).read_bytes(), str(self.repo_dir)
        )
        self.targets_signers = [ref.signer() for ref in config.roles[Targets.type][:targets_keys]]
        self.snapshot_signers = [ref.signer() for ref in config.roles[Snapshot.type]]
        self.timestamp_signers = [ref.signer() for ref in config.roles[Timestamp.type]]

    def _load(self, filename: str) -> Metadata[Any]:
        return Metadata.from_bytes((self.repo_dir / METADATA_DIR / filename).read_bytes())

    @staticmethod
    def _sign(md: Metadata[Any], signers: Iterable[Signer]) -> bytes:
        md.signatures.clear()
        for signer in signers:
            md.sign(signer, append=True)
        return md.to_bytes(JSONSerializer(compact=True))

    @staticmethod
    def _meta(old: MetaFile, version: int, data: bytes) -> MetaFile:
        """A MetaFile for ``data`` listing what ``old`` listed (length/hashes if any)."""
        length = len(data) if old.length is not None else None
        hashes = {a: hashlib.new(a, data).hexdigest() for a in old.hashes} if old.hashes else None
        return MetaFile(version=version, length=length, hashes=hashes)

    def sign_targets(self, mutate: Callable[[Targets], None]) -> ServedMetadata:
        """New top-level targets (edited by ``mutate``), snapshot and timestamp.

        Returns the files to serve under ``/metadata/``: ``timestamp.json``,
        ``N.snapshot.json`` and ``M.targets.json``, each one version above the
        repository's current ones.
        """
        timestamp: Metadata[Timestamp] = self._load("timestamp.json")
        snapshot: Metadata[Snapshot] = self._load(
            f"{timestamp.signed.snapshot_meta.version}.snapshot.json"
        )
        old_targets_meta = snapshot.signed.meta[f"{Targets.type}.json"]
        targets: Metadata[Targets] = self._load(f"{old_targets_meta.version}.targets.json")

        mutate(targets.signed)
        targets.signed.version += 1
        targets_bytes = self._sign(targets, self.targets_signers)

        snapshot.signed.meta[f"{Targets.type}.json"] = self._meta(
            old_targets_meta, targets.signed.version, targets_bytes
        )
        snapshot.signed.version += 1
        snapshot_bytes = self._sign(snapshot, self.snapshot_signers)

        timestamp.signed.snapshot_meta = self._meta(
            timestamp.signed.snapshot_meta, snapshot.signed.version, snapshot_bytes
        )
        timestamp.signed.version += 1
        timestamp_bytes = self._sign(timestamp, self.timestamp_signers)
        return ServedMetadata(
            files={
                "/metadata/timestamp.json": timestamp_bytes,
                f"/metadata/{snapshot.signed.version}.snapshot.json": snapshot_bytes,
                f"/metadata/{targets.signed.version}.targets.json": targets_bytes,
            },
            targets_version=targets.signed.version,
        )


def evil_target(like: TargetFile, data: bytes, **custom: Any) -> TargetFile:
    """A target named like ``like``, with ``like``'s custom fields, describing ``data``."""
    target = TargetFile.from_data(like.path, data, list(like.hashes))
    fields = dict(like.custom or {})
    fields.update(custom)
    target.unrecognized_fields["custom"] = fields
    return target
