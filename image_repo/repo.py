"""Offline edits of the Image repository (Uptane 2.1, 5.3; DESIGN 1, 3).

``ImageRepository`` is the Python API behind ``uptane image-repo``: the
Director, the demo and the simulator call it directly. Every mutation runs as
one edit: it loads the keys and metadata, checks all of its input, signs every
role it changes into a staging area, checks each of those roles reaches its
signature threshold, and only then writes: images, new keys, the key config,
then metadata in the order root -> targets roles -> snapshot -> timestamp. A
refused edit leaves every file of the repository as it was.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)

from image_repo.checks import (
    check_path_pattern,
    check_role_name,
    delegated_hardware_ids,
    validate_wasm,
)
from image_repo.edit import Edit
from image_repo.layout import (
    CONFIG_FILE,
    KEYS_DIR,
    LOCK_FILE,
    METADATA_DIR,
    TARGETS_DIR,
    RepoConfig,
    blob_relpath,
)
from image_repo.status import RepoStatus, RoleStatus, TargetStatus
from uptane.errors import (
    ConfigError,
    DelegationViolationError,
    ReleaseCounterRollbackError,
    RepositoryEditError,
)
from uptane.keys import KeyRef
from uptane.metadata import (
    HARDWARE_IDS,
    RELEASE_COUNTER,
    Limits,
    build_custom,
    check_identifier,
    check_plain_target_path,
)
from uptane.repository import (
    TOP_LEVEL_ROLES,
    Clock,
    DirectoryStore,
    ExpiryPolicy,
    SigningRepository,
    utc_now,
)

TARGET_HASH_ALGORITHMS: Final = ["sha256", "sha512"]


# --- the API -------------------------------------------------------------------


class ImageRepository:
    """An Image repository directory (layout in ``image_repo.layout``).

    ``clock`` is the time metadata is signed at (its expiry is counted from
    it); ``expiry`` says how long each role stays valid.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Clock = utc_now,
        expiry: ExpiryPolicy | None = None,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self.expiry = expiry or ExpiryPolicy()
        if not (self.path / CONFIG_FILE).is_file():
            raise ConfigError(
                f"{self.path} is not an image repository (no {CONFIG_FILE}); "
                "create one with 'uptane image-repo init'"
            )

    @property
    def metadata_dir(self) -> Path:
        return self.path / METADATA_DIR

    @property
    def targets_dir(self) -> Path:
        return self.path / TARGETS_DIR

    # creation ---------------------------------------------------------------

    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        keys_dir: str | os.PathLike[str] | None = None,
        root_threshold: int = 2,
        targets_threshold: int = 2,
        clock: Clock = utc_now,
        expiry: ExpiryPolicy | None = None,
    ) -> ImageRepository:
        """Create a repository: new keys and version 1 of every top-level role.

        Root and targets get ``threshold`` keys each (offline roles), snapshot
        and timestamp one each. Refuses a directory that is not empty.
        """
        root_dir = Path(path)
        if root_dir.exists() and (not root_dir.is_dir() or any(root_dir.iterdir())):
            raise ConfigError(f"{root_dir} exists and is not an empty directory; refusing to init")
        for what, threshold in (("root", root_threshold), ("targets", targets_threshold)):
            if threshold < 1:
                raise RepositoryEditError(f"{what} threshold must be at least 1")
        keys = Path(keys_dir) if keys_dir is not None else root_dir / KEYS_DIR
        config = RepoConfig(keys_dir=keys.resolve())
        edit = Edit(root_dir, config, clock, expiry or ExpiryPolicy())
        counts = {
            Root.type: root_threshold,
            Targets.type: targets_threshold,
            Snapshot.type: 1,
            Timestamp.type: 1,
        }
        with edit.repo.edit_root() as root:
            for role, count in counts.items():
                refs = [edit.generate_key(f"{role}-{i}") for i in range(1, count + 1)]
                for ref in refs:
                    root.add_key(ref.public, role)
                root.roles[role].threshold = count
                edit.config.roles[role] = refs
        with edit.repo.edit_targets():
            pass
        edit.repo.publish()
        edit.verify()
        root_dir.mkdir(parents=True, exist_ok=True)
        (root_dir / METADATA_DIR).mkdir(exist_ok=True)
        (root_dir / TARGETS_DIR).mkdir(exist_ok=True)
        (root_dir / LOCK_FILE).touch()
        edit._orig_config = b""  # always write the config
        edit.commit()
        return cls(root_dir, clock=clock, expiry=expiry)

    # internals ----------------------------------------------------------------

    def _load_config(self) -> RepoConfig:
        return RepoConfig.from_bytes((self.path / CONFIG_FILE).read_bytes(), str(self.path))

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)

    @contextmanager
    def _edit(self, expiry_overrides: Mapping[str, timedelta] | None = None) -> Iterator[Edit]:
        expiry = self.expiry
        if expiry_overrides:
            expiry = dataclasses.replace(expiry, overrides={**expiry.overrides, **expiry_overrides})
        with self._locked(exclusive=True):
            edit = Edit(self.path, self._load_config(), self.clock, expiry)
            yield edit
            edit.commit()

    @staticmethod
    def _targets_role(repo: SigningRepository, role: str) -> DelegatedRole | None:
        """The delegation of targets role ``role`` (None for top-level targets)."""
        if role == Targets.type:
            return None
        if role in TOP_LEVEL_ROLES:
            raise RepositoryEditError(f"{role!r} is not a targets role")
        delegation = repo.delegation(role)
        if delegation is None:
            known = [r for r in repo.targets_roles() if r != Targets.type]
            delegated = repo.targets().delegations
            if delegated is not None and delegated.roles:
                known = sorted(set(known) | set(delegated.roles))
            raise RepositoryEditError(
                f"unknown role {role!r}; targets roles: {', '.join(['targets', *known])}"
            )
        return delegation

    # targets --------------------------------------------------------------------

    def add_target(
        self,
        data: bytes,
        *,
        name: str,
        hardware_ids: Sequence[str],
        release_counter: int,
        capabilities: Iterable[str] = (),
        limits: Limits | None = None,
        role: str = Targets.type,
    ) -> TargetFile:
        """Add or replace image ``name`` in targets role ``role`` (5.3.3).

        Refuses an invalid WASM module, an unsafe name, bad custom fields, a
        name or hardware id outside ``role``'s delegation, and a release
        counter lower than any role already publishes for ``name``.
        """
        data = bytes(data)
        check_plain_target_path(name)
        custom = build_custom(
            hardware_ids=hardware_ids,
            release_counter=release_counter,
            capabilities=capabilities,
            limits=limits,
        )
        validate_wasm(data)
        with self._edit() as edit:
            repo = edit.repo
            delegation = self._targets_role(repo, role)
            if delegation is not None:
                if not delegation.is_delegated_path(name):
                    raise DelegationViolationError(
                        f"role {role!r} may only publish {', '.join(delegation.paths or [])}; "
                        f"{name!r} is outside its delegation"
                    )
                allowed = delegated_hardware_ids(delegation)
                outside = [
                    h for h in custom[HARDWARE_IDS] if allowed is not None and h not in allowed
                ]
                if outside:
                    raise DelegationViolationError(
                        f"role {role!r} may only publish for hardware ids "
                        f"{', '.join(allowed or ())}; not for {', '.join(outside)}"
                    )
            for other in repo.targets_roles():
                published = repo.targets(other).targets.get(name)
                counter = (published.custom or {}).get(RELEASE_COUNTER) if published else None
                if isinstance(counter, int) and release_counter < counter:
                    raise ReleaseCounterRollbackError(
                        f"release counter {release_counter} of {name!r} is lower than "
                        f"{counter}, already published by role {other!r}"
                    )
            highest = edit.config.release_counters.get(name)
            if highest is not None and release_counter < highest:
                raise ReleaseCounterRollbackError(
                    f"release counter {release_counter} of {name!r} is lower than {highest}, "
                    "published for it before (removed images keep their counter)"
                )
            edit.config.release_counters[name] = max(release_counter, highest or 0)
            target = TargetFile.from_data(name, data, TARGET_HASH_ALGORITHMS)
            target.unrecognized_fields["custom"] = custom
            with repo.edit_targets(role) as targets:
                targets.targets[name] = target
            repo.publish()
            edit.add_blob(name, data)
        return target

    def add_target_file(
        self, path: str | os.PathLike[str], *, name: str | None = None, **kwargs: Any
    ) -> TargetFile:
        """``add_target`` with the bytes of ``path``; the name defaults to its basename.

        The module is first checked against the secondary's ABI with exactly
        the capabilities and limits to be signed (``image_repo.abi``).
        """
        from image_repo.abi import check_module

        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise RepositoryEditError(f"cannot read {p}: {e}") from e
        check_module(data, kwargs.get("capabilities", ()), kwargs.get("limits") or Limits())
        return self.add_target(data, name=name if name is not None else p.name, **kwargs)

    def remove_target(self, name: str, *, role: str = Targets.type) -> None:
        """Stop publishing ``name`` in ``role`` (its stored image stays for old snapshots)."""
        with self._edit() as edit:
            repo = edit.repo
            self._targets_role(repo, role)
            if name not in repo.targets(role).targets:
                raise RepositoryEditError(f"role {role!r} does not publish {name!r}")
            with repo.edit_targets(role) as targets:
                del targets.targets[name]
            repo.publish()

    # delegations ----------------------------------------------------------------

    def delegate(
        self,
        supplier: str,
        *,
        paths: Sequence[str],
        hardware_ids: Sequence[str],
        keys: Sequence[KeyRef] | None = None,
        threshold: int = 1,
    ) -> list[KeyRef]:
        """Delegate ``paths`` for ``hardware_ids`` from top-level targets to ``supplier``.

        The delegation is terminating; its allowed hardware ids are stored in
        ``DelegatedRole.unrecognized_fields["custom"]["hardware_ids"]``.
        Without ``keys``, ``threshold`` new keys are generated into the keys
        dir. The supplier's role is published (version 1, empty) now if its
        keys can sign, else by its first ``add_target(..., role=supplier)``.
        Returns the role's keys.
        """
        check_role_name(supplier)
        patterns = [check_path_pattern(p) for p in paths]
        if not patterns:
            raise RepositoryEditError("a delegation needs at least one --path pattern")
        hw = [check_identifier(h, "hardware id") for h in hardware_ids]
        if not hw or len(set(hw)) != len(hw):
            raise RepositoryEditError("a delegation needs one or more distinct hardware ids")
        if threshold < 1:
            raise RepositoryEditError("threshold must be at least 1")
        if keys is not None:
            if len({k.keyid for k in keys}) != len(keys):
                raise RepositoryEditError("the same key is given twice")
            if len(keys) < threshold:
                raise RepositoryEditError(
                    f"threshold {threshold} cannot be reached with {len(keys)} key(s)"
                )
        with self._edit() as edit:
            repo = edit.repo
            existing = repo.targets().delegations
            if (
                supplier in edit.config.roles
                or (existing is not None and existing.roles and supplier in existing.roles)
                or repo.delegation(supplier) is not None
            ):
                raise RepositoryEditError(f"role {supplier!r} already exists")
            if keys is None:
                refs = [edit.generate_key(edit.free_key_name(supplier)) for _ in range(threshold)]
            else:
                refs = list(keys)
                for ref in refs:
                    edit.add_signer_for(ref)
            with repo.edit_targets() as targets:
                if targets.delegations is None:
                    targets.delegations = Delegations(keys={}, roles={})
                assert targets.delegations.roles is not None
                targets.delegations.roles[supplier] = DelegatedRole(
                    name=supplier,
                    keyids=[],
                    threshold=threshold,
                    terminating=True,
                    paths=patterns,
                    unrecognized_fields={"custom": {HARDWARE_IDS: hw}},
                )
                for ref in refs:
                    targets.add_key(ref.public, supplier)
            if edit.can_sign(supplier):
                with repo.edit_targets(supplier):
                    pass
            repo.publish()
            edit.config.roles[supplier] = refs
        return refs

    # signing ----------------------------------------------------------------------

    def resign(
        self,
        roles: Sequence[str] | None = None,
        *,
        expires_in: timedelta | None = None,
    ) -> list[str]:
        """Publish new versions of ``roles`` (default snapshot + timestamp).

        ``expires_in`` overrides the expiry of those roles. Snapshot and
        timestamp follow whatever changed. Returns the roles re-signed.
        """
        wanted = list(roles) if roles else [Snapshot.type, Timestamp.type]
        if expires_in is not None and expires_in <= timedelta(0):
            raise RepositoryEditError("expiry must be in the future")
        overrides = dict.fromkeys(wanted, expires_in) if expires_in is not None else None
        with self._edit(overrides) as edit:
            repo = edit.repo
            for role in wanted:
                if role not in TOP_LEVEL_ROLES:
                    self._targets_role(repo, role)
            order = [Root.type, *repo.targets_roles(), Snapshot.type, Timestamp.type]
            order += [r for r in wanted if r not in order]  # delegated, not yet published
            done = []
            for role in order:
                if role not in wanted:
                    continue
                if role == Snapshot.type or role == Timestamp.type:
                    continue
                with repo.edit(role):
                    pass
                done.append(role)
            repo.do_snapshot(force=Snapshot.type in wanted)
            repo.do_timestamp(force=Timestamp.type in wanted)
            done += [r for r in (Snapshot.type, Timestamp.type) if r in wanted]
        return done

    def rotate_key(self, role: str, old_keyid: str, new_key: KeyRef | None = None) -> KeyRef:
        """Replace key ``old_keyid`` (or a unique prefix of it) of ``role``.

        A top-level role's keys change in a new root version; for ``root``
        that version is signed by a threshold of the old and of the new root
        keys, so clients follow the chain (TUF 5.3.4). A supplier's keys
        change in top-level targets. The role is then re-signed with its new
        keys, and snapshot and timestamp are published again. Without
        ``new_key`` a key is generated into the keys dir. Returns the new key.
        """
        with self._edit() as edit:
            repo = edit.repo
            top_level = role in TOP_LEVEL_ROLES
            if top_level:
                keyids = list(repo.root().roles[role].keyids)
            else:
                delegation = self._targets_role(repo, role)
                assert delegation is not None
                if parent_name(repo, role) != Targets.type:
                    raise RepositoryEditError(
                        f"role {role!r} is not delegated by top-level targets"
                    )
                keyids = list(delegation.keyids)
            matches = [k for k in keyids if k.startswith(old_keyid)] if old_keyid else []
            if len(matches) != 1:
                raise RepositoryEditError(
                    f"{old_keyid!r} matches {len(matches)} key(s) of role {role!r}; "
                    f"its keys are {', '.join(keyids)}"
                )
            old = matches[0]
            if new_key is None:
                new_key = edit.generate_key(edit.free_key_name(role))
            else:
                edit.add_signer_for(new_key)
            if new_key.keyid in keyids:
                raise RepositoryEditError(f"key {new_key.keyid} already signs role {role!r}")
            if top_level:
                with repo.edit_root() as root:
                    root.revoke_key(old, role)
                    root.add_key(new_key.public, role)
                if role == Targets.type:
                    with repo.edit_targets():
                        pass
            else:
                with repo.edit_targets() as targets:
                    targets.revoke_key(old, role)
                    targets.add_key(new_key.public, role)
                with repo.edit_targets(role):
                    pass
            repo.do_snapshot(force=True)
            repo.do_timestamp(force=True)
            refs = edit.config.roles.get(role, [])
            edit.config.roles[role] = [r for r in refs if r.keyid != old] + [new_key]
            known = {r.keyid for r in edit.config.retired}
            edit.config.retired += [r for r in refs if r.keyid == old and r.keyid not in known]
        return new_key

    # reading ------------------------------------------------------------------------

    def _reader(self) -> SigningRepository:
        return SigningRepository(
            store=DirectoryStore(self.metadata_dir), expiry=self.expiry, clock=self.clock
        )

    def root_bytes(self, version: int | None = None) -> bytes:
        """Bytes of root ``version`` (default: the current one), e.g. to bootstrap a client."""
        filename = "root.json" if version is None else f"{version}.root.json"
        data = (self.metadata_dir / filename).read_bytes()
        return data

    def targets(self) -> dict[str, tuple[str, TargetFile]]:
        """Every published image: name -> (role, TargetFile), top-level role first."""
        with self._locked(exclusive=False):
            repo = self._reader()
            found: dict[str, tuple[str, TargetFile]] = {}
            for role in repo.targets_roles():
                for name, target in repo.targets(role).targets.items():
                    found.setdefault(name, (role, target))
            return found

    def blob_path(self, target: TargetFile) -> Path:
        """Where the bytes of ``target`` are stored."""
        return self.targets_dir / blob_relpath(target.path, target.hashes["sha256"])

    def status(self) -> RepoStatus:
        """Roles (version, expiry, keys, valid signatures) and targets."""
        with self._locked(exclusive=False):
            repo = self._reader()
            root = repo.root()
            roles: list[RoleStatus] = []
            for role in TOP_LEVEL_ROLES:
                md = repo.open(role)
                r = root.roles[role]
                result = root.get_verification_result(role, md.signed_bytes, md.signatures)
                roles.append(
                    RoleStatus(
                        name=role,
                        version=md.signed.version,
                        expires=md.signed.expires,
                        threshold=r.threshold,
                        keyids=tuple(r.keyids),
                        valid_signatures=len(result.signed),
                    )
                )
            targets: list[TargetStatus] = []
            for role in repo.targets_roles():
                md = repo.open(role)
                if role != Targets.type:
                    parent, delegation = self._parent_of(repo, role)
                    result = parent.get_verification_result(role, md.signed_bytes, md.signatures)
                    roles.append(
                        RoleStatus(
                            name=role,
                            version=md.signed.version,
                            expires=md.signed.expires,
                            threshold=delegation.threshold,
                            keyids=tuple(delegation.keyids),
                            valid_signatures=len(result.signed),
                            delegated_by=parent_name(repo, role),
                            paths=tuple(delegation.paths or ()),
                            hardware_ids=delegated_hardware_ids(delegation),
                        )
                    )
                for name, t in repo.targets(role).targets.items():
                    targets.append(
                        TargetStatus(
                            role=role,
                            name=name,
                            length=t.length,
                            hashes=dict(t.hashes),
                            custom=dict(t.custom or {}),
                        )
                    )
            return RepoStatus(roles=tuple(roles), targets=tuple(targets))

    @staticmethod
    def _parent_of(repo: SigningRepository, role: str) -> tuple[Targets, DelegatedRole]:
        name = parent_name(repo, role)
        parent = repo.targets(name)
        assert parent.delegations is not None and parent.delegations.roles is not None
        return parent, parent.delegations.roles[role]


def parent_name(repo: SigningRepository, role: str) -> str:
    """Name of the targets role that delegates ``role``."""
    for parent in repo.targets_roles():
        delegations = repo.targets(parent).delegations
        if delegations is not None and delegations.roles and role in delegations.roles:
            return parent
    raise ConfigError(f"role {role!r} is not delegated by any targets role")
