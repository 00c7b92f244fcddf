"""``uptane.manifest.split_signed_report``: the Director's strict reader of a signed
report envelope (issue 12) accepts nothing ``uptane.codec.decode`` refuses."""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner, Signature

from uptane import codec
from uptane.errors import CodecError
from uptane.manifest import (
    MAX_REPORT_SIZE,
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    split_signed_report,
)

WHEN = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


@functools.cache
def signers() -> tuple[CryptoSigner, ...]:
    return tuple(CryptoSigner.generate_ed25519() for _ in range(3))


def _signed(n_signatures: int = 1, **kw: Any) -> SignedEcuVersionReport:
    report = EcuVersionReport(
        "ecu-2",
        "hw-brake",
        kw.pop("installed", InstalledImage("brake.wasm", 2048, {"sha256": "aa" * 32}, 3)),
        7,
        WHEN,
        **kw,
    )
    der = report.to_der()
    return SignedEcuVersionReport(der, tuple(s.sign(der) for s in signers()[:n_signatures]))


def _by_codec(data: bytes) -> tuple[bytes, tuple[Signature, ...]]:
    value = codec.decode("SignedEcuVersionReport", data, MAX_REPORT_SIZE)
    sigs = tuple(Signature(s["keyid"], bytes(s["value"]).hex()) for s in value["signatures"])
    return bytes(value["report"]), sigs


@pytest.mark.parametrize("n", [1, 2, 3])
def test_same_bytes_and_signatures_as_the_codec(n: int) -> None:
    signed = _signed(n, last_result_text="x" * 300)  # long forms of the lengths too
    data = signed.to_der()
    assert split_signed_report(data) == _by_codec(data)
    assert split_signed_report(data) == (signed.report_der, signed.signatures)


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def _envelope(report: bytes, sigs: list[tuple[bytes, bytes]]) -> bytes:
    # AUTOMATIC TAGS: [0] report, [1] signatures; in a Signature [0] keyid, [1] value
    entries = b"".join(_tlv(0x30, _tlv(0x80, k) + _tlv(0x81, v)) for k, v in sigs)
    return _tlv(0x30, _tlv(0x80, report) + _tlv(0xA1, entries))


KEYID = b"a" * 64
VALUE = b"\x01" * 64


def _overlong_signature() -> bytes:
    """The last signature's SEQUENCE and value each claim one byte more than the
    signatures container holds: read as given, the value would end past the data and
    be taken short."""
    value = b"\x01" * 8
    inner = _tlv(0x80, KEYID) + bytes([0x81, len(value) + 1]) + value
    signature = bytes([0x30, len(inner) + 1]) + inner
    return _tlv(0x30, _tlv(0x80, b"\x30\x00") + _tlv(0xA1, signature))


def _refusals() -> list[tuple[str, bytes]]:
    good = _envelope(b"\x30\x00", [(KEYID, VALUE)])
    assert split_signed_report(good)[0] == b"\x30\x00"
    short = _envelope(b"\x30\x00", [(KEYID, b"\x01")])  # under 128 bytes: a short length
    assert short[1] == len(short) - 2 < 0x80 and split_signed_report(short)[0] == b"\x30\x00"
    nonminimal = b"\x30\x81" + short[1:]  # the same length in a needless long form
    return [
        ("trailing byte", good + b"\x00"),
        ("truncated", good[:-1]),
        ("long form for a short length", nonminimal),
        ("indefinite length", b"\x30\x80" + good[2:] + b"\x00\x00"),
        ("a signature's lengths run past its container", _overlong_signature()),
        ("empty report", _envelope(b"", [(KEYID, VALUE)])),
        ("report over 4096 bytes", _envelope(b"\x00" * 4097, [(KEYID, VALUE)])),
        ("no signature", _envelope(b"\x30\x00", [])),
        ("nine signatures", _envelope(b"\x30\x00", [(KEYID, VALUE)] * 9)),
        ("key id of 63 characters", _envelope(b"\x30\x00", [(KEYID[:-1], VALUE)])),
        ("key id with a control character", _envelope(b"\x30\x00", [(b"\n" + KEYID[1:], VALUE)])),
        ("empty signature value", _envelope(b"\x30\x00", [(KEYID, b"")])),
        ("signature value over 512 bytes", _envelope(b"\x30\x00", [(KEYID, b"\x01" * 513)])),
        ("report with a universal tag", b"\x30\x06\x04\x00\xa1\x02\x30\x00"),
        ("oversize", b"\x30" + _der_length(MAX_REPORT_SIZE) + b"\x00" * MAX_REPORT_SIZE),
    ]


@pytest.mark.parametrize(("what", "data"), _refusals(), ids=[w for w, _ in _refusals()])
def test_refuses_what_the_module_or_der_forbids(what: str, data: bytes) -> None:
    with pytest.raises(CodecError):
        split_signed_report(data)


@settings(max_examples=400, deadline=None)
@given(
    n=st.integers(1, 3),
    cut=st.integers(0, 400),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=3),
    insert=st.binary(max_size=3),
)
def test_never_more_lenient_than_the_codec(
    n: int, cut: int, flips: list[tuple[int, int]], insert: bytes
) -> None:
    data = bytearray(_signed(n).to_der())
    for where, byte in flips:
        data[where % len(data)] = byte
    pos = cut % (len(data) + 1)
    mutated = bytes(data[:pos] + insert + data[pos:])
    try:
        mine = split_signed_report(mutated)
    except CodecError:
        return
    assert mine == _by_codec(mutated)  # the codec accepts it too, with the same values
