"""DER codec of the primary/secondary messages (DESIGN 4; uptane/asn1/uptane.asn)."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uptane import codec
from uptane.errors import CodecError
from uptane.manifest import RESULT_CODES

# --- strategies for every SecondaryMessage alternative ------------------------

_visible = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1)
identifiers = _visible.filter(lambda s: len(s) <= 128).map(lambda s: s[:128])
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
filenames = st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40)
lengths = st.integers(0, 2**32 - 1)
nonces = st.binary(max_size=32)
result_codes = st.sampled_from(RESULT_CODES)
hashes = st.lists(
    st.fixed_dictionaries(
        {
            "function": st.sampled_from(["sha256", "sha512", "blake2b"]),
            "digest": st.binary(min_size=16, max_size=64),
        }
    ),
    min_size=1,
    max_size=4,
)
image_infos = st.fixed_dictionaries(
    {
        "filename": filenames,
        "length": lengths,
        "hashes": hashes,
        "releaseCounter": st.integers(0, 2**63 - 1),
    }
)
signed_blobs = st.binary(min_size=1, max_size=300)

MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "infoRequest": st.fixed_dictionaries({"protocolVersion": st.integers(0, 255)}),
    "infoResponse": st.fixed_dictionaries(
        {
            "ecuSerial": identifiers,
            "hardwareId": identifiers,
            "keyType": st.sampled_from(["ed25519", "ecdsa"]),
            "scheme": st.sampled_from(["ed25519", "ecdsa-sha2-nistp256"]),
            "publicKey": st.binary(min_size=1, max_size=100),
            "protocolVersion": st.integers(0, 255),
            "verificationMode": st.sampled_from(["partial", "full"]),
            "freeSlotSize": lengths,
        }
    ),
    "versionReportRequest": st.fixed_dictionaries({"nonce": nonces}),
    "versionReportResponse": st.fixed_dictionaries({"signedReport": signed_blobs}),
    "metadataPush": st.fixed_dictionaries(
        {
            "repository": st.sampled_from(["director", "image"]),
            "role": st.sampled_from(["root", "targets"]),
            "version": st.integers(1, 2**31 - 1),
            "der": signed_blobs,
        }
    ),
    "ack": st.fixed_dictionaries({"code": result_codes, "text": texts}),
    "imageOffer": st.fixed_dictionaries({"image": image_infos}),
    "imageChunk": st.fixed_dictionaries(
        {"offset": lengths, "data": st.binary(min_size=1, max_size=500)}
    ),
    "chunkAck": st.fixed_dictionaries({"code": result_codes, "nextOffset": lengths}),
    "installRequest": st.fixed_dictionaries({"filename": filenames}),
    "installResult": st.fixed_dictionaries(
        {"code": result_codes, "text": texts, "signedReport": signed_blobs}
    ),
    "timeMessage": st.fixed_dictionaries(
        {"time": st.integers(0, 253402300799)},
        optional={
            "nonce": st.binary(min_size=16, max_size=32),
            "signatures": st.lists(
                st.fixed_dictionaries(
                    {
                        "keyid": st.text("0123456789abcdef", min_size=64, max_size=64),
                        "value": st.binary(min_size=1, max_size=80),
                    }
                ),
                min_size=1,
                max_size=2,
            ),
        },
    ),
    "timeNonceRequest": st.fixed_dictionaries({"protocolVersion": st.integers(0, 255)}),
    "timeNonceResponse": st.fixed_dictionaries({"nonce": st.binary(min_size=16, max_size=32)}),
}

messages = st.sampled_from(sorted(MESSAGES)).flatmap(
    lambda kind: st.tuples(st.just(kind), MESSAGES[kind])
)


def test_every_alternative_has_a_strategy() -> None:
    alternatives = {m.name for m in codec.spec().types[codec.MESSAGE_TYPE].type.members}
    assert alternatives == set(MESSAGES)


@settings(max_examples=200, deadline=None)
@given(messages)
def test_message_round_trip(message: tuple[str, Any]) -> None:
    kind, value = message
    data = codec.encode_message(kind, value)
    assert codec.decode_message(data) == (kind, value)
    assert codec.expect_message(data, kind) == value
    # DER is deterministic: decoding and re-encoding gives the same bytes.
    assert codec.encode_message(*codec.decode_message(data)) == data


def test_expect_message_refuses_other_kind() -> None:
    data = codec.encode_message("timeMessage", {"time": 5})
    with pytest.raises(CodecError, match="expected a ack message, got timeMessage"):
        codec.expect_message(data, "ack")


def test_decode_refuses_trailing_bytes() -> None:
    data = codec.encode_message("timeMessage", {"time": 5})
    assert codec.decode_message(data) == ("timeMessage", {"time": 5})
    with pytest.raises(CodecError, match="trailing bytes"):
        codec.decode_message(data + b"\x00")
    with pytest.raises(CodecError, match="trailing bytes"):
        codec.decode_message(data + data)


def test_decode_refuses_oversize_before_parsing() -> None:
    data = codec.encode_message("imageChunk", {"offset": 0, "data": b"x" * 100})
    assert codec.decode_message(data, max_size=len(data))[0] == "imageChunk"
    with pytest.raises(CodecError, match="exceeds the limit"):
        codec.decode_message(data, max_size=len(data) - 1)
    # Garbage over the limit is refused for its size, not parsed.
    with pytest.raises(CodecError, match="exceeds the limit"):
        codec.decode_message(b"\xff" * (codec.DEFAULT_MAX_MESSAGE + 1))


def test_decode_refuses_empty_and_non_bytes() -> None:
    with pytest.raises(CodecError, match="empty"):
        codec.decode_message(b"")
    with pytest.raises(CodecError, match="expected bytes"):
        codec.decode_message("not bytes")  # type: ignore[arg-type]
    # bytearray and memoryview are accepted.
    data = codec.encode_message("timeMessage", {"time": 1})
    assert codec.decode_message(bytearray(data)) == ("timeMessage", {"time": 1})
    assert codec.decode_message(memoryview(data)) == ("timeMessage", {"time": 1})


def test_decode_refuses_truncated_and_lying_lengths() -> None:
    data = codec.encode_message("ack", {"code": "ok", "text": "fine"})
    for cut in range(1, len(data)):
        with pytest.raises(CodecError):
            codec.decode_message(data[:cut])
    # A header announcing 4 GiB with 2 bytes behind it.
    with pytest.raises(CodecError):
        codec.decode_message(b"\x30\x84\xff\xff\xff\xff\x00\x00")


@pytest.mark.parametrize(
    ("kind", "value", "needle"),
    [
        ("infoRequest", {"protocolVersion": 256}, "protocolVersion"),
        ("versionReportRequest", {"nonce": b"n" * 33}, "nonce"),
        ("timeMessage", {"time": -1}, "time"),
        ("timeMessage", {"time": 253402300800}, "time"),
        ("metadataPush", {"repository": "director", "role": "", "version": 1, "der": b"x"}, "role"),
        (
            "metadataPush",
            {"repository": "director", "role": "r", "version": 0, "der": b"x"},
            "version",
        ),
        ("imageChunk", {"offset": 0, "data": b""}, "data"),
        ("installRequest", {"filename": ""}, "filename"),
        ("ack", {"code": "ok", "text": "t" * 513}, "text"),
        (
            "infoResponse",
            {
                "ecuSerial": "a\x01",  # a control character is not a VisibleString
                "hardwareId": "hw",
                "keyType": "ed25519",
                "scheme": "ed25519",
                "publicKey": b"k",
                "protocolVersion": 1,
                "verificationMode": "full",
                "freeSlotSize": 1,
            },
            "ecuSerial",
        ),
    ],
)
def test_constraint_violations_refused_both_ways(kind: str, value: Any, needle: str) -> None:
    with pytest.raises(CodecError, match=needle):
        codec.encode_message(kind, value)
    # The same value encoded without constraint checks is refused on decode.
    raw = bytes(codec.spec().encode(codec.MESSAGE_TYPE, (kind, value), check_constraints=False))
    with pytest.raises(CodecError, match=needle):
        codec.decode_message(raw)


def test_unknown_enumeration_value_refused() -> None:
    data = bytearray(codec.encode_message("ack", {"code": "noUpdate", "text": ""}))
    # ack is [5] { code [0] ENUMERATED, text [1] }: the enumeration is 80 01 0b.
    index = data.index(bytes([0x80, 0x01, 11]))
    data[index + 2] = 99
    with pytest.raises(CodecError):
        codec.decode_message(bytes(data))


def test_unknown_choice_alternative_refused() -> None:
    data = bytearray(codec.encode_message("timeMessage", {"time": 5}))
    assert data[0] == 0xAB  # [11] constructed
    data[0] = 0xBE  # [30]: no such alternative
    with pytest.raises(CodecError):
        codec.decode_message(bytes(data))


def test_encode_refuses_bad_values() -> None:
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode_message("noSuchMessage", {})
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode_message("timeMessage", {})
    with pytest.raises(CodecError, match="cannot encode"):
        codec.encode_message("timeMessage", {"time": "soon"})


def test_spec_is_compiled_once() -> None:
    assert codec.spec() is codec.spec()


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging (SIGALRM; the suite runs on Linux)."""

    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still decoding after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_sequence_of_element_with_wrong_tag_is_refused_not_looped() -> None:
    # imageOffer { image { filename, length, hashes SEQUENCE OF Hash, ... } }:
    # give the one Hash element a wrong tag. Plain asn1tools DER loops forever
    # here (eerimoq/asn1tools#180); the codec must refuse it.
    value = {
        "image": {
            "filename": "a",
            "length": 1,
            "hashes": [{"function": "sha256", "digest": b"\x00" * 32}],
            "releaseCounter": 1,
        }
    }
    data = bytearray(codec.encode_message("imageOffer", value))
    index = data.index(b"\x30\x2a\x80\x06sha256")  # the Hash SEQUENCE
    data[index] = 0xA1
    with _deadline(10), pytest.raises(CodecError, match="tag"):
        codec.decode_message(bytes(data))


