"""DER form of TUF metadata (DESIGN 3): round trips, signatures, refusals."""

from __future__ import annotations

import functools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner, Key, SSlibKey
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError, SerializationError
from tuf.api.serialization.json import JSONSerializer

from uptane import codec, der_metadata
from uptane.der_metadata import (
    DERDeserializationError,
    DERMetadataDeserializer,
    DERMetadataSerializer,
    DERSerializationError,
    DERSignedSerializer,
    der_signed_bytes,
    to_der_metadata,
)
from uptane.errors import CodecError
from uptane.metadata import UptaneTarget, build_custom, get_vehicle_id, set_vehicle_id

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)
POOL_SIZE = 4


@functools.cache
def pool() -> tuple[CryptoSigner, ...]:
    """A few ed25519 keys shared by all examples (generating keys per example is slow)."""
    return tuple(CryptoSigner.generate_ed25519() for _ in range(POOL_SIZE))


def _canonical(signed: Signed) -> bytes:
    text = encode_canonical(signed.to_dict())
    assert text is not None
    return text.encode()


def _der(md: Metadata[Any]) -> bytes:
    return md.to_bytes(DERMetadataSerializer())


def _from_der(data: bytes) -> Metadata[Any]:
    return Metadata.from_bytes(data, DERMetadataDeserializer())


# --- strategies ---------------------------------------------------------------

texts = st.text(st.characters(codec="utf-8"), max_size=12)
nonempty_texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
big_ints = st.integers(-(2**255), 2**255 - 1)
json_leaves = st.none() | st.booleans() | big_ints | st.integers(-10, 10) | texts
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=12,
)
# Unrecognized fields: any JSON under names that are not TUF field names.
unrecognized = st.dictionaries(texts.map(lambda s: "x-" + s), json_values, max_size=2)
versions = st.integers(1, 2**63 - 1)
lengths = st.integers(0, 2**63 - 1)
expiries = st.integers(0, 253402300799).map(lambda t: datetime.fromtimestamp(t, UTC))
spec_versions = st.sampled_from(["1.0.31", "1.0", "1.2.3", "1.31.0"])
digests = st.binary(min_size=16, max_size=64).map(bytes.hex)
hashes = st.dictionaries(
    st.sampled_from(["sha256", "sha512", "sha384", "blake2b-256"]), digests, min_size=1, max_size=4
)
identifiers = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._:-]{0,20}\Z")
key_indexes = st.lists(st.integers(0, POOL_SIZE - 1), max_size=POOL_SIZE, unique=True)


@st.composite
def keys(draw: st.DrawFn) -> list[Key]:
    """Copies of the pool's public keys, some with unrecognized fields."""
    out: list[Key] = []
    for signer in pool():
        k = signer.public_key
        out.append(SSlibKey(k.keyid, k.keytype, k.scheme, dict(k.keyval), draw(unrecognized)))
    return out


@st.composite
def uptane_customs(draw: st.DrawFn) -> Any:
    custom = build_custom(
        hardware_ids=draw(st.lists(identifiers, min_size=1, max_size=3, unique=True)),
        release_counter=draw(st.integers(0, 2**63 - 1)),
        ecu_serial=draw(st.none() | identifiers),
    )
    return custom | draw(st.dictionaries(texts.map(lambda s: "x-" + s), json_values, max_size=2))


@st.composite
def target_files(draw: st.DrawFn, path: str) -> TargetFile:
    fields = draw(unrecognized)
    if draw(st.booleans()):
        fields["custom"] = draw(uptane_customs() | json_values)
    return TargetFile(draw(lengths), draw(hashes), path, fields)


