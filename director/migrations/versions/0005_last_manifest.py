"""The latest vehicle version manifest on the vehicle row; history rows only on change.

Issue 12: a check-in that changes nothing but report counters and times no
longer adds a ``manifests`` row; the vehicle's latest verified manifest is
kept in ``vehicles.last_manifest`` (received at ``vehicles.last_seen``).
Existing vehicles get theirs from their newest ``manifests`` row.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vehicles") as batch:
        batch.add_column(sa.Column("last_manifest", sa.LargeBinary(), nullable=True))
    op.execute(
        "UPDATE vehicles SET last_manifest = (SELECT m.body FROM manifests m "
        "WHERE m.vehicle_id = vehicles.id ORDER BY m.id DESC LIMIT 1)"
    )


def downgrade() -> None:
    with op.batch_alter_table("vehicles") as batch:
        batch.drop_column("last_manifest")
