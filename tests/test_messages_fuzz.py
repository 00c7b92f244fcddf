"""Fuzzing the bytes an ECU accepts from the bus (DESIGN 4; Uptane 2.1, 5.4.4).

Random bytes and mutations of valid DER of every SecondaryMessage alternative,
of a signed ECU version report and of DER TUF metadata: the only thing that may
come out of a decoder is a value or a typed ``CodecError``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from uptane import codec, der_metadata
from uptane.errors import CodecError
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import build_custom, set_vehicle_id

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
IMAGE = {
    "filename": "app.wasm",
    "length": 1234,
    "hashes": [{"function": "sha256", "digest": b"\x11" * 32}],
    "releaseCounter": 7,
}

SAMPLE_MESSAGES: dict[str, Any] = {
    "infoRequest": {"protocolVersion": 1},
    "infoResponse": {
        "ecuSerial": "ecu-1",
        "hardwareId": "hw-a",
        "keyType": "ed25519",
        "scheme": "ed25519",
        "publicKey": b"\x01" * 32,
        "protocolVersion": 1,
        "verificationMode": "partial",
        "freeSlotSize": 65536,
    },
    "versionReportRequest": {"nonce": b"\x02" * 16},
    "versionReportResponse": {"signedReport": b"\x30\x03\x02\x01\x00"},
    "metadataPush": {"repository": "director", "role": "targets", "version": 3, "der": b"\x30\x00"},
    "ack": {"code": "ok", "text": "fine"},
    "imageOffer": {"image": IMAGE},
    "imageChunk": {"offset": 4096, "data": b"chunk" * 20},
    "chunkAck": {"code": "ok", "nextOffset": 4196},
    "installRequest": {"filename": "app.wasm"},
    "installResult": {"code": "rolledBack", "text": "self-test trapped", "signedReport": b"\x05"},
    "timeMessage": {
        "time": 1_700_000_000,
        "nonce": b"\x04" * 16,
        "signatures": [{"keyid": "a" * 64, "value": b"\x05" * 64}],
    },
    "timeNonceRequest": {"protocolVersion": 1},
    "timeNonceResponse": {"nonce": b"\x06" * 16},
}


@functools.cache
def _signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@functools.cache
def samples() -> dict[str, bytes]:
    """Valid DER of every message, a signed report and two metadata files."""
    out = {f"msg:{k}": codec.encode_message(k, v) for k, v in SAMPLE_MESSAGES.items()}
    signer = _signer()
    report = EcuVersionReport(
        ecu_serial="ecu-1",
        hardware_id="hw-a",
        installed=InstalledImage("app.wasm", 1234, {"sha256": "11" * 32}, 7),
        report_counter=4,
        latest_time=EXPIRES,
        nonce=b"\x03" * 8,
        attacks_detected=("freeze",),
        last_result="ok",
    )
    out["report"] = SignedEcuVersionReport.sign(report, signer).to_der()
    root = Root(expires=EXPIRES)
    for role in ("root", "targets", "snapshot", "timestamp"):
        root.add_key(signer.public_key, role)
    out["md:root"] = der_metadata.to_der_metadata(Metadata(root), [signer])
    targets = Targets(version=2, expires=EXPIRES)
    custom = build_custom(hardware_ids=["hw-a"], release_counter=7, ecu_serial="ecu-1")
    targets.targets["app.wasm"] = TargetFile(
        1234, {"sha256": "11" * 32}, "app.wasm", {"custom": custom}
    )
    set_vehicle_id(targets, "VIN0001")
    out["md:targets"] = der_metadata.to_der_metadata(Metadata(targets), [signer])
    return out


def _decode_message(data: bytes) -> None:
    kind, _ = codec.decode_message(data)
    assert kind in SAMPLE_MESSAGES


def _decode_report(data: bytes) -> None:
    signed = SignedEcuVersionReport.from_der(data)
    _ = signed.report  # decoding the inner report must be just as safe


def _decode_metadata(data: bytes) -> None:
    try:
        md = Metadata.from_bytes(data, der_metadata.DERMetadataDeserializer())
    except der_metadata.DERDeserializationError as e:
        assert isinstance(e, DeserializationError)
        raise
    # Whatever is accepted is the one canonical encoding of what it says.
    assert md.to_bytes(der_metadata.DERMetadataSerializer()) == data


DECODERS: dict[str, Callable[[bytes], None]] = {
    "message": _decode_message,
    "report": _decode_report,
    "metadata": _decode_metadata,
}


def _decoder_for(name: str) -> Callable[[bytes], None]:
    if name.startswith("msg:"):
        return _decode_message
    return _decode_report if name == "report" else _decode_metadata


def _only_codec_errors(decoder: Callable[[bytes], None], data: bytes) -> bool:
    """Run ``decoder``; True if it accepted, False if it refused with a CodecError."""
    try:
        decoder(data)
    except CodecError:
        return False
    return True


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    name = draw(st.sampled_from(sorted(samples())))
    data = bytearray(samples()[name])
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "byte", "cut", "insert", "delete", "length"]))
        pos = draw(st.integers(0, len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 8))]
        elif op == "length" and len(data) > 1:
            # Lengths live right after tags: make them lie.
            data[1] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x81, 0x84, 0x89, 0xFF]))
    return name, bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(DECODERS)), st.binary(max_size=600))
def test_random_bytes_give_value_or_codec_error(decoder: str, data: bytes) -> None:
    _only_codec_errors(DECODERS[decoder], data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(DECODERS)), st.binary(min_size=1, max_size=40))
def test_random_bytes_behind_a_valid_header(decoder: str, tail: bytes) -> None:
    # A plausible SEQUENCE/CHOICE header gets the parser past the first byte.
    for head in (b"\x30", b"\xa0", b"\xa4", b"\xab", b"\x30\x82\x01\x00"):
        _only_codec_errors(DECODERS[decoder], head + bytes([len(tail)]) + tail)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_valid_der_gives_value_or_codec_error(sample: tuple[str, bytes]) -> None:
    name, data = sample
    _only_codec_errors(_decoder_for(name), data)


def test_samples_are_valid() -> None:
    for name, data in samples().items():
        assert _only_codec_errors(_decoder_for(name), data), name


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(samples())), st.binary(min_size=1, max_size=64))
def test_trailing_bytes_refused(name: str, tail: bytes) -> None:
    data = samples()[name]
    with pytest.raises(CodecError):
        _decoder_for(name)(data + tail)


@pytest.mark.parametrize("name", sorted(samples()))
def test_every_truncation_refused(name: str) -> None:
    data = samples()[name]
    for cut in range(len(data)):
        with pytest.raises(CodecError):
            _decoder_for(name)(data[:cut])


def test_oversize_refused_before_parsing() -> None:
    big = b"\x30" + b"\xff" * codec.DEFAULT_MAX_MESSAGE
    with pytest.raises(CodecError, match="exceeds the limit"):
        codec.decode_message(big)
    with pytest.raises(CodecError, match="exceeds the limit"):
        SignedEcuVersionReport.from_der(b"\x30" * 8193)
    with pytest.raises(der_metadata.DERDeserializationError, match="exceeds the limit"):
        Metadata.from_bytes(
            b"\x30" * (der_metadata.DEFAULT_MAX_METADATA + 1),
            der_metadata.DERMetadataDeserializer(),
        )
    # A valid file over a caller's tighter cap is refused for its size.
    data = samples()["md:targets"]
    with pytest.raises(der_metadata.DERDeserializationError, match="exceeds the limit"):
        Metadata.from_bytes(data, der_metadata.DERMetadataDeserializer(max_size=len(data) - 1))
    assert Metadata.from_bytes(data, der_metadata.DERMetadataDeserializer(max_size=len(data)))


def test_deep_nesting_is_a_codec_error() -> None:
    # 5000 nested JsonValue arrays exhaust the parser's recursion: a typed error.
    inner = b"\x80\x00"  # JsonValue.null
    for _ in range(5000):
        inner = b"\xa4" + _der_length(len(inner)) + inner
    with pytest.raises(CodecError, match="nesting too deep"):
        codec.decode("JsonValue", inner)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body
