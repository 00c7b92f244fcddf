"""Each vehicle metadata file stored once: no unversioned copies (issue 12).

Every signing used to store ``targets.json``, ``targets.der`` and
``snapshot.json`` next to byte-identical ``N.targets.json``,
``N.targets.der`` and ``N.snapshot.json``. Now only the versioned files are
rows; the unversioned names are served as the vehicle's highest version
(``director.store.ALIASES``), which is what the copies held. Upgrading
drops each copy whose bytes a versioned file of the vehicle holds; an
unversioned file without one (stored before versioned copies were kept)
is renamed to its version, read from its content. One that cannot be read
is dropped and its vehicle marked for re-signing (as if never signed: the
next request or signer round signs it above every stored version).
Downgrading puts the copies back.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

ALIASES = ("targets.json", "targets.der", "snapshot.json")

_files = sa.table(
    "metadata_files",
    sa.column("vehicle_id", sa.Integer()),
    sa.column("filename", sa.String(64)),
    sa.column("data", sa.LargeBinary()),
    sa.column("updated_at", sa.DateTime()),
)
_vehicles = sa.table(
    "vehicles", sa.column("id", sa.Integer()), sa.column("targets_version", sa.Integer())
)


def _version(alias: str, data: bytes) -> int | None:
    """The ``signed.version`` of a stored file (None: unreadable)."""
    try:
        if alias.endswith(".der"):
            from tuf.api.metadata import Metadata

            from uptane.der_metadata import DERMetadataDeserializer

            value = Metadata.from_bytes(data, DERMetadataDeserializer()).signed.version
        else:
            value = json.loads(data)["signed"]["version"]
    except Exception:  # anything unreadable: re-signed instead
        return None
    return value if isinstance(value, int) and 0 < value < 2**31 else None


def upgrade() -> None:
    bind = op.get_bind()
    other = _files.alias("versioned")
    for alias in ALIASES:
        # the copies: a versioned file of the same vehicle holds the same bytes
        bind.execute(
            sa.delete(_files).where(
                _files.c.filename == alias,
                sa.exists().where(
                    other.c.vehicle_id == _files.c.vehicle_id,
                    other.c.filename.like(f"%.{alias}"),
                    other.c.data == _files.c.data,
                ),
            )
        )
    # what is left has no versioned copy: renamed to its version, or dropped
    left = bind.execute(
        sa.select(_files.c.vehicle_id, _files.c.filename, _files.c.data, _files.c.updated_at)
        .where(_files.c.filename.in_(ALIASES))
        .order_by(_files.c.vehicle_id, _files.c.filename)
    ).all()
    resign: set[int] = set()
    for vehicle_id, alias, data, updated_at in left:
        version = _version(alias, bytes(data))
        if version is None:
            resign.add(vehicle_id)
        else:
            name = f"{version}.{alias}"
            taken = bind.execute(
                sa.select(sa.literal(1)).where(
                    _files.c.vehicle_id == vehicle_id, _files.c.filename == name
                )
            ).first()
            if taken is None:
                bind.execute(
                    sa.insert(_files).values(
                        vehicle_id=vehicle_id, filename=name, data=data, updated_at=updated_at
                    )
                )
        bind.execute(
            sa.delete(_files).where(_files.c.vehicle_id == vehicle_id, _files.c.filename == alias)
        )
    for vehicle_id in sorted(resign):
        bind.execute(
            sa.update(_vehicles).where(_vehicles.c.id == vehicle_id).values(targets_version=0)
        )


def downgrade() -> None:
    bind = op.get_bind()
    higher = _files.alias("higher")
    for alias in ALIASES:
        pattern = f"%.{alias}"
        bind.execute(
            sa.insert(_files).from_select(
                ["vehicle_id", "filename", "data", "updated_at"],
                sa.select(
                    _files.c.vehicle_id,
                    sa.literal(alias, sa.String(64)),
                    _files.c.data,
                    _files.c.updated_at,
                ).where(
                    _files.c.filename.like(pattern),
                    ~sa.exists().where(
                        higher.c.vehicle_id == _files.c.vehicle_id,
                        higher.c.filename.like(pattern),
                        (sa.func.length(higher.c.filename) > sa.func.length(_files.c.filename))
                        | (
                            (sa.func.length(higher.c.filename) == sa.func.length(_files.c.filename))
                            & (higher.c.filename > _files.c.filename)
                        ),
                    ),
                ),
            )
        )