@st.composite
def delegations(draw: st.DrawFn) -> Delegations:
    pool_keys = draw(keys())
    chosen = draw(key_indexes)
    dkeys = {pool_keys[i].keyid: pool_keys[i] for i in chosen}

    def keyids() -> list[str]:
        return [pool_keys[i].keyid for i in draw(key_indexes)]

    if draw(st.booleans()):
        succinct = SuccinctRoles(
            keyids(),
            draw(st.integers(1, 3)),
            draw(st.integers(1, 32)),
            draw(texts),
            draw(unrecognized),
        )
        return Delegations(dkeys, succinct_roles=succinct, unrecognized_fields=draw(unrecognized))
    names = draw(
        st.lists(
            nonempty_texts.filter(lambda n: n not in TOP_LEVEL_ROLE_NAMES), max_size=3, unique=True
        )
    )
    roles = {}
    for name in names:
        patterns = draw(st.lists(texts, max_size=3))
        use_paths = draw(st.booleans())
        roles[name] = DelegatedRole(
            name,
            keyids(),
            draw(st.integers(1, 3)),
            draw(st.booleans()),
            paths=patterns if use_paths else None,
            path_hash_prefixes=None if use_paths else patterns,
            unrecognized_fields=draw(unrecognized),
        )
    return Delegations(dkeys, roles=roles, unrecognized_fields=draw(unrecognized))


@st.composite
def targets(draw: st.DrawFn) -> Targets:
    paths = draw(st.lists(nonempty_texts, max_size=4, unique=True))
    files = {p: draw(target_files(p)) for p in paths}
    fields = draw(unrecognized)
    if draw(st.booleans()):  # Director targets carry the vehicle id (custom.vin)
        fields["custom"] = {"vin": draw(identifiers)} | draw(
            st.dictionaries(texts.map(lambda s: "x-" + s), json_values, max_size=2)
        )
    return Targets(
        draw(versions),
        draw(spec_versions),
        draw(expiries),
        files,
        draw(st.none() | delegations()),
        fields,
    )


@st.composite
def roots(draw: st.DrawFn) -> Root:
    root = Root(
        draw(versions),
        draw(spec_versions),
        draw(expiries),
        consistent_snapshot=draw(st.none() | st.booleans()),
        unrecognized_fields=draw(unrecognized),
    )
    pool_keys = draw(keys())
    for role in TOP_LEVEL_ROLE_NAMES:
        for i in draw(key_indexes):
            root.add_key(pool_keys[i], role)
        root.roles[role].threshold = draw(st.integers(1, 3))
        root.roles[role].unrecognized_fields = draw(unrecognized)
    return root


@st.composite
def metafiles(draw: st.DrawFn) -> MetaFile:
    return MetaFile(
        draw(versions),
        draw(st.none() | lengths),
        draw(st.none() | hashes),
        draw(unrecognized),
    )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    meta = draw(st.dictionaries(nonempty_texts.map(lambda n: n + ".json"), metafiles(), max_size=4))
    return Snapshot(draw(versions), draw(spec_versions), draw(expiries), meta, draw(unrecognized))


@st.composite
def timestamps(draw: st.DrawFn) -> Timestamp:
    return Timestamp(
        draw(versions), draw(spec_versions), draw(expiries), draw(metafiles()), draw(unrecognized)
    )


signeds = st.one_of(roots(), targets(), snapshots(), timestamps())


