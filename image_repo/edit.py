"""One all-or-nothing edit of the Image repository (Uptane 5.3; DESIGN 1).

An ``Edit`` loads the keys and metadata, stages every role it changes,
images and new keys, checks that each written role reaches its signature
threshold (a new root twice: by its own keys and by those of the root it
replaces), and only then writes: images, new keys, the key config, then
metadata (``StagedStore``: root -> targets roles -> snapshot -> timestamp).
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Final

from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root

from image_repo.layout import CONFIG_FILE, METADATA_DIR, TARGETS_DIR, RepoConfig, blob_relpath
from uptane.errors import KeyLoadError, RepositoryEditError
from uptane.keys import KeyRef, check_key_free, keyref_for, write_key
from uptane.repository import (
    Clock,
    DirectoryStore,
    ExpiryPolicy,
    SigningRepository,
    StagedStore,
    atomic_write,
)

_VERSIONED_RE: Final = re.compile(r"^[0-9]+\.")


class Edit:
    """Staged state of one mutation: metadata, images, new keys and config."""

    def __init__(
        self,
        root_dir: Path,
        config: RepoConfig,
        clock: Clock,
        expiry: ExpiryPolicy,
    ) -> None:
        self.root_dir = root_dir
        self.config = copy.deepcopy(config)
        self._orig_config = config.to_bytes()
        self.store = StagedStore(DirectoryStore(root_dir / METADATA_DIR))
        self.repo = SigningRepository(store=self.store, expiry=expiry, clock=clock)
        self.load_errors: dict[str, str] = {}
        self.new_keys: dict[str, CryptoSigner] = {}
        self.blobs: dict[str, bytes] = {}
        for ref in self.config.all_keys():
            try:
                self.repo.signers[ref.keyid] = ref.signer()
            except KeyLoadError as e:
                self.load_errors[ref.keyid] = str(e)

    # staging --------------------------------------------------------------

    def generate_key(self, name: str) -> KeyRef:
        """A new ed25519 key, usable for signing now, stored on commit."""
        check_key_free(self.config.keys_dir, name)
        if name in self.new_keys:
            raise KeyLoadError(f"key {name!r} is generated twice")
        signer = CryptoSigner.generate_ed25519()
        self.new_keys[name] = signer
        self.repo.signers[signer.public_key.keyid] = signer
        return keyref_for(self.config.keys_dir, name, signer.public_key)

    def free_key_name(self, prefix: str) -> str:
        i = 1
        while True:
            name = f"{prefix}-{i}"
            try:
                check_key_free(self.config.keys_dir, name)
            except KeyLoadError:
                i += 1
                continue
            if name not in self.new_keys:
                return name
            i += 1

    def add_signer_for(self, ref: KeyRef) -> None:
        """Try to load a key's signer into the pool (external keys may have none)."""
        if ref.keyid in self.repo.signers:
            return
        try:
            self.repo.signers[ref.keyid] = ref.signer()
        except KeyLoadError as e:
            self.load_errors[ref.keyid] = str(e)

    def add_blob(self, name: str, data: bytes) -> None:
        self.blobs[blob_relpath(name, hashlib.sha256(data).hexdigest())] = data

    # checks and commit ----------------------------------------------------------

    def written_roles(self) -> list[str]:
        roles = []
        for filename in self.store.pending:
            if not _VERSIONED_RE.match(filename):
                roles.append(filename.removesuffix(".json"))
        return roles

    def can_sign(self, role: str) -> bool:
        keyids, threshold = self.repo.role_keys(role)
        return len(keyids & set(self.repo.signers)) >= threshold

    def _unsigned(self, role: str) -> RepositoryEditError:
        keyids, threshold = self.repo.role_keys(role)
        have = sorted(keyids & set(self.repo.signers))
        msg = (
            f"cannot sign role {role!r}: it needs {threshold} signature(s) from keys "
            f"{', '.join(k[:12] for k in sorted(keyids))}, but only {len(have)} of them "
            "can be loaded"
        )
        errors = [
            f"{k[:12]}: {self.load_errors[k]}" for k in sorted(keyids) if k in self.load_errors
        ]
        if errors:
            msg += " (" + "; ".join(errors) + ")"
        return RepositoryEditError(msg)

    def verify(self) -> None:
        """Every role written in this edit must reach its threshold (root twice)."""
        for role in self.written_roles():
            try:
                self.repo.verify_role(role)
            except UnsignedMetadataError:
                raise self._unsigned(role) from None
            if role != Root.type:
                continue
            new = self.repo.open(Root.type)
            prev_bytes = self.store.read(f"{new.signed.version - 1}.root.json")
            if prev_bytes is None:
                continue
            prev = Metadata[Root].from_bytes(prev_bytes).signed
            try:
                prev.verify_delegate(Root.type, new.signed_bytes, new.signatures)
            except UnsignedMetadataError:
                raise RepositoryEditError(
                    f"cannot sign root v{new.signed.version}: it needs {prev.roles['root'].threshold}"
                    " signature(s) from the keys of the root it replaces"
                ) from None

    def commit(self) -> None:
        self.verify()
        targets_dir = self.root_dir / TARGETS_DIR
        for rel, data in self.blobs.items():
            path = targets_dir / rel
            if path.is_file() and path.read_bytes() == data:
                continue
            atomic_write(path, data)
        for name, signer in self.new_keys.items():
            write_key(self.config.keys_dir, name, signer)
        new_config = self.config.to_bytes()
        if new_config != self._orig_config:
            atomic_write(self.root_dir / CONFIG_FILE, new_config)
        self.store.commit()
