"""ECU version reports and vehicle version manifests (Uptane 2.1, 5.4.2)."""

from __future__ import annotations

import base64
import functools
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner

from uptane.errors import ATTACKS, CodecError, ManifestError
from uptane.manifest import (
    MAX_MANIFEST_SIZE,
    RESULT_CODES,
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    SignedVehicleManifest,
    VehicleVersionManifest,
)

WHEN = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


@functools.cache
def keys() -> dict[str, CryptoSigner]:
    """One key per ECU plus a stranger, generated once per session."""
    return {name: CryptoSigner.generate_ed25519() for name in ("primary", "ecu-2", "stranger")}


def _report(serial: str = "ecu-2", counter: int = 1, **kw: Any) -> EcuVersionReport:
    fields: dict[str, Any] = {
        "ecu_serial": serial,
        "hardware_id": "hw-brake",
        "installed": InstalledImage("brake.wasm", 2048, {"sha256": "aa" * 32}, 3),
        "report_counter": counter,
        "latest_time": WHEN,
        "nonce": b"\x01\x02",
    }
    return EcuVersionReport(**(fields | kw))


def _signed_report(**kw: Any) -> SignedEcuVersionReport:
    return SignedEcuVersionReport.sign(_report(**kw), keys()["ecu-2"])


def _manifest_bytes() -> bytes:
    k = keys()
    reports = {
        "ecu-1": SignedEcuVersionReport.sign(_report("ecu-1"), k["primary"]),
        "ecu-2": SignedEcuVersionReport.sign(_report("ecu-2", installed=None), k["ecu-2"]),
    }
    manifest = VehicleVersionManifest("VIN0001", "ecu-1", reports)
    return manifest.sign(k["primary"])


# --- ECU version reports --------------------------------------------------------------

identifiers = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,30}\Z")
installed_images = st.builds(
    InstalledImage,
    filename=st.text(st.characters(codec="utf-8"), min_size=1, max_size=30),
    length=st.integers(0, 2**32 - 1),
    hashes=st.dictionaries(
        st.sampled_from(["sha256", "sha512"]),
        st.binary(min_size=32, max_size=64).map(bytes.hex),
        min_size=1,
        max_size=2,
    ),
    release_counter=st.integers(0, 2**63 - 1),
)
reports = st.builds(
    EcuVersionReport,
    ecu_serial=identifiers,
    hardware_id=identifiers,
    installed=st.none() | installed_images,
    report_counter=st.integers(0, 2**63 - 1),
    latest_time=st.integers(0, 253402300799).map(lambda t: datetime.fromtimestamp(t, UTC)),
    nonce=st.binary(max_size=32),
    attacks_detected=st.lists(st.sampled_from(sorted(ATTACKS)), max_size=5).map(tuple),
    last_result=st.sampled_from(RESULT_CODES),
    last_result_text=st.text(st.characters(codec="utf-8"), max_size=50),
)


@settings(max_examples=100, deadline=None)
@given(reports)
def test_report_round_trip_and_signature(report: EcuVersionReport) -> None:
    signer = keys()["ecu-2"]
    der = report.to_der()
    assert EcuVersionReport.from_der(der) == report
    signed = SignedEcuVersionReport.sign(report, signer)
    back = SignedEcuVersionReport.from_der(signed.to_der())
    assert back == signed
    assert back.report == report
    assert back.verify(signer.public_key) == report


def test_report_refuses_unknown_result_and_attack() -> None:
    with pytest.raises(ValueError, match="unknown result code"):
        _report(last_result="exploded").to_der()
    # An attack name outside the vocabulary cannot come in from the bus.
    der = _report(attacks_detected=("freeze",)).to_der()
    forged = der.replace(b"freeze", b"frozen")
    with pytest.raises(CodecError, match="unknown attack name"):
        EcuVersionReport.from_der(forged)
    # Also when it arrives signed: the envelope's parser checks the inner report.
    signed = SignedEcuVersionReport(forged, (keys()["ecu-2"].sign(forged),))
    with pytest.raises(CodecError, match="unknown attack name"):
        SignedEcuVersionReport.from_der(signed.to_der())


def test_installed_image_refuses_bad_hashes() -> None:
    with pytest.raises(CodecError, match="not hex"):
        InstalledImage("a", 1, {"sha256": "zz" * 32}, 0).to_asn1()
    value = InstalledImage("a", 1, {"sha256": "aa" * 32}, 0).to_asn1()
    value["hashes"] = value["hashes"] * 2
    with pytest.raises(CodecError, match="duplicate hash"):
        InstalledImage.from_asn1(value)


