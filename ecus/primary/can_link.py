"""The primary's sender to one secondary over a ``SecondaryLink`` (DESIGN 2 step 4, 4).

``CanSecondaryClient`` implements ``ecus.primary.links.SecondaryClient``
with DER ``SecondaryMessage`` requests over any link (ISO-TP on CAN, or the
in-memory pair): version reports, time, Director metadata (root chain +
targets), the image in resumable chunks, and the install request.

Resumable transfer: the secondary answers an ``imageOffer`` and every
``imageChunk`` with the next offset it wants (its durable write offset). When
an exchange fails (lost frame, timeout, a secondary that restarted), the
client offers the image again and continues from the offset the secondary
names, up to ``max_retries`` times per transfer, so bytes the secondary
already holds are not sent again.

Pipelined chunks: the client keeps ``window`` (2) chunks on the link
(``SecondaryLink.post``/``collect``): chunk k+1 crosses the bus while the
secondary writes chunk k, so the bus does not idle for each write and ack
turnaround. The secondary still acks a chunk only once it is durable, and
acks come back in order, so every offset the client resumes from is one the
secondary holds; a failure costs at most the chunks in flight, sent again.
Chunks out of step (a lost chunk, a restarted secondary) are answered with
the offset the secondary expects; the client reads the acks still in flight
and goes on from the last one.

Time and receipts (DESIGN 7): with the primary's ``signer``, the client
sends its time as a signed ``timeMessage`` bound to a nonce it first asks
the secondary for, and a version report request may carry a signed receipt
naming the counter of the ECU's last report the Director accepted, so the
ECU clears the attacks that report carried. Without a signer neither is sent.

Nothing a secondary says is trusted: replies are size-capped by the link and
decoded with the codec (``CodecError`` on anything malformed), reports are
returned as raw DER for the primary to verify with the ECU's key. A refusal
is a ``SecondaryRefusedError`` carrying the secondary's result code and text.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from securesystemslib.signer import Key, Signer, SSlibKey

from ecus.primary.deltas import send_delta
from ecus.primary.links import EcuUpdate
from ecus.transport.base import SecondaryLink
from uptane import codec
from uptane.delta import DeltaOffer
from uptane.errors import CodecError, TransportError, UptaneError
from uptane.manifest import InstalledImage, SignedEcuVersionReport, sign_statement
from uptane.verification import partial

logger = logging.getLogger(__name__)

PROTOCOL_VERSION: Final = 1
#: Bytes an ``imageChunk`` message adds around its data (tags and lengths).
CHUNK_OVERHEAD: Final = 32
DEFAULT_CHUNK_SIZE: Final = 32 * 1024
DEFAULT_INSTALL_TIMEOUT: Final = 30.0
#: Image chunks on the link before the first of them must be acknowledged.
DEFAULT_WINDOW: Final = 2

Progress = Callable[[int, int], None]


class SecondaryRefusedError(UptaneError):
    """The secondary answered with a result code other than ``ok``."""

    def __init__(self, code: str, text: str, what: str = "request") -> None:
        super().__init__(f"secondary refused the {what}: {code}: {text}")
        self.code = code
        self.text = text


class MetadataRejectedError(SecondaryRefusedError):
    """The secondary's partial verification refused the Director metadata."""


class ImageRefusedError(SecondaryRefusedError):
    """The secondary refused an image offer or chunk."""