def test_non_canonical_der_refused() -> None:
    data = codec.encode_message("timeMessage", {"time": 5})
    assert data == bytes.fromhex("ab03800105")
    # Long-form length where the short form fits.
    with pytest.raises(CodecError, match="canonical"):
        codec.decode_message(bytes.fromhex("ab8103800105"))
    # INTEGER with a superfluous leading zero octet.
    with pytest.raises(CodecError, match="canonical"):
        codec.decode_message(bytes.fromhex("ab0480020005"))
    # Indefinite length (BER only).
    with pytest.raises(CodecError):
        codec.decode_message(bytes.fromhex("ab808001050000"))


def test_result_codes_match_the_asn1_enumeration() -> None:
    """``uptane.manifest.RESULT_CODES`` is the ResultCode ENUMERATED, in order."""
    decoded = [codec.decode("ResultCode", bytes([0x0A, 1, i])) for i in range(len(RESULT_CODES))]
    assert decoded == list(RESULT_CODES)
    with pytest.raises(CodecError):
        codec.decode("ResultCode", bytes([0x0A, 1, len(RESULT_CODES)]))


# --- shared member encodings (issue 16) ----------------------------------------

_plain_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None)
@given(objects=st.lists(st.dictionaries(st.sampled_from("abcd"), _plain_json), max_size=6))
def test_shared_member_encodings_give_asn1tools_own_bytes(objects: list[dict[str, Any]]) -> None:
    """Members that repeat (few keys, small values) reuse DER; every result is the plain one."""
    from uptane.der_values import _json_to_asn1

    # the same objects twice, and 1 / True / "1" side by side under one key
    values = [_json_to_asn1(o, "test") for o in [*objects, *objects]]
    values += [_json_to_asn1({"a": v}, "test") for v in (1, True, "1", [1], {"a": 1})]
    plain = [codec.encode("JsonValue", v) for v in values]
    with codec.shared_member_encodings():
        assert [codec.encode("JsonValue", v) for v in values] == plain
    assert [codec.encode("JsonValue", v) for v in values] == plain  # after the block too


