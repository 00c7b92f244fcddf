"""A/B slot store of a secondary ECU (DESIGN 5; Uptane 2.1, 5.4.3, 5.4.4.1).

A directory holds two image slots (``slot_a.img``, ``slot_b.img``) and one
JSON state record (``state.json``): which slot is active, which is on trial,
boot attempts, the installed target of each slot, and the ECU state a
secondary keeps across restarts (trusted Director metadata, last report
counter, time floor).

Every change of the state record is one atomic write (temporary file, fsync,
rename, fsync of the directory: ``uptane.repository.atomic_write``), and
image bytes are fsynced before the state record says they are there. Chunk
progress is cheaper (fdatasync of the bytes and of the new record, no
directory fsync: a lost rename only brings back an older, still true offset). The
order of writes is chosen so that a power cut at any point leaves a bootable
ECU running a verified image:

* an image is written only into the inactive slot, which the state record
  marks ``writing`` *before* its file is touched;
* ``ImageWriter.finish`` checks the length and every hash of the bytes on
  disk; only then is the slot ``verified``, and only a verified slot can be
  put on trial;
* a slot becomes active only by ``commit`` after its trial; a trial that a
  restart interrupted is rolled back by ``boot`` (after ``max_trial_boots``
  restarts; 0 by default);
* ``boot`` checks the length and hashes of the image it returns, and falls
  back to the other committed slot when the active one no longer matches.

``fault(point)`` is called before each durable write, with the name of the
write point (``WRITE_POINTS``); the ECU simulator and the tests raise
``PowerCut`` there to cut the power.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ecus.secondary.slot_state import (
    _READ_BLOCK,
    COMMITTED,
    EMPTY,
    FAILED,
    SLOTS,
    STATE_FILE,
    STATUSES,
    VERIFIED,
    WRITE_POINTS,
    WRITING,
    BootedImage,
    Failure,
    InstalledTarget,
    PowerCut,
    SlotInfo,
    _check_state,
    _empty_state,
    _fsync_dir,
    _hashers,
    _mismatch,
)
from uptane.errors import EndlessDataError, ImageMismatchError, InstallError
from uptane.repository import atomic_write

__all__ = [
    "COMMITTED",
    "EMPTY",
    "FAILED",
    "SLOTS",
    "STATUSES",
    "VERIFIED",
    "WRITE_POINTS",
    "WRITING",
    "BootedImage",
    "Failure",
    "ImageWriter",
    "InstalledTarget",
    "PowerCut",
    "SlotInfo",
    "SlotStore",
]


class SlotStore:
    """Two image slots and the persisted state of a secondary ECU (DESIGN 5)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        fault: Callable[[str], None] | None = None,
        *,
        slot_size: int | None = None,
        max_trial_boots: int = 0,
    ) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._fault = fault
        self.slot_size = slot_size
        self.max_trial_boots = max_trial_boots
        self._writer_generation = 0
        raw = None
        try:
            raw = (self.path / STATE_FILE).read_bytes()
        except FileNotFoundError:
            self._state = _empty_state()
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except ValueError as e:
                raise InstallError(f"slot state record is not JSON: {e}") from e
            self._state = _check_state(loaded)

    # --- state record -----------------------------------------------------

    def _save(self, state: dict[str, Any], point: str) -> None:
        """Persist ``state`` atomically after the ``fault`` hook for ``point``."""
        if self._fault is not None:
            self._fault(point)
        data = json.dumps(state, indent=1, sort_keys=True).encode()
        if point == "chunk_state":
            _save_progress(self.path / STATE_FILE, data)
        else:
            atomic_write(self.path / STATE_FILE, data)
        self._state = state

    def _edit(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def slot_path(self, slot: str) -> Path:
        if slot not in SLOTS:
            raise ValueError(f"no slot {slot!r}")
        return self.path / f"slot_{slot}.img"

    def slot_info(self, slot: str) -> SlotInfo:
        info = self._state["slots"][slot]
        target = info["target"]
        return SlotInfo(
            slot=slot,
            status=info["status"],
            target=None if target is None else InstalledTarget.from_dict(target),
            written=info["written"],
        )

    @property
    def active(self) -> str | None:
        """The slot that runs (None before the first install)."""
        active: str | None = self._state["active"]
        return active

    @property
    def trial(self) -> str | None:
        """The slot on trial, if an install is between ``start_trial`` and commit/rollback."""
        trial: str | None = self._state["trial"]
        return trial

    @property
    def boot_attempts(self) -> int:
        attempts: int = self._state["boot_attempts"]
        return attempts

    def active_target(self) -> InstalledTarget | None:
        """The installed target of the active slot."""
        return None if self.active is None else self.slot_info(self.active).target

    @property
    def last_failure(self) -> Failure | None:
        raw = self._state["last_failure"]
        if raw is None:
            return None
        return Failure(slot=raw["slot"], target=raw["target"], reason=raw["reason"])

    def inactive_slot(self) -> str:
        """The slot a new image is written into."""
        return "b" if self.active == "a" else "a"

    # --- writing an image -------------------------------------------------

    def begin_image(self, target: InstalledTarget) -> ImageWriter:
        """Start writing ``target`` into the inactive slot, from offset 0."""
        if self.trial is not None:
            raise RuntimeError("an image is on trial: commit or roll it back first")
        _hashers(target)
        if self.slot_size is not None and target.length > self.slot_size:
            raise InstallError(
                f"{target.name}: {target.length} bytes do not fit a slot of {self.slot_size}"
            )
        slot = self.inactive_slot()
        state = self._edit()
        state["slots"][slot] = {"status": WRITING, "target": target.to_dict(), "written": 0}
        self._save(state, "begin")
        self._call_fault("begin_truncate")
        path = self.slot_path(slot)
        with path.open("wb") as f:
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.path)
        return self._new_writer(slot, target, 0)

    def resume_image(self, target: InstalledTarget) -> ImageWriter:
        """Continue writing ``target`` where the durable bytes end, or start anew.

        After a restart the inactive slot may hold a partial copy of the same
        target; its writer resumes at the persisted offset (bytes past it, from
        a chunk whose offset was never recorded, are cut off). A complete copy
        (verified, not yet on trial) gives a writer at the end, ready for
        ``finish``. Any other situation starts from offset 0. ``finish`` hashes every byte on disk,
        so bytes written before the restart are verified like the others.
        """
        if self.trial is not None:
            raise RuntimeError("an image is on trial: commit or roll it back first")
        slot = self.inactive_slot()
        info = self._state["slots"][slot]
        path = self.slot_path(slot)
        if info["status"] in (WRITING, VERIFIED) and info["target"] == target.to_dict():
            offset = info["written"]
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = -1
            if offset <= size:
                if size > offset:
                    self._call_fault("resume_truncate")
                    with path.open("r+b") as f:
                        f.truncate(offset)
                        f.flush()
                        os.fsync(f.fileno())
                return self._new_writer(slot, target, offset)
        return self.begin_image(target)

    def _new_writer(self, slot: str, target: InstalledTarget, offset: int) -> ImageWriter:
        self._writer_generation += 1
        return ImageWriter(self, slot, target, offset, self._writer_generation)

    def _call_fault(self, point: str) -> None:
        if self._fault is not None:
            self._fault(point)

    def _check_writer(self, writer: ImageWriter) -> None:
        info = self._state["slots"][writer.slot]
        if (
            writer.generation != self._writer_generation
            or self.trial is not None
            or info["status"] not in (WRITING, VERIFIED)
            or info["target"] != writer.target.to_dict()
        ):
            raise RuntimeError("this image writer is no longer current")

    def _write_chunk(self, writer: ImageWriter, offset: int, data: bytes) -> None:
        self._check_writer(writer)
        self._call_fault("chunk")
        with self.slot_path(writer.slot).open("r+b") as f:
            f.seek(offset)
            f.write(data)
            f.flush()
            _datasync(f.fileno())
        state = self._edit()
        state["slots"][writer.slot]["written"] = offset + len(data)
        self._save(state, "chunk_state")

    def _finish(self, writer: ImageWriter) -> InstalledTarget:
        self._check_writer(writer)
        target = writer.target
        problem = self._verify_file(writer.slot, target)
        state = self._edit()
        if problem is not None:
            state["slots"][writer.slot]["status"] = FAILED
            state["last_failure"] = {
                "slot": writer.slot,
                "target": target.name,
                "reason": "image_mismatch",
            }
            self._save(state, "finish")
            raise ImageMismatchError(f"{target.name}: {problem}")
        state["slots"][writer.slot]["status"] = VERIFIED
        self._save(state, "finish")
        return target

    # --- verification -----------------------------------------------------

    def _verify_file(self, slot: str, target: InstalledTarget) -> str | None:
        """Return why the slot's bytes do not match ``target``, or None if they do."""
        hashers = _hashers(target)
        length = 0
        try:
            with self.slot_path(slot).open("rb") as f:
                while length <= target.length:
                    block = f.read(_READ_BLOCK)
                    if not block:
                        break
                    length += len(block)
                    for h in hashers.values():
                        h.update(block)
        except FileNotFoundError:
            return "slot file is missing"
        return _mismatch(target, length, hashers)

    def read_image(self, slot: str) -> bytes:
        """Return the slot's bytes after checking them against its recorded target."""
        info = self.slot_info(slot)
        if info.target is None or info.status not in (VERIFIED, COMMITTED):
            raise InstallError(f"slot {slot} holds no verified image")
        try:
            with self.slot_path(slot).open("rb") as f:
                data = f.read(info.target.length + 1)
        except FileNotFoundError:
            raise ImageMismatchError(f"slot {slot}: file is missing") from None
        hashers = _hashers(info.target)
        for h in hashers.values():
            h.update(data)
        problem = _mismatch(info.target, len(data), hashers)
        if problem is not None:
            raise ImageMismatchError(f"slot {slot} ({info.target.name}): {problem}")
        return data

    # --- trial, commit, rollback ------------------------------------------

    def start_trial(self) -> BootedImage:
        """Put the verified image of the inactive slot on trial; return its bytes."""
        if self.trial is not None:
            raise RuntimeError("an image is already on trial")
        slot = self.inactive_slot()
        info = self.slot_info(slot)
        if info.status != VERIFIED or info.target is None:
            raise RuntimeError(f"slot {slot} holds no verified image to try")
        image = self.read_image(slot)
        state = self._edit()
        state["trial"] = slot
        state["boot_attempts"] = 0
        self._save(state, "start_trial")
        return BootedImage(slot=slot, target=info.target, image=image, trial=True)

    def commit(self) -> InstalledTarget:
        """Make the trial slot the active one (its trial passed)."""
        slot = self.trial
        if slot is None:
            raise RuntimeError("no image is on trial")
        state = self._edit()
        state["slots"][slot]["status"] = COMMITTED
        state["active"] = slot
        state["trial"] = None
        state["boot_attempts"] = 0
        state["last_failure"] = None
        self._save(state, "commit")
        target = self.slot_info(slot).target
        assert target is not None
        return target

    def rollback(self, reason: str) -> None:
        """Give up the trial slot: the previous active slot stays active."""
        slot = self.trial
        if slot is None:
            raise RuntimeError("no image is on trial")
        state = self._rollback_state(reason)
        self._save(state, "rollback")

    def _rollback_state(self, reason: str) -> dict[str, Any]:
        slot = self.trial
        assert slot is not None
        state = self._edit()
        state["slots"][slot]["status"] = FAILED
        state["trial"] = None
        state["boot_attempts"] = 0
        target = state["slots"][slot]["target"]
        state["last_failure"] = {
            "slot": slot,
            "target": None if target is None else target["name"],
            "reason": reason,
        }
        return state

    # --- boot ---------------------------------------------------------------

    def boot(self) -> BootedImage | None:
        """Decide what runs after a (re)start; None if no verified image exists.

        A trial that a restart interrupted is retried for up to
        ``max_trial_boots`` boots (``BootedImage.trial`` tells the ECU to run
        the trial again), then rolled back. The returned bytes are checked
        against the slot's recorded length and hashes; if the active slot no
        longer matches, the other committed slot (the previous image) is
        booted instead.
        """
        rolled_back: str | None = None
        if self.trial is not None:
            trial = self.trial
            attempts = self.boot_attempts + 1
            if attempts <= self.max_trial_boots:
                try:
                    image = self.read_image(trial)
                except ImageMismatchError:
                    rolled_back = "trial image no longer matches its metadata"
                else:
                    state = self._edit()
                    state["boot_attempts"] = attempts
                    self._save(state, "boot_attempt")
                    target = self.slot_info(trial).target
                    assert target is not None
                    return BootedImage(slot=trial, target=target, image=image, trial=True)
            else:
                rolled_back = "trial interrupted by a restart"
            self._save(self._rollback_state(rolled_back), "rollback")

        candidates = [s for s in (self.active, *SLOTS) if s is not None]
        for slot in dict.fromkeys(candidates):
            info = self.slot_info(slot)
            if info.status != COMMITTED or info.target is None:
                continue
            try:
                image = self.read_image(slot)
            except ImageMismatchError:
                continue
            if slot != self.active:
                state = self._edit()
                if self.active is not None:
                    state["slots"][self.active]["status"] = FAILED
                state["active"] = slot
                self._save(state, "boot_fallback")
            return BootedImage(slot=slot, target=info.target, image=image, rolled_back=rolled_back)
        if self.active is not None:
            state = self._edit()
            state["slots"][self.active]["status"] = FAILED
            state["active"] = None
            self._save(state, "boot_fallback")
        return None

    # --- persisted ECU state -----------------------------------------------

    def trusted_metadata(self, role: str) -> bytes | None:
        """The trusted (verified) metadata bytes of ``role``, if any."""
        raw = self._state["metadata"].get(role)
        if raw is None:
            return None
        try:
            return base64.b64decode(raw, validate=True)
        except binascii.Error as e:
            raise InstallError(f"stored {role} metadata is not base64") from e

    def set_trusted_metadata(self, roles: Mapping[str, bytes | None]) -> None:
        """Replace the trusted metadata of several roles in one atomic write (None deletes)."""
        state = self._edit()
        for role, data in roles.items():
            if data is None:
                state["metadata"].pop(role, None)
            else:
                state["metadata"][role] = base64.b64encode(data).decode("ascii")
        self._save(state, "ecu_state")

    @property
    def report_counter(self) -> int:
        """The counter of the last version report signed."""
        counter: int = self._state["report_counter"]
        return counter

    def next_report_counter(self) -> int:
        """Persist and return a report counter that was never used before."""
        state = self._edit()
        state["report_counter"] += 1
        self._save(state, "ecu_state")
        return self.report_counter

    @property
    def time_floor(self) -> datetime | None:
        """The latest verified time seen: the ECU's clock never goes below it."""
        raw = self._state["time_floor"]
        return None if raw is None else datetime.fromisoformat(raw)

    def advance_time_floor(self, when: datetime) -> datetime:
        """Raise the time floor to ``when`` if it is later; return the floor."""
        if when.tzinfo is None:
            raise ValueError("time floor must be timezone-aware")
        floor = self.time_floor
        if floor is not None and when <= floor:
            return floor
        state = self._edit()
        state["time_floor"] = when.isoformat()
        self._save(state, "ecu_state")
        return when

    def get_extra(self, key: str) -> Any:
        """A JSON value the ECU persisted under ``key`` (None if absent)."""
        return copy.deepcopy(self._state["extra"].get(key))

    def set_extra(self, key: str, value: Any) -> None:
        """Persist a JSON value under ``key`` (one atomic write)."""
        state = self._edit()
        state["extra"][key] = json.loads(json.dumps(value))
        self._save(state, "ecu_state")


