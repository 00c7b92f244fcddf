"""Values the Director takes and returns: ECU specs, statuses, assignments, receipts.

Plain frozen dataclasses, so callers (the HTTP app, the CLI, the simulator)
never see database rows; also the states an assignment row goes through.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from securesystemslib.signer import Key

from director.db import Assignment

# States of an assignment (``Assignment.status``).
PENDING = "pending"
INSTALLED = "installed"
SUPERSEDED = "superseded"


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
    # secondaries' reports left out of the record (not fresh), with the reason
    refused_reports: Mapping[str, str] = field(default_factory=dict)
    # secondaries the manifest has no report from (unreachable): their state is kept
    unreported: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuditInfo:
    """One audit log entry: an operator action on a check (``director.db.AuditEntry``)."""

    id: int
    at: datetime
    actor: str
    action: str
    vin: str | None
    ecu_serial: str | None
    detail: Mapping[str, Any]


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