def test_shared_member_encodings_reuse_within_the_block_only() -> None:
    value = ("object", [{"key": "limits", "value": ("array", [("integer", 4)])}])
    with codec.shared_member_encodings():
        codec.encode("JsonValue", value)
        shared = codec._SHARED.get()
        assert shared is not None
        assert list(shared.members.values()) == [codec.encode("JsonValue", value)[2:]]
        with codec.shared_member_encodings():  # a nested block starts empty
            inner = codec._SHARED.get()
            assert inner is not None and inner.members == {} and inner.size == 0
    assert codec._SHARED.get() is None


def test_only_outermost_members_are_kept_and_the_size_is_capped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Members inside a member are not looked up; past the byte cap nothing more is kept."""
    nested = (
        "object",
        [{"key": "a", "value": ("object", [{"key": "b", "value": ("integer", 1)}])}],
    )
    with codec.shared_member_encodings():
        codec.encode("JsonValue", nested)
        shared = codec._SHARED.get()
        assert shared is not None and [k[1][:12] for k in shared.members] == ["{'key': 'a',"]
    monkeypatch.setattr(codec, "MAX_SHARED_BYTES", 60)
    values = [("object", [{"key": "k", "value": ("string", f"value-{i}")}]) for i in range(8)]
    plain = [codec.encode("JsonValue", v) for v in values]
    with codec.shared_member_encodings():
        assert [codec.encode("JsonValue", v) for v in values] == plain
        shared = codec._SHARED.get()
        assert shared is not None and 0 < len(shared.members) < len(values)
        assert shared.size <= 60


def test_each_member_encoder_is_wrapped_once() -> None:
    """A JsonMember reached from several types (or a second pass) gets one wrapper."""
    compiled = codec.spec()
    for compiled_type in compiled.types.values():
        codec._share_json_members(compiled_type.type, set())
    value = ("object", [{"key": "k", "value": ("string", "v")}])
    with codec.shared_member_encodings():
        codec.encode("JsonValue", value)
        shared = codec._SHARED.get()
        assert shared is not None and len(shared.members) == 1
    wrapped: list[Any] = []

    def walk(node: Any, seen: set[int]) -> None:
        if node is None or id(node) in seen:
            return
        seen.add(id(node))
        if isinstance(node.__dict__.get("encode"), codec._SharedEncoder):
            wrapped.append(node.encode)
        for attr in ("root_members", "additions", "members"):
            for child in getattr(node, attr, None) or ():
                walk(child, seen)
        for attr in ("element_type", "inner"):
            walk(getattr(node, attr, None), seen)

    seen: set[int] = set()
    for compiled_type in compiled.types.values():
        walk(compiled_type.type, seen)
    assert wrapped
    assert not any(isinstance(w.encode, codec._SharedEncoder) for w in wrapped)
