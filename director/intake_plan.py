"""What an accepted manifest writes, worked out before anything is written (``director.intake``).

Pure functions over the rows read under the vehicle's lock (``director.intake_sql``):
the ECUs' new report state, attacks, install results, completed assignments,
and whether the manifest gets a ``manifests`` row (Uptane 2.1 5.4.2; issue 12).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from director.records import INSTALLED, AssignmentInfo, AttackInfo, ManifestReceipt
from uptane.errors import ATTACK_REPLAYED_REPORT, ManifestError
from uptane.manifest import EcuVersionReport

# the Director's log name from before it was split into modules
logger = logging.getLogger("director.service")


@dataclass(frozen=True)
class Verified:
    """A manifest that passed every check that needs no lock (``ManifestIntake._verify``)."""

    vin: str
    data: bytes
    keyids: Mapping[str, str]
    primary: str
    reports: Mapping[str, EcuVersionReport]
    # the ECU keys came from the per-process cache (``ManifestIntake._ecu_keys``)
    cached_keys: bool = False
    # registered secondaries with no report in the manifest (unreachable this cycle)
    unreported: tuple[str, ...] = ()


@dataclass
class Plan:
    """The writes of one accepted manifest, and its receipt."""

    vin: str
    vehicle_id: int
    data: bytes
    reports: dict[str, EcuVersionReport]
    # the vehicle's and its ECUs' rows read under the lock (``director.intake_sql``)
    vehicle: Any = None
    previous: Mapping[str, Any] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)
    attack_rows: list[dict[str, Any]] = field(default_factory=list)
    result_rows: list[dict[str, Any]] = field(default_factory=list)
    completed: list[AssignmentInfo] = field(default_factory=list)
    attacks: list[AttackInfo] = field(default_factory=list)
    refused_reports: dict[str, str] = field(default_factory=dict)
    unreported: tuple[str, ...] = ()
    # kept as a ``manifests`` row (else only as the vehicle's ``last_manifest``)
    changed: bool = False
    metadata_version: int = 0

    def receipt(self) -> ManifestReceipt:
        return ManifestReceipt(
            vin=self.vin,
            metadata_version=self.metadata_version,
            completed=tuple(self.completed),
            attacks=tuple(self.attacks),
            refused_reports=dict(self.refused_reports),
            unreported=self.unreported,
        )


def hashes_match(installed: Mapping[str, Any], assigned: Mapping[str, str]) -> bool:
    """The reported hashes equal the assigned target's, for every function both name.

    At least one function must be in common; an ECU may report fewer hash
    functions than the target lists (the ASN.1 report carries at most four).
    """
    reported = installed.get("hashes")
    if not isinstance(reported, Mapping):
        return False
    common = set(reported) & set(assigned)
    return bool(common) and all(reported[name] == assigned[name] for name in common)


def naive_utc(value: datetime) -> str:
    """``value`` as the database stores it (``director.db.UTCDateTime``): naive UTC, ISO."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat()


def db_text(value: str) -> str:
    """Text an ECU chose, made storable everywhere (PostgreSQL refuses NUL)."""
    return value.replace("\x00", "\ufffd")


def installed_dict(report: EcuVersionReport) -> dict[str, Any] | None:
    if report.installed is None:
        return None
    img = report.installed
    return {
        "filename": db_text(img.filename),
        "length": img.length,
        "hashes": dict(img.hashes),
        "release_counter": img.release_counter,
    }


def changes_record(
    report: EcuVersionReport, ecu: Any, installed: Mapping[str, Any] | None, text: str
) -> bool:
    """Whether ``report`` says more than a new counter and time for this ECU.

    Its first report, another installed image or install result, or another
    health than stored: such a manifest is kept in ``manifests`` (5.4.2.2).
    """
    if ecu.last_report_counter is None:
        return True
    if installed != ecu.installed or (report.last_result, text) != (
        ecu.last_result,
        ecu.last_result_text,
    ):
        return True
    h = report.health
    return h is not None and (
        h.status,
        h.traps,
        dict(h.capability_denials),
        dict(h.rollbacks),
    ) != (ecu.health_status, ecu.health_traps, ecu.health_denials, ecu.health_rollbacks)


