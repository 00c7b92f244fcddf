"""The primary's persisted state (DESIGN 2; Uptane 2.1, 5.4.4.2).

```
STATE/trusted/current -> gen-000007     symlink, swapped atomically
STATE/trusted/gen-000007/director/      ngclient metadata dir of the Director
STATE/trusted/gen-000007/image/         ngclient metadata dir of the Image repository
STATE/trusted/gen-000007/installed.json installed image per ECU (release counters)
STATE/reports.json                      report counter, attacks and result to report
STATE/work/                             scratch copy a cycle verifies into
```

Trusted state changes only by ``commit``: a cycle copies the current
generation into ``work/``, lets ngclient update that copy, and, only once
everything verified, fsyncs it, moves it to ``trusted/gen-N+1`` and replaces
the ``current`` symlink with one rename. A cycle that fails (or a power cut at
any point) leaves ``trusted/`` as it was. ``reports.json`` is not trusted
state: it is what the primary says in its next report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from uptane.errors import ATTACKS
from uptane.manifest import RESULT_CODES, InstalledImage
from uptane.repository import atomic_write

CURRENT: Final = "current"
INSTALLED: Final = "installed.json"
REPORTS: Final = "reports.json"
MAX_PENDING_ATTACKS: Final = 16
MAX_RESULT_TEXT: Final = 500
_GEN_RE: Final = re.compile(r"^gen-([0-9]{6,})$")


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
        raw = json.loads(data)
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
    """The primary's state directory: trusted generations + report state."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.trusted_dir = state_dir / "trusted"
        self.work_dir = state_dir / "work"
        self.trusted_dir.mkdir(parents=True, exist_ok=True)
        if not (self.trusted_dir / CURRENT).exists():
            first = self.work_dir / "gen-000000"
            shutil.rmtree(first, ignore_errors=True)
            (first / "director").mkdir(parents=True)
            (first / "image").mkdir()
            (first / INSTALLED).write_bytes(installed_to_bytes({}))
            self._swap_in(first, 0)
        self._cleanup()

    # --- generations -------------------------------------------------------

    def current(self) -> Path:
        """The trusted generation directory."""
        return (self.trusted_dir / CURRENT).resolve()

    def _generation(self) -> int:
        match = _GEN_RE.match(os.readlink(self.trusted_dir / CURRENT))
        if match is None:
            raise RuntimeError(f"corrupt state: {self.trusted_dir / CURRENT} is not a generation")
        return int(match.group(1))

    def _cleanup(self) -> None:
        """Drop scratch copies and generations left by an interrupted cycle."""
        shutil.rmtree(self.work_dir, ignore_errors=True)
        keep = os.readlink(self.trusted_dir / CURRENT)
        for entry in self.trusted_dir.iterdir():
            if entry.name not in (CURRENT, keep) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)

    def begin(self) -> Path:
        """A scratch copy of the trusted generation for one cycle to verify into."""
        scratch = self.work_dir / f"gen-{self._generation() + 1:06d}"
        shutil.rmtree(scratch, ignore_errors=True)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        shutil.copytree(self.current(), scratch, symlinks=True)
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

    def _swap_in(self, scratch: Path, number: int) -> None:
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
        return installed_from_bytes(((generation or self.current()) / INSTALLED).read_bytes())

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

    # --- report state (not trusted) -------------------------------------------

    def reports(self) -> ReportState:
        try:
            return ReportState.from_bytes((self.state_dir / REPORTS).read_bytes())
        except FileNotFoundError:
            return ReportState()

    def save_reports(self, state: ReportState) -> None:
        atomic_write(self.state_dir / REPORTS, state.to_bytes())
