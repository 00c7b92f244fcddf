"""DER of Director targets one target at a time (``uptane.der_targets``; issue 16).

``targets_signed_der`` must be byte for byte the whole encoding, reuse a
target's DER only for an equal ASN.1 value, and the primary's DER check
built on it must refuse what it refused before.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)

from uptane import codec, der_metadata
from uptane.der_targets import targets_signed_der
from uptane.errors import CodecError, MetadataError
from uptane.metadata import build_custom, set_vehicle_id
from uptane.verification.der import DerCache, verify_director_der
from uptane.verification.full import VerifiedRepository, verify_root_chain

EXPIRES = datetime(2031, 1, 1, tzinfo=UTC)


def _target(name: str, data: bytes, serial: str = "ecu-1", **custom: Any) -> TargetFile:
    t = TargetFile.from_data(name, data, ["sha256", "sha512"])
    t.unrecognized_fields["custom"] = build_custom(
        hardware_ids=["hw-a"], release_counter=1, ecu_serial=serial
    ) | dict(custom)
    return t


def _targets(*targets: TargetFile, **fields: Any) -> Targets:
    signed = Targets(expires=EXPIRES, targets={t.path: t for t in targets}, **fields)
    set_vehicle_id(signed, "VIN-1")
    return signed


def _whole(signed: Targets) -> bytes:
    return der_metadata.DERSignedSerializer().serialize(signed)


def _delegating() -> Targets:
    key = CryptoSigner.generate_ed25519().public_key
    role = DelegatedRole("acme", [key.keyid], 1, True, paths=["apps/*"])
    signed = _targets(_target("apps/a.wasm", b"a"))
    signed.delegations = Delegations(keys={key.keyid: key}, roles={"acme": role})
    return signed


def _succinct() -> Targets:
    key = CryptoSigner.generate_ed25519().public_key
    succinct = SuccinctRoles([key.keyid], 1, 4, "bin")
    signed = _targets(_target("b.wasm", b"b"), unrecognized_fields={"note": ["x", 1, None]})
    signed.delegations = Delegations(keys={key.keyid: key}, succinct_roles=succinct)
    return signed


@pytest.mark.parametrize(
    "make",
    [
        lambda: _targets(),
        lambda: _targets(_target("a.wasm", b"a")),
        lambda: _targets(*(_target(f"app-{i:03d}.wasm", bytes([i]), f"e{i}") for i in range(40))),
        _delegating,
        _succinct,
    ],
)
@pytest.mark.parametrize("check_constraints", [True, False])
def test_targets_signed_der_is_the_whole_encoding(make: Any, check_constraints: bool) -> None:
    signed = make()
    der, pieces = targets_signed_der(signed, check_constraints=check_constraints)
    assert der == _whole(signed)
    assert list(pieces) == sorted(signed.targets)
    assert [codec.decode("TufTargetFile", p[1])["path"] for p in pieces.values()] == list(pieces)
    assert targets_signed_der(signed, pieces)[0] == der  # all reused: still the same bytes


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(customs=st.lists(_json, min_size=1, max_size=5), changed=st.lists(_json, max_size=5))
def test_pieces_reused_only_for_equal_values(customs: list[Any], changed: list[Any]) -> None:
    """Any change of any target's content, a boolean for an integer included, is encoded."""
    old = _targets(*(_target(f"t{i}", b"x", note=c) for i, c in enumerate(customs)))
    _, pieces = targets_signed_der(old)
    new = copy.deepcopy(old)
    for i, c in enumerate(changed[: len(customs)]):
        new.targets[f"t{i}"].unrecognized_fields["custom"]["note"] = c
    der, new_pieces = targets_signed_der(new, pieces)
    assert der == _whole(new)
    for value, piece in new_pieces.values():
        assert piece == codec.encode("TufTargetFile", value)


def test_a_boolean_is_not_taken_for_an_integer() -> None:
    old = _targets(_target("a.wasm", b"a", flag=1), _target("b.wasm", b"b", "ecu-2"))
    _, pieces = targets_signed_der(old)
    new = copy.deepcopy(old)
    new.targets["a.wasm"].unrecognized_fields["custom"]["flag"] = True
    assert new.targets["a.wasm"] == old.targets["a.wasm"]  # python-tuf says equal
    der, new_pieces = targets_signed_der(new, pieces)
    assert der == _whole(new) != _whole(old)
    assert new_pieces["b.wasm"][1] is pieces["b.wasm"][1]  # unchanged: reused
    assert new_pieces["a.wasm"][1] != pieces["a.wasm"][1]


