"""A secondary ECU: partial verification, A/B slots, WASM trial (DESIGN 4, 5, 7).

``Secondary.handle(request) -> response`` is the whole bus-facing surface:
every request is one DER ``SecondaryMessage`` (``uptane/asn1/uptane.asn``),
size-capped before decoding; a malformed or unexpected message is answered
with ``ack{badRequest}`` and changes nothing. Plug it into any
``SecondaryEndpoint`` (ISO-TP, in-memory).

Update flow (Uptane 2.1, 5.4.4.1 and 5.4.3):

1. ``metadataPush(director, root, N)`` buffers root rotation entries;
   ``metadataPush(director, targets)`` runs partial verification
   (``uptane.verification.partial.verify``) with them at the reference time
   ``max(clock(), persisted floor)``. Failure: ``ack{metadataRejected}`` and
   the attack is recorded for the next version report; nothing else changes.
   Success: the new root and targets are persisted in one atomic write, and
   the one target for this ECU (or none) becomes the only image it accepts.
2. ``imageOffer`` must equal that target (name, length, every hash, release
   counter). The answer is ``chunkAck{nextOffset}``: the inactive slot's writer
   is begun or resumed (``SlotStore.resume_image``), so after a lost frame, a
   timeout or a restart of either side the transfer continues from the last
   durable offset. ``imageChunk`` at any other offset gets the expected offset
   back and writes nothing; bytes past the target's length are refused
   (endless data).
3. ``installRequest`` checks length and every hash of the slot, puts it on
   trial (``WasmHost.trial`` with the target's signed capabilities and
   limits) and commits or rolls back; the ``installResult`` carries a fresh
   signed version report whose ``lastResult``/``attacksDetected`` say why.

Time (DESIGN 7): the reference time is ``max(clock(), floor)``; the floor is
persisted and never moves backwards. It advances to the reference time
whenever the ECU uses it (verifying metadata, signing a report), and to the
time of a ``timeMessage`` that is authentic, fresh, not before it and, when
``max_time_ahead`` is set, not more than that ahead of the ECU's own clock.
Authentic and fresh: the primary asks for a nonce (``timeNonceRequest``; the
ECU keeps the last ``MAX_TIME_NONCES`` it issued, each good once) and signs
``PrimaryStatement.time {ecuSerial, nonce, time}`` with its key, provisioned
on the ECU like the Director root (``primary_key``). A time message that is
unsigned or signed by another key is refused and ``spoofed_message`` goes
into the next report; one with a nonce the ECU did not issue, or already
used, is refused as ``replayed_message``. Without a provisioned primary key
every time message is refused. A time may still only move the floor forward
(failing closed: metadata can only look *more* expired), and the bound keeps
even a signed one from pushing the floor arbitrarily far into the future.
What a compromised primary can still do: send a signed time up to
``max_time_ahead`` past the ECU's clock (with ``max_time_ahead=None``, any
time: such an ECU trusts its primary for time), which makes metadata look
expired and so withholds updates; it can withhold updates anyway.

ECU ceilings (``WasmCeilings``, given to the ``WasmHost``): an offer of an
image whose signed limits exceed them is refused with ``limitsExceeded``
before any byte moves, and the report says why.

Attacks detected are reported in every signed report until the primary
confirms the Director recorded one that carried them: a
``versionReportRequest`` may name the counter of this ECU's last report the
Director accepted (``lastAccepted``), signed by the primary's key; the ECU
then clears the attacks recorded before that report was signed. A receipt
that is not signed by the primary is ignored and reported as
``spoofed_message``, so a rogue node reading reports cannot make recorded
attacks vanish. A replayed genuine receipt clears only what the Director
already has. The last result stays until the next step replaces it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Key, Signer
from tuf.api import exceptions as tuf_exc

from ecus.secondary import health
from ecus.secondary.delta import DEFAULT_DELTA_MEMORY, DeltaRefusedError, abandon, start_delta
from ecus.secondary.primary_statements import MAX_TIME_NONCES, PrimaryStatements, _utc
from ecus.secondary.report_state import ReportState, _text
from ecus.secondary.slots import BootedImage, ImageWriter, InstalledTarget, SlotStore
from ecus.secondary.wasm_host import (
    Peripherals,
    SimPeripherals,
    WasmApp,
    WasmCeilings,
    WasmHost,
)
from ecus.transport.base import DEFAULT_MAX_REQUEST
from uptane import codec
from uptane.delta import DeltaOffer
from uptane.errors import (
    ATTACK_ARBITRARY_SOFTWARE,
    ATTACK_ENDLESS_DATA,
    ATTACK_INVALID_METADATA,
    ATTACK_WRONG_ECU,
    CodecError,
    EndlessDataError,
    ImageMismatchError,
    InstallError,
    UptaneError,
    WasmError,
    WasmHostError,
    WasmLimitsExceededError,
    attack_name,
)
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
)
from uptane.metadata import UptaneTarget
from uptane.verification import partial

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
#: Keys of the trusted Director metadata in the slot store (one atomic write).
ROOT_KEY: Final = "director_root"
TARGETS_KEY: Final = "director_targets"
#: Extra key of the report state (attacks since the last report, last result).
REPORT_KEY: Final = "report"
MAX_LENGTH: Final = 4_294_967_295  # ASN.1 Length
DEFAULT_MAX_TIME_AHEAD: Final = timedelta(days=1)

Clock = Callable[[], datetime]


def _same_image(offer: InstalledImage, target: UptaneTarget) -> bool:
    return (
        offer.filename == target.name
        and offer.length == target.length
        and offer.release_counter == target.release_counter
        and {k: v.lower() for k, v in offer.hashes.items()}
        == {k: v.lower() for k, v in target.hashes.items()}
    )


def _is_installed(target: UptaneTarget, installed: InstalledTarget | None) -> bool:
    return (
        installed is not None
        and installed.name == target.name
        and installed.length == target.length
        and dict(installed.hashes) == dict(target.hashes)
    )


class Secondary(PrimaryStatements):
    """One secondary ECU with partial verification (Uptane 2.1, 5.4.4.1)."""

    def __init__(
        self,
        *,
        ecu_serial: str,
        hardware_id: str,
        signer: Signer,
        director_root: bytes,
        slot_dir: str | Path,
        clock: Clock,
        vin: str | None = None,
        peripherals: Peripherals | None = None,
        host: WasmHost | None = None,
        slot_size: int | None = None,
        max_message: int = DEFAULT_MAX_REQUEST,
        max_time_ahead: timedelta | None = DEFAULT_MAX_TIME_AHEAD,
        max_trial_boots: int = 0,
        fault: Callable[[str], None] | None = None,
        delta_memory_limit: int = DEFAULT_DELTA_MEMORY,
        primary_key: Key | None = None,
        ceilings: WasmCeilings | None = None,
    ) -> None:
        self.identity = partial.SecondaryIdentity(ecu_serial, hardware_id, vin)
        self.signer = signer
        self.clock = clock
        self.primary_key = primary_key
        self.peripherals: Peripherals = peripherals if peripherals is not None else SimPeripherals()
        if host is not None and ceilings is not None and host.ceilings != ceilings:
            raise ValueError("pass ceilings or a host with them, not both")
        self.host = host or WasmHost(ceilings)
        self._time_nonces: deque[bytes] = deque(maxlen=MAX_TIME_NONCES)
        self.max_message = max_message
        self.max_time_ahead = max_time_ahead
        self.delta_memory_limit = delta_memory_limit  # bytes a delta's decoder may use
        self.store = SlotStore(
            slot_dir, fault=fault, slot_size=slot_size, max_trial_boots=max_trial_boots
        )
        self._lock = threading.RLock()
        self._roots: dict[int, bytes] = {}
        self._writer: ImageWriter | None = None
        self.app: WasmApp | None = None

        stored_root = self.store.trusted_metadata(ROOT_KEY)
        root_der = stored_root if stored_root is not None else bytes(director_root)
        partial.TrustedDirectorState(root_der).root  # noqa: B018 - refuse a bad root now
        targets_der = self.store.trusted_metadata(TARGETS_KEY)
        self._target: UptaneTarget | None = None
        targets_version = 0
        if targets_der is not None:
            targets = partial.load_targets(targets_der)
            targets_version = targets.version
            self._target = partial.find_target(self.identity, targets)
        release = 0 if self._target is None else self._target.release_counter
        self.trusted = partial.TrustedDirectorState(root_der, targets_version, release)
        self._boot()

    # --- boot and the running app -------------------------------------------

    def _boot(self) -> None:
        booted = self.store.boot()
        if booted is None:
            return
        if booted.rolled_back is not None:
            self._set_result("rolledBack", booted.rolled_back)
            health.record_rollback(self.store, "boot")
        if booted.trial:
            self._run_trial(booted)
            return
        try:
            self.app = self.host.load(
                booted.image, booted.target.capabilities, booted.target.limits, self.peripherals
            )
        except WasmError as e:  # it passed its trial once; report, keep the ECU up
            logger.error("installed image %s does not load: %s", booted.target.name, e)
            self._set_result("internalError", f"installed image does not load: {e}")

    def tick(self, t: int) -> int | None:
        """Run the installed module's ``tick(t)``; None when nothing is installed."""
        with self._lock:
            if self.app is None:
                return None
            try:
                return self.app.tick(t)
            except WasmError as e:  # counted and reported as unhealthy (ecus.secondary.health)
                active = self.store.active_target()
                health.record_failure(self.store, e, None if active is None else active.name)
                raise

    @property
    def pending_target(self) -> UptaneTarget | None:
        """The verified target this ECU will accept, unless it already runs it."""
        target = self._target
        if target is None or _is_installed(target, self.store.active_target()):
            return None
        return target

    # --- time ---------------------------------------------------------------

    def reference_time(self) -> datetime:
        """``max(clock(), floor)``: the ECU's time never goes backwards (DESIGN 7)."""
        now = _utc(self.clock())
        floor = self.store.time_floor
        return now if floor is None or now > floor else floor

    def _now(self) -> datetime:
        """The reference time, persisted as the new floor (a clock set back later
        cannot make the ECU accept what it already saw expire)."""
        return self.store.advance_time_floor(self.reference_time())

    # --- report state -------------------------------------------------------

    @property
    def report_state(self) -> ReportState:
        return ReportState.from_dict(self.store.get_extra(REPORT_KEY))

    def _save_report_state(self, state: ReportState) -> None:
        self.store.set_extra(REPORT_KEY, state.to_dict())

    def _set_result(self, code: str, text: str, attack: str | None = None) -> None:
        state = self.report_state
        if attack is not None:
            state = state.with_attack(attack, self.store.report_counter)
        self._save_report_state(ReportState(state.attacks, code, _text(text), state.since))

    def _note_attack(self, attack: str | None, text: str) -> None:
        """Record an attack for the next reports without touching the last result."""
        logger.warning("%s: %s", self.identity.ecu_serial, text)
        if attack is not None:
            self._save_report_state(
                self.report_state.with_attack(attack, self.store.report_counter)
            )

    def signed_report(self, nonce: bytes = b"") -> bytes:
        """A fresh signed ``EcuVersionReport`` (5.4.2.1), as DER."""
        state = self.report_state
        active = self.store.active_target()
        installed = None
        if active is not None:
            installed = InstalledImage(
                filename=active.name,
                length=active.length,
                hashes=dict(active.hashes),
                release_counter=active.release_counter,
            )
        report = EcuVersionReport(
            ecu_serial=self.identity.ecu_serial,
            hardware_id=self.identity.hardware_id,
            installed=installed,
            report_counter=self.store.next_report_counter(),
            latest_time=self._now().replace(microsecond=0),
            nonce=nonce,
            attacks_detected=state.attacks,
            last_result=state.last_result,
            last_result_text=state.last_result_text,
            health=health.current(self.store, self.app, None if active is None else active.name),
        )
        return SignedEcuVersionReport.sign(report, self.signer).to_der()

    # --- messages -----------------------------------------------------------

    def handle(self, request: bytes) -> bytes:
        """Answer one DER ``SecondaryMessage`` (the endpoint handler)."""
        try:
            kind, value = codec.decode_message(request, self.max_message)
        except CodecError as e:
            return self._ack("badRequest", f"malformed message: {e}")
        handler = self._handlers.get(kind)
        if handler is None:
            return self._ack("badRequest", f"a secondary does not accept {kind} messages")
        with self._lock:
            try:
                return handler(value)
            except UptaneError as e:
                logger.error("%s failed: %s", kind, e)
                return self._ack("internalError", f"{kind} failed: {e}")
            except (OSError, RuntimeError, ValueError) as e:
                logger.exception("%s failed", kind)
                return self._ack("internalError", f"{kind} failed: {type(e).__name__}: {e}")

    __call__ = handle

    @property
    def _handlers(self) -> dict[str, Callable[[Any], bytes]]:
        return {
            "infoRequest": self._on_info,
            "versionReportRequest": self._on_report,
            "metadataPush": self._on_metadata,
            "timeMessage": self._on_time,
            "imageOffer": self._on_offer,
            "imageChunk": self._on_chunk,
            "installRequest": self._on_install,
            "timeNonceRequest": self._on_time_nonce,
        }

    @staticmethod
    def _ack(code: str, text: str = "") -> bytes:
        return codec.encode_message("ack", {"code": code, "text": _text(text)})

    @staticmethod
    def _chunk_ack(code: str, offset: int) -> bytes:
        return codec.encode_message("chunkAck", {"code": code, "nextOffset": offset})

    def _on_info(self, value: Mapping[str, Any]) -> bytes:
        key = self.signer.public_key
        try:
            raw = bytes.fromhex(str(key.keyval["public"]))
        except (KeyError, ValueError) as e:
            raise InstallError(f"public key has no raw form: {e}") from e
        size = self.store.slot_size
        return codec.encode_message(
            "infoResponse",
            {
                "ecuSerial": self.identity.ecu_serial,
                "hardwareId": self.identity.hardware_id,
                "keyType": key.keytype,
                "scheme": key.scheme,
                "publicKey": raw,
                "protocolVersion": PROTOCOL_VERSION,
                "verificationMode": "partial",
                "freeSlotSize": MAX_LENGTH if size is None else min(size, MAX_LENGTH),
            },
        )

    def _on_report(self, value: Mapping[str, Any]) -> bytes:
        if "lastAccepted" in value or "receiptSignatures" in value:
            self._on_receipt(value.get("lastAccepted"), value.get("receiptSignatures"))
        report = self.signed_report(bytes(value["nonce"]))
        return codec.encode_message("versionReportResponse", {"signedReport": report})

    # metadata (5.4.4.1)

    def _on_metadata(self, value: Mapping[str, Any]) -> bytes:
        if value["repository"] != "director":
            return self._ack("badRequest", "this ECU does partial verification: Director only")
        role, version, der = value["role"], value["version"], bytes(value["der"])
        if role == "root":
            if version not in self._roots and len(self._roots) >= partial.MAX_ROOT_ROTATIONS:
                return self._ack("badRequest", "too many root versions pushed")
            self._roots[version] = der
            return self._ack("ok", f"root v{version} buffered")
        if role != "targets":
            return self._ack("badRequest", f"unexpected role {role!r}")
        roots = [self._roots[v] for v in sorted(self._roots)]
        self._roots.clear()
        active = self.store.active_target()
        now = self._now()
        try:
            result = partial.verify(
                self.identity,
                self.trusted,
                der,
                now,
                active.release_counter if active is not None else 0,
                roots,
            )
        except (UptaneError, tuf_exc.RepositoryError) as e:
            attack = attack_name(e) or ATTACK_INVALID_METADATA
            text = f"Director metadata rejected ({attack}): {e}"
            logger.warning("%s: %s", self.identity.ecu_serial, text)
            self._set_result("metadataRejected", text, attack)
            return self._ack("metadataRejected", text)
        self.store.set_trusted_metadata({ROOT_KEY: result.state.root_der, TARGETS_KEY: der})
        self.trusted = result.state
        if self._target != result.target:
            abandon(self._writer)
            self._writer = None
        self._target = result.target
        pending = self.pending_target
        if pending is None:
            return self._ack("noUpdate", f"targets v{result.targets_version}: no update")
        return self._ack("ok", f"targets v{result.targets_version}: update {pending.name}")

    # image transfer (DESIGN 4)

    def _refuse_offer(self, code: str, text: str, attack: str | None) -> bytes:
        self._set_result(code, text, attack)
        return self._chunk_ack(code, 0)

    def _on_offer(self, value: Mapping[str, Any]) -> bytes:
        offer = InstalledImage.from_asn1(value["image"])
        target = self.pending_target
        if target is None:
            if self._target is not None and _same_image(offer, self._target):
                return self._chunk_ack("noUpdate", 0)  # already running it
            return self._refuse_offer(
                "noUpdate",
                f"{offer.filename} is not assigned to this ECU by verified Director metadata",
                ATTACK_WRONG_ECU,
            )
        if not _same_image(offer, target):
            return self._refuse_offer(
                "imageMismatch",
                f"offered {offer.filename} does not match the verified target {target.name}",
                ATTACK_ARBITRARY_SOFTWARE,
            )
        abandon(self._writer)  # a delta apply still running stops here
        if value.get("delta") is not None:  # the image comes as a delta (docs/deltas.md)
            try:
                self._writer = start_delta(
                    self.store,
                    InstalledTarget.from_uptane(target),
                    DeltaOffer.from_asn1(value["delta"]),
                    memory_limit=self.delta_memory_limit,
                )
            except DeltaRefusedError as e:  # not applicable: the primary sends the image
                self._writer = None
                return self._refuse_offer("badRequest", str(e), None)
            except (ImageMismatchError, EndlessDataError) as e:  # resumed bytes do not apply
                self._writer = None
                return self._refuse_offer("imageMismatch", str(e), attack_name(e))
            except InstallError as e:  # too big for the slot
                self._writer = None
                return self._refuse_offer("noSpace", str(e), None)
            return self._chunk_ack("ok", self._writer.offset)
        try:  # before any byte moves: this ECU's ceilings on the signed limits
            self.host.ceilings.check(target.limits)
        except WasmLimitsExceededError as e:
            self._writer = None
            return self._refuse_offer("limitsExceeded", f"{target.name}: {e}", None)
        # Every offer resumes from the durable offset: after a lost ack the
        # primary learns how far the slot really got.
        try:
            self._writer = self.store.resume_image(InstalledTarget.from_uptane(target))
        except InstallError as e:  # too big for the slot, unsupported hash function
            self._writer = None
            return self._refuse_offer("noSpace", str(e), None)
        return self._chunk_ack("ok", self._writer.offset)

    def _on_chunk(self, value: Mapping[str, Any]) -> bytes:
        """Write one chunk at the expected offset; ack it once it is durable.

        The ack's ``nextOffset`` is the writer's offset after the bytes and the
        slot state naming them are fsynced, never earlier: it is where the
        primary resumes after any failure. The overlap that keeps the bus busy
        comes from the primary (two chunks in flight, ``CanSecondaryClient``):
        the ISO-TP stack receives the next chunk while this handler writes, so
        nothing is acknowledged as "received" before it is written.
        """
        writer = self._writer
        if writer is None:
            return self._chunk_ack("notReady", 0)
        offset, data = value["offset"], bytes(value["data"])
        if offset != writer.offset:
            return self._chunk_ack("transferIncomplete", writer.offset)
        try:
            return self._chunk_ack("ok", writer.write(offset, data))
        except EndlessDataError as e:
            self._set_result("imageMismatch", str(e), ATTACK_ENDLESS_DATA)
            return self._chunk_ack("imageMismatch", writer.offset)
        except (ImageMismatchError, InstallError) as e:  # a delta that does not apply
            self._writer = None
            self._set_result("imageMismatch", str(e), attack_name(e))
            return self._chunk_ack("imageMismatch", writer.offset)

    # install (5.4.3, DESIGN 5)

    def _result(self, code: str, text: str) -> bytes:
        return codec.encode_message(
            "installResult",
            {"code": code, "text": _text(text), "signedReport": self.signed_report()},
        )

    def _on_install(self, value: Mapping[str, Any]) -> bytes:
        filename = value["filename"]
        target = self.pending_target
        if target is None or target.name != filename:
            return self._result("noUpdate", f"{filename} is not a pending update of this ECU")
        writer = self._writer
        if writer is None or writer.target != InstalledTarget.from_uptane(target):
            return self._result("transferIncomplete", "offer and send the image first")
        if writer.remaining:
            return self._result(
                "transferIncomplete", f"{writer.offset} of {target.length} bytes received"
            )
        self._writer = None
        try:
            writer.finish()
        except ImageMismatchError as e:
            self._set_result("imageMismatch", str(e), ATTACK_ARBITRARY_SOFTWARE)
            return self._result("imageMismatch", str(e))
        except RuntimeError as e:  # the slot changed under the writer
            return self._result("transferIncomplete", str(e))
        booted = self.store.start_trial()
        code, text = self._run_trial(booted)
        return self._result(code, text)

    def _run_trial(self, booted: BootedImage) -> tuple[str, str]:
        """Try the image on trial; commit it or roll back, whatever the module does."""
        target = booted.target
        try:
            result = self.host.trial(
                booted.image, target.capabilities, target.limits, self.peripherals
            )
            passed, app = result.passed and result.app is not None, result.app
            reason, detail = result.reason or "trial_failed", result.detail
            violations = result.rate_limit_violations
        except Exception as e:  # never leave the image on trial (issue 10)
            logger.exception("trial of %s failed", target.name)
            passed, app = False, None
            reason, detail = WasmHostError.reason, f"{type(e).__name__}: {e}"
            violations = 0
        if passed and app is not None:
            self.store.commit()
            self.app = app
            code, text = "ok", f"installed {target.name}: {detail}"
        else:
            self.store.rollback(reason)
            code, text = "trialFailed", f"{reason}: {detail}; rolled back"
        self._set_result(code, text)
        health.record_trial(self.store, None if passed else reason, violations)
        return code, text
