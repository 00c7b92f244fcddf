"""Checks of the DER codec that no other test protected (mutation review, DESIGN 3).

Each test here fails when one check in ``uptane.codec``, ``uptane.der_values``
or ``uptane.der_metadata`` is removed.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime

import pytest
from asn1tools.codecs import ber as ber_codec
from securesystemslib.signer import CryptoSigner, Signature
from tuf.api.metadata import (
    TOP_LEVEL_ROLE_NAMES,
    DelegatedRole,
    Delegations,
    Metadata,
    Role,
    Root,
    TargetFile,
    Targets,
)

from uptane import codec
from uptane.der_metadata import (
    DERMetadataDeserializer,
    DERMetadataSerializer,
    DERSerializationError,
    DERSignedSerializer,
    der_signed_bytes,
    join_envelope,
    split_envelope,
    to_der_metadata,
)
from uptane.errors import CodecError

EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)


def _targets_der(signer: CryptoSigner) -> bytes:
    targets = Targets(version=3, expires=EXPIRES)
    target = TargetFile.from_data("app.wasm", b"\0asm\x01\0\0\0", ["sha256"])
    targets.targets[target.path] = target
    return to_der_metadata(Metadata(targets), [signer])


def test_received_signed_bytes_belong_to_that_very_object_not_a_copy() -> None:
    """A copy of a decoded ``signed`` changed afterwards is encoded, never given the
    bytes received for the original (a signature over those must not cover the copy)."""
    signer = CryptoSigner.generate_ed25519()
    md = DERMetadataDeserializer().deserialize(_targets_der(signer))
    received = der_signed_bytes(md.signed)
    changed = copy.deepcopy(md.signed)
    changed.version += 1
    assert der_signed_bytes(changed) == DERSignedSerializer().serialize(changed) != received
    assert der_signed_bytes(md.signed) == received  # the original keeps what was received


def test_shared_member_encodings_count_what_they_keep() -> None:
    """``built_members``' ``room`` refuses past ``MAX_SHARED_BYTES`` (a bounded cache)."""
    assert codec.built_members() is None
    with codec.shared_member_encodings():
        shared = codec.built_members()
        assert shared is not None
        _store, room = shared
        assert room(codec.MAX_SHARED_BYTES - 10)
        assert not room(11)
        assert room(10)
        assert not room(1)
    assert codec.built_members() is None


def test_split_envelope_refuses_headers_with_other_tags() -> None:
    """``split_envelope`` reads only headers, but each must carry its ``Metadata`` tag."""
    data = _targets_der(CryptoSigner.generate_ed25519())
    signed, signatures = split_envelope(data)
    assert join_envelope(signed, signatures) == data
    outer = 1 + (data[1] & 0x7F if data[1] & 0x80 else 0) + 1  # where [0] signed starts
    assert data[outer] == 0xA0
    for at, tag in ((0, 0x31), (outer, 0xA2)):
        other = data[:at] + bytes((tag,)) + data[at + 1 :]
        with pytest.raises(CodecError, match="expected tag"):
            split_envelope(other)


def test_split_envelope_refuses_bytes_outside_its_elements() -> None:
    data = _targets_der(CryptoSigner.generate_ed25519())
    signed, signatures = split_envelope(data)
    with pytest.raises(CodecError, match="bytes after the envelope"):
        split_envelope(data + b"\x00")
    inner = _tlv(0xA0, signed) + _tlv(0xA1, b"".join(signatures)) + b"\x05\x00"
    with pytest.raises(CodecError, match="bytes after the signatures"):
        split_envelope(_tlv(0x30, inner))


def _tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + bytes(ber_codec.encode_length_definite(len(content))) + content


def test_root_roles_other_than_the_top_level_four_cannot_be_encoded() -> None:
    """An extra role in a root would be dropped from its DER form: refused instead."""
    signer = CryptoSigner.generate_ed25519()
    root = Root()
    for role in TOP_LEVEL_ROLE_NAMES:
        root.add_key(signer.public_key, role)
    DERSignedSerializer().serialize(root)  # the four roles: fine
    root.roles["mirror"] = Role([signer.public_key.keyid], 1)
    with pytest.raises(DERSerializationError, match="root roles"):
        DERSignedSerializer().serialize(root)
    del root.roles["mirror"], root.roles["timestamp"]
    with pytest.raises(DERSerializationError):
        DERSignedSerializer().serialize(root)


def test_delegations_naming_both_kinds_of_roles_cannot_be_encoded() -> None:
    """A field the DER form would drop (both kinds of roles given) is refused, not dropped."""
    key = CryptoSigner.generate_ed25519().public_key
    role = DelegatedRole("a", [key.keyid], 1, False, paths=["a/*"])
    targets = Targets(expires=EXPIRES)
    targets.delegations = Delegations({key.keyid: key}, roles={"a": role})
    DERSignedSerializer().serialize(targets)  # one kind: fine
    targets.delegations.unrecognized_fields["succinct_roles"] = {
        "keyids": [key.keyid],
        "threshold": 1,
        "bit_length": 1,
        "name_prefix": "bin",
    }
    with pytest.raises(DERSerializationError, match="exactly one of roles"):
        DERSignedSerializer().serialize(targets)
    del targets.delegations.unrecognized_fields["succinct_roles"]
    role.unrecognized_fields["path_hash_prefixes"] = ["ab"]
    with pytest.raises(DERSerializationError, match="exactly one of paths"):
        DERSignedSerializer().serialize(targets)


def test_signature_entries_the_der_form_cannot_hold_are_refused() -> None:
    """A signature filed under another keyid, or with fields of its own, is not encoded."""
    signer = CryptoSigner.generate_ed25519()
    md = DERMetadataDeserializer().deserialize(_targets_der(signer))
    keyid = signer.public_key.keyid
    sig = md.signatures[keyid]
    md.signatures[keyid] = Signature(keyid, sig.signature, {"note": "unsigned"})
    with pytest.raises(DERSerializationError, match="malformed signature entry"):
        DERMetadataSerializer().serialize(md)
    other = "0" * 64
    md.signatures = {other: Signature(keyid, sig.signature)}
    with pytest.raises(DERSerializationError, match="malformed signature entry"):
        DERMetadataSerializer().serialize(md)


def test_booleans_and_integers_are_not_taken_for_each_other() -> None:
    """JSON ``true`` is no version and ``1`` no boolean: the DER form would say otherwise."""
    flagged = Targets(version=True, expires=EXPIRES)  # python-tuf lets a bool through
    with pytest.raises(DERSerializationError, match="expected an integer, got bool"):
        DERSignedSerializer().serialize(flagged)
    signer = CryptoSigner.generate_ed25519()
    root = Root()
    for role in TOP_LEVEL_ROLE_NAMES:
        root.add_key(signer.public_key, role)
    root.consistent_snapshot = 1  # type: ignore[assignment]
    with pytest.raises(DERSerializationError, match="expected a boolean, got int"):
        DERSignedSerializer().serialize(root)


def test_a_string_where_a_list_belongs_is_refused_not_split_into_characters() -> None:
    """``paths: "a/*"`` (python-tuf keeps what it is given) is no list of three paths."""
    key = CryptoSigner.generate_ed25519().public_key
    role = DelegatedRole("a", [key.keyid], 1, False, paths=["a/*"])
    targets = Targets(expires=EXPIRES)
    targets.delegations = Delegations({key.keyid: key}, roles={"a": role})
    DERSignedSerializer().serialize(targets)
    role.paths = "a/*"  # type: ignore[assignment]
    with pytest.raises(DERSerializationError, match="expected a list, got str"):
        DERSignedSerializer().serialize(targets)