def test_equal_custom_members_are_built_once_and_stay_apart_by_kind() -> None:
    """Each distinct ``custom`` member is built and encoded once (issue 16); ``1``,
    ``True``, ``"1"``, ``[1]`` and ``{"a": 1}`` are distinct members, each repeated."""
    notes = [1, True, "1", [1], {"a": 1}, 1, True, "1", [1], {"a": 1}]
    signed = _targets(*(_target(f"t{i}", b"x", f"e{i}", note=n) for i, n in enumerate(notes)))
    der, pieces = targets_signed_der(signed)
    assert der == _whole(signed)  # asn1tools' bytes for the whole, every member in place

    def member(i: int, key: str) -> Any:
        (found,) = (m for m in pieces[f"t{i}"][0]["custom"][1] if m["key"] == key)
        return found

    assert all(member(i, "note") is member(i + 5, "note") for i in range(5))
    assert len({id(member(i, "note")) for i in range(5)}) == 5
    assert all(member(i, "limits") is member(0, "limits") for i in range(10))
    assert len({id(member(i, "ecu_serial")) for i in range(10)}) == 10


def test_shared_custom_members_still_go_through_the_constraint_pass() -> None:
    """A member first encoded without constraints, then met where they are checked."""
    signed = _targets(_target("a.wasm", b"a", big=2**300), _target("b.wasm", b"b", "e2"))
    with codec.shared_member_encodings():  # as the Director signs a batch
        targets_signed_der(signed, check_constraints=False)
        with pytest.raises(der_metadata.DERSerializationError):
            targets_signed_der(signed)


# --- the primary's check with pieces held (uptane.verification.der) -----------------


def _director(
    signed: Targets, version: int
) -> tuple[VerifiedRepository, dict[int, bytes], bytes, dict[str, CryptoSigner]]:
    """A verified Director repository holding ``signed`` at ``version``, its DER root and targets."""
    keys = {r: CryptoSigner.generate_ed25519() for r in ("root", "targets")}
    root = Root(expires=EXPIRES + timedelta(days=1))
    for role, signer in keys.items():
        root.add_key(signer.public_key, role)
    root_md = Metadata(root)
    root_md.sign(keys["root"])
    signed.version = version
    roots = verify_root_chain((root_md.to_bytes(),), "director")
    director = VerifiedRepository("director", roots, Timestamp(), Snapshot(), signed)
    ders = {1: der_metadata.to_der_metadata(root_md, [keys["root"]])}
    return director, ders, der_metadata.to_der_metadata(Metadata(signed), [keys["targets"]]), keys


def test_der_check_with_held_pieces_still_refuses_a_changed_unchanged_target() -> None:
    """Pieces of the last version make no DER of the next one pass that differs from its JSON."""
    first = _targets(*(_target(f"app-{i}.wasm", bytes([i]), f"e{i}") for i in range(5)))
    director, roots, der, keys = _director(first, 2)
    cache = DerCache()
    verify_director_der(director, roots, der, cache=cache)
    held = dict(cache.target_pieces)
    assert len(held) == 5

    second = copy.deepcopy(first)
    second.targets["app-0.wasm"] = _target("app-0.wasm", b"new", "e0")
    second.version = 3
    director = replace(director, targets=second)
    # DER of the new version, but app-3 (unchanged in the JSON) one byte off, validly signed
    forged = copy.deepcopy(second)
    forged.targets["app-3.wasm"].length += 1
    bad = der_metadata.to_der_metadata(Metadata(forged), [keys["targets"]])
    with pytest.raises(MetadataError, match="same"):
        verify_director_der(director, roots, bad, cache=cache)
    good = der_metadata.to_der_metadata(Metadata(second), [keys["targets"]])
    assert verify_director_der(director, roots, good, cache=cache).targets == good
    assert cache.target_pieces["app-3.wasm"][1] is held["app-3.wasm"][1]  # reused
    assert cache.target_pieces["app-0.wasm"][1] != held["app-0.wasm"][1]


def test_a_broken_constraint_passes_the_primary_and_no_secondary() -> None:
    """The primary encodes the verified JSON without asn1tools' constraint pass (issue 16).

    A value that breaks a constraint of the DER form has no DER an honest
    Director makes; DER a Director key signs anyway says what the signed JSON
    says, so the primary's byte comparison passes it, and every secondary's
    decoder (``DERMetadataDeserializer``, constraints checked) refuses it.
    """
    good = _targets(_target("a.wasm", b"a"))
    director, roots, _, keys = _director(good, 2)
    bad = copy.deepcopy(good)
    bad.targets["a.wasm"].hashes = {"sha256": "ab" * 8}  # Hash.digest is SIZE(16..64)
    with pytest.raises(der_metadata.DERSerializationError):
        _whole(bad)
    signed_der, _ = targets_signed_der(bad, check_constraints=False)
    with pytest.raises(CodecError):
        targets_signed_der(bad)
    signature = keys["targets"].sign(signed_der)
    element = codec.encode(
        "Signature", {"keyid": signature.keyid, "value": bytes.fromhex(signature.signature)}
    )
    envelope = der_metadata.join_envelope(signed_der, [element])
    checked = verify_director_der(replace(director, targets=bad), roots, envelope)
    assert checked.targets == envelope
    with pytest.raises(
        der_metadata.DERDeserializationError, match="digest: Expected between 16 and 64"
    ):
        der_metadata.DERMetadataDeserializer().deserialize(envelope)
