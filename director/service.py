"""The Director service: inventory, assignments, manifests, per-vehicle metadata.

No HTTP here (``director.app`` wraps it). ``Director`` is built from one part
per responsibility, each in its own module:

- ``director.signing``: the per-vehicle Director repository (Uptane 2.1 5.2,
  5.3.2): the shared root chain, signing each vehicle's targets, snapshot and
  timestamp, serving metadata and re-signing what nears expiry.
- ``director.inventory``: registering vehicles and ECU keys (5.4.2.2), status.
- ``director.assignments``: assigning Image repository targets to ECUs (5.2.3).
- ``director.intake``: checking and recording vehicle version manifests
  (5.3.2.1, 5.4.2).
- ``director.records``: the values all of them take and return.

All state is in the database; several ``Director`` objects (processes) can
share one PostgreSQL database.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta

from securesystemslib.signer import Signer

from director.assignments import Assignments, ImageLookup
from director.bulk import BulkImport, ImportResult, VehicleRecord
from director.config import DEFAULT_REPORT_TIME_TOLERANCE, DirectorConfig
from director.db import Database
from director.fleet import FleetControl
from director.intake import ManifestIntake
from director.inventory import MAX_ECUS, check_ecu_key
from director.records import (
    INSTALLED,
    PENDING,
    SUPERSEDED,
    AssignmentInfo,
    AttackInfo,
    AuditInfo,
    EcuSpec,
    EcuStatus,
    InstallResultInfo,
    ManifestReceipt,
    VehicleStatus,
)
from director.signing import ONLINE_ROLES
from uptane.errors import ConfigError
from uptane.manifest import MAX_MANIFEST_SIZE
from uptane.repository import Clock, utc_now

__all__ = [
    "INSTALLED",
    "MAX_ECUS",
    "ONLINE_ROLES",
    "PENDING",
    "SUPERSEDED",
    "AssignmentInfo",
    "AttackInfo",
    "AuditInfo",
    "Director",
    "EcuSpec",
    "EcuStatus",
    "ImageLookup",
    "ImportResult",
    "InstallResultInfo",
    "ManifestReceipt",
    "VehicleRecord",
    "VehicleStatus",
    "check_ecu_key",
]


class Director(FleetControl, BulkImport, Assignments, ManifestIntake):
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
