"""Campaign outcomes from vehicles' signed reports (issue 14).

``observe_campaigns`` runs inside the transaction that records an accepted
manifest (``director.fleet``): for each campaign the vehicle is in, a result
code that changed since the ECU's previous report counts once (a rollback,
an install failure), an ECU running the campaign's image (same name, length
and hashes) while its report says unhealthy is a health failure, a
``deferred`` or ``declined`` answer of the vehicle's install policy is
noted (not a failure), and a vehicle whose bundle ECUs all run their images
is installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from director.fleet_db import Campaign, CampaignVehicle
from uptane.manifest import EcuVersionReport

# states of a vehicle in a campaign
ASSIGNING, ASSIGNED, INSTALLED_V, CANCELLED, REFUSED = (
    "assigning",
    "assigned",
    "installed",
    "cancelled",
    "refused",
)
# the states whose vehicles' reports campaigns still read
OBSERVED = (ASSIGNING, ASSIGNED, INSTALLED_V)
# ECU results that count as a rollback, and as an install failure
ROLLBACK_RESULTS = frozenset({"trialFailed", "rolledBack"})
FAILURE_RESULTS = frozenset(
    {
        "metadataRejected",
        "imageMismatch",
        "transferIncomplete",
        "noSpace",
        "badRequest",
        "internalError",
    }
)
CONSENT_RESULTS = frozenset({"deferred", "declined"})


class CampaignOutcomes:
    """What each accepted manifest tells the campaigns its vehicle is in."""

    def observe_campaigns(
        self,
        session: Session,
        vehicle_id: int,
        previous: Mapping[str, Any],
        reports: Mapping[str, EcuVersionReport],
        unhealthy: Sequence[str],
        now: datetime,
    ) -> None:
        """Update this vehicle's campaign outcomes from an accepted manifest.

        ``previous`` holds each ECU's stored row before this manifest (serial,
        hardware id, installed, last result and text); a result counts once,
        when it changes. ``unhealthy`` are the serials whose report says the
        running module is unhealthy.
        """
        rows = session.execute(
            select(CampaignVehicle, Campaign.bundle)
            .join(Campaign, Campaign.id == CampaignVehicle.campaign_id)
            .where(
                CampaignVehicle.vehicle_id == vehicle_id,
                CampaignVehicle.status.in_(OBSERVED),
            )
        ).all()
        for cv, bundle in rows:
            before = (cv.status, cv.consent, cv.rolled_back, cv.install_failed, cv.health_failed)
            consent = cv.consent
            done = True
            for serial, report in reports.items():
                prev = previous[serial]
                changed = (report.last_result, report.last_result_text) != (
                    prev.last_result,
                    prev.last_result_text,
                )
                if report.last_result in CONSENT_RESULTS and cv.status != INSTALLED_V:
                    consent = report.last_result
                entry = bundle.get(prev.hardware_id)
                if entry is None:
                    continue
                if changed and report.last_result in ROLLBACK_RESULTS and not cv.rolled_back:
                    cv.rolled_back = True
                elif changed and report.last_result in FAILURE_RESULTS and not cv.install_failed:
                    cv.install_failed = True
                runs = report.installed is not None and _matches(report, entry)
                if runs and serial in unhealthy and not cv.health_failed:
                    cv.health_failed = True
                done = done and runs
            if done and cv.status != INSTALLED_V:
                cv.status = INSTALLED_V
                consent = None
            if consent != cv.consent:
                cv.consent = consent
            after = (cv.status, cv.consent, cv.rolled_back, cv.install_failed, cv.health_failed)
            if after != before:  # a row is written only when its outcome changes
                cv.updated_at = now


def _matches(report: EcuVersionReport, entry: Mapping[str, Any]) -> bool:
    img = report.installed
    if img is None or img.filename != entry["image"] or img.length != entry["length"]:
        return False
    common = set(img.hashes) & set(entry["hashes"])
    return bool(common) and all(img.hashes[h] == entry["hashes"][h] for h in common)
