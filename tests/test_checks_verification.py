"""Checks of full and partial verification that no other test kept (mutation review).

Each test here fails when the one check it names is removed from
``uptane.verification`` (Uptane 2.1, 5.4.4.1 and 5.4.4.2; TUF 5.3-5.6) and
passes with it: the checks a mutation review found unprotected.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.director_sim import T0, VIN, DirectorSim
from securesystemslib.signer import CryptoSigner
from test_verification_full import (
    NOW,
    MemoryFetcher,
    Repo,
    _same,
    _tlv,
    delegate,
    director_with_der,
    good_map,
    make_repo,
    ngclient_image,
    publish_image,
    refreshed,
    resign,
    verified,
)
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
)
from tuf.ngclient import Updater

from ecus.primary.config import DownloadPolicy
from ecus.primary.download import download_image, safe_target_path
from ecus.primary.stale import check_floor, check_stored, stored_files
from uptane import codec, der_metadata
from uptane.errors import ConfigError, MetadataError, MixAndMatchError
from uptane.verification.der import MAX_SIGNATURES, DerCache, verify_director_der
from uptane.verification.full import (
    RepositoryBytes,
    VerifiedRepository,
    classify_hash_error,
    verify_repository,
    verify_root_chain,
    verify_trusted,
)
from uptane.verification.matching import (
    MAX_MAP_SIZE,
    DelegationStep,
    RepositoryMap,
    find_image_target,
)
from uptane.verification.partial import (
    SecondaryIdentity,
    TrustedDirectorState,
    load_targets,
    verify,
)

PARTIAL_ME = SecondaryIdentity("ecu-1", "hw-a", VIN)

# --- full verification from bytes (verify_repository, 5.4.4.2) ---------------------


def _resigned(data: bytes, signer: Any, change: Any = None) -> bytes:
    """``data`` re-signed by ``signer`` alone, after ``change`` (if any) to its signed part."""
    md = Metadata.from_bytes(data)
    if change is not None:
        change(md.signed)
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def _with_role(data: RepositoryBytes, role: str, raw: bytes) -> RepositoryBytes:
    """``data`` with ``raw`` in place of ``role``'s file."""
    if role == Snapshot.type:
        return replace(data, snapshot=raw)
    if role == Targets.type:
        return replace(data, targets=raw)
    return replace(data, delegated={**data.delegated, role: raw})


def test_a_file_of_another_role_is_refused() -> None:
    """A snapshot served as the timestamp is a typed refusal, not a crash (type check)."""
    r = make_repo()
    data = r.data()
    with pytest.raises(tuf_exc.RepositoryError, match="expected timestamp, got snapshot"):
        verify_repository("x", replace(data, timestamp=data.snapshot), NOW)


def test_targets_that_snapshot_does_not_list_are_refused() -> None:
    r = make_repo()
    with r.repo.edit_snapshot() as snapshot:
        del snapshot.meta["targets.json"]
    r.repo.do_timestamp(force=True)
    with pytest.raises(tuf_exc.RepositoryError, match="targets is not listed by its index"):
        verify_repository("x", r.data(), NOW)


@pytest.mark.parametrize("role", [Snapshot.type, Targets.type])
def test_snapshot_and_targets_need_their_roles_keys(role: str) -> None:
    """Signed by a key the root does not give the role: refused even at the right version."""
    r = make_repo()
    data = r.data()
    forged = _resigned(getattr(data, role), CryptoSigner.generate_ed25519())
    with pytest.raises(tuf_exc.UnsignedMetadataError, match=role):
        verify_repository("x", _with_role(data, role, forged), NOW)