def _reorder(value: Any) -> Any:
    """The same JSON with every object's members in reverse insertion order."""
    if isinstance(value, dict):
        return {k: _reorder(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reorder(v) for v in value]
    return value


_CLASSES: dict[str, type[Signed]] = {
    "root": Root,
    "targets": Targets,
    "snapshot": Snapshot,
    "timestamp": Timestamp,
}


# --- round trips ---------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(signeds, st.lists(st.integers(0, POOL_SIZE - 1), max_size=3, unique=True))
def test_der_round_trip(signed: Signed, signer_indexes: list[int]) -> None:
    md: Metadata[Any] = Metadata(signed)
    for i in signer_indexes:
        md.sign(pool()[i], append=True, signed_serializer=DERSignedSerializer())
    der = _der(md)
    back = _from_der(der)
    assert type(back.signed) is type(signed)
    assert back.signed.to_dict() == signed.to_dict()
    # Stricter than dict equality (which has True == 1): the canonical JSON is equal.
    assert _canonical(back.signed) == _canonical(signed)
    assert back.signatures == md.signatures
    assert list(back.signatures) == list(md.signatures)
    # DER -> JSON -> DER is byte-identical.
    json_bytes = back.to_bytes(JSONSerializer())
    again: Metadata[Any] = Metadata.from_bytes(json_bytes)
    assert _der(again) == der
    assert der_signed_bytes(again.signed) == der_signed_bytes(signed)


@settings(max_examples=100, deadline=None)
@given(signeds)
def test_der_does_not_depend_on_member_order(signed: Signed) -> None:
    d = signed.to_dict()
    reordered = _CLASSES[d["_type"]].from_dict(_reorder(d))
    assert reordered == signed
    assert der_signed_bytes(reordered) == der_signed_bytes(signed)


def test_serializers_agree() -> None:
    targets = Targets(expires=EXPIRES)
    md: Metadata[Any] = Metadata(targets)
    signer = pool()[0]
    md.sign(signer, signed_serializer=DERSignedSerializer())
    assert der_signed_bytes(targets) == DERSignedSerializer().serialize(targets)
    assert _der(md) == to_der_metadata(md, [signer])
    # The signed part of the envelope is exactly der_signed_bytes(signed).
    assert der_signed_bytes(targets) in _der(md)


def _director_targets() -> Targets:
    targets = Targets(version=5, expires=EXPIRES)
    custom = build_custom(
        hardware_ids=["hw-a", "hw-b"],
        release_counter=9,
        ecu_serial="ecu-1",
        capabilities=["log", "sensor.read"],
    )
    targets.targets["apps/brake.wasm"] = TargetFile(
        4096, {"sha256": "ab" * 32, "sha512": "cd" * 64}, "apps/brake.wasm", {"custom": custom}
    )
    set_vehicle_id(targets, "VIN0001")
    return targets


def test_director_targets_uptane_fields_survive() -> None:
    signer = pool()[0]
    json_md: Metadata[Targets] = Metadata(_director_targets())
    json_md.sign(signer)
    back = _from_der(to_der_metadata(json_md, [signer]))
    assert get_vehicle_id(back.signed) == "VIN0001"
    target = back.signed.targets["apps/brake.wasm"]
    assert UptaneTarget.from_target_file(target, director=True) == UptaneTarget.from_target_file(
        json_md.signed.targets["apps/brake.wasm"], director=True
    )
    # to_der_metadata leaves the JSON metadata and its signatures alone.
    assert list(json_md.signatures) == [signer.public_key.keyid]


# --- the same keys verify both forms --------------------------------------------


@functools.cache
def _repo() -> tuple[Root, Metadata[Targets], bytes, bytes]:
    """A root (targets threshold 2), and targets signed as JSON and as DER."""
    s0, s1, s2, _ = pool()
    root = Root(expires=EXPIRES)
    for role in TOP_LEVEL_ROLE_NAMES:
        root.add_key(s2.public_key, role)
    root.add_key(s0.public_key, "targets")
    root.add_key(s1.public_key, "targets")
    root.roles["targets"].threshold = 2
    json_md: Metadata[Targets] = Metadata(_director_targets())
    json_md.sign(s0, append=True)
    json_md.sign(s1, append=True)
    json_bytes = json_md.to_bytes()
    der_bytes = to_der_metadata(json_md, [s0, s1])
    return root, json_md, json_bytes, der_bytes


def _verify_json(root: Root, data: bytes) -> Metadata[Any]:
    md: Metadata[Any] = Metadata.from_bytes(data)
    root.verify_delegate("targets", md.signed_bytes, md.signatures)
    return md


def _verify_der(root: Root, data: bytes) -> Metadata[Any]:
    md = _from_der(data)
    root.verify_delegate("targets", der_signed_bytes(md.signed), md.signatures)
    return md


def test_json_and_der_verify_with_the_same_keys() -> None:
    root, json_md, json_bytes, der_bytes = _repo()
    from_json = _verify_json(root, json_bytes)
    from_der = _verify_der(root, der_bytes)
    assert from_json.signed == from_der.signed
    assert set(from_json.signatures) == set(from_der.signatures)
    # The same through the Metadata API and per key.
    Metadata(root).verify_delegate("targets", from_der, DERSignedSerializer())
    for sig in from_der.signatures.values():
        root.get_key(sig.keyid).verify_signature(sig, der_signed_bytes(from_der.signed))
    # The two forms have different signatures: neither verifies the other's bytes.
    with pytest.raises(UnsignedMetadataError):
        root.verify_delegate("targets", der_signed_bytes(json_md.signed), json_md.signatures)
    with pytest.raises(UnsignedMetadataError):
        root.verify_delegate("targets", json_md.signed_bytes, from_der.signatures)


def test_der_below_threshold_or_wrong_key_refused() -> None:
    root, json_md, _, _ = _repo()
    s0, _, s2, s3 = pool()
    with pytest.raises(UnsignedMetadataError):
        _verify_der(root, to_der_metadata(json_md, [s0]))
    with pytest.raises(UnsignedMetadataError):
        _verify_der(root, to_der_metadata(json_md, [s2, s3]))
    with pytest.raises(UnsignedMetadataError):
        _verify_der(root, to_der_metadata(json_md, [s0, s0]))


def test_der_root_verifies_itself() -> None:
    root, *_ = _repo()
    signer = pool()[2]
    root_der = to_der_metadata(Metadata(root), [signer])
    md = _from_der(root_der)
    md.signed.verify_delegate("root", der_signed_bytes(md.signed), md.signatures)
    Metadata(root).verify_delegate("root", md, DERSignedSerializer())


def _signed_region(form: str, data: bytes, signed: Signed) -> tuple[int, int]:
    if form == "der":
        start = data.index(der_signed_bytes(signed))
        return start, start + len(der_signed_bytes(signed))
    start = data.index(b'"signed":')
    return start, len(data)


def _sig_hex_spans(data: bytes, md: Metadata[Any]) -> list[tuple[int, int]]:
    spans = []
    for sig in md.signatures.values():
        start = data.index(sig.signature.encode())
        spans.append((start, start + len(sig.signature)))
    return spans


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["json", "der"]),
    st.sampled_from(["signed", "anywhere"]),
    st.integers(0, 2**32),
    st.integers(0, 7),
)
def test_one_bit_change_fails_verification(form: str, region: str, where: int, bit: int) -> None:
    root, json_md, json_bytes, der_bytes = _repo()
    data = der_bytes if form == "der" else json_bytes
    start, end = (
        _signed_region(form, data, json_md.signed) if region == "signed" else (0, len(data))
    )
    index = start + where % (end - start)
    flipped = bytearray(data)
    flipped[index] ^= 1 << bit
    verify: Callable[[Root, bytes], Metadata[Any]] = _verify_der if form == "der" else _verify_json
    try:
        md = verify(root, bytes(flipped))
    except (DeserializationError, SerializationError, UnsignedMetadataError) as e:
        if form == "der":
            assert isinstance(e, DERDeserializationError | UnsignedMetadataError)
        return
    # Only known way through: JSON hex is case-insensitive, so flipping the 0x20
    # bit of a letter inside a signature's hex gives the same signature bytes.
    # The signed content is then unchanged. DER has no such slack.
    assert form == "json"
    assert bit == 5 and chr(data[index]) in "abcdef"
    assert any(a <= index < b for a, b in _sig_hex_spans(data, json_md))
    assert md.signed == json_md.signed


