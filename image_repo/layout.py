"""On-disk layout of an Image repository directory (DESIGN 1).

```
DIR/image-repo.json      key refs (signer URI + public key) per role
DIR/metadata/            N.root.json, N.targets.json, N.<supplier>.json,
                         N.snapshot.json, timestamp.json (+ unversioned copies)
DIR/targets/             images stored as <sha256hex>.<name>, keeping the
                         directories of names with "/" (TUF consistent targets)
DIR/keys/                default keys dir: NAME.pem + NAME.pub.json
DIR/.image-repo.lock     serialises edits
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uptane.errors import ConfigError, KeyLoadError
from uptane.keys import KeyRef
from uptane.metadata import check_plain_target_path

CONFIG_FILE: Final = "image-repo.json"
METADATA_DIR: Final = "metadata"
TARGETS_DIR: Final = "targets"
KEYS_DIR: Final = "keys"
LOCK_FILE: Final = ".image-repo.lock"
CONFIG_FORMAT: Final = 1


def blob_relpath(name: str, sha256: str) -> str:
    """Where target ``name`` with digest ``sha256`` is stored under ``targets/``.

    The hash prefixes the basename, as python-tuf's ngclient requests it with
    ``prefix_targets_with_hash`` (TUF 5.5.2 consistent targets).
    """
    check_plain_target_path(name)
    dirname, sep, basename = name.rpartition("/")
    return f"{dirname}{sep}{sha256}.{basename}"


@dataclass
class RepoConfig:
    """The repository's key refs per role (``image-repo.json``).

    ``retired`` keeps keys rotated out of a role: they stay in the signer pool
    so that an interrupted rotation can be finished, but no role lists them.
    """

    keys_dir: Path
    roles: dict[str, list[KeyRef]] = field(default_factory=dict)
    retired: list[KeyRef] = field(default_factory=list)
    # highest release counter ever published per image name: survives removal,
    # so removing and re-adding an image cannot lower it (Uptane 2.1, 5.3.3)
    release_counters: dict[str, int] = field(default_factory=dict)

    def all_keys(self) -> list[KeyRef]:
        seen: dict[str, KeyRef] = {}
        for ref in [*(k for refs in self.roles.values() for k in refs), *self.retired]:
            seen.setdefault(ref.keyid, ref)
        return list(seen.values())

    def to_bytes(self) -> bytes:
        data: dict[str, Any] = {
            "format": CONFIG_FORMAT,
            "keys_dir": str(self.keys_dir),
            "roles": {role: [k.to_dict() for k in refs] for role, refs in self.roles.items()},
            "retired": [k.to_dict() for k in self.retired],
            "release_counters": dict(sorted(self.release_counters.items())),
        }
        return json.dumps(data, indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> RepoConfig:
        try:
            raw = json.loads(data)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON: {e}") from e
        if not isinstance(raw, dict) or raw.get("format") != CONFIG_FORMAT:
            raise ConfigError(f"{where}: not an image repository config (format {CONFIG_FORMAT})")
        roles_raw = raw.get("roles")
        retired_raw = raw.get("retired", [])
        keys_dir = raw.get("keys_dir")
        if not isinstance(roles_raw, dict) or not isinstance(retired_raw, list):
            raise ConfigError(f"{where}: 'roles' must be an object and 'retired' a list")
        if not isinstance(keys_dir, str):
            raise ConfigError(f"{where}: 'keys_dir' must be a path")
        try:
            roles = {}
            for role, refs in roles_raw.items():
                if not isinstance(refs, list):
                    raise ConfigError(f"{where}: keys of role {role!r} must be a list")
                roles[str(role)] = [KeyRef.from_dict(r) for r in refs]
            retired = [KeyRef.from_dict(r) for r in retired_raw]
        except KeyLoadError as e:
            raise ConfigError(f"{where}: {e}") from e
        counters_raw = raw.get("release_counters", {})
        if not isinstance(counters_raw, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in counters_raw.values()
        ):
            raise ConfigError(f"{where}: 'release_counters' must map image names to integers")
        return cls(
            keys_dir=Path(keys_dir),
            roles=roles,
            retired=retired,
            release_counters={str(k): v for k, v in counters_raw.items()},
        )