class TransferFailedError(TransportError):
    """An image transfer did not complete within the allowed retries."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


@dataclass(frozen=True)
class SecondaryInfo:
    """What a secondary says about itself (``infoResponse``); unverified."""

    ecu_serial: str
    hardware_id: str
    public_key: Key
    protocol_version: int
    verification_mode: str
    free_slot_size: int


@dataclass(frozen=True)
class TransferResult:
    """How an image transfer went.

    ``start_offset`` is where the first offer told us to start (> 0 when a
    previous transfer is resumed), ``resumed_at`` the offsets later offers
    resumed from after a failure; ``chunks_sent``/``bytes_sent`` count every
    chunk put on the link, failed attempts included.
    """

    length: int
    start_offset: int
    resumed_at: tuple[int, ...]
    chunks_sent: int
    bytes_sent: int
    retries: int


@dataclass(frozen=True)
class InstallOutcome:
    """The ``installResult``: a result code, its text and the new signed report (DER)."""

    code: str
    text: str
    signed_report: bytes

    @property
    def ok(self) -> bool:
        return self.code == "ok"

    @property
    def report(self) -> SignedEcuVersionReport:
        return SignedEcuVersionReport.from_der(self.signed_report)


def _root_version(der: bytes) -> int:
    return partial.TrustedDirectorState(der).root.version


def _targets_version(der: bytes) -> int:
    return partial.load_targets(der).version


class CanSecondaryClient:
    """The primary's handle on one secondary over a ``SecondaryLink``."""

    def __init__(
        self,
        link: SecondaryLink,
        serial: str,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        max_retries: int = 5,
        timeout: float | None = None,
        install_timeout: float = DEFAULT_INSTALL_TIMEOUT,
        clock: Callable[[], datetime] | None = None,
        signer: Signer | None = None,
        window: int = DEFAULT_WINDOW,
    ) -> None:
        self.link = link
        self.signer = signer  # the primary's key: signs time messages and receipts
        self._serial = serial
        self.chunk_size = self._check_chunk_size(chunk_size)
        # called as progress(offset, length) during image transfers of send_update
        self.progress: Progress | None = None
        if max_retries < 0:
            raise ValueError("max_retries must not be negative")
        self.max_retries = max_retries
        if window < 1:
            raise ValueError("window must be at least 1")
        self.window = window
        self.timeout = timeout
        self.install_timeout = install_timeout
        self.clock = clock

    @property
    def serial(self) -> str:
        return self._serial

    def _check_chunk_size(self, chunk_size: int) -> int:
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if chunk_size + CHUNK_OVERHEAD > self.link.max_request:
            raise ValueError(
                f"chunk_size {chunk_size} does not fit the link's request limit "
                f"of {self.link.max_request} bytes"
            )
        return chunk_size

    # --- one exchange ---------------------------------------------------------

    def _call(
        self, kind: str, value: Any, expect: str, *, timeout: float | None = None
    ) -> dict[str, Any]:
        response = self.link.request(
            codec.encode_message(kind, value), timeout if timeout is not None else self.timeout
        )
        got, answer = codec.decode_message(response, self.link.max_response)
        if got == expect:
            return dict(answer)
        if got == "ack":
            raise SecondaryRefusedError(str(answer["code"]), str(answer["text"]), kind)
        raise CodecError(f"expected {expect} in answer to {kind}, got {got}")

    # --- SecondaryClient ------------------------------------------------------

    def get_info(self) -> SecondaryInfo:
        """Ask for serial, hardware id, public key, protocol version, slot size."""
        v = self._call("infoRequest", {"protocolVersion": PROTOCOL_VERSION}, "infoResponse")
        try:
            key = SSlibKey(
                keyid="0" * 64,
                keytype=v["keyType"],
                scheme=v["scheme"],
                keyval={"public": bytes(v["publicKey"]).hex()},
            )
            key = SSlibKey.from_crypto(key._crypto_key(), scheme=key.scheme)
        except Exception as e:  # securesystemslib raises several types for bad keys
            raise CodecError(f"secondary sent an unusable public key: {e}") from e
        return SecondaryInfo(
            ecu_serial=v["ecuSerial"],
            hardware_id=v["hardwareId"],
            public_key=key,
            protocol_version=v["protocolVersion"],
            verification_mode=str(v["verificationMode"]),
            free_slot_size=v["freeSlotSize"],
        )

    def version_report(self, nonce: bytes, last_accepted: int = 0) -> bytes:
        """A fresh ``SignedEcuVersionReport`` (DER) carrying ``nonce`` (5.4.2.1).

        ``last_accepted`` > 0 (the counter of this ECU's last report the
        Director recorded) goes along as a receipt signed by the primary.
        """
        request: dict[str, Any] = {"nonce": nonce}
        if last_accepted > 0 and self.signer is not None:
            receipt = {"ecuSerial": self.serial, "reportCounter": last_accepted}
            request["lastAccepted"] = last_accepted
            request["receiptSignatures"] = sign_statement("reportReceipt", receipt, self.signer)
        v = self._call("versionReportRequest", request, "versionReportResponse")
        return bytes(v["signedReport"])

    def get_report(self, nonce: bytes) -> SignedEcuVersionReport:
        """``version_report`` decoded (not verified: the caller checks the signature)."""
        return SignedEcuVersionReport.from_der(self.version_report(nonce))

    def send_time(self, when: datetime) -> None:
        """Send the primary's time, signed and bound to a nonce the secondary issued.

        The secondary only uses it to move its time floor forward (DESIGN 7).
        """
        if when.tzinfo is None:
            raise ValueError("time must be timezone-aware")
        if self.signer is None:
            raise ValueError("sending time needs the primary's signer")
        seconds = int(when.astimezone(UTC).timestamp())
        nonce = bytes(
            self._call(
                "timeNonceRequest", {"protocolVersion": PROTOCOL_VERSION}, "timeNonceResponse"
            )["nonce"]
        )
        statement = {"ecuSerial": self.serial, "nonce": nonce, "time": seconds}
        message = {
            "time": seconds,
            "nonce": nonce,
            "signatures": sign_statement("time", statement, self.signer),
        }
        v = self._call("timeMessage", message, "ack")
        if v["code"] != "ok":
            raise SecondaryRefusedError(v["code"], v["text"], "time")

    def push_metadata(
        self,
        root_chain: Sequence[bytes],
        targets: bytes,
        *,
        root_versions: Sequence[int] | None = None,
        targets_version: int | None = None,
    ) -> str:
        """Push DER Director roots (oldest first) then targets; return ``ok`` or ``noUpdate``.

        Raises ``MetadataRejectedError`` when partial verification fails.
        """
        if root_versions is None:
            root_versions = [_root_version(der) for der in root_chain]
        if len(root_versions) != len(root_chain):
            raise ValueError("root_versions must match root_chain")
        for version, der in zip(root_versions, root_chain, strict=True):
            push = {"repository": "director", "role": "root", "version": version, "der": der}
            v = self._call("metadataPush", push, "ack")
            if v["code"] != "ok":
                raise MetadataRejectedError(v["code"], v["text"], f"root v{version}")
        if targets_version is None:
            targets_version = _targets_version(targets)
        push = {"repository": "director", "role": "targets", "version": targets_version}
        v = self._call("metadataPush", {**push, "der": targets}, "ack")
        if v["code"] not in ("ok", "noUpdate"):
            raise MetadataRejectedError(v["code"], v["text"], "Director targets")
        return str(v["code"])

    def offer(self, image: InstalledImage, delta: DeltaOffer | None = None) -> int:
        """Offer an image (as ``delta`` if given); return the offset the secondary wants next."""
        value: dict[str, Any] = {"image": image.to_asn1()}
        if delta is not None:
            value["delta"] = delta.to_asn1()
        v = self._call("imageOffer", value, "chunkAck")
        if v["code"] != "ok":
            raise ImageRefusedError(v["code"], f"offer of {image.filename} refused", "offer")
        return self._checked_offset(
            v["nextOffset"], image.length if delta is None else delta.length
        )

    def send_chunk(self, offset: int, data: bytes, length: int) -> int:
        """Send one chunk and await its ack; return the secondary's next offset.

        A ``transferIncomplete`` answer (wrong offset) returns the offset the
        secondary expects; any other refusal raises ``ImageRefusedError``.
        """
        self.link.post(self._chunk_request(offset, data), self.timeout)
        return self._chunk_ack(self.link.collect(self.timeout), offset, length)

    @staticmethod
    def _chunk_request(offset: int, data: bytes) -> bytes:
        return codec.encode_message("imageChunk", {"offset": offset, "data": data})

    def _chunk_ack(self, response: bytes, offset: int, length: int) -> int:
        got, v = codec.decode_message(response, self.link.max_response)
        if got == "ack":
            raise ImageRefusedError(str(v["code"]), str(v["text"]), "chunk")
        if got != "chunkAck":
            raise CodecError(f"expected chunkAck in answer to imageChunk, got {got}")
        if v["code"] not in ("ok", "transferIncomplete"):
            raise ImageRefusedError(v["code"], f"chunk at {offset} refused", "chunk")
        return self._checked_offset(v["nextOffset"], length)

    def _drain(self) -> None:
        """Collect (and drop) the acks of chunks still in flight before giving up."""
        while self.link.in_flight:
            try:
                self.link.collect(self.timeout)
            except TransportError:
                self.link.abandon()

    @staticmethod
    def _checked_offset(offset: int, length: int) -> int:
        if not 0 <= offset <= length:
            raise CodecError(f"secondary asked for offset {offset} of a {length}-byte image")
        return offset

    def send_image(
        self,
        image: bytes | Path,
        info: InstalledImage,
        *,
        chunk_size: int | None = None,
        progress: Progress | None = None,
        delta: DeltaOffer | None = None,
    ) -> TransferResult:
        """Send ``image`` in pipelined chunks, resuming after failures (module docstring).

        Up to ``window`` chunks are in flight: chunk k+1 goes on the link as
        soon as chunk k is, so it crosses the bus while the secondary writes
        chunk k; the ack of chunk k is read after that. Acks are taken in
        order and each names the secondary's durable offset, so the offset
        this client resumes from is always one the secondary holds. When an
        ack names another offset than the end of its chunk (the secondary
        restarted, or wants an earlier offset), the acks still in flight are
        read and sending goes on from the offset the last of them names.
        ``progress(offset, length)`` is called after every acknowledged chunk.
        Raises ``ImageRefusedError`` on a refusal and ``TransferFailedError``
        once ``max_retries`` transport failures happened.
        """
        data = image.read_bytes() if isinstance(image, Path) else bytes(image)
        length = info.length if delta is None else delta.length  # bytes on the bus
        if len(data) != length:
            raise ValueError(f"image is {len(data)} bytes, its info says {length}")
        size = self.chunk_size if chunk_size is None else self._check_chunk_size(chunk_size)
        retries = chunks = sent = 0
        resumed: list[int] = []
        offset: int | None = None  # the secondary's durable offset, from its last ack
        start: int | None = None
        stalled = 0
        in_flight: collections.deque[tuple[int, int]] = collections.deque()  # (offset, end)
        following = 0  # the offset of the next chunk to send
        while True:
            try:
                if offset is None:
                    offset = following = self.offer(info, delta)
                    if start is None:
                        start = offset
                    else:
                        resumed.append(offset)
                while len(in_flight) < self.window and following < length:
                    chunk = data[following : following + size]
                    self.link.post(self._chunk_request(following, chunk), self.timeout)
                    chunks += 1
                    sent += len(chunk)
                    in_flight.append((following, following + len(chunk)))
                    following += len(chunk)
                if not in_flight:
                    break
                at, end = in_flight.popleft()
                nxt = self._chunk_ack(self.link.collect(self.timeout), at, length)
                if nxt != end:  # out of step: the acks in flight say where to go on
                    while in_flight:
                        at, end = in_flight.popleft()
                        nxt = self._chunk_ack(self.link.collect(self.timeout), at, length)
                    following = nxt
            except TransportError as e:
                retries += 1
                logger.warning("%s: transfer failed at %s: %s", self.serial, offset, e)
                in_flight.clear()
                self.link.abandon()
                if retries > self.max_retries:
                    raise TransferFailedError(
                        f"{self.serial}: image transfer failed {retries} times, last: {e}",
                        offset or 0,
                    ) from e
                offset = None  # offer again: the secondary says where to go on
                continue
            except (ImageRefusedError, CodecError):
                in_flight.clear()
                self._drain()  # so no late ack is taken for the answer to the next request
                raise
            if nxt <= offset:
                stalled += 1
                if stalled > self.max_retries:
                    self._drain()
                    raise TransferFailedError(f"{self.serial}: transfer makes no progress", nxt)
            else:
                stalled = 0
            offset = nxt
            if progress is not None:
                progress(offset, length)
        return TransferResult(
            length=length,
            start_offset=start or 0,
            resumed_at=tuple(resumed),
            chunks_sent=chunks,
            bytes_sent=sent,
            retries=retries,
        )

    def install(self, filename: str) -> InstallOutcome:
        """Ask the secondary to verify, try and activate the image it received."""
        v = self._call(
            "installRequest",
            {"filename": filename},
            "installResult",
            timeout=self.install_timeout,
        )
        return InstallOutcome(str(v["code"]), str(v["text"]), bytes(v["signedReport"]))

    def send_update(self, update: EcuUpdate) -> bytes:
        """Time, metadata, image and install request; return the new signed report (DER).

        A failed install is not an exception: the report says what happened
        (its ``lastResult``). Refused metadata or image raise
        ``SecondaryRefusedError``, link failures ``TransportError``.
        """
        if update.ecu_serial != self.serial:
            raise ValueError(f"update for {update.ecu_serial!r} sent to {self.serial!r}")
        if self.clock is not None and self.signer is not None:
            try:
                self.send_time(self.clock())
            except SecondaryRefusedError as e:  # its floor is ahead of us: not fatal
                logger.warning("%s: %s", self.serial, e)
        code = self.push_metadata(
            update.director_root_chain,
            update.director_targets,
            root_versions=update.director_root_versions,
            targets_version=update.director_targets_version,
        )
        if code == "noUpdate":
            return self.version_report(b"")
        if update.delta is None or not send_delta(self, update):  # docs/deltas.md
            self.send_image(update.image_path, update.installed_image, progress=self.progress)
        return self.install(update.target.name).signed_report