def plan_record(
    verified: Verified,
    vehicle: Any,
    ecus: Mapping[str, Any],
    dropped: Mapping[str, tuple[ManifestError, EcuVersionReport]],
    now: datetime,
) -> Plan:
    """The writes of an accepted manifest: counters, installed images, attacks, results.

    ``vehicle`` and ``ecus`` are the rows read under the vehicle's lock;
    ``dropped`` the secondaries' reports left out (not fresh) with why. The
    manifest gets a ``manifests`` row only when it changes what is recorded
    (``changes_record``), reports an attack or a result, or has a report left
    out: a check-in that only moves counters and times is kept as the
    vehicle's ``last_manifest`` alone (issue 12, docs/director-scale.md).
    """
    reports = {s: r for s, r in verified.reports.items() if s not in dropped}
    plan = Plan(
        verified.vin,
        vehicle.id,
        verified.data,
        reports,
        vehicle=vehicle,
        previous=ecus,
        changed=bool(dropped),
        metadata_version=vehicle.targets_version,
        unreported=verified.unreported,
    )
    # An ECU time ahead of ours (within the tolerance) is stored as our time, so an
    # ECU whose fast clock is corrected is not refused until it catches up again.
    cap = now.replace(microsecond=0)
    for serial, report in sorted(reports.items()):
        ecu = ecus[serial]
        installed = installed_dict(report)
        text = db_text(report.last_result_text)
        report_time = min(report.latest_time, cap)
        if ecu.last_report_time is not None:
            report_time = max(report_time, ecu.last_report_time)
        plan.updates.append(
            {
                "b_ecu_id": ecu.id,
                "counter": report.report_counter,
                "at": now,
                "time": report_time,
                "b_installed": installed,
                "result": report.last_result,
                "text": text,
            }
        )
        plan.changed = plan.changed or changes_record(report, ecu, installed, text)
        for attack in report.attacks_detected:
            plan.attack_rows.append(
                {"ecu_id": ecu.id, "attack": attack, "report_counter": report.report_counter}
            )
            plan.attacks.append(AttackInfo(serial, attack, report.report_counter, now))
        done = (
            ecu.a_id is not None
            and installed is not None
            and installed["filename"] == ecu.a_image
            and installed["length"] == ecu.a_length
            and hashes_match(installed, ecu.a_hashes)
        )
        if done:
            plan.completed.append(
                AssignmentInfo(
                    id=ecu.a_id,
                    vin=verified.vin,
                    ecu_serial=serial,
                    image=ecu.a_image,
                    length=ecu.a_length,
                    hashes=dict(ecu.a_hashes),
                    custom=dict(ecu.a_custom),
                    status=INSTALLED,
                    created_at=ecu.a_created_at,
                )
            )
        result_changed = (report.last_result, text) != (ecu.last_result, ecu.last_result_text)
        if done or (result_changed and report.last_result != "ok"):
            plan.result_rows.append(
                {
                    "ecu_id": ecu.id,
                    "assignment_id": ecu.a_id if done else None,
                    "result": report.last_result,
                    "text": text,
                    "image": installed["filename"] if installed else None,
                    "received_at": now,
                }
            )
    for serial, (problem, left_out) in sorted(dropped.items()):
        name = ATTACK_REPLAYED_REPORT if problem.reason == "replayed_report" else problem.reason
        plan.attack_rows.append(
            {"ecu_id": ecus[serial].id, "attack": name, "report_counter": left_out.report_counter}
        )
        plan.attacks.append(AttackInfo(serial, name, left_out.report_counter, now))
        plan.refused_reports[serial] = problem.reason
        logger.warning("vehicle %s: report of ECU %s left out: %s", verified.vin, serial, problem)
    if verified.unreported:
        logger.info("vehicle %s: no report from ECUs %s", verified.vin, list(verified.unreported))
    plan.changed = plan.changed or bool(plan.attack_rows or plan.result_rows)
    return plan