@pytest.mark.parametrize("role", [Snapshot.type, Targets.type, "supplier"])
def test_lengths_and_hashes_the_index_lists_are_checked(role: str) -> None:
    """Same version, other bytes, signed by the role's own key: not the file the index lists."""
    r = make_repo()
    r.repo.meta_hashes = True
    delegate(r, Targets.type, "supplier", ["*"])
    data = r.data(delegated=("supplier",))
    assert verify_repository("x", data, NOW).delegated.keys() == {"supplier"}
    delegations = r.repo.targets().delegations
    assert delegations is not None and delegations.roles is not None
    supplier_keyids = delegations.roles["supplier"].keyids
    supplier_key = next(s for k, s in r.repo.signers.items() if k in supplier_keyids)
    keys = {Snapshot.type: r.keys[Snapshot.type], Targets.type: r.keys[Targets.type]}
    raw = data.delegated[role] if role == "supplier" else getattr(data, role)
    later = NOW + timedelta(days=2)
    other = _resigned(raw, keys.get(role, supplier_key), lambda s: setattr(s, "expires", later))
    assert Metadata.from_bytes(other).signed.version == Metadata.from_bytes(raw).signed.version
    with pytest.raises(tuf_exc.LengthOrHashMismatchError):
        verify_repository("x", _with_role(data, role, other), NOW)


def test_an_empty_root_chain_is_a_typed_refusal() -> None:
    with pytest.raises(tuf_exc.RepositoryError, match="no root metadata"):
        verify_root_chain((), "x")


def test_a_new_root_needs_a_threshold_of_its_own_keys() -> None:
    """Root v2 signed by v1's root key only, while v2 names another root key (TUF 5.3.4)."""
    r = make_repo()
    first = r.data().root_chain[0]
    new_root_key = CryptoSigner.generate_ed25519()
    r.repo.add_signers([new_root_key])
    with r.repo.edit_root() as root:
        root.revoke_key(r.keys[Root.type].public_key.keyid, Root.type)
        root.add_key(new_root_key.public_key, Root.type)
    second = r.store.files["2.root.json"]
    assert len(verify_root_chain((first, second), "x")) == 2
    old_only = _resigned(second, r.keys[Root.type])
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_root_chain((first, old_only), "x")


def test_a_role_with_a_top_level_name_is_not_a_delegated_role() -> None:
    r = make_repo()
    data = r.data()
    with pytest.raises(tuf_exc.RepositoryError, match="cannot be a delegated role"):
        verify_repository("x", replace(data, delegated={Snapshot.type: data.targets}), NOW)


# --- the re-check over ngclient's trusted set (verify_trusted, 5.4.4.2) ------------


def _with_supplier(tmp: Path) -> tuple[Repo, VerifiedRepository]:
    r = make_repo()
    delegate(r, Targets.type, "supplier", ["apps/*"], ["hw-a"])
    publish_image(r, "supplier", "apps/x.wasm")
    return r, ngclient_image(r, tmp, "apps/x.wasm")


def test_verify_trusted_accepts_what_ngclient_trusted(tmp_path: Path) -> None:
    _, image = _with_supplier(tmp_path)
    again = verify_trusted("image", _same(image), image.roots, NOW)
    assert again.delegated.keys() == {"supplier"}
    assert again.edges == {(Targets.type, "supplier")}


def test_verify_trusted_needs_the_chain_to_end_at_the_trusted_root(tmp_path: Path) -> None:
    _, image = _with_supplier(tmp_path)
    other = make_repo()
    other_roots = verify_root_chain(other.data().root_chain, "other")
    with pytest.raises(tuf_exc.RepositoryError, match="does not end at the trusted root"):
        verify_trusted("image", _same(image), other_roots, NOW)


def test_verify_trusted_refuses_a_root_chain_with_a_gap(tmp_path: Path) -> None:
    r = make_repo()
    resign(r, Root.type)
    resign(r, Root.type)
    updater = refreshed(r, tmp_path)
    trusted = updater._trusted_set
    roots = verify_root_chain(r.data().root_chain, "image")
    assert [x.version for x in roots] == [1, 2, 3]
    assert verify_trusted("image", trusted, roots, NOW).root.version == 3
    with pytest.raises(tuf_exc.BadVersionNumberError, match="v3 does not follow v1"):
        verify_trusted("image", trusted, (roots[0], roots[2]), NOW)