def test_report_signature_wrong_key_refused() -> None:
    signed = _signed_report()
    with pytest.raises(ManifestError) as info:
        signed.verify(keys()["stranger"].public_key)
    assert info.value.reason == "bad_ecu_signature"
    assert "not signed by key" in str(info.value)


def test_report_signature_by_another_key_with_same_keyid_refused() -> None:
    # A signature claiming the right keyid but made with another key.
    right = keys()["ecu-2"]
    report = _report()
    forged_sig = keys()["stranger"].sign(report.to_der())
    forged_sig.keyid = right.public_key.keyid
    forged = SignedEcuVersionReport(report.to_der(), (forged_sig,))
    with pytest.raises(ManifestError) as info:
        forged.verify(right.public_key)
    assert info.value.reason == "bad_ecu_signature"
    assert "invalid" in str(info.value)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 7))
def test_report_one_bit_change_refused(where: int, bit: int) -> None:
    signer = keys()["ecu-2"]
    signed = _signed_report()
    der = bytearray(signed.report_der)
    der[where % len(der)] ^= 1 << bit
    tampered = SignedEcuVersionReport(bytes(der), signed.signatures)
    with pytest.raises(ManifestError) as info:
        tampered.verify(signer.public_key)
    assert info.value.reason == "bad_ecu_signature"
    # The whole envelope: a flip anywhere is a decode error or a bad signature.
    envelope = bytearray(signed.to_der())
    envelope[where % len(envelope)] ^= 1 << bit
    try:
        parsed = SignedEcuVersionReport.from_der(bytes(envelope))
    except CodecError:
        return
    with pytest.raises((ManifestError, CodecError)):
        parsed.verify(signer.public_key)


# --- vehicle version manifests -----------------------------------------------------------


def test_manifest_round_trip_and_verification() -> None:
    k = keys()
    data = _manifest_bytes()
    parsed = SignedVehicleManifest.from_bytes(data)
    manifest = parsed.verify(k["primary"].public_key)
    assert manifest.vin == "VIN0001"
    assert manifest.primary_ecu_serial == "ecu-1"
    assert set(manifest.reports) == {"ecu-1", "ecu-2"}
    # Each report keeps the exact bytes its ECU signed; the Director checks them.
    assert manifest.reports["ecu-2"].verify(k["ecu-2"].public_key) == _report(installed=None)
    assert manifest.reports["ecu-1"].verify(k["primary"].public_key).ecu_serial == "ecu-1"
    with pytest.raises(ManifestError) as info:
        manifest.reports["ecu-2"].verify(k["primary"].public_key)
    assert info.value.reason == "bad_ecu_signature"


def test_manifest_wrong_primary_key_refused() -> None:
    parsed = SignedVehicleManifest.from_bytes(_manifest_bytes())
    with pytest.raises(ManifestError) as info:
        parsed.verify(keys()["stranger"].public_key)
    assert info.value.reason == "bad_primary_signature"


def test_manifest_signature_over_other_content_refused() -> None:
    doc = json.loads(_manifest_bytes())
    doc["signed"]["vin"] = "VIN0002"
    parsed = SignedVehicleManifest.from_bytes(json.dumps(doc).encode())
    with pytest.raises(ManifestError) as info:
        parsed.verify(keys()["primary"].public_key)
    assert info.value.reason == "bad_primary_signature"


def _sig_hex_span(data: bytes) -> tuple[int, int]:
    sig = json.loads(data)["signatures"][0]["sig"].encode()
    start = data.index(sig)
    return start, start + len(sig)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(0, 7))
def test_manifest_one_bit_change_refused(where: int, bit: int) -> None:
    data = _manifest_bytes()
    index = where % len(data)
    flipped = bytearray(data)
    flipped[index] ^= 1 << bit
    try:
        SignedVehicleManifest.from_bytes(bytes(flipped)).verify(keys()["primary"].public_key)
    except ManifestError as e:
        assert e.reason in {"malformed", "bad_primary_signature"}
        return
    # JSON hex is case-insensitive: only flipping a letter's case inside the
    # signature's hex leaves the signature (and everything signed) unchanged.
    start, end = _sig_hex_span(data)
    assert start <= index < end and bit == 5 and chr(data[index]) in "abcdef"


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_manifest_bytes())
    return doc


def _tamper(change: Any) -> bytes:
    doc = _doc()
    change(doc)
    return json.dumps(doc).encode()


def _set(path: list[Any], value: Any) -> Any:
    def change(doc: Any) -> None:
        for part in path[:-1]:
            doc = doc[part]
        doc[path[-1]] = value

    return change


def _delete(path: list[Any]) -> Any:
    def change(doc: Any) -> None:
        for part in path[:-1]:
            doc = doc[part]
        del doc[path[-1]]

    return change


