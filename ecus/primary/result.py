"""What one primary update cycle found: results, issues, stages (Uptane 2.1, 5.4.2, 5.4.4.2)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tuf.api import exceptions as tuf_exc

from ecus.primary.links import EcuUpdate
from uptane.errors import (
    EndlessDataError,
    ImageMismatchError,
    SlowRetrievalError,
)
from uptane.manifest import (
    EcuVersionReport,
)
from uptane.metadata import UptaneTarget
from uptane.verification.der import DirectorDer

NONCE_BYTES = 16
MAX_RESPONSE_BYTES = 65536

# Stages of a cycle, as reported in ``CycleIssue.stage`` / ``CycleResult.stage``.
STAGE_REPORTS = "reports"
STAGE_MANIFEST = "manifest"
STAGE_DIRECTOR = "director"
STAGE_IMAGE = "image"
STAGE_MATCH = "match"
STAGE_DER = "der"
STAGE_DOWNLOAD = "download"
STAGE_COMMIT = "commit"


@dataclass(frozen=True)
class CycleIssue:
    """One thing that went wrong in a cycle, with the attack it is evidence of."""

    stage: str
    error: BaseException
    attack: str | None = None
    ecu_serial: str | None = None

    def __str__(self) -> str:
        who = f" [{self.ecu_serial}]" if self.ecu_serial else ""
        attack = f" (attack: {self.attack})" if self.attack else ""
        return f"{self.stage}{who}: {type(self.error).__name__}: {self.error}{attack}"


@dataclass(frozen=True)
class ManifestOutcome:
    """The Director's answer to the vehicle version manifest (5.4.2.2)."""

    accepted: bool
    status: int | None = None
    reason: str | None = None
    detail: str = ""
    metadata_version: int | None = None
    #: ECU reports the Director left out of an accepted manifest, with why (stale counter...)
    refused_reports: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CycleResult:
    """What one update cycle found and prepared.

    ``ok`` is True when full verification, downloads and commit succeeded;
    ``updates`` then holds, per ECU serial, the target to install, the image
    path and the DER Director metadata to forward (the primary's own serial
    included when it has an update); ``der`` holds the verified DER Director
    metadata they share (None when no ECU needs an update). ``error`` is the
    failure that stopped verification (None if ``ok``); ``issues`` lists it and
    every non-fatal
    problem (an unreachable secondary, a refused manifest, a bad report);
    ``attacks`` names every attack detected. ``timings`` is seconds spent per
    stage (by the primary's monotonic ``timer``), for benchmarks and logs.
    """

    VERIFICATION_STAGES = (STAGE_DIRECTOR, STAGE_IMAGE, STAGE_MATCH, STAGE_DER)

    ok: bool
    updates: Mapping[str, EcuUpdate] = field(default_factory=dict)
    director_targets: Mapping[str, UptaneTarget] = field(default_factory=dict)
    reports: Mapping[str, EcuVersionReport] = field(default_factory=dict)
    manifest: ManifestOutcome | None = None
    der: DirectorDer | None = None
    issues: tuple[CycleIssue, ...] = ()
    error: BaseException | None = None
    stage: str | None = None
    attacks: tuple[str, ...] = ()
    timings: Mapping[str, float] = field(default_factory=dict)

    def raise_for_error(self) -> None:
        if self.error is not None:
            raise self.error


class Stages:
    """Which stage a cycle is in, and how long each took."""

    def __init__(self, timer: Callable[[], float]) -> None:
        self._timer = timer
        self.current = ""
        self._start = timer()
        self.timings: dict[str, float] = {}

    def enter(self, stage: str) -> None:
        self.close()
        self.current = stage
        self._start = self._timer()

    def close(self) -> str:
        if self.current:
            elapsed = self._timer() - self._start
            self.timings[self.current] = self.timings.get(self.current, 0.0) + elapsed
            self._start = self._timer()
        return self.current


def result_code(error: BaseException) -> str:
    if isinstance(error, ImageMismatchError | tuf_exc.LengthOrHashMismatchError):
        return "imageMismatch"
    if isinstance(error, SlowRetrievalError | EndlessDataError | tuf_exc.DownloadError):
        return "transferIncomplete"
    if isinstance(error, tuf_exc.RepositoryError):
        return "metadataRejected"
    return "internalError"
