"""Vehicle manifests parsed in the order the Director checks them: cheapest refusal first.

Uptane 2.1 5.4.2.2: the primary signs the manifest envelope over canonical
JSON, and that signature covers the ECU reports as base64 text. So the
Director can refuse an unknown vehicle, a wrong shape or size, more reports
than the vehicle has ECUs and a bad primary signature before it decodes a
single ECU report (DER); each report is then decoded once, after its
signature is checked against the registered ECU key.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from securesystemslib.signer import Key, Signature

from uptane.canonical_json import canonical_json
from uptane.errors import CodecError, ManifestError, MetadataError
from uptane.manifest import MANIFEST_TYPE, EcuVersionReport, split_signed_report
from uptane.metadata import check_identifier

# the ASN.1 module's SEQUENCE OF bound on a report's signatures
_MAX_SIGNATURES = 8
_FIELDS = frozenset({"_type", "vin", "primary_ecu_serial", "ecu_version_reports"})


@dataclass(frozen=True, eq=False)
class ManifestEnvelope:
    """A manifest's JSON envelope with its ECU reports still undecoded (base64 text)."""

    vin: str
    primary_ecu_serial: str
    reports: dict[str, str]
    signed: dict[str, Any]
    signatures: tuple[Signature, ...]

    @classmethod
    def from_bytes(cls, data: bytes, max_size: int) -> ManifestEnvelope:
        """Size, JSON and shape checks only: no ECU report is decoded here."""
        if len(data) > max_size:
            raise ManifestError(f"manifest is {len(data)} bytes, over {max_size}", "too_large")
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ManifestError("a manifest is a JSON object", "malformed")
            signed = doc["signed"]
            if not isinstance(signed, dict) or signed.get("_type") != MANIFEST_TYPE:
                raise ManifestError("not a vehicle manifest", "malformed")
            if set(signed) != _FIELDS:
                raise ManifestError("unexpected or missing fields in manifest", "malformed")
            vin = check_identifier(signed["vin"], "vin")
            primary = check_identifier(signed["primary_ecu_serial"], "primary_ecu_serial")
            reports = signed["ecu_version_reports"]
            if not isinstance(reports, dict):
                raise ManifestError("ecu_version_reports must be an object", "malformed")
            sig_list = doc["signatures"]
            if not isinstance(sig_list, list) or not 1 <= len(sig_list) <= _MAX_SIGNATURES:
                raise ManifestError("signatures must be a list of 1-8 entries", "malformed")
            sigs = tuple(Signature.from_dict(dict(s)) for s in sig_list)
        except ManifestError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError, MetadataError) as e:
            raise ManifestError(f"malformed manifest: {e}", "malformed") from e
        return cls(vin, primary, reports, signed, sigs)

    @cached_property
    def signed_bytes(self) -> bytes:
        """The canonical JSON of the signed part: what the primary signed (made once)."""
        return canonical_json(self.signed)

    def verify(self, primary_key: Key) -> Signature:
        """The signature by ``primary_key`` over the canonical signed part (5.4.2.2)."""
        for sig in self.signatures:
            if sig.keyid == primary_key.keyid:
                try:
                    primary_key.verify_signature(sig, self.signed_bytes)
                except Exception as e:  # securesystemslib's UnverifiedSignatureError
                    raise ManifestError(
                        f"vehicle manifest signature is invalid: {e}", "bad_primary_signature"
                    ) from e
                return sig
        raise ManifestError(
            "vehicle manifest is not signed by the registered primary key",
            "bad_primary_signature",
        )

    def verified_bytes(self, signature: Signature) -> bytes:
        """What the Director stores: the signed part and the signature that verified it.

        Canonical JSON, so nothing the primary did not sign (extra top-level
        fields, other signatures, the first copy of a duplicated key) is kept.
        """
        # canonical JSON sorts keys: "signatures" before "signed"
        return b"".join(
            (
                b'{"signatures":[',
                canonical_json(signature.to_dict()),
                b'],"signed":',
                self.signed_bytes,
                b"}",
            )
        )


def verify_report(serial: str, text: object, key: Key) -> EcuVersionReport:
    """Check ``key`` signed one ECU report's exact bytes, then decode its content once.

    The signed envelope is read by slicing (``split_signed_report``), so a
    report is decoded once, after its signature verified (issue 12).

    A malformed report is ``malformed``; a report not signed by ``key`` is
    ``bad_ecu_signature`` (5.4.2.1).
    """
    try:
        if not isinstance(text, str):
            raise ManifestError(f"report of {serial} must be base64", "malformed")
        report_der, sigs = split_signed_report(base64.b64decode(text, validate=True))
    except CodecError as e:
        raise ManifestError(f"malformed ECU version report: {e}", "malformed") from e
    except (ValueError, binascii.Error) as e:
        raise ManifestError(f"report of {serial} is not base64: {e}", "malformed") from e
    sig = next((s for s in sigs if s.keyid == key.keyid), None)
    if sig is None:
        raise ManifestError(
            f"ECU version report of {serial} is not signed by key {key.keyid[:8]}",
            "bad_ecu_signature",
        )
    try:
        key.verify_signature(sig, report_der)
    except Exception as e:  # securesystemslib's UnverifiedSignatureError
        raise ManifestError(
            f"ECU version report signature of {serial} by {key.keyid[:8]} is invalid: {e}",
            "bad_ecu_signature",
        ) from e
    try:
        return EcuVersionReport.from_der(report_der)
    except CodecError as e:
        raise ManifestError(f"malformed ECU version report: {e}", "malformed") from e
