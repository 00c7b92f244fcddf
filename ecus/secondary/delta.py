"""Streaming delta apply into the inactive slot (docs/deltas.md; Uptane 2.1, 5.4.3).

A ``DeltaWriter`` takes the place of the slot's ``ImageWriter`` when the
primary offers the assigned image as a delta (``imageOffer.delta``): the
chunks are a detools sequential patch (heatshrink-compressed) whose base is
the active slot. detools' own ``apply_patch`` runs in a worker thread over
three files: the active slot (base, read only), the received patch bytes,
and the inactive slot (result). Each chunk is made durable (fsync of the
patch file, then its offset in the state record, write points
``delta_chunk`` and ``delta_state``), handed to the worker, and acknowledged
once the worker has turned every received byte into output: the result is
written as chunks arrive.

Resumable like a full transfer: after a lost frame, a timeout or a power
cut, the next offer of the same delta starts the apply again from the
durable patch bytes (local reads and writes only) and answers with the
offset received so far, so no byte crosses the bus twice.

Nothing in a delta is trusted. The base named in the offer must be the
active image (name, length, hashes); the patch header must be a detools
sequential, heatshrink patch for exactly the target's length (detools
never writes past the size in the header; a larger one is endless data); the decoder memory its window and lookahead
need must fit ``memory_limit``; and ``finish`` checks the result's length
and every hash from the verified Director target before the slot can go on
trial (``SlotStore``). A delta that fails any of these marks the slot
failed: nothing is installed and the active slot is never written.

Memory: detools moves at most 4 KiB blocks (patch data, base, output, the
sum, and the copies its byte-string concatenation makes); the heatshrink
decoder holds its window and what one read of ``FEED_BYTES`` patch bytes
expands to (at most ``2**lookahead`` bytes per input byte), and that output
is copied once more when detools takes it: ``decoder_memory`` = window +
2 * FEED_BYTES * 2**lookahead + 8 * 4 KiB = 66,048 bytes for the
repository's 512 B window / 256 B lookahead (the bench measures 41-47 KB of
Python heap for detools' apply with this feed; detools' own 4 KiB reads
would let the decoder's output reach 190-430 KB). Neither image is ever held
in memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import detools
from detools.common import (
    COMPRESSION_HEATSHRINK,
    PATCH_TYPE_SEQUENTIAL,
    unpack_header,
    unpack_size,
)
from detools.compression.heatshrink import unpack_header as unpack_heatshrink_header

from ecus.secondary.slot_state import FAILED, WRITING, InstalledTarget
from ecus.secondary.slots import ImageWriter, SlotStore
from uptane.delta import DELTA_FORMAT, DeltaOffer
from uptane.errors import EndlessDataError, ImageMismatchError, InstallError

logger = logging.getLogger(__name__)

#: Extra key of the delta transfer record in the slot state.
DELTA_KEY: Final = "delta"
#: Where the received patch bytes are kept (in the slot directory).
DELTA_FILE: Final = "delta.part"
#: Patch bytes handed to the decoder per read: bounds its output buffer.
FEED_BYTES: Final = 64
#: detools' block size (diff, base, output and the sum of the two).
_DETOOLS_BLOCK: Final = 4096
#: Default decoder memory limit of a secondary (bytes).
DEFAULT_DELTA_MEMORY: Final = 80 * 1024
#: A worker with no new patch bytes for this long gives up (primary gone).
IDLE_TIMEOUT: Final = 600.0


def decoder_memory(window_sz2: int, lookahead_sz2: int) -> int:
    """Bytes the apply needs for a heatshrink window/lookahead (module docstring)."""
    return (1 << window_sz2) + 2 * FEED_BYTES * (1 << lookahead_sz2) + 8 * _DETOOLS_BLOCK


class DeltaRefusedError(InstallError):
    """An offered delta cannot be used (its base is not the active image, ...)."""


class _Aborted(Exception):
    """The transfer was abandoned (new offer, power cut, idle primary)."""


class _PatchStream:
    """The received patch bytes as a blocking, seekable file for detools.

    It claims the offered length (detools asks for the patch size), and
    ``read`` blocks until the bytes it needs have been received.
    """

    def __init__(self, path: Path, length: int) -> None:
        self._file = path.open("rb")
        self._length = length
        self._pos = 0
        self._available = 0
        self._cond = threading.Condition()
        self._aborted = False
        self.starving = False

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        want = FEED_BYTES if size < 0 else min(size, FEED_BYTES)
        if want == 0 or self._pos >= self._length:
            return b""
        with self._cond:
            waited = 0.0
            while self._pos >= self._available and not self._aborted:
                self.starving = True
                self._cond.notify_all()
                self._cond.wait(timeout=1.0)
                waited += 1.0
                if waited >= IDLE_TIMEOUT:
                    self._aborted = True
            self.starving = False
            if self._aborted:
                raise _Aborted
            n = min(want, self._available - self._pos)
        self._file.seek(self._pos)
        data = self._file.read(n)
        self._pos += len(data)
        return data

    def feed(self, available: int) -> None:
        with self._cond:
            self._available = available
            self.starving = False
            self._cond.notify_all()

    def wait_idle(self, done: threading.Event) -> None:
        """Until the reader wants bytes not yet received, or the apply ended."""
        with self._cond:
            while not done.is_set() and not (self.starving and self._pos >= self._available):
                self._cond.wait(timeout=0.05)

    def abort(self) -> None:
        with self._cond:
            self._aborted = True
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        self._file.close()


class DeltaWriter(ImageWriter):
    """Receives a delta and writes its result into the inactive slot (module docstring).

    ``offset`` counts patch bytes; ``target`` is the result image.
    """

    def __init__(
        self,
        store: SlotStore,
        inner: ImageWriter,
        offer: DeltaOffer,
        base_path: Path,
        received: int,
        memory_limit: int,
    ) -> None:
        super().__init__(store, inner.slot, inner.target, received, inner.generation)
        self.offer = offer
        self.memory_limit = memory_limit
        self._base_path = base_path
        self._patch_path = store.path / DELTA_FILE
        self._stream = _PatchStream(self._patch_path, offer.length)
        self._done = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(
            target=self._apply, name=f"delta-{inner.target.name}", daemon=True
        )
        self._thread.start()
        self._stream.feed(received)
        self._stream.wait_idle(self._done)

    # --- the worker ---------------------------------------------------------

    def _check_header(self) -> None:
        """Refuse any patch that is not ours before detools runs it."""
        stream = self._stream
        patch_type, compression = unpack_header(stream.read(1))
        if patch_type != PATCH_TYPE_SEQUENTIAL or compression != COMPRESSION_HEATSHRINK:
            raise ImageMismatchError(
                f"{self.target.name}: the delta is not a {DELTA_FORMAT} patch "
                f"(type {patch_type}, compression {compression})"
            )
        to_size = unpack_size(stream)
        if to_size != self.target.length:
            raise EndlessDataError(
                f"{self.target.name}: the delta makes {to_size} bytes, "
                f"the verified target has {self.target.length}"
            )
        window, lookahead = unpack_heatshrink_header(stream.read(1))
        need = decoder_memory(window, lookahead)
        if need > self.memory_limit:
            raise InstallError(
                f"{self.target.name}: the delta needs {need} bytes of decoder memory, "
                f"this ECU allows {self.memory_limit}"
            )
        stream.seek(0)

    def _apply(self) -> None:
        try:
            with (
                self._base_path.open("rb") as base,
                self.store.slot_path(self.slot).open("r+b") as out,
            ):
                self._check_header()
                out.truncate(0)
                # detools writes exactly the header's size, checked above to be the
                # target's length: no output past it (``finish`` checks all of it)
                detools.apply_patch(base, self._stream, out)
                out.flush()
                os.fsync(out.fileno())
        except _Aborted:
            pass
        except (EndlessDataError, ImageMismatchError, InstallError) as e:
            self.error = e
        except Exception as e:  # detools.Error and whatever a corrupted patch provokes
            self.error = ImageMismatchError(f"{self.target.name}: the delta does not apply: {e}")
        finally:
            self._stream.close()
            self._done.set()
            self._stream.wake()

    # --- ImageWriter ----------------------------------------------------------

    @property
    def remaining(self) -> int:
        return self.offer.length - self.offset

    def write(self, offset: int, data: bytes) -> int:
        """Keep ``data`` durably, let the worker apply it; return the next patch offset."""
        if offset != self.offset:
            raise InstallError(f"delta chunk at offset {offset}, expected {self.offset}")
        if offset + len(data) > self.offer.length:
            self._fail("endless_data")
            raise EndlessDataError(
                f"{self.target.name}: delta chunk ends at {offset + len(data)}, "
                f"beyond the {self.offer.length} bytes offered"
            )
        self._raise_if_failed()
        if not data:
            return self.offset
        try:
            self.store._check_writer(self)
            self.store._call_fault("delta_chunk")
            with self._patch_path.open("r+b") as f:
                f.seek(offset)
                f.write(data)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
            state = self.store._edit()
            record = state["extra"].get(DELTA_KEY) or {}
            state["extra"][DELTA_KEY] = {**record, "received": offset + len(data)}
            self.store._save(state, "delta_state")
        except BaseException:  # a power cut or a failed write: the worker stops too
            self.abort()
            raise
        self.offset = offset + len(data)
        self._stream.feed(self.offset)
        self._stream.wait_idle(self._done)
        self._raise_if_failed()
        return self.offset

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            self._fail("image_mismatch")
            raise self.error

    def finish(self) -> InstalledTarget:
        """Wait for the apply, then check the result's length and every hash (``SlotStore``)."""
        self._thread.join(timeout=IDLE_TIMEOUT)
        if not self._done.is_set():
            self.abort()
            raise InstallError(f"{self.target.name}: the delta apply did not end")
        self._raise_if_failed()
        try:
            return self.store._finish(self)
        finally:
            self._forget()

    def abort(self) -> None:
        """Stop the worker (the durable patch bytes stay for a resume)."""
        self._stream.abort()
        self._thread.join(timeout=5.0)

    def _forget(self) -> None:
        """Drop the transfer record and the patch bytes."""
        state = self.store._edit()
        if state["extra"].pop(DELTA_KEY, None) is not None:
            self.store._save(state, "delta_state")
        with contextlib.suppress(FileNotFoundError):
            self._patch_path.unlink()

    def _fail(self, reason: str) -> None:
        """Mark the slot failed (it can never go on trial) and forget the transfer."""
        self.abort()
        info = self.store._state["slots"][self.slot]
        if info["status"] == WRITING and info["target"] == self.target.to_dict():
            state = self.store._edit()
            state["slots"][self.slot]["status"] = FAILED
            state["last_failure"] = {
                "slot": self.slot,
                "target": self.target.name,
                "reason": reason,
            }
            state["extra"].pop(DELTA_KEY, None)
            self.store._save(state, "finish")
        with contextlib.suppress(FileNotFoundError):
            self._patch_path.unlink()