def test_verify_trusted_refuses_a_snapshot_its_timestamp_does_not_name(tmp_path: Path) -> None:
    r, image = _with_supplier(tmp_path)
    resign(r, Snapshot.type)
    newer = ngclient_image(r, tmp_path / "newer", "apps/x.wasm")
    assert newer.snapshot.version > image.snapshot.version
    with pytest.raises(tuf_exc.BadVersionNumberError, match="snapshot"):
        verify_trusted("image", _same(image, timestamp_of=newer), image.roots, NOW)


def test_verify_trusted_refuses_a_delegated_role_its_snapshot_does_not_name(
    tmp_path: Path,
) -> None:
    r, image = _with_supplier(tmp_path)
    resign(r, "supplier")
    newer = ngclient_image(r, tmp_path / "newer", "apps/x.wasm")
    assert newer.delegated["supplier"].version > image.delegated["supplier"].version
    with pytest.raises(tuf_exc.BadVersionNumberError, match="supplier"):
        verify_trusted("image", _same(image, delegated_of=newer), image.roots, NOW)


def test_verify_trusted_refuses_a_role_no_trusted_delegator_delegates(tmp_path: Path) -> None:
    """The set claims top-level targets verified 'ghost', which targets does not delegate."""
    r, image = _with_supplier(tmp_path)
    ghost = replace(image, delegated={**image.delegated, "ghost": image.delegated["supplier"]})
    with r.repo.edit_snapshot() as snapshot:
        snapshot.meta["ghost.json"] = snapshot.meta["supplier.json"]
    r.repo.do_timestamp(force=True)
    listed = replace(ghost, snapshot=r.repo.snapshot(), timestamp=r.repo.timestamp())
    claims = frozenset({(Targets.type, "supplier"), (Targets.type, "ghost")})
    with pytest.raises(tuf_exc.RepositoryError, match=r"\['ghost'\] are not delegated"):
        verify_trusted("image", _same(listed, claims=claims), image.roots, NOW)


def test_a_role_outside_the_hash_bins_is_not_delegated_by_them() -> None:
    """TAP 15: succinct delegations delegate their bins only, not any role name."""
    r = make_repo()
    signer = CryptoSigner.generate_ed25519()
    succinct = SuccinctRoles([], 1, 1, "bin")
    with r.repo.edit_targets() as t:
        t.delegations = Delegations(keys={}, succinct_roles=succinct)
        t.add_key(signer.public_key)
    r.repo.publish(force=True)
    bin_name = succinct.get_role_for_target("apps/x.wasm")
    bin_md = Metadata(Targets(expires=NOW + timedelta(days=1)))
    bin_md.sign(signer)
    with r.repo.edit_snapshot() as snapshot:
        snapshot.meta[f"{bin_name}.json"] = MetaFile(version=1)
        snapshot.meta["ghost.json"] = MetaFile(version=1)
    r.repo.do_timestamp(force=True)
    data = r.data()
    image = verify_repository("image", replace(data, delegated={bin_name: bin_md.to_bytes()}), NOW)
    assert image.edges == {(Targets.type, bin_name)}
    with pytest.raises(tuf_exc.RepositoryError, match="not delegated by any trusted role"):
        verify_repository("image", replace(data, delegated={"ghost": bin_md.to_bytes()}), NOW)


