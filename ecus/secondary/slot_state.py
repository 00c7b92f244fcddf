"""The A/B slot store's state record: slot statuses, write points, installed targets (DESIGN 5)."""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from uptane.errors import InstallError, MetadataError, UnsafeTargetPathError
from uptane.metadata import (
    Limits,
    UptaneTarget,
    check_capabilities,
    check_identifier,
    check_target_path,
)

SLOTS: Final = ("a", "b")
STATE_FILE: Final = "state.json"
STATE_FORMAT: Final = 1

# Slot statuses.
EMPTY: Final = "empty"  # nothing usable
WRITING: Final = "writing"  # an image is being written; ``written`` bytes are durable
VERIFIED: Final = "verified"  # complete, length and hashes checked, never run
COMMITTED: Final = "committed"  # passed its trial; bootable
FAILED: Final = "failed"  # failed verification or its trial; never booted
STATUSES: Final = frozenset({EMPTY, WRITING, VERIFIED, COMMITTED, FAILED})

# Hash functions an image may be checked with (hashlib names, as TUF uses them).
HASH_ALGORITHMS: Final = frozenset({"sha224", "sha256", "sha384", "sha512"})

# Names passed to ``fault`` before each durable write.
WRITE_POINTS: Final = frozenset(
    {
        "begin",  # state: slot marked writing
        "begin_truncate",  # slot file emptied
        "chunk",  # chunk bytes written and fsynced
        "chunk_state",  # state: written offset
        "resume_truncate",  # slot file cut back to the durable offset
        "finish",  # state: slot verified (or failed)
        "start_trial",  # state: trial slot set
        "commit",  # state: trial slot active
        "rollback",  # state: trial slot failed
        "boot_attempt",  # state: boot attempts of a trial
        "boot_fallback",  # state: active slot replaced by the other committed one
        "ecu_state",  # state: metadata, report counter, time floor, extra
    }
)

_READ_BLOCK: Final = 1 << 16


class PowerCut(BaseException):
    """Raised by a ``fault`` hook to simulate losing power at a write point.

    A ``BaseException`` so that ``except Exception`` handlers do not survive it.
    """


@dataclass(frozen=True)
class InstalledTarget:
    """What a slot holds, from the signed target it was installed for (DESIGN 3)."""

    name: str
    length: int
    hashes: Mapping[str, str]
    release_counter: int
    hardware_ids: tuple[str, ...]
    capabilities: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_target_path(self.name)
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise MetadataError(f"{self.name}: length must be a non-negative integer")
        if not self.hashes:
            raise MetadataError(f"{self.name}: no hashes to verify the image with")
        for algo, digest in self.hashes.items():
            if not isinstance(digest, str):
                raise MetadataError(f"{self.name}: {algo} digest is not a string")
            try:
                bytes.fromhex(digest)
            except ValueError:
                raise MetadataError(f"{self.name}: {algo} digest is not hex") from None

    @classmethod
    def from_uptane(cls, target: UptaneTarget) -> InstalledTarget:
        return cls(
            name=target.name,
            length=target.length,
            hashes=dict(target.hashes),
            release_counter=target.release_counter,
            hardware_ids=target.hardware_ids,
            capabilities=target.capabilities,
            limits=target.limits,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "length": self.length,
            "hashes": dict(sorted(self.hashes.items())),
            "release_counter": self.release_counter,
            "hardware_ids": list(self.hardware_ids),
            "capabilities": list(self.capabilities),
            "limits": self.limits.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InstalledTarget:
        try:
            hashes = data["hashes"]
            if not isinstance(hashes, Mapping):
                raise MetadataError("hashes must be an object")
            return cls(
                name=data["name"],
                length=data["length"],
                hashes=dict(hashes),
                release_counter=data["release_counter"],
                hardware_ids=tuple(
                    check_identifier(h, "hardware id") for h in data["hardware_ids"]
                ),
                capabilities=check_capabilities(data["capabilities"]),
                limits=Limits.from_dict(data["limits"]),
            )
        except (KeyError, TypeError) as e:
            raise MetadataError(f"invalid installed target record: {e!r}") from e


@dataclass(frozen=True)
class SlotInfo:
    """The state record of one slot."""

    slot: str
    status: str
    target: InstalledTarget | None
    written: int = 0


@dataclass(frozen=True)
class BootedImage:
    """What ``boot`` (or ``start_trial``) hands the ECU to run: verified bytes."""

    slot: str
    target: InstalledTarget
    image: bytes
    trial: bool = False
    rolled_back: str | None = None  # why ``boot`` rolled a trial back, if it did


@dataclass(frozen=True)
class Failure:
    """The last install that failed, for the next version report."""

    slot: str
    target: str | None
    reason: str


def _hashers(target: InstalledTarget) -> dict[str, Any]:
    unsupported = sorted(set(target.hashes) - HASH_ALGORITHMS)
    if unsupported:
        raise InstallError(
            f"{target.name}: cannot verify hash function(s) {', '.join(unsupported)}; "
            f"supported: {', '.join(sorted(HASH_ALGORITHMS))}"
        )
    return {algo: hashlib.new(algo) for algo in target.hashes}


def _mismatch(target: InstalledTarget, length: int, hashers: Mapping[str, Any]) -> str | None:
    if length != target.length:
        return f"length is {length}, expected {target.length}"
    for algo, h in sorted(hashers.items()):
        if not hmac.compare_digest(h.hexdigest(), target.hashes[algo].lower()):
            return f"{algo} hash does not match"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _empty_state() -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "active": None,
        "trial": None,
        "boot_attempts": 0,
        "slots": {s: {"status": EMPTY, "target": None, "written": 0} for s in SLOTS},
        "last_failure": None,
        "metadata": {},
        "report_counter": 0,
        "time_floor": None,
        "extra": {},
    }


def _check_state(state: Any) -> dict[str, Any]:
    """Validate the shape of a loaded state record (raise InstallError)."""
    try:
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("unknown format")
        if state["active"] not in (None, *SLOTS) or state["trial"] not in (None, *SLOTS):
            raise ValueError("bad active/trial slot")
        if state["trial"] is not None and state["trial"] == state["active"]:
            raise ValueError("trial slot is the active slot")
        for slot in SLOTS:
            info = state["slots"][slot]
            if info["status"] not in STATUSES:
                raise ValueError(f"bad status of slot {slot}")
            if info["target"] is not None:
                InstalledTarget.from_dict(info["target"])
            if not isinstance(info["written"], int) or info["written"] < 0:
                raise ValueError(f"bad written offset of slot {slot}")
        for slot in (state["active"], state["trial"]):
            if slot is not None and state["slots"][slot]["target"] is None:
                raise ValueError(f"slot {slot} is in use but has no target")
        if not isinstance(state["boot_attempts"], int) or not isinstance(
            state["report_counter"], int
        ):
            raise ValueError("bad counters")
        if not isinstance(state["metadata"], dict) or not isinstance(state["extra"], dict):
            raise ValueError("bad metadata/extra")
        if state["time_floor"] is not None:
            datetime.fromisoformat(state["time_floor"])
    except (KeyError, TypeError, ValueError, MetadataError, UnsafeTargetPathError) as e:
        raise InstallError(f"slot state record is invalid: {e!r}") from e
    return state