def test_every_bit_of_a_der_envelope_matters() -> None:
    root, *_ = _repo()
    snapshot_meta = MetaFile(3, 512, {"sha256": "ef" * 32})
    der_bytes = to_der_metadata(
        Metadata(Timestamp(7, expires=EXPIRES, snapshot_meta=snapshot_meta)), [pool()[2]]
    )

    def verify(data: bytes) -> None:
        md = _from_der(data)
        root.verify_delegate("timestamp", der_signed_bytes(md.signed), md.signatures)

    verify(der_bytes)
    for index in range(len(der_bytes)):
        for bit in range(8):
            flipped = bytearray(der_bytes)
            flipped[index] ^= 1 << bit
            with pytest.raises((DERDeserializationError, UnsignedMetadataError)):
                verify(bytes(flipped))


# --- refusals on decoding ------------------------------------------------------------


def _raw(md: Metadata[Any]) -> dict[str, Any]:
    """The asn1tools value of a DER envelope, for crafting bad encodings."""
    value: dict[str, Any] = codec.spec().decode(der_metadata.METADATA_TYPE, _der(md))
    return value


def _encode_raw(value: dict[str, Any]) -> bytes:
    return bytes(codec.spec().encode(der_metadata.METADATA_TYPE, value))


def _two_targets() -> Metadata[Targets]:
    targets = Targets(expires=EXPIRES)
    for name in ("a.wasm", "b.wasm"):
        targets.targets[name] = TargetFile(1, {"sha256": "00" * 32}, name, {"custom": {"k": 1}})
    md: Metadata[Targets] = Metadata(targets)
    md.sign(pool()[0], signed_serializer=DERSignedSerializer())
    return md


