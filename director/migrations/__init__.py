"""Alembic migrations of the Director inventory (run by ``Database.migrate``)."""
