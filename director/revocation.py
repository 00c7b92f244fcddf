"""Vehicle certificate revocation: cut off a vehicle's client certificate, CA unchanged.

A stolen or decommissioned vehicle's certificate would otherwise be valid
until it expires (825 days) or the Director CA is replaced (issue 12):

- every client certificate the Director issues (``register --issue-cert``,
  ``POST /api/vehicles/{vin}/certificate``) is recorded by serial with its VIN
  (``vehicle_certificates``, migration 0007), and a newer one for a VIN revokes
  the VIN's earlier ones: a vehicle has one valid certificate;
- ``uptane director revoke-cert VIN`` (or ``DELETE /api/vehicles/{vin}/certificate``)
  revokes every recorded certificate of the VIN; ``--serial HEX`` revokes one
  certificate by serial, also one issued before migration 0007 (not recorded);
- the vehicle listener (``director.tls.ListenerGate``) checks the serial of
  every request's client certificate against this process's ``RevocationList``,
  on connections opened before the revocation too: ``403 certificate_revoked``.

Each process reads the revoked serials from the database (a count first, the
list only when the count changed; a partial index covers both) at most once
per ``refresh_seconds``, on a request. A revocation made by another process
or host therefore takes effect within ``refresh_seconds`` (2 s); the process
that revoked through the API sees it at once. When the list cannot be read
for ``stale_seconds`` (database down), vehicle requests get ``503`` rather
than being served on an old list (fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Index, String, Text, func, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Mapped, Session, mapped_column

from director.db import AuditEntry, Base, Database, UTCDateTime
from director.errors import InvalidRequestError, NotFoundError

logger = logging.getLogger("director.revocation")

REFRESH_SECONDS = 2.0
STALE_SECONDS = 30.0
SUPERSEDED = "superseded by a newer certificate"
# Key space of the PostgreSQL advisory locks (one per VIN) that serialize issuing and
# revoking a vehicle's certificates.
_CERT_LOCK = 0x55_43_45_52  # "UCER"


def _lock_vin(db: Database, s: Session, vin: str) -> None:
    """Serialize this transaction with every other one issuing or revoking ``vin``'s
    certificates (PostgreSQL; SQLite writers are serialized already). Without it two
    concurrent issues for a VIN both stay valid: each revokes the rows it saw, and
    neither sees the other's new one (READ COMMITTED)."""
    if db.is_postgresql:
        s.execute(
            text("SELECT pg_advisory_xact_lock(:ns, hashtext(:vin))"),
            {"ns": _CERT_LOCK, "vin": vin},
        )


class VehicleCertificate(Base):
    """A client certificate issued to a vehicle (or revoked by serial), by serial."""

    __tablename__ = "vehicle_certificates"

    serial: Mapped[str] = mapped_column(String(40), primary_key=True)  # lowercase hex
    vin: Mapped[str] = mapped_column(String(128), index=True)
    issued_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    not_after: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index(
            "ix_vehicle_certificates_revoked",
            "serial",
            postgresql_where=text("revoked_at IS NOT NULL"),
            sqlite_where=text("revoked_at IS NOT NULL"),
        ),
    )


def serial_text(serial: int | str) -> str:
    """A certificate serial as stored and compared: lowercase hex, no leading zeros.
    Accepts an int or hex text (``ssl``'s ``serialNumber``, ``openssl x509 -serial``
    output with or without ``serial=``, colons)."""
    if isinstance(serial, int):
        value = serial
    else:
        cleaned = serial.strip().lower().removeprefix("serial=").replace(":", "")
        try:
            value = int(cleaned, 16)
        except ValueError:
            raise InvalidRequestError(f"{serial!r} is not a hexadecimal serial number") from None
    if value <= 0 or value.bit_length() > 160:
        raise InvalidRequestError(f"serial {serial!r} out of range (1 to 20 bytes)")
    return format(value, "x")


@dataclass(frozen=True)
class Revoked:
    serial: str
    vin: str


def _valid(s: Session, vin: str) -> list[VehicleCertificate]:
    """The VIN's recorded certificates not yet revoked, locked for this transaction."""
    return list(
        s.scalars(
            select(VehicleCertificate)
            .where(VehicleCertificate.vin == vin, VehicleCertificate.revoked_at.is_(None))
            .with_for_update()
        )
    )


def _audit(s: Session, now: datetime, actor: str, action: str, vin: str, **detail: Any) -> None:
    s.add(
        AuditEntry(at=now, actor=actor[:64], action=action, vin=vin, ecu_serial=None, detail=detail)
    )


