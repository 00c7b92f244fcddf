"""ECU report time: the ECU's own clock in its last accepted version report.

Uptane 2.1, 5.4.2.1: the Director refuses a report whose time is earlier than
the ECU's previous one. ``ecus.last_report_at`` is when the Director received
it; ``ecus.last_report_time`` is what the ECU said. Existing ECUs start
without one (their next report sets it).

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ecus") as batch:
        batch.add_column(sa.Column("last_report_time", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ecus") as batch:
        batch.drop_column("last_report_time")