def test_an_older_file_than_its_hashed_index_lists_is_named_a_rollback() -> None:
    """A length/hash mismatch of ``N.role.json`` (4.3.3): older bytes roll back, others mix."""
    r = make_repo()
    resign(r, Targets.type)
    v1, v2 = r.store.files["1.targets.json"], r.store.files["2.targets.json"]
    err = tuf_exc.LengthOrHashMismatchError("x")
    older = classify_hash_error(err, "2.targets.json", v1)
    assert isinstance(older, tuf_exc.BadVersionNumberError)
    assert not isinstance(older, MixAndMatchError)
    assert isinstance(classify_hash_error(err, "1.targets.json", v2), MixAndMatchError)
    assert isinstance(classify_hash_error(err, "2.targets.json", v2), MixAndMatchError)
    assert classify_hash_error(err, "timestamp.json", r.store.files["timestamp.json"]) is err
    assert classify_hash_error(err, None, None) is err


# --- partial verification on a secondary (5.4.4.1) --------------------------------


def test_partial_refuses_a_trusted_root_that_is_not_a_root() -> None:
    """The persisted state's root must be a root (type check before any key lookup)."""
    sim = DirectorSim()
    state = TrustedDirectorState(sim.targets_ders[1])
    with pytest.raises(tuf_exc.RepositoryError, match="expected root metadata"):
        verify(PARTIAL_ME, state, sim.targets_ders[1], T0, 0)


def test_load_targets_refuses_a_root() -> None:
    sim = DirectorSim()
    assert load_targets(sim.targets_ders[1]).version == 1
    with pytest.raises(tuf_exc.RepositoryError, match="expected targets metadata"):
        load_targets(sim.root_ders[1])


# --- DER forms the primary forwards (DESIGN 3) --------------------------------------


def _der_envelope(signed: bytes, entries: list[bytes]) -> bytes:
    """A DER ``Metadata``: ``signed`` and the given ``Signature`` elements, in order."""
    return _tlv(0x30, _tlv(0xA0, signed) + _tlv(0xA1, b"".join(entries)))


def _signature_entry(signer: Any, signed: bytes) -> bytes:
    sig = signer.sign(signed)
    value = {"keyid": sig.keyid, "value": bytes.fromhex(sig.signature)}
    return codec.encode("Signature", value)


def test_der_over_the_size_limit_is_refused() -> None:
    r, roots, targets = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    limit = max(len(targets), *(len(d) for d in roots.values()))
    assert verify_director_der(verified, roots, targets, max_size=limit).targets == targets
    with pytest.raises(MetadataError, match="exceeds the limit"):
        verify_director_der(verified, roots, targets, max_size=len(targets) - 1)


def test_der_with_one_signature_twice_is_refused() -> None:
    """The same keyid twice: no secondary should be sent what counts a key twice."""
    r, roots, _ = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    signed = der_metadata.der_signed_bytes(r.repo.open(Targets.type).signed)
    entry = _signature_entry(r.keys[Targets.type], signed)
    assert verify_director_der(verified, roots, _der_envelope(signed, [entry])).targets_version
    with pytest.raises(MetadataError, match="appears twice"):
        verify_director_der(verified, roots, _der_envelope(signed, [entry, entry]))


def test_der_with_more_signatures_than_the_schema_allows_is_refused() -> None:
    """``SEQUENCE (SIZE(0..64)) OF Signature``: a 65th is refused before any secondary sees it."""
    r, roots, _ = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    signed = der_metadata.der_signed_bytes(r.repo.open(Targets.type).signed)
    entries = [_signature_entry(r.keys[Targets.type], signed)]
    entries += [
        _signature_entry(CryptoSigner.generate_ed25519(), signed) for _ in range(MAX_SIGNATURES)
    ]
    assert verify_director_der(verified, roots, _der_envelope(signed, entries[:-1])).targets
    with pytest.raises(MetadataError, match=f"more than {MAX_SIGNATURES} signatures"):
        verify_director_der(verified, roots, _der_envelope(signed, entries))


