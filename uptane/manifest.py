"""ECU version reports and vehicle version manifests (Uptane 2.1, 5.4.2).

An ECU version report is a DER ``EcuVersionReport`` signed over its exact
DER bytes (``SignedEcuVersionReport``); those bytes travel unchanged from
the ECU through the primary to the Director, which verifies the signature
with the key in its inventory. The vehicle version manifest is a JSON
envelope (like TUF metadata) signed by the primary over canonical JSON:

    {"signed": {"_type": "vehicle_manifest", "vin": ..., "primary_ecu_serial": ...,
                "ecu_version_reports": {SERIAL: base64(SignedEcuVersionReport DER)}},
     "signatures": [{"keyid": ..., "sig": ...}]}
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from securesystemslib.signer import Key, Signature, Signer

from uptane import codec
from uptane.canonical_json import canonical_json
from uptane.errors import ATTACKS, CodecError, ManifestError, SpoofedMessageError
from uptane.metadata import check_identifier

MANIFEST_TYPE: Final = "vehicle_manifest"
MAX_MANIFEST_SIZE: Final = 1_000_000
MAX_REPORT_SIZE: Final = 8192

RESULT_CODES: Final = (
    "ok",
    "metadataRejected",
    "imageMismatch",
    "transferIncomplete",
    "trialFailed",
    "rolledBack",
    "noSpace",
    "badRequest",
    "busy",
    "notReady",
    "internalError",
    "noUpdate",
    "limitsExceeded",
    "deferred",
    "declined",
)
HEALTH_STATUSES: Final = ("healthy", "degraded", "unhealthy", "unknown")
MAX_HEALTH_COUNTS: Final = 16


@dataclass(frozen=True)
class InstalledImage:
    """What an ECU runs: target name, length, hashes (hex) and release counter."""

    filename: str
    length: int
    hashes: Mapping[str, str]
    release_counter: int

    def to_asn1(self) -> dict[str, Any]:
        try:
            hashes = [
                {"function": k, "digest": bytes.fromhex(v)} for k, v in sorted(self.hashes.items())
            ]
        except ValueError as e:
            raise CodecError(f"hash is not hex: {e}") from e
        return {
            "filename": self.filename,
            "length": self.length,
            "hashes": hashes,
            "releaseCounter": self.release_counter,
        }

    @classmethod
    def from_asn1(cls, value: Mapping[str, Any]) -> InstalledImage:
        hashes = {h["function"]: bytes(h["digest"]).hex() for h in value["hashes"]}
        if len(hashes) != len(value["hashes"]):
            raise CodecError("duplicate hash function in image info")
        return cls(
            filename=value["filename"],
            length=value["length"],
            hashes=hashes,
            release_counter=value["releaseCounter"],
        )


def _counts_to_asn1(counts: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{"name": k, "count": v} for k, v in sorted(counts.items())]


def _counts_from_asn1(items: Any) -> dict[str, int]:
    counts = {str(i["name"]): int(i["count"]) for i in items}
    if len(counts) != len(items):
        raise CodecError("duplicate name in health counts")
    if list(counts) != sorted(counts):
        raise CodecError("health counts must be sorted by name")
    return counts


@dataclass(frozen=True)
class EcuHealth:
    """Health of an ECU's running WASM module (issue 14): status, last code, counts.

    ``traps``, ``capability_denials`` (by capability) and ``rollbacks`` (by
    reason) count since the ECU was made; the Director compares reports.
    """

    status: str = "unknown"
    health_code: int = 0
    traps: int = 0
    capability_denials: Mapping[str, int] = field(default_factory=dict)
    rollbacks: Mapping[str, int] = field(default_factory=dict)

    def to_asn1(self) -> dict[str, Any]:
        if self.status not in HEALTH_STATUSES:
            raise CodecError(f"unknown health status {self.status!r}")
        return {
            "status": self.status,
            "healthCode": self.health_code,
            "traps": self.traps,
            "capabilityDenials": _counts_to_asn1(self.capability_denials),
            "rollbacks": _counts_to_asn1(self.rollbacks),
        }

    @classmethod
    def from_asn1(cls, value: Mapping[str, Any]) -> EcuHealth:
        return cls(
            status=value["status"],
            health_code=value["healthCode"],
            traps=value["traps"],
            capability_denials=_counts_from_asn1(value["capabilityDenials"]),
            rollbacks=_counts_from_asn1(value["rollbacks"]),
        )


@dataclass(frozen=True)
class EcuVersionReport:
    """Uptane 2.1, 5.4.2.1: what one ECU says it runs, and what it saw."""

    ecu_serial: str
    hardware_id: str
    installed: InstalledImage | None
    report_counter: int
    latest_time: datetime
    nonce: bytes = b""
    attacks_detected: tuple[str, ...] = ()
    last_result: str = "ok"
    last_result_text: str = ""
    health: EcuHealth | None = None

    def to_der(self) -> bytes:
        if self.last_result not in RESULT_CODES:
            raise ValueError(f"unknown result code {self.last_result!r}")
        value: dict[str, Any] = {
            "ecuSerial": self.ecu_serial,
            "hardwareId": self.hardware_id,
            "reportCounter": self.report_counter,
            "nonce": self.nonce,
            "latestTime": int(self.latest_time.timestamp()),
            "attacksDetected": list(self.attacks_detected),
            "lastResult": self.last_result,
            "lastResultText": self.last_result_text,
        }
        if self.installed is not None:
            value["installed"] = self.installed.to_asn1()
        if self.health is not None:
            value["health"] = self.health.to_asn1()
        return codec.encode("EcuVersionReport", value)

    @classmethod
    def from_der(cls, data: bytes) -> EcuVersionReport:
        v = codec.decode("EcuVersionReport", data, MAX_REPORT_SIZE)
        for attack in v["attacksDetected"]:
            if attack not in ATTACKS:
                raise CodecError(f"unknown attack name {attack!r} in report")
        return cls(
            ecu_serial=v["ecuSerial"],
            hardware_id=v["hardwareId"],
            installed=InstalledImage.from_asn1(v["installed"]) if "installed" in v else None,
            report_counter=v["reportCounter"],
            latest_time=datetime.fromtimestamp(v["latestTime"], UTC),
            nonce=bytes(v["nonce"]),
            attacks_detected=tuple(v["attacksDetected"]),
            last_result=v["lastResult"],
            last_result_text=v["lastResultText"],
            health=EcuHealth.from_asn1(v["health"]) if "health" in v else None,
        )


# SignedEcuVersionReport bounds of the ASN.1 module (uptane/asn1/uptane.asn)
_MAX_REPORT_DER = 4096
_MAX_SIGNATURES = 8
_KEYID_LENGTH = 64
_MAX_SIGNATURE = 512
_VISIBLE = re.compile(rb"[\x20-\x7e]*")  # a VisibleString's characters


def _der_item(data: bytes, pos: int, end: int, tag: int) -> tuple[int, int]:
    """The content (start, end) of the DER item with ``tag`` at ``pos``; ``CodecError`` if not.

    Definite lengths in their shortest form only (DER, X.690 10.1), inside ``end``.
    """
    if pos + 2 > end or data[pos] != tag:
        raise CodecError(f"SignedEcuVersionReport: expected tag {tag:#04x} at byte {pos}")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x81:
        if pos + 1 > end or data[pos] < 0x80:
            raise CodecError("SignedEcuVersionReport: length not in its shortest form")
        length = data[pos]
        pos += 1
    elif first == 0x82:
        if pos + 2 > end or data[pos] == 0 or (data[pos] << 8 | data[pos + 1]) < 0x100:
            raise CodecError("SignedEcuVersionReport: length not in its shortest form")
        length = data[pos] << 8 | data[pos + 1]
        pos += 2
    else:  # indefinite, or longer than anything this type allows
        raise CodecError("SignedEcuVersionReport: unsupported length")
    if pos + length > end:
        raise CodecError("SignedEcuVersionReport: value runs past its container")
    return pos, pos + length


def split_signed_report(data: bytes) -> tuple[bytes, tuple[Signature, ...]]:
    """The report's exact DER bytes and the signatures of a DER ``SignedEcuVersionReport``.

    A strict reader of this one fixed type (issue 12: the Director decodes each
    report once, its content, after the signature over these bytes is checked):
    DER tags and shortest-form lengths, every size bound of the ASN.1 module,
    key ids of 64 visible characters, nothing after the value. It accepts no
    encoding that ``uptane.codec.decode`` refuses (``tests/test_manifest.py``).
    """
    if len(data) > MAX_REPORT_SIZE:
        raise CodecError(f"SignedEcuVersionReport: {len(data)} bytes exceeds {MAX_REPORT_SIZE}")
    start, end = _der_item(data, 0, len(data), 0x30)
    if end != len(data):
        raise CodecError("SignedEcuVersionReport: trailing bytes after the value")
    # AUTOMATIC TAGS: report [0] IMPLICIT OCTET STRING, signatures [1] SEQUENCE OF
    report_start, report_end = _der_item(data, start, end, 0x80)
    if not 1 <= report_end - report_start <= _MAX_REPORT_DER:
        raise CodecError("SignedEcuVersionReport: report size out of range")
    sigs_start, sigs_end = _der_item(data, report_end, end, 0xA1)
    if sigs_end != end:
        raise CodecError("SignedEcuVersionReport: unexpected data after the signatures")
    signatures: list[Signature] = []
    pos = sigs_start
    while pos < sigs_end:
        if len(signatures) == _MAX_SIGNATURES:
            raise CodecError("SignedEcuVersionReport: more than 8 signatures")
        sig_start, sig_end = _der_item(data, pos, sigs_end, 0x30)
        # Signature: keyid [0] VisibleString, value [1] OCTET STRING
        key_start, key_end = _der_item(data, sig_start, sig_end, 0x80)
        keyid = data[key_start:key_end]
        if len(keyid) != _KEYID_LENGTH or _VISIBLE.fullmatch(keyid) is None:
            raise CodecError("SignedEcuVersionReport: key id is not 64 visible characters")
        value_start, value_end = _der_item(data, key_end, sig_end, 0x81)
        if value_end != sig_end or not 1 <= value_end - value_start <= _MAX_SIGNATURE:
            raise CodecError("SignedEcuVersionReport: malformed signature")
        signatures.append(Signature(keyid.decode("ascii"), data[value_start:value_end].hex()))
        pos = sig_end
    if not signatures:
        raise CodecError("SignedEcuVersionReport: no signature")
    return data[report_start:report_end], tuple(signatures)


@dataclass(frozen=True)
class SignedEcuVersionReport:
    """A report's exact DER bytes plus signatures over them."""

    report_der: bytes
    signatures: tuple[Signature, ...]

    @classmethod
    def sign(cls, report: EcuVersionReport, signer: Signer) -> SignedEcuVersionReport:
        der = report.to_der()
        return cls(report_der=der, signatures=(signer.sign(der),))

    @property
    def report(self) -> EcuVersionReport:
        """The decoded report (unverified: call ``verify`` for trust)."""
        return EcuVersionReport.from_der(self.report_der)

    def to_der(self) -> bytes:
        sigs = []
        for s in self.signatures:
            try:
                sigs.append({"keyid": s.keyid, "value": bytes.fromhex(s.signature)})
            except ValueError as e:
                raise CodecError(f"signature is not hex: {e}") from e
        return codec.encode(
            "SignedEcuVersionReport", {"report": self.report_der, "signatures": sigs}
        )

    @classmethod
    def from_der(cls, data: bytes) -> SignedEcuVersionReport:
        v = codec.decode("SignedEcuVersionReport", data, MAX_REPORT_SIZE)
        sigs = tuple(Signature(s["keyid"], bytes(s["value"]).hex()) for s in v["signatures"])
        signed = cls(report_der=bytes(v["report"]), signatures=sigs)
        _ = signed.report  # the inner report must be valid too (CodecError if not)
        return signed

    def verify(self, key: Key) -> EcuVersionReport:
        """Return the report if ``key`` signed these exact bytes (5.4.2.1)."""
        for sig in self.signatures:
            if sig.keyid != key.keyid:
                continue
            try:
                key.verify_signature(sig, self.report_der)
            except Exception as e:  # securesystemslib raises UnverifiedSignatureError
                raise ManifestError(
                    f"ECU version report signature by {key.keyid[:8]} is invalid: {e}",
                    reason="bad_ecu_signature",
                ) from e
            return self.report
        raise ManifestError(
            f"ECU version report is not signed by key {key.keyid[:8]}",
            reason="bad_ecu_signature",
        )