def test_unsorted_or_duplicate_entries_refused() -> None:
    md = _two_targets()
    value = _raw(md)
    assert _from_der(_encode_raw(value)).signed == md.signed
    files = value["signed"][1]["targets"]
    value["signed"][1]["targets"] = [files[1], files[0]]
    with pytest.raises(DERDeserializationError, match="not sorted or duplicated"):
        _from_der(_encode_raw(value))
    value["signed"][1]["targets"] = [files[0], files[0]]
    with pytest.raises(DERDeserializationError, match="not sorted or duplicated"):
        _from_der(_encode_raw(value))


def test_unsorted_json_object_refused() -> None:
    targets = Targets(expires=EXPIRES, unrecognized_fields={"custom": {"a": 1, "b": 2}})
    md: Metadata[Any] = Metadata(targets)
    value = _raw(md)
    kind, members = value["signed"][1]["custom"]
    assert kind == "object"
    value["signed"][1]["custom"] = ("object", [members[1], members[0]])
    with pytest.raises(DERDeserializationError, match="not sorted or duplicated"):
        _from_der(_encode_raw(value))


def test_empty_unrecognized_must_be_omitted() -> None:
    md: Metadata[Any] = Metadata(Timestamp(expires=EXPIRES))
    value = _raw(md)
    value["signed"][1]["unrecognized"] = []
    with pytest.raises(DERDeserializationError, match="must be omitted"):
        _from_der(_encode_raw(value))


def test_non_minimal_der_refused() -> None:
    md: Metadata[Any] = Metadata(Root(expires=EXPIRES, consistent_snapshot=True))
    der = _der(md)
    assert _from_der(der).signed == md.signed
    # BER allows any non-zero octet for TRUE; DER only 0xff.
    index = der.index(b"\x83\x01\xff")  # consistentSnapshot [3] BOOLEAN TRUE
    ber_true = der[: index + 2] + b"\x01" + der[index + 3 :]
    with pytest.raises(DERDeserializationError):
        _from_der(ber_true)
    # A length in more octets than needed.
    assert der[0] == 0x30 and der[1] < 0x80
    long_length = b"\x30\x81" + der[1:]
    with pytest.raises(DERDeserializationError, match="canonical"):
        _from_der(long_length)


def test_invalid_tuf_content_refused_by_python_tuf() -> None:
    md: Metadata[Any] = Metadata(Root(expires=EXPIRES))
    value = _raw(md)
    value["signed"][1]["specVersion"] = "2.0.0"
    with pytest.raises(DERDeserializationError, match="invalid TUF metadata"):
        _from_der(_encode_raw(value))

    keyid = pool()[0].public_key.keyid
    value = _raw(md)
    value["signed"][1]["roles"]["root"]["keyids"] = [keyid, keyid]
    with pytest.raises(DERDeserializationError, match="invalid TUF metadata"):
        _from_der(_encode_raw(value))

    targets = Targets(expires=EXPIRES)
    targets.delegations = Delegations(
        {}, roles={"role1": DelegatedRole("role1", [], 1, False, paths=["*"])}
    )
    value = _raw(Metadata(targets))
    value["signed"][1]["delegations"]["roles"][1][0]["name"] = "snapshot"
    with pytest.raises(DERDeserializationError, match="invalid TUF metadata"):
        _from_der(_encode_raw(value))


