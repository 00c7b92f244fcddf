"""Fleet rollout control: campaigns, vehicle attributes, quarantine, ECU health, audit log.

Issue 14: phased campaigns with halt rules (``campaigns``,
``campaign_vehicles``), attributes that campaign target groups filter on
(``vehicle_attributes``), quarantined vehicles (``quarantines``) and the
images each ECU legitimately ran (``ecu_seen_images``), the health part of
each ECU's last report (``ecu_health``), and operator actions
(``fleet_audit_log``). Only new tables: existing rows are untouched.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _fk(column: str, table: str) -> sa.Column[int]:
    return sa.Column(
        column, sa.Integer(), sa.ForeignKey(f"{table}.id", ondelete="CASCADE"), nullable=False
    )


def upgrade() -> None:
    op.create_table(
        "vehicle_attributes",
        _fk("vehicle_id", "vehicles"),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.String(255), nullable=False),
        sa.PrimaryKeyConstraint("vehicle_id", "name"),
    )
    op.create_table(
        "campaigns",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("bundle", sa.JSON(), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("phases", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("phase_started_at", sa.DateTime(), nullable=False),
        sa.Column("halt_reason", sa.Text(), nullable=True),
        sa.Column("on_halt", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("name"),
    )
    op.create_index("ix_campaigns_status", "campaigns", ["status"])
    op.create_table(
        "campaign_vehicles",
        _fk("campaign_id", "campaigns"),
        _fk("vehicle_id", "vehicles"),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("install_failed", sa.Boolean(), nullable=False),
        sa.Column("rolled_back", sa.Boolean(), nullable=False),
        sa.Column("health_failed", sa.Boolean(), nullable=False),
        sa.Column("consent", sa.String(16), nullable=True),
        sa.Column("assigned_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("campaign_id", "vehicle_id"),
    )
    op.create_index("ix_campaign_vehicles_vehicle_id", "campaign_vehicles", ["vehicle_id"])
    op.create_table(
        "quarantines",
        sa.Column("id", sa.Integer(), primary_key=True),
        _fk("vehicle_id", "vehicles"),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("since", sa.DateTime(), nullable=False),
        sa.Column("released_at", sa.DateTime(), nullable=True),
        sa.Column("released_by", sa.String(128), nullable=True),
    )
    op.create_index("ix_quarantines_vehicle_id", "quarantines", ["vehicle_id"])
    op.create_table(
        "ecu_seen_images",
        _fk("ecu_id", "ecus"),
        sa.Column("digest", sa.String(160), nullable=False),
        sa.PrimaryKeyConstraint("ecu_id", "digest"),
    )
    op.create_table(
        "ecu_health",
        _fk("ecu_id", "ecus"),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("traps", sa.Integer(), nullable=False),
        sa.Column("capability_denials", sa.JSON(), nullable=False),
        sa.Column("rollbacks", sa.JSON(), nullable=False),
        sa.Column("payload", sa.String(255), nullable=True),
        sa.Column("reported_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("ecu_id"),
    )
    op.create_table(
        "fleet_audit_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "fleet_audit_log",
        "ecu_health",
        "ecu_seen_images",
        "quarantines",
        "campaign_vehicles",
        "campaigns",
        "vehicle_attributes",
    ):
        op.drop_table(table)
