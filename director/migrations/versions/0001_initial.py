"""Initial Director inventory.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vehicles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("vin", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=True),
        sa.Column("metadata_expires", sa.DateTime(), nullable=True),
        sa.Column("root_version", sa.Integer(), nullable=False),
        sa.Column("targets_version", sa.Integer(), nullable=False),
        sa.UniqueConstraint("vin"),
    )
    op.create_table(
        "ecus",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "vehicle_id",
            sa.Integer(),
            sa.ForeignKey("vehicles.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("serial", sa.String(128), nullable=False),
        sa.Column("hardware_id", sa.String(128), nullable=False),
        sa.Column("public_key", sa.JSON(), nullable=False),
        sa.Column("is_primary", sa.Boolean(), nullable=False),
        sa.Column("last_report_counter", sa.BigInteger(), nullable=True),
        sa.Column("last_report_at", sa.DateTime(), nullable=True),
        sa.Column("installed", sa.JSON(), nullable=True),
        sa.Column("last_result", sa.String(32), nullable=True),
        sa.Column("last_result_text", sa.Text(), nullable=True),
        sa.UniqueConstraint("serial"),
    )
    op.create_index("ix_ecus_vehicle_id", "ecus", ["vehicle_id"])
    op.create_index("ix_ecus_hardware_id", "ecus", ["hardware_id"])
    op.create_table(
        "manifests",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "vehicle_id",
            sa.Integer(),
            sa.ForeignKey("vehicles.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("received_at", sa.DateTime(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_manifests_vehicle_id", "manifests", ["vehicle_id"])
    op.create_table(
        "assignments",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "ecu_id", sa.Integer(), sa.ForeignKey("ecus.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("image", sa.String(255), nullable=False),
        sa.Column("length", sa.BigInteger(), nullable=False),
        sa.Column("hashes", sa.JSON(), nullable=False),
        sa.Column("custom", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_assignments_ecu_id", "assignments", ["ecu_id"])
    op.create_index("ix_assignments_status", "assignments", ["status"])
    op.create_table(
        "install_results",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "ecu_id", sa.Integer(), sa.ForeignKey("ecus.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "manifest_id",
            sa.Integer(),
            sa.ForeignKey("manifests.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "assignment_id",
            sa.Integer(),
            sa.ForeignKey("assignments.id", ondelete="SET NULL"),
            nullable=True,
        ),
        sa.Column("result", sa.String(32), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("image", sa.String(255), nullable=True),
        sa.Column("received_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_install_results_ecu_id", "install_results", ["ecu_id"])
    op.create_table(
        "attacks",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "vehicle_id",
            sa.Integer(),
            sa.ForeignKey("vehicles.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column(
            "ecu_id", sa.Integer(), sa.ForeignKey("ecus.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column(
            "manifest_id",
            sa.Integer(),
            sa.ForeignKey("manifests.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("attack", sa.String(64), nullable=False),
        sa.Column("report_counter", sa.BigInteger(), nullable=False),
        sa.Column("detected_at", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_attacks_vehicle_id", "attacks", ["vehicle_id"])
    op.create_table(
        "metadata_files",
        sa.Column(
            "vehicle_id",
            sa.Integer(),
            sa.ForeignKey("vehicles.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("filename", sa.String(64), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "root_metadata",
        sa.Column("version", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "root_metadata",
        "metadata_files",
        "attacks",
        "install_results",
        "assignments",
        "manifests",
        "ecus",
        "vehicles",
    ):
        op.drop_table(table)
