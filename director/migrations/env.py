"""Alembic environment: migrations run on the connection ``Database.migrate`` passes."""

from __future__ import annotations

from alembic import context

import director.revocation  # noqa: F401  (its table, vehicle_certificates, is on Base)
from director.db import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through director.db.Database.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