def _report_b64(report: EcuVersionReport, key: str = "ecu-2") -> str:
    signed = SignedEcuVersionReport.sign(report, keys()[key])
    return base64.b64encode(signed.to_der()).decode()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"{not json", id="bad-json"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b'{"signed": {}}', id="no-signatures"),
        pytest.param(_tamper(_set(["signed"], "x")), id="signed-not-object"),
        pytest.param(_tamper(_set(["signed", "_type"], "targets")), id="wrong-type"),
        pytest.param(_tamper(_set(["signed", "extra"], 1)), id="extra-field"),
        pytest.param(_tamper(_delete(["signed", "vin"])), id="missing-vin"),
        pytest.param(_tamper(_set(["signed", "vin"], 17)), id="vin-not-string"),
        pytest.param(_tamper(_set(["signed", "vin"], "../VIN")), id="vin-unsafe"),
        pytest.param(_tamper(_set(["signed", "primary_ecu_serial"], "")), id="primary-empty"),
        pytest.param(_tamper(_set(["signed", "ecu_version_reports"], [])), id="reports-not-object"),
        pytest.param(
            _tamper(_set(["signed", "ecu_version_reports", "ecu-2"], 5)), id="report-not-string"
        ),
        pytest.param(
            _tamper(_set(["signed", "ecu_version_reports", "ecu-2"], "!!notbase64!!")),
            id="bad-base64",
        ),
        pytest.param(
            _tamper(_set(["signed", "ecu_version_reports", "ecu-2"], "AAAA")), id="bad-der"
        ),
        pytest.param(
            _tamper(
                _set(
                    ["signed", "ecu_version_reports", "ecu-2"],
                    base64.b64encode(b"\x30" * 9000).decode(),
                )
            ),
            id="report-too-large",
        ),
        pytest.param(
            _tamper(_set(["signed", "ecu_version_reports", "bad serial"], "AAAA")),
            id="bad-serial",
        ),
        pytest.param(_tamper(_set(["signatures"], [])), id="no-signature"),
        pytest.param(_tamper(_set(["signatures"], "sig")), id="signatures-not-list"),
        pytest.param(_tamper(_set(["signatures"], ["sig"])), id="signature-not-object"),
        pytest.param(_tamper(_set(["signatures", 0], {"keyid": "k"})), id="signature-no-sig"),
        pytest.param(
            _tamper(lambda doc: doc.__setitem__("signatures", doc["signatures"] * 9)),
            id="too-many-signatures",
        ),
    ],
)
def test_malformed_manifest_refused(data: bytes) -> None:
    with pytest.raises(ManifestError) as info:
        SignedVehicleManifest.from_bytes(data)
    assert info.value.reason == "malformed"


def test_unknown_attack_name_in_report_refused() -> None:
    der = _report(attacks_detected=("rollback",)).to_der().replace(b"rollback", b"rollbacc")
    signed = SignedEcuVersionReport(der, (keys()["ecu-2"].sign(der),))
    doc = _doc()
    doc["signed"]["ecu_version_reports"]["ecu-2"] = base64.b64encode(signed.to_der()).decode()
    with pytest.raises(ManifestError, match="unknown attack name") as info:
        SignedVehicleManifest.from_bytes(json.dumps(doc).encode())
    assert info.value.reason == "malformed"


def test_oversize_manifest_refused_before_parsing() -> None:
    with pytest.raises(ManifestError) as info:
        SignedVehicleManifest.from_bytes(b"{" * (MAX_MANIFEST_SIZE + 1))
    assert info.value.reason == "too_large"
    data = _manifest_bytes()
    with pytest.raises(ManifestError) as info:
        SignedVehicleManifest.from_bytes(data, max_size=len(data) - 1)
    assert info.value.reason == "too_large"
    assert SignedVehicleManifest.from_bytes(data, max_size=len(data))


def test_reports_inside_manifest_round_trip_exact_bytes() -> None:
    report = _report(counter=42)
    b64 = _report_b64(report)
    doc = _doc()
    doc["signed"]["ecu_version_reports"]["ecu-2"] = b64
    parsed = SignedVehicleManifest.from_bytes(json.dumps(doc).encode())
    inner = parsed.manifest.reports["ecu-2"]
    assert base64.b64encode(inner.to_der()).decode() == b64
    assert inner.verify(keys()["ecu-2"].public_key).report_counter == 42
    # Non-canonical DER of a report envelope is refused at the codec.
    der = base64.b64decode(b64)
    assert der[0] == 0x30 and der[1] == 0x81  # 128-255 bytes of content
    longer = b"\x30\x82\x00" + der[2:]  # the same length in one octet more
    with pytest.raises(CodecError, match="canonical"):
        SignedEcuVersionReport.from_der(longer)
    assert SignedEcuVersionReport.from_der(der) == inner
