"""The primary's persisted state (DESIGN 2; Uptane 2.1, 5.4.4.2).

```
STATE/trusted/current -> gen-000007     symlink, swapped atomically
STATE/trusted/gen-000007/director/      ngclient metadata dir of the Director
STATE/trusted/gen-000007/image/         ngclient metadata dir of the Image repository
STATE/trusted/gen-000007/installed.json installed image per ECU (release counters)
STATE/trusted/gen-000007/seal.json      digest of every file above, signed by the primary
STATE/reports.json                      report counter, attacks and result (signed)
STATE/work/                             scratch copy a cycle verifies into
```

Trusted state changes only by ``commit``: a cycle copies the current
generation into ``work/`` (hard links: files are only ever replaced, never
written in place), lets ngclient update that copy, and, only once
everything verified, fsyncs it, moves it to ``trusted/gen-N+1`` and replaces
the ``current`` symlink with one rename. A cycle that fails (or a power cut at
any point) leaves ``trusted/`` as it was. ``reports.json`` is not trusted
state: it is what the primary says in its next report.

Both are authenticated with the primary's own key (its ECU key, the one that
signs its version reports): each generation carries ``seal.json``, the
SHA-256 of every file and the target of every symlink in it plus the
generation number, signed; ``reports.json`` is a signed envelope. A file
edited, added, removed or garbled on disk, or a generation renamed, is a
``StateError`` when the state is read, never a silently lowered rollback
floor. What a seal cannot stop: someone who can write the disk restoring a
whole older sealed generation (or deleting the state to start afresh);
that needs storage with a monotonic counter, which this code does not assume.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Signature, Signer

from uptane.canonical_json import canonical_json
from uptane.errors import ATTACKS, StateError
from uptane.manifest import RESULT_CODES, InstalledImage
from uptane.repository import atomic_write

CURRENT: Final = "current"
INSTALLED: Final = "installed.json"
REPORTS: Final = "reports.json"
SEAL: Final = "seal.json"
MAX_PENDING_ATTACKS: Final = 16
MAX_RESULT_TEXT: Final = 500
_GEN_RE: Final = re.compile(r"^gen-([0-9]{6,})\Z")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath, name)
            if p.is_symlink():
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _sign(signer: Signer, payload: Any) -> dict[str, Any]:
    return {"signed": payload, "signature": signer.sign(canonical_json(payload)).to_dict()}


def _open_envelope(signer: Signer, data: bytes, what: str) -> Any:
    """The ``signed`` part of an envelope written by ``_sign``; ``StateError`` if not genuine."""
    try:
        raw = json.loads(data)
        payload = raw["signed"]
        signature = Signature.from_dict(dict(raw["signature"]))
        signer.public_key.verify_signature(signature, canonical_json(payload))
    except Exception as e:  # garbage, wrong shape, bad or foreign signature: all the same
        raise StateError(f"{what} failed authentication: {type(e).__name__}: {e}") from e
    return payload


def _tree_index(root: Path) -> dict[str, str]:
    """Every file (its SHA-256) and symlink (``-> target``) under ``root``, but the seal.

    Plain ``os`` string paths: this runs on every cycle (``begin``, ``commit``).
    """
    index: dict[str, str] = {}
    top = os.fspath(root)
    for dirpath, dirs, files in os.walk(top):
        dirs.sort()
        prefix = "" if dirpath == top else os.path.relpath(dirpath, top).replace(os.sep, "/") + "/"
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(files + links):
            rel = prefix + name
            if rel == SEAL:
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                index[rel] = f"-> {os.readlink(path)}"
            else:
                with open(path, "rb") as f:
                    index[rel] = hashlib.sha256(f.read()).hexdigest()
    return index


@dataclass
class ReportState:
    """What the primary's own next version report says (5.4.2.1)."""

    report_counter: int = 0
    attacks: list[str] = field(default_factory=list)
    last_result: str = "ok"
    last_result_text: str = ""

    def note_failure(self, attacks: Iterable[str], result: str, text: str) -> None:
        for attack in attacks:
            if attack in ATTACKS and attack not in self.attacks:
                self.attacks.append(attack)
        del self.attacks[:-MAX_PENDING_ATTACKS]
        self.last_result = result if result in RESULT_CODES else "internalError"
        self.last_result_text = text[:MAX_RESULT_TEXT]

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "report_counter": self.report_counter,
                "attacks": self.attacks,
                "last_result": self.last_result,
                "last_result_text": self.last_result_text,
            },
            indent=2,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> ReportState:
        return cls.from_dict(json.loads(data))

    def to_dict(self) -> dict[str, Any]:
        return dict(json.loads(self.to_bytes()))

    @classmethod
    def from_dict(cls, raw: Any) -> ReportState:
        state = cls(report_counter=int(raw["report_counter"]))
        state.note_failure(raw.get("attacks", []), raw.get("last_result", "ok"), "")
        state.last_result_text = str(raw.get("last_result_text", ""))[:MAX_RESULT_TEXT]
        return state


