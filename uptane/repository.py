"""A ``tuf.repository.Repository`` over a storage backend (DESIGN 1).

Shared by the Image repository and the Director. Metadata is written with
consistent snapshots (``N.root.json``, ``N.targets.json``, ``N.<role>.json``,
``N.snapshot.json`` and ``timestamp.json``) plus an unversioned copy of each
role for local reading. ``DirectoryStore`` writes every file atomically
(temporary file, fsync, rename, fsync of the directory), so a crash leaves
either the old or the new file and never a torn one; roles are written in the
order targets -> snapshot -> timestamp, so a client never sees a timestamp
that points at metadata that is not there yet.

Signing uses a key pool: every role is signed by each available signer whose
keyid the role's delegator lists, and a new root is also signed by the keys
of the root it replaces (root rotation, TUF 5.3.4).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from securesystemslib.signer import Signer
from tuf.api.metadata import (
    DelegatedRole,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer
from tuf.repository import Repository

from uptane.errors import ConfigError

Clock = Callable[[], datetime]
TOP_LEVEL_ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)


def utc_now() -> datetime:
    return datetime.now(UTC)


class MetadataStore(Protocol):
    """Where a repository keeps its metadata files."""

    def read(self, filename: str) -> bytes | None:
        """Return the file's bytes, or None if it does not exist."""

    def write(self, filename: str, data: bytes) -> None:
        """Store ``data`` under ``filename`` atomically."""


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path``: temp file, fsync, rename, fsync directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class DirectoryStore:
    """A ``MetadataStore`` over a directory, with atomic writes."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def _path(self, filename: str) -> Path:
        if "/" in filename or "\\" in filename or filename.startswith("."):
            raise ValueError(f"bad metadata filename {filename!r}")
        return self.directory / filename

    def read(self, filename: str) -> bytes | None:
        try:
            return self._path(filename).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, filename: str, data: bytes) -> None:
        atomic_write(self._path(filename), data)


class StagedStore:
    """A ``MetadataStore`` that buffers writes over another store until ``commit``.

    Lets an edit sign and check every role before anything is stored: reads
    see the staged files, ``commit`` writes them to the base store in the
    order they were last written (targets -> snapshot -> timestamp), and
    ``discard`` drops them.
    """

    def __init__(self, base: MetadataStore) -> None:
        self.base = base
        self.pending: dict[str, bytes] = {}

    def read(self, filename: str) -> bytes | None:
        if filename in self.pending:
            return self.pending[filename]
        return self.base.read(filename)

    def write(self, filename: str, data: bytes) -> None:
        self.pending.pop(filename, None)  # keep the order of last writes
        self.pending[filename] = data

    def commit(self) -> None:
        for filename, data in self.pending.items():
            self.base.write(filename, data)
        self.pending.clear()

    def discard(self) -> None:
        self.pending.clear()


class MemoryStore:
    """A ``MetadataStore`` in a dict, for tests and simulators."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}

    def read(self, filename: str) -> bytes | None:
        return self.files.get(filename)

    def write(self, filename: str, data: bytes) -> None:
        self.files[filename] = data