def _same_base(offer: DeltaOffer, active: InstalledTarget | None) -> bool:
    if active is None:
        return False
    mine = {a: d.lower() for a, d in active.hashes.items()}
    theirs = {a: d.lower() for a, d in offer.base.hashes.items()}
    return (
        offer.base.filename == active.name and offer.base.length == active.length and mine == theirs
    )


def abandon(writer: ImageWriter | None) -> None:
    """Stop a delta writer's worker (a new offer replaces it); no-op for other writers."""
    if isinstance(writer, DeltaWriter):
        writer.abort()


def start_delta(
    store: SlotStore, target: InstalledTarget, offer: DeltaOffer, *, memory_limit: int
) -> DeltaWriter:
    """Begin or resume applying ``offer`` for ``target`` (module docstring).

    Raises ``DeltaRefusedError`` when the delta cannot be used (the primary
    then sends the full image) and ``InstallError`` when the slot is too
    small; ``ImageMismatchError``/``EndlessDataError`` when the patch bytes
    received before a restart do not apply.
    """
    if offer.format != DELTA_FORMAT:
        raise DeltaRefusedError(f"unknown delta format {offer.format!r}")
    active = store.active_target()
    if active is None or store.active is None or not _same_base(offer, active):
        raise DeltaRefusedError(f"the delta base {offer.base.filename} is not the active image")
    if not 0 < offer.length <= target.length:
        raise DeltaRefusedError(
            f"a delta of {offer.length} bytes for a {target.length}-byte image is refused"
        )
    record = {
        "result": target.to_dict(),
        "base": active.to_dict(),
        "length": offer.length,
        "slot": store.inactive_slot(),
    }
    saved = store.get_extra(DELTA_KEY)
    patch_path = store.path / DELTA_FILE
    received = 0
    slot = store.slot_info(store.inactive_slot())
    if (
        isinstance(saved, Mapping)
        and {k: v for k, v in saved.items() if k != "received"} == record
        and slot.status == WRITING
        and slot.target == target
        and isinstance(saved.get("received"), int)
        and 0 <= saved["received"] <= _size(patch_path)
    ):
        received = saved["received"]
    else:
        state = store._edit()
        state["extra"][DELTA_KEY] = {**record, "received": 0}
        store._save(state, "delta_state")
    inner = store.begin_image(target)  # WRITING before the slot is touched; checks its size
    store._call_fault("delta_truncate")
    with patch_path.open("ab") as f:
        f.truncate(received)
        f.flush()
        os.fsync(f.fileno())
    writer = DeltaWriter(store, inner, offer, store.slot_path(store.active), received, memory_limit)
    writer._raise_if_failed()
    return writer


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1