# --- what the primary signs for a secondary (DESIGN 7) --------------------------

STATEMENT_TYPE: Final = "PrimaryStatement"


def statement_bytes(kind: str, value: Mapping[str, Any]) -> bytes:
    """DER of a ``PrimaryStatement`` (``time`` or ``reportReceipt``): what is signed."""
    return codec.encode(STATEMENT_TYPE, (kind, dict(value)))


def sign_statement(kind: str, value: Mapping[str, Any], signer: Signer) -> list[dict[str, Any]]:
    """The ASN.1 ``Signatures`` of the primary over one statement."""
    sig = signer.sign(statement_bytes(kind, value))
    try:
        return [{"keyid": sig.keyid, "value": bytes.fromhex(sig.signature)}]
    except ValueError as e:
        raise CodecError(f"signature is not hex: {e}") from e


def verify_statement(kind: str, value: Mapping[str, Any], signatures: Any, key: Key | None) -> None:
    """Check that ``key`` (the primary's) signed this statement; else ``SpoofedMessageError``.

    A statement without signatures, or with no signature by ``key``, or an
    ECU without a provisioned primary key (``key`` None) is refused the same way.
    """
    if key is None:
        raise SpoofedMessageError("no primary key is provisioned: signed messages are refused")
    if not signatures:
        raise SpoofedMessageError(f"{kind} message is not signed")
    data = statement_bytes(kind, value)
    for entry in signatures:
        if entry["keyid"] != key.keyid:
            continue
        try:
            key.verify_signature(Signature(key.keyid, bytes(entry["value"]).hex()), data)
        except Exception as e:  # securesystemslib raises UnverifiedSignatureError
            raise SpoofedMessageError(f"{kind} signature by the primary key is invalid") from e
        return
    raise SpoofedMessageError(f"{kind} message is not signed by the primary key")


