"""What ``uptane image-repo status`` reports: roles, versions, expiries, targets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RoleStatus:
    """One role's published metadata."""

    name: str
    version: int
    expires: datetime
    threshold: int
    keyids: tuple[str, ...]
    valid_signatures: int
    delegated_by: str | None = None
    paths: tuple[str, ...] = ()
    hardware_ids: tuple[str, ...] | None = None

    @property
    def signed(self) -> bool:
        return self.valid_signatures >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["expires"] = self.expires.isoformat()
        d["signed"] = self.signed
        return d


@dataclass(frozen=True)
class TargetStatus:
    """One published image."""

    role: str
    name: str
    length: int
    hashes: Mapping[str, str]
    custom: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"hashes": dict(self.hashes)}


@dataclass(frozen=True)
class RepoStatus:
    """Roles, versions, expiries and targets of a repository (``status``)."""

    roles: tuple[RoleStatus, ...]
    targets: tuple[TargetStatus, ...]

    def role(self, name: str) -> RoleStatus:
        for r in self.roles:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "roles": [r.to_dict() for r in self.roles],
            "targets": [t.to_dict() for t in self.targets],
        }