def _datasync(fd: int) -> None:
    """Make a file's bytes (and its size) durable: fdatasync where there is one."""
    getattr(os, "fdatasync", os.fsync)(fd)


def _save_progress(path: Path, data: bytes) -> None:
    """Replace the state record with a chunk's progress: temporary file, fdatasync, rename.

    Unlike ``atomic_write`` the directory is not fsynced: if a power cut loses
    the rename, the previous record comes back, whose ``written`` offset is
    older and whose bytes are durable, so the install resumes a chunk earlier.
    The next state change of any other kind fsyncs the directory (and so this
    rename) before it counts.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            _datasync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ImageWriter:
    """Writes one image into a slot, chunk by chunk, in order (DESIGN 4, 5)."""

    def __init__(
        self, store: SlotStore, slot: str, target: InstalledTarget, offset: int, generation: int
    ) -> None:
        self.store = store
        self.slot = slot
        self.target = target
        self.offset = offset
        self.generation = generation

    def write(self, offset: int, data: bytes) -> int:
        """Write ``data`` at ``offset`` (which must be the next offset); return the next one.

        Raises ``InstallError`` for a chunk out of order and ``EndlessDataError``
        for bytes beyond the target's length; nothing is written then.
        """
        if offset != self.offset:
            raise InstallError(f"chunk at offset {offset}, expected {self.offset}")
        if offset + len(data) > self.target.length:
            raise EndlessDataError(
                f"{self.target.name}: chunk ends at {offset + len(data)}, "
                f"beyond the {self.target.length} bytes the metadata allows"
            )
        if data:
            self.store._write_chunk(self, offset, bytes(data))
            self.offset = offset + len(data)
        return self.offset

    @property
    def remaining(self) -> int:
        return self.target.length - self.offset

    def finish(self) -> InstalledTarget:
        """Check length and every hash of the slot's bytes; mark it verified.

        Raises ``ImageMismatchError`` (and marks the slot failed) otherwise:
        such a slot can never be put on trial or booted.
        """
        return self.store._finish(self)
