"""Metadata signer: vehicles whose signed metadata is to be re-signed (issue 12).

An assignment to many vehicles writes the assignment rows in short batches
and marks the vehicles ``metadata_stale``; a signer (``director.metadata_signer``)
claims stale vehicles in batches (``FOR UPDATE SKIP LOCKED`` on PostgreSQL)
and re-signs them. Until then a vehicle keeps being served its previous,
valid metadata. A partial index on the VINs of stale vehicles gives signers
batches in VIN order without a scan or a sort.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("vehicles") as batch:
        batch.add_column(
            sa.Column("metadata_stale", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_index(
        "ix_vehicles_metadata_stale",
        "vehicles",
        ["vin"],
        postgresql_where=sa.text("metadata_stale"),
        sqlite_where=sa.text("metadata_stale"),
    )


def downgrade() -> None:
    op.drop_index("ix_vehicles_metadata_stale", table_name="vehicles")
    with op.batch_alter_table("vehicles") as batch:
        batch.drop_column("metadata_stale")
