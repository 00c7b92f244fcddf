"""Tables of fleet rollout control: campaigns, vehicle attributes, quarantine, health, audit.

Kept apart from ``director.db`` (the check-in schema) but on the same
declarative ``Base``, so the Alembic migration ``0003`` creates them and the
model/migration comparison covers them. ``director.campaigns``,
``director.quarantine`` and ``director.health`` read and write them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from director.db import Base, UTCDateTime


class VehicleAttribute(Base):
    """A name/value pair an operator stored for a vehicle (campaign target filters)."""

    __tablename__ = "vehicle_attributes"

    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Campaign(Base):
    """A phased rollout of one image per hardware id to a target group."""

    __tablename__ = "campaigns"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    # {hardware_id: {"image", "length", "hashes", "release_counter"}}
    bundle: Mapped[dict[str, Any]] = mapped_column(JSON)
    # {"all": true} | {"vins": [...]} | {"attributes": {name: value}}
    target: Mapped[dict[str, Any]] = mapped_column(JSON)
    # [{"name", "vehicles" | "percent", "minutes", "halt": {rule: limit}}]
    phases: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    # active | paused | halted | aborted | completed
    status: Mapped[str] = mapped_column(String(16), index=True)
    phase: Mapped[int] = mapped_column(Integer, default=0)
    phase_started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    halt_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # what a halt does besides withdrawing: {"rollback": {hardware_id: {"image", ...}}}
    on_halt: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class CampaignVehicle(Base):
    """One vehicle a campaign assigned to, in which phase, and what came of it."""

    __tablename__ = "campaign_vehicles"

    campaign_id: Mapped[int] = mapped_column(
        ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True
    )
    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    phase: Mapped[int] = mapped_column(Integer)
    # assigned -> installed (or stays assigned while it retries)
    status: Mapped[str] = mapped_column(String(16))
    install_failed: Mapped[bool] = mapped_column(Boolean, default=False)
    rolled_back: Mapped[bool] = mapped_column(Boolean, default=False)
    health_failed: Mapped[bool] = mapped_column(Boolean, default=False)
    # the vehicle's last consent answer: deferred | declined (not a failure)
    consent: Mapped[str | None] = mapped_column(String(16), nullable=True)
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class QuarantineEntry(Base):
    """A vehicle taken out of rollouts, until an operator releases it."""

    __tablename__ = "quarantines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    vehicle_id: Mapped[int] = mapped_column(
        ForeignKey("vehicles.id", ondelete="CASCADE"), index=True
    )
    # unexpected_image | repeated_attacks
    reason: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(Text)
    since: Mapped[datetime] = mapped_column(UTCDateTime())
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    released_by: Mapped[str | None] = mapped_column(String(128), nullable=True)


class SeenImage(Base):
    """An image an ECU legitimately ran (its first report, or an assignment it installed)."""

    __tablename__ = "ecu_seen_images"

    ecu_id: Mapped[int] = mapped_column(ForeignKey("ecus.id", ondelete="CASCADE"), primary_key=True)
    # "function:hexdigest" of the image's first hash (sorted by function name)
    digest: Mapped[str] = mapped_column(String(160), primary_key=True)


class EcuHealthRecord(Base):
    """The health part of an ECU's last signed version report (counts since its boot image)."""

    __tablename__ = "ecu_health"

    ecu_id: Mapped[int] = mapped_column(ForeignKey("ecus.id", ondelete="CASCADE"), primary_key=True)
    # healthy | degraded | unhealthy | unknown
    status: Mapped[str] = mapped_column(String(16))
    traps: Mapped[int] = mapped_column(Integer)
    # {capability: denials}, {reason: rollbacks}
    capability_denials: Mapped[dict[str, int]] = mapped_column(JSON)
    rollbacks: Mapped[dict[str, int]] = mapped_column(JSON)
    # the image the health is about (filename), if any
    payload: Mapped[str | None] = mapped_column(String(255), nullable=True)
    # when the ECU first reported this health (rows change only when it does)
    reported_at: Mapped[datetime] = mapped_column(UTCDateTime())


class FleetAuditEntry(Base):
    """An operator action on fleet rollout state (campaign changes, quarantine releases)."""

    __tablename__ = "fleet_audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(128))
    detail: Mapped[str] = mapped_column(Text)
