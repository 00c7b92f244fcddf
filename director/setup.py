"""A Director directory: its keys, root metadata and ``director.json`` (init, key rotation)."""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from director.config import DEFAULT_PORT, ONLINE_ROLES
from director.db_url import check_db_url

if TYPE_CHECKING:
    from director.config import DirectorConfig
    from uptane.keys import KeyRef
    from uptane.repository import SigningRepository


def _free_key_name(keys_dir: Path, prefix: str) -> str:
    n = 1
    while (keys_dir / f"{prefix}-{n}.pub.json").exists() or (
        keys_dir / f"{prefix}-{n}.pem"
    ).exists():
        n += 1
    return f"{prefix}-{n}"


def _root_repo(config: DirectorConfig, signers: list[KeyRef]) -> SigningRepository:
    from uptane.repository import DirectoryStore, ExpiryPolicy, SigningRepository

    repo = SigningRepository(
        store=DirectoryStore(config.root_dir), expiry=ExpiryPolicy(root=config.root_expiry)
    )
    repo.add_signers(ref.signer() for ref in signers)
    return repo


def _write_root_der(config: DirectorConfig, repo: SigningRepository, refs: list[KeyRef]) -> int:
    from tuf.api.metadata import Metadata, Root

    from uptane import der_metadata
    from uptane.repository import atomic_write

    md: Metadata[Root] = repo.open(Root.type)
    der = der_metadata.to_der_metadata(md, [ref.signer() for ref in refs])
    path = config.root_dir / f"{md.signed.version}.root.der"

    atomic_write(path, der)
    return md.signed.version


def init_director(
    directory: Path,
    *,
    image_repo_url: str | None = None,
    image_repo_root: Path | None = None,
    db_url: str = "",
    port: int = DEFAULT_PORT,
    root_keys: int = 1,
    root_threshold: int = 1,
    token: str | None = None,
) -> DirectorConfig:
    """Create keys, root version 1 (JSON + DER) and ``director.json`` in ``directory``.

    ``db_url`` (empty: SQLite in the directory) is checked before anything is written.
    """
    from tuf.api.metadata import Root

    from director.config import CONFIG_FILE, DirectorConfig
    from uptane.errors import ConfigError
    from uptane.keys import generate_ed25519

    directory = Path(directory)
    if (directory / CONFIG_FILE).exists():
        raise ConfigError(f"{directory / CONFIG_FILE} exists; refusing to overwrite")
    if not 1 <= root_threshold <= root_keys:
        raise ConfigError("need 1 <= root threshold <= number of root keys")
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    if db_url:
        check_db_url(db_url)
    directory.mkdir(parents=True, exist_ok=True)
    config = DirectorConfig(
        directory=directory,
        token=token or secrets.token_urlsafe(32),
        db_url=db_url,
        port=port,
        image_repo_url=image_repo_url,
        root_threshold=root_threshold,
    )
    if image_repo_root is not None:
        shutil.copyfile(image_repo_root, directory / "image_root.json")
    keys = config.keys_dir
    config.root_keys = [generate_ed25519(keys, f"root-{i + 1}") for i in range(root_keys)]
    config.online_keys = {role: [generate_ed25519(keys, f"{role}-1")] for role in ONLINE_ROLES}
    repo = _root_repo(config, config.root_keys)
    with repo.edit_root() as root:
        for ref in config.root_keys:
            root.add_key(ref.public, Root.type)
        root.roles[Root.type].threshold = root_threshold
        for role, refs in config.online_keys.items():
            for ref in refs:
                root.add_key(ref.public, role)
    _write_root_der(config, repo, config.root_keys)
    config.save()
    from director.tls import create_ca

    create_ca(directory)  # vehicles' client certificates (mutual TLS, director.tls)
    _restrict_modes(config)
    return config


def _restrict_modes(config: DirectorConfig) -> None:
    """Keys private to the owner; no Director directory group/world writable, whatever the umask."""
    import os

    os.chmod(config.keys_dir, 0o700)
    for d in (config.directory, config.root_dir):
        os.chmod(d, d.stat().st_mode & 0o7755)


def rotate_key(config: DirectorConfig, role: str) -> tuple[int, KeyRef]:
    """Replace the keys of ``role`` by a new one; sign root N+1 with old and new root keys.

    Returns the new root version and key. Restart running servers afterwards
    when an online key changed (they load online keys at start).
    """
    from tuf.api.metadata import Root

    from uptane.errors import ConfigError
    from uptane.keys import generate_ed25519

    if role not in (Root.type, *ONLINE_ROLES):
        raise ConfigError(f"unknown role {role!r}")
    if not config.root_keys:
        raise ConfigError("no root keys in the config: rotate needs the offline root keys")
    new = generate_ed25519(config.keys_dir, _free_key_name(config.keys_dir, role))
    old_root_refs = list(config.root_keys)
    signing_refs = old_root_refs + ([new] if role == Root.type else [])
    repo = _root_repo(config, signing_refs)
    with repo.edit_root() as root:
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new.public, role)
        if role == Root.type:
            root.roles[Root.type].threshold = 1
    version = _write_root_der(config, repo, signing_refs)
    if role == Root.type:
        config.root_keys = [new]
        config.root_threshold = 1
    else:
        config.online_keys[role] = [new]
    config.save()
    return version, new