def test_der_cache_does_not_take_another_roots_envelope() -> None:
    """A cached DER root v1 is reused only for the same JSON root v1, not any root v1."""
    a, a_roots, a_targets = director_with_der()
    b, b_roots, b_targets = director_with_der()
    cache = DerCache()
    verify_director_der(
        verify_repository("director", a.data(), NOW), a_roots, a_targets, cache=cache
    )
    b_verified = verify_repository("director", b.data(), NOW)
    with pytest.raises((MetadataError, tuf_exc.UnsignedMetadataError)):
        verify_director_der(b_verified, a_roots, b_targets, cache=cache)
    assert verify_director_der(b_verified, b_roots, b_targets, cache=cache).root_chain == (
        b_roots[1],
    )


# --- repository map (TAP 4) ----------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        good_map() | {"extra": 1},
        good_map() | {"repositories": {"director": [], "image": ["http://y"]}},
        good_map() | {"repositories": {"director": ["ftp://x"], "image": ["http://y"]}},
        good_map() | {"repositories": {"director": ["http://"], "image": ["http://y"]}},
        good_map() | {"mapping": []},
    ],
)
def test_repository_map_refuses_each_malformed_part(raw: Any) -> None:
    assert RepositoryMap.from_dict(good_map()).mapping
    with pytest.raises(ConfigError):
        RepositoryMap.from_dict(raw)


def test_repository_map_refuses_an_oversized_file() -> None:
    data = json.dumps(good_map()).encode()
    assert RepositoryMap.from_bytes(data).mapping
    padded = data[:-1] + b" " * MAX_MAP_SIZE + b"}"
    with pytest.raises(ConfigError, match="over"):
        RepositoryMap.from_bytes(padded)


# --- Image repository delegations (How to resolve delegations; 5.4.4.2 step 7) -----


def test_a_three_deep_delegation_is_checked_against_its_own_delegator() -> None:
    """targets -> a -> b -> c: 'c' must satisfy b's delegation (the one walked to it)."""
    r = make_repo()
    delegate(r, Targets.type, "a", ["apps/*"], ["hw-a"])
    delegate(r, "a", "b", ["apps/*"], ["hw-a"])
    delegate(r, "b", "c", ["apps/*"], ["hw-a"])
    image = publish_image(r, "c", "apps/x.wasm")
    found = find_image_target(verified(r), "apps/x.wasm")
    assert found is not None and found.target == image and found.role == "c"
    assert [step.role for step in found.chain] == ["a", "b", "c"]


def test_hash_bins_end_the_search_like_a_terminating_delegation() -> None:
    """TAP 15: succinct delegations are terminating: a later sibling is not searched."""
    r = make_repo()
    delegate(r, Targets.type, "binned", ["apps/*"])
    delegate(r, Targets.type, "later", ["apps/*"])
    publish_image(r, "later", "apps/x.wasm")
    signer = CryptoSigner.generate_ed25519()
    succinct = SuccinctRoles([], 1, 1, "bin")
    with r.repo.edit_targets("binned") as t:
        t.delegations = Delegations(keys={}, succinct_roles=succinct)
        t.add_key(signer.public_key)
    r.repo.publish(force=True)
    bin_name = succinct.get_role_for_target("apps/x.wasm")
    bin_md = Metadata(Targets(expires=NOW + timedelta(days=1)))  # lists nothing
    bin_md.sign(signer)
    with r.repo.edit_snapshot() as snapshot:
        snapshot.meta[f"{bin_name}.json"] = MetaFile(version=1)
    r.repo.do_timestamp(force=True)
    data = r.data(delegated=("binned", "later"))
    image = verify_repository(
        "image", replace(data, delegated={**data.delegated, bin_name: bin_md.to_bytes()}), NOW
    )
    assert find_image_target(image, "apps/x.wasm") is None
    without_bins = verify_repository("image", r.data(delegated=("later",)), NOW)
    assert without_bins.delegated.keys() == {"later"}


