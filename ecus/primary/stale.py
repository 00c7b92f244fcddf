"""A stale stored snapshot: what ngclient reuses, checked, set aside and refetched (TUF 5.5, 5.6).

Used by ``RepositorySync._sync_repository`` (issue 10 item 7): ngclient loads a stored
snapshot whose version the new timestamp names without checking its hashes (tuf 7.0.1
checks a stored targets or delegated role against its snapshot entry itself).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot
from tuf.api.serialization import DeserializationError

from uptane.verification.full import (
    VerifiedRepository,
)

#: Files of a metadata directory never set aside: the root chain and the new timestamp.
_NOT_SET_ASIDE: Final = frozenset({"root_history", "root.json", "timestamp.json"})


def stored_files(metadata_dir: Path) -> frozenset[str]:
    """The file names in ``metadata_dir`` (none when it does not exist yet)."""
    try:
        return frozenset(os.listdir(metadata_dir))
    except FileNotFoundError:
        return frozenset()


def check_stored(metadata_dir: Path, trusted: Any, stored: Collection[str] | None = None) -> None:
    """Files ngclient took from its own store match the lengths and hashes listed for them.

    ngclient loads a stored snapshot whose version the new timestamp names as
    trusted, without checking the hashes the timestamp lists (TUF 5.5.2; tuf
    7.0.1 checks a stored targets or delegated role against its snapshot
    entry itself, so checking those here is defence in depth against an older
    or changed ngclient). This checks them, for the files whose index
    lists a length or hashes: ``LengthOrHashMismatchError`` when the stored
    copy is not the file the index names (``RepositorySync._sync_repository`` refetches).
    ``stored``: the file names ``stored_files`` found before the refresh; a
    role whose file was not among them cannot have come from the store: ngclient
    downloaded it and checked its length and hashes (a first cycle checks
    nothing twice). None: every listed role is checked.
    """
    listed: list[tuple[str, Any]] = [("snapshot", trusted.timestamp.snapshot_meta)]
    for filename, meta in trusted.snapshot.meta.items():
        role = filename.removesuffix(".json")
        if role != Root.type and role in trusted:
            listed.append((role, meta))
    for role, meta in listed:
        if meta.length is None and not meta.hashes:
            continue
        filename = f"{quote(role, safe='')}.json"
        if stored is not None and filename not in stored:
            continue
        try:
            data = (metadata_dir / filename).read_bytes()
        except OSError as e:
            raise tuf_exc.RepositoryError(f"stored {role} metadata is unreadable: {e}") from e
        meta.verify_length_and_hashes(data)


def snapshot_floor(metadata_dir: Path) -> Snapshot | None:
    """The stored snapshot before a refetch (parsed, not re-verified), or None."""
    try:
        return Metadata[Snapshot].from_bytes((metadata_dir / "snapshot.json").read_bytes()).signed
    except (OSError, DeserializationError):
        return None


def set_aside(metadata_dir: Path, aside: Path) -> None:
    """Move every stored role but root and timestamp out of ngclient's sight."""
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    for entry in metadata_dir.iterdir():
        if entry.name not in _NOT_SET_ASIDE:
            os.replace(entry, aside / entry.name)


def put_back(aside: Path, metadata_dir: Path) -> None:
    """Undo ``set_aside``: drop what the fresh attempt stored, restore the old files."""
    for entry in metadata_dir.iterdir():
        if entry.name not in _NOT_SET_ASIDE:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for entry in aside.iterdir():
        os.replace(entry, metadata_dir / entry.name)
    aside.rmdir()


def check_floor(name: str, floor: Snapshot, fresh: VerifiedRepository) -> None:
    """The fresh copy must not go back from the set-aside snapshot (TUF 5.5.5).

    ngclient checks this itself against a stored snapshot; with the stored
    one set aside, it is checked here: the snapshot version, and the version
    of every role the old snapshot listed, which the new one must still list.
    """
    new = fresh.snapshot
    if new.version < floor.version:
        raise tuf_exc.BadVersionNumberError(
            f"{name} snapshot version {new.version} is below the stored {floor.version}"
        )
    for role, old in floor.meta.items():
        meta = new.meta.get(role)
        if meta is None:
            raise tuf_exc.RepositoryError(f"{name} snapshot no longer lists {role}")
        if meta.version < old.version:
            raise tuf_exc.BadVersionNumberError(
                f"{name} {role} version {meta.version} is below the stored {old.version}"
            )
