"""Full verification re-check of one TUF repository (Uptane 2.1, 5.4.4.2).

The primary lets python-tuf's ngclient download and verify each repository,
then hands the bytes ngclient trusted to ``verify_repository`` together with
its own reference time. This is a second, independent pass over the same
bytes: root chain, signatures by the delegating role, the version links
timestamp -> snapshot -> targets -> delegated targets, and expiry of every
role against the primary's clock (5.4.4.2 steps 1-6 for each repository).

Errors are python-tuf's (``UnsignedMetadataError``, ``BadVersionNumberError``,
``ExpiredMetadataError``, ``LengthOrHashMismatchError``, ``RepositoryError``),
which ``uptane.errors.attack_name`` maps to attack names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from uptane.errors import MixAndMatchError, RootRotationError

_CONSISTENT_NAME: Final = re.compile(r"^(?P<version>[1-9][0-9]{0,18})\.(?P<role>.+)\.json$")


@dataclass(frozen=True)
class RepositoryBytes:
    """The metadata of one repository that ngclient trusted after a refresh.

    ``root_chain`` runs from the provisioned (bootstrap) root to the current
    one, one version apart. ``delegated`` maps delegated targets role names to
    their bytes (only the roles ngclient loaded).
    """

    root_chain: tuple[bytes, ...]
    timestamp: bytes
    snapshot: bytes
    targets: bytes
    delegated: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class VerifiedRepository:
    """A repository's metadata after ``verify_repository``: every role trusted."""

    name: str
    roots: tuple[Metadata[Root], ...]
    timestamp: Metadata[Timestamp]
    snapshot: Metadata[Snapshot]
    targets: Metadata[Targets]
    delegated: Mapping[str, Metadata[Targets]] = field(default_factory=dict)

    @property
    def root(self) -> Root:
        return self.roots[-1].signed


def _load(data: bytes, role_type: type[Any], what: str) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise tuf_exc.RepositoryError(f"{what}: cannot parse metadata: {e}") from e
    if not isinstance(md.signed, role_type):
        raise tuf_exc.RepositoryError(f"{what}: expected {role_type.type}, got {md.signed.type}")
    return md


def _check_expiry(md: Metadata[Any], what: str, reference_time: datetime) -> None:
    if md.signed.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError(
            f"{what} expired at {md.signed.expires.isoformat()} "
            f"(reference time {reference_time.isoformat()})"
        )


def _check_meta(meta: MetaFile | None, data: bytes, version: int, what: str) -> None:
    if meta is None:
        raise tuf_exc.RepositoryError(f"{what} is not listed by its index")
    meta.verify_length_and_hashes(data)
    if version != meta.version:
        raise tuf_exc.BadVersionNumberError(
            f"{what}: expected version {meta.version}, got {version}"
        )


def verify_root_chain(chain: tuple[bytes, ...], what: str) -> tuple[Metadata[Root], ...]:
    """Verify a root chain: each root signed by itself and by its predecessor."""
    if not chain:
        raise tuf_exc.RepositoryError(f"{what}: no root metadata")
    roots: list[Metadata[Root]] = []
    for data in chain:
        md: Metadata[Root] = _load(data, Root, f"{what} root")
        if roots:
            prev = roots[-1].signed
            if md.signed.version != prev.version + 1:
                raise tuf_exc.BadVersionNumberError(
                    f"{what}: root v{md.signed.version} does not follow v{prev.version}"
                )
            prev.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        roots.append(md)
    return tuple(roots)