def installed_to_bytes(installed: Mapping[str, InstalledImage]) -> bytes:
    data: dict[str, Any] = {
        serial: {
            "filename": img.filename,
            "length": img.length,
            "hashes": dict(img.hashes),
            "release_counter": img.release_counter,
        }
        for serial, img in sorted(installed.items())
    }
    return json.dumps(data, indent=2, sort_keys=True).encode()


def installed_from_bytes(data: bytes) -> dict[str, InstalledImage]:
    raw = json.loads(data)
    return {
        serial: InstalledImage(
            filename=v["filename"],
            length=int(v["length"]),
            hashes=dict(v["hashes"]),
            release_counter=int(v["release_counter"]),
        )
        for serial, v in raw.items()
    }


class PrimaryState:
    """The primary's state directory: sealed trusted generations + signed report state.

    ``signer`` is the primary's key: it seals what is written and its public
    key checks what is read (``StateError`` when that fails).
    """

    def __init__(self, state_dir: Path, signer: Signer) -> None:
        self.state_dir = state_dir
        self.trusted_dir = state_dir / "trusted"
        self.work_dir = state_dir / "work"
        self._signer = signer
        # the last seal bytes this state wrote or authenticated, and their payload: the
        # same bytes need no second signature check (the file index is checked always)
        self._authentic_seal: tuple[bytes, Any] | None = None
        self.trusted_dir.mkdir(parents=True, exist_ok=True)
        link = self.trusted_dir / CURRENT
        if not link.is_symlink() and not link.exists():
            first = self.work_dir / "gen-000000"
            shutil.rmtree(first, ignore_errors=True)
            (first / "director").mkdir(parents=True)
            (first / "image").mkdir()
            (first / INSTALLED).write_bytes(installed_to_bytes({}))
            self._swap_in(first, 0)
        self._cleanup()

    # --- generations -------------------------------------------------------

    def current(self) -> Path:
        """The trusted generation directory, its seal checked (``StateError`` if broken)."""
        number = self._generation()
        path = self.trusted_dir / f"gen-{number:06d}"
        self._check_seal(path, number)
        return path

    def _generation(self) -> int:
        try:
            target = os.readlink(self.trusted_dir / CURRENT)
        except OSError as e:
            raise StateError(f"corrupt state: {self.trusted_dir / CURRENT}: {e}") from e
        match = _GEN_RE.match(target)
        if match is None:
            raise StateError(f"corrupt state: {self.trusted_dir / CURRENT} is not a generation")
        return int(match.group(1))

    def _seal(self, generation: Path, number: int) -> None:
        payload = {"generation": number, "files": _tree_index(generation)}
        seal = generation / SEAL
        seal.unlink(missing_ok=True)  # a hard link to the trusted seal (``begin``): never write it
        data = json.dumps(_sign(self._signer, payload)).encode()
        seal.write_bytes(data)
        self._authentic_seal = (data, json.loads(data)["signed"])

    def _check_seal(self, generation: Path, number: int, *, files: bool = True) -> dict[str, str]:
        """The generation is the one the primary sealed, file for file (``files``).

        Returns the sealed index (file name -> digest).
        """
        try:
            data = (generation / SEAL).read_bytes()
        except OSError as e:
            raise StateError(f"trusted state {generation.name} has no readable seal: {e}") from e
        known = self._authentic_seal
        if known is not None and known[0] == data:
            payload = known[1]  # these very bytes were signed or authenticated by this state
        else:
            payload = _open_envelope(self._signer, data, f"trusted state {generation.name}")
            self._authentic_seal = (data, payload)
        if not isinstance(payload, dict) or payload.get("generation") != number:
            raise StateError(f"trusted state {generation.name}: seal is for another generation")
        sealed = payload.get("files")
        if not isinstance(sealed, dict):
            raise StateError(f"trusted state {generation.name}: seal lists no files")
        if not files:
            return sealed
        try:
            index = _tree_index(generation)
        except OSError as e:
            raise StateError(f"trusted state {generation.name} cannot be read: {e}") from e
        if index != sealed:
            changed = sorted(k for k in set(index) | set(sealed) if index.get(k) != sealed.get(k))
            raise StateError(
                f"trusted state {generation.name} was changed outside the primary: "
                f"{', '.join(changed[:5])}"
            )
        return sealed

    def _cleanup(self) -> None:
        """Drop scratch copies and generations left by an interrupted cycle."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        try:
            keep = os.readlink(self.trusted_dir / CURRENT)
        except OSError:
            return  # corrupt: leave everything for the cycle to report (StateError)
        for entry in self.trusted_dir.iterdir():
            if entry.name not in (CURRENT, keep) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def begin(self) -> Path:
        """A scratch copy of the trusted generation for one cycle to verify into."""
        current = self.current()
        scratch = self.work_dir / f"gen-{self._generation() + 1:06d}"
        shutil.rmtree(scratch, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        _link_tree(current, scratch)
        return scratch

    def discard(self, scratch: Path) -> None:
        shutil.rmtree(scratch, ignore_errors=True)

    def commit(self, scratch: Path) -> None:
        """Make ``scratch`` (from ``begin``) the trusted generation, atomically."""
        match = _GEN_RE.match(scratch.name)
        if scratch.parent != self.work_dir or match is None:
            raise ValueError(f"{scratch} is not a scratch generation of this state")
        if int(match.group(1)) != self._generation() + 1:
            raise RuntimeError("trusted state changed during the cycle")
        self._swap_in(scratch, int(match.group(1)))

    def keep_metadata(self, scratch: Path, keep: Mapping[str, Iterable[str]]) -> bool:
        """After a failed cycle: commit the trusted generation plus ``keep`` from ``scratch``.

        ``keep`` maps a repository's metadata directory (``director``,
        ``image``) to the file names, relative to it, that ngclient wrote there
        only once it verified them (TUF 5.3.8, 5.4.5, 5.5.7, 5.6.6: roots,
        top-level roles); ``root_history`` keeps every root. Everything else,
        ``installed.json`` included, stays as trusted. ``scratch`` is removed.
        Returns whether anything new was kept (no new generation otherwise).
        """
        failed = self.work_dir / "failed"
        shutil.rmtree(failed, ignore_errors=True)
        os.replace(scratch, failed)
        try:
            fresh = self.begin()
            changed = False
            for repo, names in keep.items():
                for name in names:
                    src, dst = failed / repo / name, fresh / repo / name
                    if src.is_dir() and not src.is_symlink():
                        for child in sorted(src.iterdir()):
                            changed |= _copy_if_new(child, dst / child.name)
                    elif src.exists() or src.is_symlink():
                        changed |= _copy_if_new(src, dst)
            if changed:
                self.commit(fresh)
            else:
                self.discard(fresh)
            return changed
        finally:
            shutil.rmtree(failed, ignore_errors=True)

    def _swap_in(self, scratch: Path, number: int) -> None:
        self._seal(scratch, number)
        _fsync_tree(scratch)
        old = self.trusted_dir / CURRENT
        old_target = os.readlink(old) if old.is_symlink() else None
        name = f"gen-{number:06d}"
        os.replace(scratch, self.trusted_dir / name)
        tmp_link = self.trusted_dir / f".{CURRENT}.tmp"
        tmp_link.unlink(missing_ok=True)
        os.symlink(name, tmp_link)
        os.replace(tmp_link, old)
        _fsync_dir(self.trusted_dir)
        if old_target is not None and old_target != name:
            shutil.rmtree(self.trusted_dir / old_target, ignore_errors=True)

    # --- installed images (trusted) -----------------------------------------

    def installed(self, generation: Path | None = None) -> dict[str, InstalledImage]:
        """Installed images of the trusted generation (sealed) or of a scratch copy."""
        if generation is None:
            number = self._generation()
            generation = self.trusted_dir / f"gen-{number:06d}"
            sealed = self._check_seal(generation, number, files=False)
            data = self._sealed_file(generation, INSTALLED, sealed)
        else:
            data = (generation / INSTALLED).read_bytes()
        try:
            return installed_from_bytes(data)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise StateError(f"{generation.name}/{INSTALLED} is malformed: {e}") from e

    @staticmethod
    def _sealed_file(generation: Path, name: str, seal: Mapping[str, str]) -> bytes:
        """One file of a generation, checked against its digest in the (checked) seal."""
        try:
            data = (generation / name).read_bytes()
        except OSError as e:
            raise StateError(f"trusted state {generation.name}: {name}: {e}") from e
        if seal.get(name) != hashlib.sha256(data).hexdigest():
            raise StateError(
                f"trusted state {generation.name} was changed outside the primary: {name}"
            )
        return data

    @staticmethod
    def write_installed(generation: Path, installed: Mapping[str, InstalledImage]) -> None:
        atomic_write(generation / INSTALLED, installed_to_bytes(installed))

    def update_installed(self, changes: Mapping[str, InstalledImage]) -> None:
        """Record installed images outside a cycle, as its own atomic generation."""
        scratch = self.begin()
        try:
            self.write_installed(scratch, self.installed(scratch) | dict(changes))
            self.commit(scratch)
        except BaseException:
            self.discard(scratch)
            raise

    # --- report state (signed, not trusted) --------------------------------------

    def reports(self) -> ReportState:
        """The report state; ``StateError`` if ``reports.json`` is not the primary's."""
        try:
            data = (self.state_dir / REPORTS).read_bytes()
        except FileNotFoundError:
            return ReportState()
        payload = _open_envelope(self._signer, data, REPORTS)
        try:
            return ReportState.from_dict(payload)
        except (ValueError, KeyError, TypeError) as e:
            raise StateError(f"{REPORTS} is malformed: {e}") from e

    def save_reports(self, state: ReportState) -> None:
        envelope = _sign(self._signer, state.to_dict())
        atomic_write(self.state_dir / REPORTS, json.dumps(envelope, indent=2).encode())


