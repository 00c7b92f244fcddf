"""Vehicle certificates: the client certificates the Director issued, and revocations.

Each client certificate issued through the Director (``register --issue-cert``,
``POST /api/vehicles/{vin}/certificate``) is recorded by serial with its VIN;
a revoked one has ``revoked_at`` (``uptane director revoke-cert``, or a newer
certificate for the same VIN). The vehicle listener refuses a revoked serial
(``director.revocation``). A partial index on the revoked serials lets every
server process read the revoked set without scanning the fleet's certificates.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vehicle_certificates",
        sa.Column("serial", sa.String(length=40), nullable=False),
        sa.Column("vin", sa.String(length=128), nullable=False),
        sa.Column("issued_at", sa.DateTime(), nullable=True),
        sa.Column("not_after", sa.DateTime(), nullable=True),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("serial"),
    )
    op.create_index("ix_vehicle_certificates_vin", "vehicle_certificates", ["vin"])
    op.create_index(
        "ix_vehicle_certificates_revoked",
        "vehicle_certificates",
        ["serial"],
        postgresql_where=sa.text("revoked_at IS NOT NULL"),
        sqlite_where=sa.text("revoked_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_vehicle_certificates_revoked", table_name="vehicle_certificates")
    op.drop_index("ix_vehicle_certificates_vin", table_name="vehicle_certificates")
    op.drop_table("vehicle_certificates")