def verify_repository(
    name: str, data: RepositoryBytes, reference_time: datetime
) -> VerifiedRepository:
    """Re-verify a repository's trusted metadata at ``reference_time`` (5.4.4.2).

    Checks the root chain, that timestamp, snapshot and targets are signed by
    a threshold of the current root's keys, that snapshot and targets have the
    versions (and lengths/hashes, when listed) their index names, that every
    delegated role is signed by a threshold of its delegator's keys and listed
    in snapshot, and that no role (root included) is expired.
    """
    roots = verify_root_chain(data.root_chain, name)
    root = roots[-1].signed
    _check_expiry(roots[-1], f"{name} root", reference_time)

    timestamp: Metadata[Timestamp] = _load(data.timestamp, Timestamp, f"{name} timestamp")
    root.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)
    _check_expiry(timestamp, f"{name} timestamp", reference_time)

    snapshot: Metadata[Snapshot] = _load(data.snapshot, Snapshot, f"{name} snapshot")
    _check_meta(
        timestamp.signed.snapshot_meta, data.snapshot, snapshot.signed.version, f"{name} snapshot"
    )
    root.verify_delegate(Snapshot.type, snapshot.signed_bytes, snapshot.signatures)
    _check_expiry(snapshot, f"{name} snapshot", reference_time)

    targets: Metadata[Targets] = _load(data.targets, Targets, f"{name} targets")
    _check_meta(
        snapshot.signed.meta.get("targets.json"),
        data.targets,
        targets.signed.version,
        f"{name} targets",
    )
    root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)
    _check_expiry(targets, f"{name} targets", reference_time)

    delegated = _verify_delegated(name, data, snapshot.signed, targets, reference_time)
    return VerifiedRepository(
        name=name,
        roots=roots,
        timestamp=timestamp,
        snapshot=snapshot,
        targets=targets,
        delegated=delegated,
    )


def _verify_delegated(
    name: str,
    data: RepositoryBytes,
    snapshot: Snapshot,
    top: Metadata[Targets],
    reference_time: datetime,
) -> dict[str, Metadata[Targets]]:
    """Verify delegated roles in delegation order (a delegator before its delegates)."""
    verified: dict[str, Metadata[Targets]] = {Targets.type: top}
    todo = dict(data.delegated)
    if Targets.type in todo:
        raise tuf_exc.RepositoryError(f"{name}: 'targets' cannot be a delegated role")
    while todo:
        progress = False
        for role, raw in list(todo.items()):
            delegators = [md.signed for md in verified.values() if _delegates(md.signed, role)]
            if not delegators:
                continue
            what = f"{name} {role}"
            md: Metadata[Targets] = _load(raw, Targets, what)
            _check_meta(snapshot.meta.get(f"{role}.json"), raw, md.signed.version, what)
            last: tuf_exc.UnsignedMetadataError | None = None
            for delegator in delegators:
                try:
                    delegator.verify_delegate(role, md.signed_bytes, md.signatures)
                    break
                except tuf_exc.UnsignedMetadataError as e:
                    last = e
            else:
                assert last is not None
                raise last
            _check_expiry(md, what, reference_time)
            verified[role] = md
            del todo[role]
            progress = True
        if not progress:
            raise tuf_exc.RepositoryError(
                f"{name}: roles {sorted(todo)} are not delegated by any trusted role"
            )
    del verified[Targets.type]
    return verified


def _delegates(targets: Targets, role: str) -> bool:
    """Does ``targets`` delegate ``role`` (by name, or as one of its hash bins, TAP 15)?"""
    delegations = targets.delegations
    if delegations is None:
        return False
    if delegations.roles is not None:
        return role in delegations.roles
    succinct = delegations.succinct_roles
    return succinct is not None and succinct.is_delegated_role(role)


def classify_version_error(
    error: tuf_exc.BadVersionNumberError, filename: str | None, data: bytes | None
) -> tuf_exc.RepositoryError:
    """Name a version mismatch ngclient found as rollback or mix-and-match (4.3.3).

    ``filename``/``data`` are the last metadata file downloaded. With
    consistent snapshots the file name carries the version its signed index
    promised; a file whose own version is *higher* was combined with an older
    index: a mix-and-match, returned as ``MixAndMatchError``. A root file
    ``N.root.json`` of another version is a broken root rotation
    (``RootRotationError``), not a mix-and-match. Anything else (a lower
    version, a timestamp going back) stays a rollback: ``error``.
    """
    if filename is None or data is None:
        return error
    match = _CONSISTENT_NAME.match(filename)
    if match is None:
        return error
    try:
        served = Metadata.from_bytes(data).signed.version
    except DeserializationError:
        return error
    expected = int(match.group("version"))
    if match.group("role") == Root.type and served != expected:  # no index names roots
        return RootRotationError(
            f"{filename} carries root version {served}: not the rotation to version {expected}"
        )
    if served > expected:
        return MixAndMatchError(
            f"{match.group('role')} version {served} served where its index names "
            f"version {expected}: metadata from different repository states combined"
        )
    return error