def record_issued(
    db: Database,
    vin: str,
    certificate_pem: bytes,
    now: datetime | None = None,
    actor: str = "operator",
) -> list[Revoked]:
    """Record a certificate (PEM) just issued to ``vin`` and revoke the VIN's earlier
    ones (returned; an audit entry ``issue_certificate`` names the new serial and the
    superseded ones)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(certificate_pem)
    serial, not_after = cert.serial_number, cert.not_valid_after_utc
    now = now or datetime.now(UTC)
    with db.transaction(write=True) as s:
        _lock_vin(db, s, vin)
        earlier = _valid(s, vin)
        for old in earlier:
            old.revoked_at, old.reason = now, SUPERSEDED
        s.add(
            VehicleCertificate(
                serial=serial_text(serial), vin=vin, issued_at=now, not_after=not_after
            )
        )
        superseded = [c.serial for c in earlier]
        _audit(
            s,
            now,
            actor,
            "issue_certificate",
            vin,
            serial=serial_text(serial),
            superseded=superseded,
        )
        return [Revoked(c.serial, c.vin) for c in earlier]


def revoke(
    db: Database,
    vin: str,
    *,
    serial: str | None = None,
    reason: str = "revoked by the operator",
    actor: str = "operator",
    now: datetime | None = None,
) -> list[Revoked]:
    """Revoke every recorded certificate of ``vin`` not yet revoked, or the one with
    ``serial`` (recorded or not: one issued before migration 0007), with an audit entry
    (``GET /api/audit``). Returns what this call revoked; ``NotFoundError`` if it found
    nothing to revoke."""
    reason = reason.strip()
    if not 1 <= len(reason) <= 500:
        raise InvalidRequestError("give a reason of 1-500 characters")
    now = now or datetime.now(UTC)
    with db.transaction(write=True) as s:
        _lock_vin(db, s, vin)
        if serial is not None:
            key = serial_text(serial)
            cert = s.get(VehicleCertificate, key, with_for_update=True)
            if cert is None:
                cert = VehicleCertificate(serial=key, vin=vin)
                s.add(cert)
            elif cert.vin != vin:
                raise InvalidRequestError(f"certificate {key} was issued to another vehicle")
            elif cert.revoked_at is not None:
                raise NotFoundError(f"certificate {key} of {vin} is already revoked")
            certs = [cert]
        else:
            certs = _valid(s, vin)
            if not certs:
                raise NotFoundError(
                    f"no valid certificate of {vin} is recorded (revoke one issued before "
                    "migration 0007 by its serial)"
                )
        for cert in certs:
            cert.revoked_at, cert.reason = now, reason
        revoked = [Revoked(c.serial, c.vin) for c in certs]
        serials = [r.serial for r in revoked]
        _audit(s, now, actor, "revoke_certificate", vin, serials=serials, reason=reason)
    logger.warning("%s revoked certificates %s of %s: %s", actor, ", ".join(serials), vin, reason)
    return revoked


class RevocationList:
    """This process's copy of the revoked serials, refreshed on requests (module doc)."""

    def __init__(
        self,
        db: Database,
        *,
        refresh_seconds: float = REFRESH_SECONDS,
        stale_seconds: float = STALE_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db = db
        self.refresh_seconds = refresh_seconds
        self.stale_seconds = stale_seconds
        self.clock = clock
        self._serials: frozenset[str] = frozenset()
        self._count = -1
        self._checked = -math.inf  # last refresh attempt
        self._loaded = -math.inf  # last successful refresh
        self._lock: asyncio.Lock | None = None
        self._invalidations = 0

    def refresh(self) -> None:
        """Read the count of revoked serials, and the serials if it changed (blocking)."""
        revoked = VehicleCertificate.revoked_at.is_not(None)
        row = self.db.read_one(select(func.count()).select_from(VehicleCertificate).where(revoked))
        if row is None or row[0] != self._count:
            rows = self.db.read_all(select(VehicleCertificate.serial).where(revoked))
            self._serials = frozenset(r[0] for r in rows)
            self._count = len(rows)

    def invalidate(self) -> None:
        """Refresh on the next request (this process just revoked something)."""
        self._invalidations += 1
        self._checked = -math.inf

    async def revoked(self, serial: str | None) -> bool | None:
        """Whether the certificate ``serial`` (``serial_text`` form) is revoked; None
        when the list could not be read for ``stale_seconds``. No serial: revoked."""
        if self.clock() - self._checked >= self.refresh_seconds:
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                if self.clock() - self._checked >= self.refresh_seconds:
                    from starlette.concurrency import run_in_threadpool

                    invalidations = self._invalidations
                    try:
                        await run_in_threadpool(self.refresh)
                        self._loaded = self.clock()
                    except (SQLAlchemyError, OSError) as e:  # database down: fail closed when stale
                        logger.warning("cannot read the revoked certificates: %s", e)
                    finally:
                        # invalidated while this refresh read: it may lack that revocation
                        fresh = invalidations == self._invalidations
                        self._checked = self.clock() if fresh else -math.inf
        if self.clock() - self._loaded > self.stale_seconds:
            return None
        return serial is None or serial in self._serials
