"""How the primary talks to its secondaries (DESIGN 2, 4).

``SecondaryClient`` is the primary's view of one secondary: ask it for a
fresh signed version report, and hand it an update (Director metadata in DER
+ image + install request) and get its new signed report back. The CAN
implementation (ISO-TP, DER messages) lives with the secondary; this module
has the interface, the update record the primary builds, and
``InMemorySecondary``, an in-process stand-in for tests and the simulator.

Nothing a client returns is trusted: the primary verifies every report's
signature with the key registered for that ECU, its serial and its nonce.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Protocol, runtime_checkable

from securesystemslib.signer import Signer

from ecus.primary.deltas import DeltaUpdate
from uptane.errors import TransportError
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import UptaneTarget
from uptane.repository import Clock, utc_now


@dataclass(frozen=True)
class EcuUpdate:
    """One ECU's update from a successful cycle, ready to send (DESIGN 2 step 4).

    ``director_root_chain`` holds the DER Director roots, oldest first
    (``director_root_versions`` says which); the ECU skips those it already
    trusts. ``director_targets`` is the DER Director targets naming ``target``.
    """

    ecu_serial: str
    hardware_id: str
    target: UptaneTarget
    image_path: Path
    director_root_chain: tuple[bytes, ...]
    director_root_versions: tuple[int, ...]
    director_targets: bytes
    director_targets_version: int
    #: the same image as a signed delta from the ECU's active one (docs/deltas.md)
    delta: DeltaUpdate | None = None

    @property
    def installed_image(self) -> InstalledImage:
        """What the ECU reports once it runs this target."""
        return InstalledImage(
            filename=self.target.name,
            length=self.target.length,
            hashes=dict(self.target.hashes),
            release_counter=self.target.release_counter,
        )


@runtime_checkable
class SecondaryClient(Protocol):
    """The primary's handle on one secondary ECU.

    Link failures raise ``TransportError``; bad bytes from the ECU raise
    ``CodecError``. Returned reports are raw ``SignedEcuVersionReport`` DER.
    """

    @property
    def serial(self) -> str:
        """The ECU serial this client talks to."""
        ...

    def version_report(self, nonce: bytes, last_accepted: int = 0) -> bytes:
        """Ask for a fresh signed version report carrying ``nonce`` (5.4.2.1).

        ``last_accepted`` > 0 is the counter of the ECU's last report the
        Director recorded: the ECU may clear the attacks it carried.
        """
        ...

    def send_update(self, update: EcuUpdate) -> bytes:
        """Send metadata, image and install request; return the ECU's new signed report."""
        ...


@dataclass
class InMemorySecondary:
    """An in-process secondary for tests: signs reports, "installs" what it is sent.

    It checks the image bytes against the target's length and hashes and
    nothing else: it is a stand-in for the link and the ECU, not a partial
    verification secondary. ``fail_with`` makes every call raise (e.g. a
    ``TransportError`` for an unreachable ECU); ``tamper`` rewrites the
    report bytes it returns.
    """

    serial: str
    hardware_id: str
    signer: Signer
    installed: InstalledImage | None = None
    report_counter: int = 0
    clock: Clock = utc_now
    attacks_detected: tuple[str, ...] = ()
    last_result: str = "ok"
    last_result_text: str = ""
    fail_with: Exception | None = None
    tamper: Callable[[bytes], bytes] | None = None
    received: list[EcuUpdate] = field(default_factory=list)

    def _report(self, nonce: bytes) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        self.report_counter += 1
        report = EcuVersionReport(
            ecu_serial=self.serial,
            hardware_id=self.hardware_id,
            installed=self.installed,
            report_counter=self.report_counter,
            latest_time=_whole_seconds(self.clock()),
            nonce=nonce,
            attacks_detected=self.attacks_detected,
            last_result=self.last_result,
            last_result_text=self.last_result_text,
        )
        data = SignedEcuVersionReport.sign(report, self.signer).to_der()
        return self.tamper(data) if self.tamper is not None else data

    def version_report(self, nonce: bytes, last_accepted: int = 0) -> bytes:
        return self._report(nonce)

    def send_update(self, update: EcuUpdate) -> bytes:
        if self.fail_with is not None:
            raise self.fail_with
        if update.ecu_serial != self.serial:
            raise TransportError(f"update for {update.ecu_serial!r} sent to {self.serial!r}")
        self.received.append(update)
        data = update.image_path.read_bytes()
        ok = len(data) == update.target.length and all(
            hashlib.new(alg, data).hexdigest() == digest
            for alg, digest in update.target.hashes.items()
        )
        if ok:
            self.installed = update.installed_image
            self.last_result, self.last_result_text = "ok", ""
        else:
            self.last_result, self.last_result_text = "imageMismatch", "image does not match"
        return self._report(b"")

    def with_key(self, signer: Signer) -> InMemorySecondary:
        """A copy that signs with another key (a spoofed ECU, for tests)."""
        return replace(self, signer=signer)


def _whole_seconds(t: datetime) -> datetime:
    return t.replace(microsecond=0)