@pytest.mark.parametrize(
    ("custom", "message"),
    [(["hw-a"], "custom must be an object"), ({"hardware_ids": {"hw-a": True}}, "be a list")],
)
def test_a_malformed_delegation_hardware_field_is_not_taken_for_no_restriction(
    custom: Any, message: str
) -> None:
    """A delegation's custom fields that are not the documented shape refuse, not allow all."""
    role = DelegatedRole("acme", [], 1, False, paths=["*"], unrecognized_fields={"custom": custom})
    with pytest.raises(MetadataError, match=message):
        _ = DelegationStep("acme", role).hardware_ids
    fine = DelegatedRole("acme", [], 1, False, paths=["*"])
    assert DelegationStep("acme", fine).hardware_ids is None


# --- a refetched snapshot against the one set aside (TUF 5.5.5) ---------------------


def test_check_floor_refuses_a_fresh_snapshot_below_the_stored_one() -> None:
    r = make_repo()
    delegate(r, Targets.type, "supplier", ["*"])
    floor = verify_repository("x", r.data(delegated=("supplier",)), NOW).snapshot
    resign(r, Targets.type)
    fresh = verify_repository("x", r.data(delegated=("supplier",)), NOW)
    check_floor("image", floor, fresh)
    older = replace(fresh, snapshot=_snapshot_with(fresh.snapshot, version=floor.version - 1))
    with pytest.raises(tuf_exc.BadVersionNumberError, match="snapshot version"):
        check_floor("image", floor, older)
    dropped = _snapshot_with(fresh.snapshot)
    del dropped.meta["supplier.json"]
    with pytest.raises(tuf_exc.RepositoryError, match=r"no longer lists supplier\.json"):
        check_floor("image", floor, replace(fresh, snapshot=dropped))


def _snapshot_with(snapshot: Snapshot, **changes: Any) -> Snapshot:
    copied = Snapshot.from_dict(snapshot.to_dict())
    for name, value in changes.items():
        setattr(copied, name, value)
    return copied


# --- image download (5.4.4.2 step 8) ------------------------------------------------


def test_a_file_already_at_the_image_path_is_reused_only_when_its_hashes_match(
    tmp_path: Path,
) -> None:
    """Other bytes where the image goes (a torn write, a planted file) are downloaded over."""
    r = make_repo()
    data = b"\0asm\x01\0\0\0 the image"
    image = TargetFile.from_data("app.wasm", data, ["sha256"])
    resign(r, Targets.type, lambda t: t.targets.__setitem__(image.path, image))
    files = dict(r.store.files)
    files[f"{image.hashes['sha256']}.app.wasm"] = data
    fetcher = MemoryFetcher(files)
    updater = Updater(
        str(tmp_path / "metadata"),
        "http://repo/",
        target_base_url="http://repo/targets/",
        fetcher=fetcher,
        bootstrap=r.store.files["1.root.json"],
    )
    updater.refresh()
    info = updater.get_targetinfo("app.wasm")
    assert info is not None
    images = tmp_path / "images"
    images.mkdir()
    dest = safe_target_path(images, "app.wasm")
    dest.write_bytes(b"\0asm\x01\0\0\0 planted!!")
    assert len(dest.read_bytes()) == len(data)
    assert download_image(updater, info, DownloadPolicy(), images) == dest
    assert dest.read_bytes() == data
    # the right bytes are reused as they are: nothing to fetch
    del files[f"{image.hashes['sha256']}.app.wasm"]
    assert download_image(updater, info, DownloadPolicy(), images) == dest
    assert dest.read_bytes() == data


# --- delegation walk on verified keys only (issue 10, item 10) ----------------------


def _shared_signed_for_targets_only() -> Repo:
    """'shared' is delegated by top-level targets (apps/*) and by 'vendor' (other/*, with
    another key), and signed with top-level targets' key for it only."""
    r = make_repo()
    delegate(r, Targets.type, "shared", ["apps/*"], ["hw-a"])
    delegate(r, Targets.type, "vendor", ["vendor.wasm", "other/*"], ["hw-a"])
    vendor_key = CryptoSigner.generate_ed25519()  # never signs 'shared'
    with r.repo.edit_targets("vendor") as t:
        role = DelegatedRole("shared", [], 1, False, paths=["other/*"])
        t.delegations = Delegations(keys={}, roles={"shared": role})
        t.add_key(vendor_key.public_key, "shared")
    r.repo.publish(force=True)
    publish_image(r, "shared", "apps/x.wasm")
    publish_image(r, "shared", "other/x.wasm")
    publish_image(r, "vendor", "vendor.wasm")
    return r