@dataclass
class ExpiryPolicy:
    """How long each role's metadata stays valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=90)
    snapshot: timedelta = timedelta(days=7)
    timestamp: timedelta = timedelta(days=1)
    delegated: timedelta = timedelta(days=90)
    overrides: dict[str, timedelta] = field(default_factory=dict)
    """Per-role expiry that wins over the defaults above (e.g. a one-off re-sign)."""

    def for_role(self, role: str) -> timedelta:
        if role in self.overrides:
            return self.overrides[role]
        return {
            Root.type: self.root,
            Targets.type: self.targets,
            Snapshot.type: self.snapshot,
            Timestamp.type: self.timestamp,
        }.get(role, self.delegated)


@dataclass
class SigningRepository(Repository):
    """A TUF repository that signs with a pool of signers and writes to a store.

    ``signers`` maps keyid to signer; roles whose keys are not all in the pool
    are signed with what is there (threshold signing of offline roles happens
    by running the same edit with more keys present).
    """

    store: MetadataStore
    signers: dict[str, Signer] = field(default_factory=dict)
    expiry: ExpiryPolicy = field(default_factory=ExpiryPolicy)
    clock: Clock = utc_now
    #: list length and SHA-256 of each file in snapshot/timestamp, not the version alone
    #: (the Director's per-vehicle metadata: ``director.metadata_build.meta_file``)
    meta_hashes: bool = False
    _cache: dict[str, Metadata[Any]] = field(default_factory=dict, init=False, repr=False)
    _root_signers_prev: dict[str, Signer] = field(default_factory=dict, init=False, repr=False)

    _serializer = JSONSerializer(compact=False)

    def add_signers(self, signers: Iterable[Signer]) -> None:
        for signer in signers:
            self.signers[signer.public_key.keyid] = signer

    # --- Repository interface -------------------------------------------

    def open(self, role: str) -> Metadata[Any]:
        if role in self._cache:
            return Metadata.from_bytes(self._cache[role].to_bytes(self._serializer))
        data = self.store.read(f"{role}.json")
        if data is None:
            return self._new_metadata(role)
        md = Metadata.from_bytes(data)
        self._cache[role] = md
        return Metadata.from_bytes(data)

    def _new_metadata(self, role: str) -> Metadata[Any]:
        expires = self.clock() + self.expiry.for_role(role)
        signed: Signed
        if role == Root.type:
            signed = Root(expires=expires, consistent_snapshot=True)
        elif role == Timestamp.type:
            signed = Timestamp(expires=expires)
        elif role == Snapshot.type:
            signed = Snapshot(expires=expires)
        else:
            signed = Targets(expires=expires)
        # version 0 so that the first close() publishes version 1
        signed.version = 0
        return Metadata(signed)

    def exists(self, role: str) -> bool:
        return role in self._cache or self.store.read(f"{role}.json") is not None

    def close(self, role: str, md: Metadata[Any]) -> None:
        md.signed.version += 1
        md.signed.expires = (self.clock() + self.expiry.for_role(role)).replace(microsecond=0)
        self._sign(role, md)
        self._write(role, md)

    def _role_keyids(self, role: str, md: Metadata[Any]) -> tuple[set[str], int]:
        """Keyids allowed to sign ``role`` and its threshold, from its delegator."""
        if role == Root.type:
            assert isinstance(md.signed, Root)
            r = md.signed.roles[Root.type]
            return set(r.keyids), r.threshold
        if role in TOP_LEVEL_ROLES:
            r = self.root().roles[role]
            return set(r.keyids), r.threshold
        delegated = self._find_delegation(role)
        if delegated is None:
            raise ConfigError(f"role {role!r} is not delegated by any targets role")
        return set(delegated.keyids), delegated.threshold

    def role_keys(self, role: str) -> tuple[set[str], int]:
        """Keyids allowed to sign ``role`` and its signature threshold."""
        return self._role_keyids(role, self.open(role))

    def delegation(self, role: str) -> DelegatedRole | None:
        """The ``DelegatedRole`` that delegates ``role``, or None if none does."""
        return self._find_delegation(role)

    def _find_delegation(self, role: str) -> DelegatedRole | None:
        for parent in self.targets_roles():
            delegations = self.targets(parent).delegations
            if delegations is not None and delegations.roles and role in delegations.roles:
                return delegations.roles[role]
        return None

    def _sign(self, role: str, md: Metadata[Any]) -> None:
        keyids, _ = self._role_keyids(role, md)
        if role == Root.type and md.signed.version > 1:
            # a new root must also be signed by a threshold of the old root
            old = self.root().roles[Root.type]
            keyids |= set(old.keyids)
        md.signatures.clear()
        for keyid in sorted(keyids):
            signer = self.signers.get(keyid)
            if signer is not None:
                md.sign(signer, append=True)

    def _write(self, role: str, md: Metadata[Any]) -> None:
        data = md.to_bytes(self._serializer)
        if role == Timestamp.type:
            self.store.write("timestamp.json", data)
        else:
            self.store.write(f"{md.signed.version}.{role}.json", data)
            self.store.write(f"{role}.json", data)
        self._cache[role] = Metadata.from_bytes(data)

    def sign_existing(self, role: str) -> int:
        """Add signatures from the pool to the current version of ``role``.

        Returns how many valid signatures it now carries; used to reach a
        threshold of offline keys held by different people.
        """
        md = self.open(role)
        keyids, _ = self._role_keyids(role, md)
        if role == Root.type and md.signed.version > 1:
            prev = self.store.read(f"{md.signed.version - 1}.root.json")
            if prev is not None:
                keyids |= set(Metadata[Root].from_bytes(prev).signed.roles[Root.type].keyids)
        for keyid in sorted(keyids):
            signer = self.signers.get(keyid)
            if signer is not None:
                md.sign(signer, append=True)
        self._write(role, md)
        return len([k for k in md.signatures if k in keyids])

    # --- info for snapshot/timestamp --------------------------------------

    def targets_roles(self) -> list[str]:
        """Names of every targets role, top-level first, by delegation walk."""
        if not self.exists(Targets.type):
            return []
        seen: list[str] = []
        todo = [Targets.type]
        while todo:
            role = todo.pop(0)
            if role in seen or not self.exists(role):
                continue
            seen.append(role)
            delegations = self.targets(role).delegations
            if delegations is not None and delegations.roles:
                todo.extend(delegations.roles)
        return seen

    def _meta_file(self, role: str, version: int) -> MetaFile:
        data = self.store.read(f"{role}.json") if self.meta_hashes else None
        if data is None:
            return MetaFile(version=version)
        return MetaFile(
            version=version, length=len(data), hashes={"sha256": hashlib.sha256(data).hexdigest()}
        )

    @property
    def targets_infos(self) -> dict[str, MetaFile]:
        return {
            f"{role}.json": self._meta_file(role, self.targets(role).version)
            for role in self.targets_roles()
        }

    @property
    def snapshot_info(self) -> MetaFile:
        return self._meta_file(Snapshot.type, self.snapshot().version)

    def publish(self, force: bool = False) -> None:
        """Update snapshot then timestamp after targets edits."""
        self.do_snapshot(force=force)
        self.do_timestamp(force=force)

    def verify_role(self, role: str) -> None:
        """Check ``role`` is signed by a threshold of its keys (raises otherwise)."""
        md = self.open(role)
        if role == Root.type:
            assert isinstance(md.signed, Root)
            md.signed.verify_delegate(Root.type, md.signed_bytes, md.signatures)
        elif role in TOP_LEVEL_ROLES:
            self.root().verify_delegate(role, md.signed_bytes, md.signatures)
        else:
            for parent in self.targets_roles():
                delegations = self.targets(parent).delegations
                if delegations is not None and delegations.roles and role in delegations.roles:
                    self.targets(parent).verify_delegate(role, md.signed_bytes, md.signatures)
                    return
            raise ConfigError(f"role {role!r} is not delegated by any targets role")


def signers_by_keyid(signers: Mapping[str, Signer] | Iterable[Signer]) -> dict[str, Signer]:
    if isinstance(signers, Mapping):
        return dict(signers)
    return {s.public_key.keyid: s for s in signers}