def test_bad_keyids_refused() -> None:
    md = _two_targets()
    value = _raw(md)
    value["signatures"][0]["keyid"] = "A" * 64
    with pytest.raises(DERDeserializationError, match="lowercase hex"):
        _from_der(_encode_raw(value))
    value["signatures"][0]["keyid"] = "a" * 63
    with pytest.raises(DERDeserializationError):
        _from_der(_encode_raw(value))


def test_decoded_json_depth_is_limited() -> None:
    deep: Any = 1
    for _ in range(der_metadata.MAX_JSON_DEPTH + 2):
        deep = [deep]
    md: Metadata[Any] = Metadata(Targets(expires=EXPIRES))
    value = _raw(md)
    as_asn1: Any = ("integer", 1)
    for _ in range(der_metadata.MAX_JSON_DEPTH + 2):
        as_asn1 = ("array", [as_asn1])
    value["signed"][1]["custom"] = as_asn1
    with pytest.raises(DERDeserializationError, match="nested deeper"):
        _from_der(_encode_raw(value))
    with pytest.raises(DERSerializationError, match="nested deeper"):
        der_signed_bytes(Targets(expires=EXPIRES, unrecognized_fields={"custom": deep}))


def test_deserialization_error_is_both_families() -> None:
    with pytest.raises(DERDeserializationError) as info:
        _from_der(b"\x30\x00")
    assert isinstance(info.value, CodecError)
    assert isinstance(info.value, DeserializationError)
    with pytest.raises(DERDeserializationError, match="trailing"):
        _from_der(_der(_two_targets()) + b"\x00")
    with pytest.raises(DERDeserializationError, match="empty"):
        _from_der(b"")


# --- refusals on encoding -------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: Targets(expires=EXPIRES, unrecognized_fields={"custom": {"f": 1.5}}), "float"),
        (lambda: Targets(expires=EXPIRES, unrecognized_fields={"custom": {1: "x"}}), "key"),
        (lambda: Targets(expires=EXPIRES, unrecognized_fields={"custom": 2**256}), "integer"),
        (lambda: Targets(expires=EXPIRES, unrecognized_fields={"x": b"raw"}), "bytes"),
        (
            lambda: Targets(expires=EXPIRES, targets={"a": TargetFile(1, {"sha256": "ABCD"}, "a")}),
            "lowercase hex",
        ),
        (
            lambda: Targets(expires=EXPIRES, targets={"a": TargetFile(1, {"sha256": "abc"}, "a")}),
            "lowercase hex",
        ),
        (
            lambda: Targets(
                expires=EXPIRES,
                targets={"a": TargetFile(1, {f"h{i}": "00" * 32 for i in range(5)}, "a")},
            ),
            "hashes",
        ),
        (lambda: Timestamp(expires=datetime(1969, 12, 31, tzinfo=UTC)), "expires"),
        (lambda: Snapshot(expires=EXPIRES, version=2**63), "version"),
    ],
)
def test_unencodable_metadata_refused(make: Callable[[], Signed], needle: str) -> None:
    signed = make()
    with pytest.raises(DERSerializationError, match=needle) as info:
        der_signed_bytes(signed)
    assert isinstance(info.value, SerializationError)
    assert isinstance(info.value, CodecError)
    md: Metadata[Any] = Metadata(signed)
    with pytest.raises(SerializationError):
        md.sign(pool()[0], signed_serializer=DERSignedSerializer())
    with pytest.raises(DERSerializationError):
        _der(md)


def test_unsigned_envelope_fields_and_bad_signatures_refused() -> None:
    md = _two_targets()
    md.unrecognized_fields["note"] = "unsigned"
    with pytest.raises(DERSerializationError, match="unrecognized"):
        _der(md)
    md = _two_targets()
    sig = next(iter(md.signatures.values()))
    sig.signature = sig.signature.upper()
    with pytest.raises(DERSerializationError, match="lowercase hex"):
        _der(md)


def test_to_der_metadata_needs_a_signer() -> None:
    with pytest.raises(ValueError, match="at least one signer"):
        to_der_metadata(Metadata(Targets(expires=EXPIRES)), [])