@dataclass(frozen=True)
class VehicleVersionManifest:
    """Uptane 2.1, 5.4.2.2: the primary's signed bundle of all ECU reports."""

    vin: str
    primary_ecu_serial: str
    reports: Mapping[str, SignedEcuVersionReport] = field(default_factory=dict)

    def signed_dict(self) -> dict[str, Any]:
        return {
            "_type": MANIFEST_TYPE,
            "vin": self.vin,
            "primary_ecu_serial": self.primary_ecu_serial,
            "ecu_version_reports": {
                serial: base64.b64encode(r.to_der()).decode("ascii")
                for serial, r in sorted(self.reports.items())
            },
        }

    def sign(self, signer: Signer) -> bytes:
        """Return the signed JSON envelope, ready to PUT to the Director."""
        signed = self.signed_dict()
        sig = signer.sign(canonical_json(signed))
        return json.dumps({"signed": signed, "signatures": [sig.to_dict()]}).encode("utf-8")


@dataclass(frozen=True)
class SignedVehicleManifest:
    """A parsed, not yet trusted, vehicle version manifest envelope."""

    manifest: VehicleVersionManifest
    signed_bytes: bytes
    signatures: tuple[Signature, ...]

    @classmethod
    def from_bytes(cls, data: bytes, max_size: int = MAX_MANIFEST_SIZE) -> SignedVehicleManifest:
        """Parse and schema-check a manifest; every problem is a ``ManifestError``."""
        if len(data) > max_size:
            raise ManifestError(f"manifest is {len(data)} bytes, over {max_size}", "too_large")
        try:
            doc = json.loads(data)
            signed = doc["signed"]
            if not isinstance(signed, dict) or signed.get("_type") != MANIFEST_TYPE:
                raise ManifestError("not a vehicle manifest", "malformed")
            if set(signed) != {"_type", "vin", "primary_ecu_serial", "ecu_version_reports"}:
                raise ManifestError("unexpected or missing fields in manifest", "malformed")
            vin = check_identifier(signed["vin"], "vin")
            primary = check_identifier(signed["primary_ecu_serial"], "primary_ecu_serial")
            raw_reports = signed["ecu_version_reports"]
            if not isinstance(raw_reports, dict) or len(raw_reports) > 256:
                raise ManifestError("ecu_version_reports must be an object", "malformed")
            reports = {}
            for serial, b64 in raw_reports.items():
                check_identifier(serial, "ecu serial")
                if not isinstance(b64, str):
                    raise ManifestError(f"report of {serial} must be base64", "malformed")
                report = SignedEcuVersionReport.from_der(base64.b64decode(b64, validate=True))
                reports[serial] = report
            sig_list = doc["signatures"]
            if not isinstance(sig_list, list) or not 1 <= len(sig_list) <= 8:
                raise ManifestError("signatures must be a list of 1-8 entries", "malformed")
            sigs = tuple(Signature.from_dict(dict(s)) for s in sig_list)
        except ManifestError:
            raise
        except CodecError as e:
            raise ManifestError(f"malformed ECU version report: {e}", "malformed") from e
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ManifestError(f"malformed manifest: {e}", "malformed") from e
        except Exception as e:  # e.g. MetadataError from check_identifier
            raise ManifestError(f"malformed manifest: {e}", "malformed") from e
        return cls(
            manifest=VehicleVersionManifest(vin=vin, primary_ecu_serial=primary, reports=reports),
            signed_bytes=canonical_json(signed),
            signatures=sigs,
        )

    def verify(self, primary_key: Key) -> VehicleVersionManifest:
        """Return the manifest if ``primary_key`` signed it (5.4.2.2)."""
        for sig in self.signatures:
            if sig.keyid == primary_key.keyid:
                try:
                    primary_key.verify_signature(sig, self.signed_bytes)
                except Exception as e:
                    raise ManifestError(
                        f"vehicle manifest signature is invalid: {e}", "bad_primary_signature"
                    ) from e
                return self.manifest
        raise ManifestError(
            "vehicle manifest is not signed by the registered primary key",
            "bad_primary_signature",
        )
