"""Partial verification of Director metadata by a secondary (Uptane 2.1, 5.4.4.1).

Sans-IO: callers pass DER bytes (as received over the bus), the trusted state
they persisted and an explicit reference time; the result is a new trusted
state plus the one target meant for this ECU, or a typed error. Nothing is
trusted until ``verify`` returns, so a refused bundle leaves the caller's state
as it was.

Checks, in order:
1. Root rotation chain (TUF 5.3.4): each new root has version N+1 and is signed
   by a threshold of the trusted root's keys and of its own keys. Roots the
   ECU already trusts (version <= trusted) are skipped. If the chain changes
   the ``targets`` keys, the trusted targets version is forgotten (TUF 5.3.11,
   recovery from a fast-forward attack).
2. The trusted root is not expired at the reference time (freeze).
3. Targets are signed by a threshold of the root's ``targets`` keys, over the
   DER of ``signed`` (DESIGN 3).
4. Targets' version is not lower than the last trusted version (rollback) and
   they are not expired (freeze). An equal version is accepted: the primary
   resends the same bundle after a broken transfer.
5. Director targets carry no delegations (5.2.3); if both the ECU and the
   targets know the VIN, they agree (wrong vehicle).
6. Every target names an ECU serial; at most one names this ECU (none means
   "no update").
7. That target's hardware ids include this ECU's, and its release counter is
   not lower than the installed one, nor than the one the previously trusted
   Director targets assigned this ECU (5.4.4.2 step 5 / 5.4.3): a release the
   ECU trusted but has not installed yet cannot be replaced by an older one.
   Like the targets version, that floor is forgotten when the targets keys
   rotate (TUF 5.3.11).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Targets

from uptane import der_metadata
from uptane.errors import (
    DelegationNotAllowedError,
    DuplicateEcuError,
    HardwareIdMismatchError,
    MetadataError,
    ReleaseCounterRollbackError,
    VehicleIdMismatchError,
)
from uptane.metadata import ECU_SERIAL, UptaneTarget, check_identifier, get_vehicle_id

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
    """The Director metadata a secondary trusts: root DER, last targets version and the
    release counter those targets assign this ECU (0: none)."""

    root_der: bytes
    targets_version: int = 0
    release_counter: int = 0

    @property
    def root(self) -> Root:
        return _load_root(self.root_der)


@dataclass(frozen=True)
class PartialVerificationResult:
    """Outcome of a successful partial verification.

    ``target`` is the one Director target for this ECU, or None (no update).
    """

    state: TrustedDirectorState
    target: UptaneTarget | None
    targets_version: int


def _load(data: bytes, max_size: int) -> Metadata[Any]:
    md: Metadata[Any] = Metadata.from_bytes(
        data, der_metadata.DERMetadataDeserializer(max_size=max_size)
    )
    return md


def _load_root(data: bytes) -> Root:
    md = _load(data, MAX_ROOT_DER)
    if not isinstance(md.signed, Root):
        raise tuf_exc.RepositoryError(f"expected root metadata, got {md.signed.type}")
    return md.signed


def load_targets(data: bytes) -> Targets:
    """Parse DER Director targets (no signature check: for bytes already trusted)."""
    md = _load(data, MAX_TARGETS_DER)
    if not isinstance(md.signed, Targets):
        raise tuf_exc.RepositoryError(f"expected targets metadata, got {md.signed.type}")
    return md.signed


def _targets_keys(root: Root) -> tuple[frozenset[str], int]:
    role = root.roles[Targets.type]
    return frozenset(role.keyids), role.threshold


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
        payload = der_metadata.der_signed_bytes(md.signed)
        trusted.verify_delegate(Root.type, payload, md.signatures)
        md.signed.verify_delegate(Root.type, payload, md.signatures)
        trusted, trusted_der = md.signed, data
    return trusted_der


def _serial_of(custom: object, path: str) -> str:
    if not isinstance(custom, Mapping):
        raise MetadataError(f"Director target {path} has no custom fields")
    return check_identifier(custom.get(ECU_SERIAL), f"ecu_serial of Director target {path}")


def find_target(identity: SecondaryIdentity, targets: Targets) -> UptaneTarget | None:
    """Return the one Director target for ``identity`` (checks 5-6 above), or None.

    Raises ``DelegationNotAllowedError``, ``VehicleIdMismatchError``,
    ``DuplicateEcuError``, ``MetadataError`` or ``HardwareIdMismatchError``.
    """
    if targets.delegations is not None:
        raise DelegationNotAllowedError("Director targets must not delegate")
    vin = get_vehicle_id(targets)
    if identity.vin is not None and vin is not None and vin != identity.vin:
        raise VehicleIdMismatchError(f"Director targets are for vehicle {vin}")
    serials = [(_serial_of(t.custom, path), t) for path, t in targets.targets.items()]
    seen: set[str] = set()
    for serial, _ in serials:
        # 5.4.4.1 / "How to check Targets metadata": no ECU identifier is
        # represented more than once, whichever ECU it is
        if serial in seen:
            raise DuplicateEcuError(f"Director targets name ECU {serial} more than once")
        seen.add(serial)
    mine = [t for serial, t in serials if serial == identity.ecu_serial]
    if not mine:
        return None
    target = UptaneTarget.from_target_file(mine[0], director=True)
    if identity.hardware_id not in target.hardware_ids:
        raise HardwareIdMismatchError(
            f"target {target.name} is for hardware {list(target.hardware_ids)}, "
            f"this ECU is {identity.hardware_id}"
        )
    return target


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
    ``ExpiredMetadataError``, ``BadVersionNumberError``, ``DeserializationError``)
    or an Uptane leaf of ``uptane.errors``; never returns a target that failed a
    check.
    """
    if reference_time.tzinfo is None:
        raise ValueError("reference_time must be timezone-aware")
    old_root = _load_root(state.root_der)
    root_der = _update_root(state.root_der, new_roots)
    root = _load_root(root_der)
    if root.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError("Director root is expired")
    trusted_version, previous_release = state.targets_version, state.release_counter
    if _targets_keys(root) != _targets_keys(old_root):
        # new targets keys: the old version and release floors may be forged
        trusted_version, previous_release = 0, 0

    md = _load(targets_der, MAX_TARGETS_DER)
    if not isinstance(md.signed, Targets):
        raise tuf_exc.RepositoryError(f"expected targets metadata, got {md.signed.type}")
    targets: Targets = md.signed
    root.verify_delegate(Targets.type, der_metadata.der_signed_bytes(targets), md.signatures)
    if targets.version < trusted_version:
        raise tuf_exc.BadVersionNumberError(
            f"Director targets version {targets.version} is lower than the trusted "
            f"version {trusted_version}"
        )
    if targets.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError("Director targets are expired")
    target = find_target(identity, targets)
    if target is not None and target.release_counter < installed_release_counter:
        raise ReleaseCounterRollbackError(
            f"target {target.name} has release counter {target.release_counter}, "
            f"installed is {installed_release_counter}"
        )
    if target is not None and target.release_counter < previous_release:
        raise ReleaseCounterRollbackError(
            f"target {target.name} has release counter {target.release_counter}, the "
            f"previously trusted Director targets assigned {previous_release}"
        )
    return PartialVerificationResult(
        state=TrustedDirectorState(
            root_der=root_der,
            targets_version=targets.version,
            release_counter=0 if target is None else target.release_counter,
        ),
        target=target,
        targets_version=targets.version,
    )
