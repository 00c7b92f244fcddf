"""Partial verification of Director metadata by a secondary (Uptane 2.1, 5.4.4.1).

Sans-IO: callers pass DER bytes (as received over the bus), the trusted state
they persisted and an explicit reference time; the result is a new trusted
state plus the one target meant for this ECU, or a typed error. Nothing is
trusted until ``verify`` returns, so a refused bundle leaves the caller's state
as it was.

Checks, in order:
1. Root rotation chain (TUF 5.3.4): each new root has version N+1 and is signed
   by a threshold of the trusted root's keys and of its own keys.
2. The trusted root is not expired at the reference time (freeze).
3. Targets are signed by a threshold of the root's ``targets`` keys (DER form).
4. Targets are not expired (freeze) and their version is not lower than the
   last trusted version (rollback).
5. Director targets carry no delegations; if the ECU knows its VIN, the
   targets' VIN matches.
6. At most one target names this ECU's serial (none means "no update").
7. That target's hardware ids include this ECU's, and its release counter is
   not lower than the installed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Targets

from uptane import codec
from uptane.errors import (
    DelegationNotAllowedError,
    DuplicateEcuError,
    HardwareIdMismatchError,
    MetadataError,
    ReleaseCounterRollbackError,
    VehicleIdMismatchError,
)
from uptane.metadata import ECU_SERIAL, UptaneTarget, get_vehicle_id

MAX_ROOT_DER = 512_000
MAX_TARGETS_DER = 1_000_000
MAX_ROOT_ROTATIONS = 32


@dataclass(frozen=True)
class SecondaryIdentity:
    """What a secondary knows about itself at provisioning."""

    ecu_serial: str
    hardware_id: str
    vin: str | None = None


@dataclass(frozen=True)
class TrustedDirectorState:
    """The Director metadata a secondary trusts, as DER bytes it persists."""

    root_der: bytes
    targets_version: int = 0

    @property
    def root(self) -> Root:
        return _load_root(self.root_der)


@dataclass(frozen=True)
class PartialVerificationResult:
    """Outcome of a successful partial verification."""

    state: TrustedDirectorState
    target: UptaneTarget | None
    targets_version: int


def _load(data: bytes, max_size: int) -> Metadata[Root] | Metadata[Targets]:
    md = Metadata.from_bytes(data, codec.DERMetadataDeserializer(max_size=max_size))
    return md  # type: ignore[return-value]


def _load_root(data: bytes) -> Root:
    md = _load(data, MAX_ROOT_DER)
    if not isinstance(md.signed, Root):
        raise tuf_exc.RepositoryError(f"expected root metadata, got {md.signed.type}")
    return md.signed


def _update_root(trusted_der: bytes, new_roots: Sequence[bytes]) -> bytes:
    """Follow a root rotation chain (TUF 5.3.4) and return the newest trusted DER."""
    if len(new_roots) > MAX_ROOT_ROTATIONS:
        raise tuf_exc.RepositoryError(f"more than {MAX_ROOT_ROTATIONS} root rotations at once")
    trusted = _load_root(trusted_der)
    for data in new_roots:
        md = _load(data, MAX_ROOT_DER)
        if not isinstance(md.signed, Root):
            raise tuf_exc.RepositoryError(f"expected root metadata, got {md.signed.type}")
        if md.signed.version <= trusted.version:
            continue  # already trusted: a resent chain is harmless
        if md.signed.version != trusted.version + 1:
            raise tuf_exc.BadVersionNumberError(
                f"expected root version {trusted.version + 1}, got {md.signed.version}"
            )
        payload = codec.der_signed_bytes(md.signed)
        trusted.verify_delegate(Root.type, payload, md.signatures)
        md.signed.verify_delegate(Root.type, payload, md.signatures)
        trusted, trusted_der = md.signed, data
    return trusted_der


def verify(
    identity: SecondaryIdentity,
    state: TrustedDirectorState,
    targets_der: bytes,
    reference_time: datetime,
    installed_release_counter: int,
    new_roots: Sequence[bytes] = (),
) -> PartialVerificationResult:
    """Partially verify Director targets for one secondary (5.4.4.1).

    Raises python-tuf's ``RepositoryError`` family (``UnsignedMetadataError``,
    ``ExpiredMetadataError``, ``BadVersionNumberError``) or an Uptane leaf of
    ``uptane.errors``; never returns a target that failed a check.
    """
    root_der = _update_root(state.root_der, new_roots)
    root = _load_root(root_der)
    if root.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError("Director root is expired")

    md = _load(targets_der, MAX_TARGETS_DER)
    if not isinstance(md.signed, Targets):
        raise tuf_exc.RepositoryError(f"expected targets metadata, got {md.signed.type}")
    targets: Targets = md.signed
    root.verify_delegate(Targets.type, codec.der_signed_bytes(targets), md.signatures)
    if targets.version < state.targets_version:
        raise tuf_exc.BadVersionNumberError(
            f"Director targets version {targets.version} is lower than the trusted "
            f"version {state.targets_version}"
        )
    if targets.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError("Director targets are expired")
    if targets.delegations is not None:
        raise DelegationNotAllowedError("Director targets must not delegate")
    vin = get_vehicle_id(targets)
    if identity.vin is not None and vin is not None and vin != identity.vin:
        raise VehicleIdMismatchError(f"Director targets are for vehicle {vin}")

    mine = [
        t
        for t in targets.targets.values()
        if isinstance(t.custom, dict) and t.custom.get(ECU_SERIAL) == identity.ecu_serial
    ]
    if len(mine) > 1:
        raise DuplicateEcuError(f"Director targets name ECU {identity.ecu_serial} {len(mine)} times")
    target = None
    if mine:
        target = UptaneTarget.from_target_file(mine[0], director=True)
        if identity.hardware_id not in target.hardware_ids:
            raise HardwareIdMismatchError(
                f"target {target.name} is for hardware {list(target.hardware_ids)}, "
                f"this ECU is {identity.hardware_id}"
            )
        if target.release_counter < installed_release_counter:
            raise ReleaseCounterRollbackError(
                f"target {target.name} has release counter {target.release_counter}, "
                f"installed is {installed_release_counter}"
            )
    elif any(not isinstance(t.custom, dict) for t in targets.targets.values()):
        raise MetadataError("Director target without custom fields")
    return PartialVerificationResult(
        state=TrustedDirectorState(root_der=root_der, targets_version=targets.version),
        target=target,
        targets_version=targets.version,
    )
