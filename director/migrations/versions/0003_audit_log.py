"""Audit log: operator actions that change a check, such as resetting a report counter.

Uptane 2.1 5.4.2.1: report counters only go up; when an ECU is reflashed
(its counter starts again) or jammed by a compromised ECU (a counter of
2^63-1), the operator resets the counter, and that is recorded here.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("actor", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("vin", sa.String(128), nullable=True),
        sa.Column("ecu_serial", sa.String(128), nullable=True),
        sa.Column("detail", sa.JSON(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_log")