def test_a_role_trusted_through_one_delegator_is_checked_for_each_other() -> None:
    """verify_repository: once 'shared' is trusted via targets, vendor's delegation to it
    is still checked against vendor's keys before a walk may follow it."""
    r = _shared_signed_for_targets_only()
    image = verify_repository("image", r.data(delegated=("shared", "vendor")), NOW)
    assert image.edges == {(Targets.type, "shared"), (Targets.type, "vendor")}
    found = find_image_target(image, "apps/x.wasm")
    assert found is not None and found.role == "shared"
    with pytest.raises(tuf_exc.UnsignedMetadataError, match="'vendor' delegates it to"):
        find_image_target(image, "other/x.wasm")  # targets -> vendor -> shared


def test_verify_trusted_takes_only_the_delegations_ngclient_verified(tmp_path: Path) -> None:
    """ngclient verified 'shared' for targets only: vendor's delegation to it is no edge."""
    r = _shared_signed_for_targets_only()
    image = ngclient_image(r, tmp_path, "apps/x.wasm", "vendor.wasm")
    assert image.delegated.keys() == {"shared", "vendor"}
    assert image.edges == {(Targets.type, "shared"), (Targets.type, "vendor")}
    with pytest.raises(tuf_exc.UnsignedMetadataError, match="'vendor' delegates it to"):
        find_image_target(image, "other/x.wasm")


def test_der_cache_reuses_a_root_only_after_the_same_predecessor() -> None:
    """A DER root v2 verified after root v1 is checked again after another v1 (TUF 5.3.4)."""
    r, roots, _ = director_with_der()
    resign(r, Root.type)
    v2 = r.repo.open(Root.type)
    ders = {**roots, 2: der_metadata.to_der_metadata(v2, [r.keys[Root.type]])}
    targets = der_metadata.to_der_metadata(r.repo.open(Targets.type), [r.keys[Targets.type]])
    director = verify_repository("director", r.data(), NOW)
    assert [x.version for x in director.roots] == [1, 2]
    cache = DerCache()
    verify_director_der(director, ders, targets, cache=cache)
    # another root v1, whose root key (not the one signing v2's DER) is another
    other_key = CryptoSigner.generate_ed25519()
    other_v1 = Root.from_dict(director.roots[0].to_dict())
    other_v1.revoke_key(r.keys[Root.type].public_key.keyid, Root.type)
    other_v1.add_key(other_key.public_key, Root.type)
    other_der = der_metadata.to_der_metadata(Metadata(other_v1), [other_key])
    other = replace(director, roots=(other_v1, director.roots[1]))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(other, {**ders, 1: other_der}, targets)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(other, {**ders, 1: other_der}, targets, cache=cache)


# --- stored metadata ngclient reused (TUF 5.5.2, 5.6.2) ------------------------------


def test_check_stored_fails_closed_on_a_stored_file_it_cannot_read(tmp_path: Path) -> None:
    r = make_repo()
    r.repo.meta_hashes = True
    resign(r, Targets.type)
    metadata = tmp_path / "metadata"
    updater = refreshed(r, metadata)
    trusted = updater._trusted_set
    stored = stored_files(metadata)
    assert {"snapshot.json", "targets.json"} <= stored
    check_stored(metadata, trusted, stored)
    (metadata / "snapshot.json").unlink()
    with pytest.raises(tuf_exc.RepositoryError, match="stored snapshot metadata is unreadable"):
        check_stored(metadata, trusted, stored)