def _link_tree(src: Path, dst: Path) -> None:
    """Make ``dst`` a copy of the tree ``src`` whose files and symlinks are hard links.

    A scratch generation shares its files' inodes with the trusted one: safe
    because nothing writes a file of a generation in place. ngclient persists
    metadata to a temporary file and renames it over the old name
    (``Updater._persist_file``), ``atomic_write`` does the same, ``_copy_if_new``
    and ``_seal`` unlink first; a symlink cannot be changed in place at all. A
    write in place would change the trusted generation too, which its seal
    reports (``StateError``) at the next read. Where the file system has no
    hard links, files are copied and symlinks recreated.
    """
    top, out = os.fspath(src), os.fspath(dst)
    os.mkdir(out)
    for dirpath, dirs, files in os.walk(top):
        here = out if dirpath == top else os.path.join(out, os.path.relpath(dirpath, top))
        for name in dirs:
            if os.path.islink(os.path.join(dirpath, name)):
                _link_or_copy(os.path.join(dirpath, name), os.path.join(here, name))
            else:
                os.mkdir(os.path.join(here, name))
        for name in files:
            _link_or_copy(os.path.join(dirpath, name), os.path.join(here, name))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            shutil.copy2(src, dst)


def _copy_if_new(src: Path, dst: Path) -> bool:
    """Copy file or symlink ``src`` to ``dst`` unless it is already the same."""
    if src.is_symlink():
        target = os.readlink(src)
        if dst.is_symlink() and os.readlink(dst) == target:
            return False
        dst.unlink(missing_ok=True)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, dst)
        return True
    data = src.read_bytes()
    if dst.is_file() and not dst.is_symlink() and dst.read_bytes() == data:
        return False
    dst.unlink(missing_ok=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(dst, data)
    return True
