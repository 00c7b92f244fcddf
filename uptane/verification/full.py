"""Full verification re-check of one TUF repository (Uptane 2.1, 5.4.4.2).

The primary lets python-tuf's ngclient download and verify each repository
(each file's bytes verified once), then hands what ngclient trusted to
``verify_trusted`` with its own reference time: the Uptane re-check over
ngclient's parsed objects, without parsing or verifying anything twice: the
root chain (verified once per chain by ``verify_root_chain``), the version
links timestamp -> snapshot -> targets -> delegated targets, each delegated
role against the delegator it was verified with, and expiry of every role
against the primary's clock (5.4.4.2 steps 1-6 for each repository).
``verify_repository`` does all of it from bytes, signatures included, for
callers that hold only bytes.

Errors are python-tuf's (``UnsignedMetadataError``, ``BadVersionNumberError``,
``ExpiredMetadataError``, ``LengthOrHashMismatchError``, ``RepositoryError``),
which ``uptane.errors.attack_name`` maps to attack names.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile, Root, Signed, Snapshot, Targets, Timestamp
from tuf.api.serialization import DeserializationError

from uptane.errors import MixAndMatchError, RootRotationError

_TOP_LEVEL: Final = frozenset((Root.type, Timestamp.type, Snapshot.type, Targets.type))
_CONSISTENT_NAME: Final = re.compile(r"^(?P<version>[1-9][0-9]{0,18})\.(?P<role>.+)\.json\Z")


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
    """A repository's metadata after ``verify_repository``/``verify_trusted``: every role trusted.

    ``edges`` holds each ``(delegator, role)`` pair whose delegation the role's
    signatures satisfy: a walk may follow a delegation only along one of them
    (``uptane.verification.matching.find_image_target``).
    """

    name: str
    roots: tuple[Root, ...]
    timestamp: Timestamp
    snapshot: Snapshot
    targets: Targets
    delegated: Mapping[str, Targets] = field(default_factory=dict)
    edges: frozenset[tuple[str, str]] = frozenset()

    @property
    def root(self) -> Root:
        return self.roots[-1]


class TrustedSet(Protocol):
    """What ngclient trusted after a refresh (its ``TrustedMetadataSet``)."""

    @property
    def root(self) -> Root: ...
    @property
    def timestamp(self) -> Timestamp: ...
    @property
    def snapshot(self) -> Snapshot: ...
    @property
    def targets(self) -> Targets: ...
    def get(self, role: str) -> Any: ...
    def contains(self, role: str, delegator: str) -> bool: ...


def _load(data: bytes, role_type: type[Any], what: str) -> Metadata[Any]:
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except DeserializationError as e:
        raise tuf_exc.RepositoryError(f"{what}: cannot parse metadata: {e}") from e
    if not isinstance(md.signed, role_type):
        raise tuf_exc.RepositoryError(f"{what}: expected {role_type.type}, got {md.signed.type}")
    return md


def _check_expiry(signed: Signed, what: str, reference_time: datetime) -> None:
    if signed.is_expired(reference_time):
        raise tuf_exc.ExpiredMetadataError(
            f"{what} expired at {signed.expires.isoformat()} "
            f"(reference time {reference_time.isoformat()})"
        )


def _check_version(meta: MetaFile | None, version: int, what: str) -> MetaFile:
    if meta is None:
        raise tuf_exc.RepositoryError(f"{what} is not listed by its index")
    if version != meta.version:
        raise tuf_exc.BadVersionNumberError(
            f"{what}: expected version {meta.version}, got {version}"
        )
    return meta


def _check_meta(meta: MetaFile | None, data: bytes, version: int, what: str) -> None:
    _check_version(meta, version, what).verify_length_and_hashes(data)


def verify_root_chain(chain: tuple[bytes, ...], what: str) -> tuple[Root, ...]:
    """Verify a root chain: each root signed by itself and by its predecessor."""
    if not chain:
        raise tuf_exc.RepositoryError(f"{what}: no root metadata")
    roots: list[Root] = []
    for data in chain:
        md: Metadata[Root] = _load(data, Root, f"{what} root")
        if roots:
            prev = roots[-1]
            if md.signed.version != prev.version + 1:
                raise tuf_exc.BadVersionNumberError(
                    f"{what}: root v{md.signed.version} does not follow v{prev.version}"
                )
            prev.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        roots.append(md.signed)
    return tuple(roots)


def verify_repository(
    name: str, data: RepositoryBytes, reference_time: datetime
) -> VerifiedRepository:
    """Verify a repository's metadata from its bytes at ``reference_time`` (5.4.4.2).

    Checks the root chain, that timestamp, snapshot and targets are signed by
    a threshold of the current root's keys, that snapshot and targets have the
    versions (and lengths/hashes, when listed) their index names, that every
    delegated role is signed by a threshold of the keys of a delegator that
    delegates it and listed in snapshot, and that no role (root included) is
    expired. The primary does not use this on what ngclient verified (that
    would verify every file twice): see ``verify_trusted``.
    """
    roots = verify_root_chain(data.root_chain, name)
    root = roots[-1]

    timestamp: Metadata[Timestamp] = _load(data.timestamp, Timestamp, f"{name} timestamp")
    root.verify_delegate(Timestamp.type, timestamp.signed_bytes, timestamp.signatures)

    snapshot: Metadata[Snapshot] = _load(data.snapshot, Snapshot, f"{name} snapshot")
    _check_meta(
        timestamp.signed.snapshot_meta, data.snapshot, snapshot.signed.version, f"{name} snapshot"
    )
    root.verify_delegate(Snapshot.type, snapshot.signed_bytes, snapshot.signatures)

    targets: Metadata[Targets] = _load(data.targets, Targets, f"{name} targets")
    _check_meta(
        snapshot.signed.meta.get("targets.json"),
        data.targets,
        targets.signed.version,
        f"{name} targets",
    )
    root.verify_delegate(Targets.type, targets.signed_bytes, targets.signatures)

    delegated, edges = _verify_delegated(name, data, snapshot.signed, targets.signed)
    return _check_roles(
        name,
        roots,
        timestamp.signed,
        snapshot.signed,
        targets.signed,
        delegated,
        edges,
        reference_time,
    )


def verify_trusted(
    name: str, trusted: TrustedSet, roots: tuple[Root, ...], reference_time: datetime
) -> VerifiedRepository:
    """The Uptane re-check (5.4.4.2) of what ngclient verified, without verifying it twice.

    ngclient verified every file's bytes once (signatures, lengths, hashes,
    versions, expiry). This takes its parsed objects and checks again, at the
    primary's ``reference_time``, what holds between them: ``roots`` (the
    chain ``verify_root_chain`` verified) ends at the root ngclient trusts,
    the version links timestamp -> snapshot -> targets -> delegated targets,
    that each delegated role was verified against a delegator that delegates
    it (``trusted.contains``, tuf >= 7.0.1), and that no role is expired.
    Delegated roles are the roles snapshot lists that ngclient loaded, top-level
    roles excepted (a snapshot may list ``root.json``, TUF allows it).
    """
    if not roots or roots[-1] != trusted.root:
        raise tuf_exc.RepositoryError(f"{name}: root chain does not end at the trusted root")
    delegated: dict[str, Targets] = {}
    for filename in trusted.snapshot.meta:
        role = filename.removesuffix(".json")
        if role in _TOP_LEVEL:
            continue
        signed = trusted.get(role)
        if signed is None:
            continue  # listed, not needed by any lookup: not loaded
        if not isinstance(signed, Targets):
            raise tuf_exc.RepositoryError(f"{name} {role}: expected targets, got {signed.type}")
        delegated[role] = signed
    delegators = (Targets.type, *delegated)
    edges = {(d, r) for r in delegated for d in delegators if trusted.contains(r, d)}
    return _check_roles(
        name,
        roots,
        trusted.timestamp,
        trusted.snapshot,
        trusted.targets,
        delegated,
        edges,
        reference_time,
    )


def check_expiry(repository: VerifiedRepository, reference_time: datetime) -> None:
    """No role of ``repository`` has expired at ``reference_time`` (freeze, 4.3.3)."""
    name = repository.name
    _check_expiry(repository.root, f"{name} root", reference_time)
    _check_expiry(repository.timestamp, f"{name} timestamp", reference_time)
    _check_expiry(repository.snapshot, f"{name} snapshot", reference_time)
    _check_expiry(repository.targets, f"{name} targets", reference_time)
    for role, signed in repository.delegated.items():
        _check_expiry(signed, f"{name} {role}", reference_time)


def _check_roles(
    name: str,
    roots: tuple[Root, ...],
    timestamp: Timestamp,
    snapshot: Snapshot,
    targets: Targets,
    delegated: Mapping[str, Targets],
    edges: set[tuple[str, str]],
    reference_time: datetime,
) -> VerifiedRepository:
    """The checks between verified objects: versions, delegations, expiry."""
    for older, newer in itertools.pairwise(roots):
        if newer.version != older.version + 1:
            raise tuf_exc.BadVersionNumberError(
                f"{name}: root v{newer.version} does not follow v{older.version}"
            )
    _check_version(timestamp.snapshot_meta, snapshot.version, f"{name} snapshot")
    _check_version(snapshot.meta.get("targets.json"), targets.version, f"{name} targets")
    by_name: dict[str, Targets] = {Targets.type: targets, **delegated}
    valid = frozenset(
        (d, r) for d, r in edges if d in by_name and r in delegated and _delegates(by_name[d], r)
    )
    reached = {r for _, r in valid}
    for role, signed in delegated.items():
        if role in _TOP_LEVEL:
            raise tuf_exc.RepositoryError(f"{name}: {role!r} cannot be a delegated role")
        _check_version(snapshot.meta.get(f"{role}.json"), signed.version, f"{name} {role}")
    unreached = sorted(set(delegated) - reached)
    if unreached:
        raise tuf_exc.RepositoryError(
            f"{name}: roles {unreached} are not delegated by any trusted role"
        )
    verified = VerifiedRepository(
        name=name,
        roots=roots,
        timestamp=timestamp,
        snapshot=snapshot,
        targets=targets,
        delegated=dict(delegated),
        edges=valid,
    )
    check_expiry(verified, reference_time)
    return verified


def _verify_delegated(
    name: str, data: RepositoryBytes, snapshot: Snapshot, top: Targets
) -> tuple[dict[str, Targets], set[tuple[str, str]]]:
    """Verify delegated roles from their bytes: the roles and the delegations they satisfy.

    A role is trusted once a trusted delegator that delegates it has keys its
    signatures satisfy; every other ``(delegator, role)`` pair among trusted
    roles is then checked too, so ``edges`` names exactly the delegations a
    walk may follow (item: delegation walk on verified keys only).
    """
    for role in data.delegated:
        if role in _TOP_LEVEL:
            raise tuf_exc.RepositoryError(f"{name}: {role!r} cannot be a delegated role")
    loaded: dict[str, Metadata[Targets]] = {}
    for role, raw in data.delegated.items():
        loaded[role] = _load(raw, Targets, f"{name} {role}")
    trusted: dict[str, Targets] = {Targets.type: top}
    edges: set[tuple[str, str]] = set()
    tried: set[tuple[str, str]] = set()

    def satisfies(delegator: str, role: str) -> bool:
        tried.add((delegator, role))
        md = loaded[role]
        try:
            trusted[delegator].verify_delegate(role, md.signed_bytes, md.signatures)
        except tuf_exc.UnsignedMetadataError:
            return False
        edges.add((delegator, role))
        return True

    todo = dict(loaded)
    while todo:
        progress = False
        for role in list(todo):
            delegators = [d for d in list(trusted) if _delegates(trusted[d], role)]
            md = loaded[role]
            if delegators:
                meta = snapshot.meta.get(f"{role}.json")
                _check_meta(meta, data.delegated[role], md.signed.version, f"{name} {role}")
            untried = [d for d in delegators if (d, role) not in tried]
            if any([satisfies(d, role) for d in untried]):  # every delegator, no short cut
                trusted[role] = md.signed
                del todo[role]
                progress = True
        if not progress:
            for role in sorted(todo):
                delegators = [d for d in trusted if _delegates(trusted[d], role)]
                if delegators:
                    raise tuf_exc.UnsignedMetadataError(
                        f"{name} {role}: not signed by a threshold of the keys of "
                        f"{', '.join(repr(d) for d in delegators)}"
                    )
            raise tuf_exc.RepositoryError(
                f"{name}: roles {sorted(todo)} are not delegated by any trusted role"
            )
    for delegator, signed in trusted.items():
        for role in loaded:
            if (delegator, role) not in tried and _delegates(signed, role):
                satisfies(delegator, role)
    del trusted[Targets.type]
    return trusted, edges


def _delegates(targets: Targets, role: str) -> bool:
    """Does ``targets`` delegate ``role`` (by name, or as one of its hash bins, TAP 15)?"""
    delegations = targets.delegations
    if delegations is None:
        return False
    if delegations.roles is not None:
        return role in delegations.roles
    succinct = delegations.succinct_roles
    return succinct is not None and succinct.is_delegated_role(role)


def _served(filename: str | None, data: bytes | None) -> tuple[str, int, int] | None:
    """Role, the version its file name promises and the version served, if readable."""
    if filename is None or data is None:
        return None
    match = _CONSISTENT_NAME.match(filename)
    if match is None:
        return None
    try:
        served = Metadata.from_bytes(data).signed.version
    except DeserializationError:
        return None
    return match.group("role"), int(match.group("version")), served


def classify_hash_error(
    error: tuf_exc.LengthOrHashMismatchError, filename: str | None, data: bytes | None
) -> Exception:
    """Name a metadata file that is not the one its signed index lists (4.3.3).

    ``filename``/``data`` are the last metadata file downloaded, the one whose
    length or hashes differ from what the signed snapshot or timestamp lists
    (the Director lists them: ``director.metadata_build.meta_file``). An
    older version than the index names is a rollback
    (``BadVersionNumberError``); any other file (a newer version, or the same
    version with other bytes: another state's or another vehicle's) was
    combined with an index it does not belong to: ``MixAndMatchError``.
    """
    found = _served(filename, data)
    if found is None:
        return error
    role, expected, served = found
    if served < expected:
        return tuf_exc.BadVersionNumberError(
            f"{role} version {served} served where its index names version {expected}"
        )
    return MixAndMatchError(
        f"{filename} (version {served}) is not the {role} its signed index lists ({error}): "
        "metadata from different repository states or vehicles combined"
    )


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
    found = _served(filename, data)
    if found is None:
        return error
    role, expected, served = found
    if role == Root.type and served != expected:  # no index names roots
        return RootRotationError(
            f"{filename} carries root version {served}: not the rotation to version {expected}"
        )
    if served > expected:
        return MixAndMatchError(
            f"{role} version {served} served where its index names "
            f"version {expected}: metadata from different repository states combined"
        )
    return error
