"""Sans-IO full verification (Uptane 2.1, 5.4.4.2): bytes + reference time in.

Repositories are signed on demand in memory (``SigningRepository`` over a
``MemoryStore``); every check of ``uptane.verification`` has a test here that
fails if the check is removed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1tools.codecs import ber as ber_codec
from asn1tools.codecs.ber import encode_length_definite
from securesystemslib.signer import CryptoSigner, Signer
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
    Timestamp,
)
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from uptane import codec, der_metadata
from uptane.errors import (
    ConfigError,
    DelegationNotAllowedError,
    DelegationViolationError,
    DuplicateEcuError,
    HardwareIdMismatchError,
    MetadataError,
    MixAndMatchError,
    ReleaseCounterRollbackError,
    RootRotationError,
    TargetMismatchError,
    UnknownEcuError,
    UnsafeTargetPathError,
    VehicleIdMismatchError,
)
from uptane.metadata import UptaneTarget, build_custom, set_vehicle_id
from uptane.repository import ExpiryPolicy, MemoryStore, SigningRepository
from uptane.verification.der import DerCache, verify_director_der
from uptane.verification.director_checks import (
    check_director_targets,
    check_release_counter,
)
from uptane.verification.full import (
    RepositoryBytes,
    VerifiedRepository,
    check_expiry,
    classify_version_error,
    verify_repository,
    verify_root_chain,
    verify_trusted,
)
from uptane.verification.matching import (
    RepositoryMap,
    check_delegated_hardware,
    find_image_target,
    match_director_targets,
    match_target,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ROLES = (Root.type, Targets.type, Snapshot.type, Timestamp.type)
ECUS = {"primary": "gw", "ecu-a": "hw-a"}
VIN = "VIN-1"


@dataclass
class Repo:
    """An in-memory TUF repository signed on demand."""

    repo: SigningRepository
    store: MemoryStore
    keys: dict[str, Signer]

    def data(self, *, delegated: tuple[str, ...] = ()) -> RepositoryBytes:
        f = self.store.files
        root_version = self.repo.root().version
        snap = self.repo.snapshot()
        return RepositoryBytes(
            root_chain=tuple(f[f"{v}.root.json"] for v in range(1, root_version + 1)),
            timestamp=f["timestamp.json"],
            snapshot=f[f"{snap.version}.snapshot.json"],
            targets=f[f"{self.repo.targets().version}.targets.json"],
            delegated={r: f[f"{self.repo.targets(r).version}.{r}.json"] for r in delegated},
        )


def make_repo(now: datetime = NOW, short_lived: str | None = None) -> Repo:
    """A repository; ``short_lived`` is the role that expires first (in an hour)."""
    keys: dict[str, Signer] = {r: CryptoSigner.generate_ed25519() for r in ROLES}
    store = MemoryStore()
    expiry = ExpiryPolicy(overrides=dict.fromkeys(ROLES, timedelta(days=30)))
    if short_lived is not None:
        expiry.overrides[short_lived] = timedelta(hours=1)
    repo = SigningRepository(store=store, clock=lambda: now, expiry=expiry)
    repo.add_signers(keys.values())
    with repo.edit_root() as root:
        for role, signer in keys.items():
            root.add_key(signer.public_key, role)
    with repo.edit_targets():
        pass
    repo.publish()
    return Repo(repo, store, keys)


def resign(r: Repo, role: str, mutate: Any = None) -> None:
    with r.repo.edit(role) as signed:
        if mutate is not None:
            mutate(signed)
    r.repo.publish(force=True)


def image_target(name: str = "app.wasm", data: bytes = b"image", counter: int = 1) -> TargetFile:
    t = TargetFile.from_data(name, data, ["sha256", "sha512"])
    t.unrecognized_fields["custom"] = build_custom(hardware_ids=["hw-a"], release_counter=counter)
    return t


def director_target(image: TargetFile, serial: str = "ecu-a", **changes: Any) -> TargetFile:
    custom = dict(image.custom) | {"ecu_serial": serial} | changes.pop("custom", {})
    t = TargetFile(
        length=changes.pop("length", image.length),
        hashes=changes.pop("hashes", dict(image.hashes)),
        path=changes.pop("path", image.path),
        unrecognized_fields={"custom": custom},
    )
    assert not changes
    return t


# --- verify_repository --------------------------------------------------------


def test_verify_repository_accepts_a_consistent_repository() -> None:
    r = make_repo()
    verified = verify_repository("x", r.data(), NOW)
    assert verified.targets.version == 1 and verified.root.version == 1


@pytest.mark.parametrize("role", [Root.type, Timestamp.type, Snapshot.type, Targets.type])
def test_verify_repository_rechecks_expiry_of_every_role(role: str) -> None:
    r = make_repo(short_lived=role)
    verify_repository("x", r.data(), NOW + timedelta(minutes=59))
    with pytest.raises(tuf_exc.ExpiredMetadataError, match=role):
        verify_repository("x", r.data(), NOW + timedelta(minutes=61))


def test_verify_repository_rechecks_expiry_of_delegated_roles() -> None:
    r = make_repo()
    signer = CryptoSigner.generate_ed25519()
    r.repo.add_signers([signer])
    with r.repo.edit_targets() as t:
        role = DelegatedRole("supplier", [], 1, True, paths=["*"])
        t.delegations = Delegations(keys={}, roles={"supplier": role})
        t.add_key(signer.public_key, "supplier")
    r.repo.expiry.overrides["supplier"] = timedelta(hours=1)
    with r.repo.edit_targets("supplier"):
        pass
    r.repo.publish(force=True)
    data = r.data(delegated=("supplier",))
    assert "supplier" in verify_repository("x", data, NOW).delegated
    with pytest.raises(tuf_exc.ExpiredMetadataError, match="supplier"):
        verify_repository("x", data, NOW + timedelta(hours=2))
    # signed by a key its delegator does not list
    forged = Metadata.from_bytes(data.delegated["supplier"])
    forged.signatures.clear()
    forged.sign(CryptoSigner.generate_ed25519())
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_repository("x", replace(data, delegated={"supplier": forged.to_bytes()}), NOW)
    # a delegated role nobody delegates is refused
    with pytest.raises(tuf_exc.RepositoryError, match="not delegated"):
        verify_repository("x", replace(data, delegated={"ghost": data.delegated["supplier"]}), NOW)


def test_verify_repository_refuses_bad_signature() -> None:
    r = make_repo()
    other = CryptoSigner.generate_ed25519()
    md = Metadata.from_bytes(r.store.files["timestamp.json"])
    md.signatures.clear()
    md.sign(other)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_repository("x", replace(r.data(), timestamp=md.to_bytes()), NOW)


def test_verify_repository_refuses_version_links_that_do_not_hold() -> None:
    r = make_repo()
    old = r.data()
    resign(r, Targets.type)
    new = r.data()
    with pytest.raises(tuf_exc.BadVersionNumberError, match="targets"):
        verify_repository("x", replace(new, targets=old.targets), NOW)
    with pytest.raises(tuf_exc.BadVersionNumberError, match="snapshot"):
        verify_repository("x", replace(new, snapshot=old.snapshot), NOW)


def test_verify_repository_refuses_broken_root_chain() -> None:
    r = make_repo()
    first = r.data().root_chain[0]
    new_root_key = CryptoSigner.generate_ed25519()
    # root v2 signed only by a new key: not by a threshold of root v1
    r.repo.signers = {new_root_key.public_key.keyid: new_root_key} | {
        k: s for k, s in r.repo.signers.items() if s is not r.keys[Root.type]
    }
    with r.repo.edit_root() as root:
        root.revoke_key(r.keys[Root.type].public_key.keyid, Root.type)
        root.add_key(new_root_key.public_key, Root.type)
    second = r.store.files["2.root.json"]
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_repository("x", replace(r.data(), root_chain=(first, second)), NOW)
    with pytest.raises(tuf_exc.BadVersionNumberError):
        verify_repository("x", replace(r.data(), root_chain=(second, first)), NOW)


def test_classify_version_error_names_mix_and_match_only_for_newer_files() -> None:
    r = make_repo()
    resign(r, Targets.type)
    v2 = r.store.files["2.targets.json"]
    v1 = r.store.files["1.targets.json"]
    err = tuf_exc.BadVersionNumberError("x")
    assert isinstance(classify_version_error(err, "1.targets.json", v2), MixAndMatchError)
    assert classify_version_error(err, "2.targets.json", v1) is err
    assert classify_version_error(err, "timestamp.json", r.store.files["timestamp.json"]) is err
    assert classify_version_error(err, None, None) is err


def test_classify_version_error_names_a_mislabelled_root_a_root_rotation_error() -> None:
    """``N.root.json`` carrying another version is never a mix-and-match (issue 10, item 7)."""
    r = make_repo()
    resign(r, Root.type)
    v1, v2 = r.store.files["1.root.json"], r.store.files["2.root.json"]
    err = tuf_exc.BadVersionNumberError("x")
    for filename, data in (("1.root.json", v2), ("2.root.json", v1)):
        named = classify_version_error(err, filename, data)
        assert isinstance(named, RootRotationError) and not isinstance(named, MixAndMatchError)
        assert isinstance(named, tuf_exc.BadVersionNumberError)


# --- Director checks -------------------------------------------------------------


def director_targets(*targets: TargetFile, vin: str | None = VIN) -> Targets:
    t = Targets(expires=NOW + timedelta(days=1), targets={x.path: x for x in targets})
    if vin is not None:
        set_vehicle_id(t, vin)
    return t


def test_director_checks_accept_good_targets() -> None:
    checked = check_director_targets(
        director_targets(director_target(image_target())), vin=VIN, ecu_hardware_ids=ECUS
    )
    assert checked.by_ecu["ecu-a"].name == "app.wasm"
    # non-empty targets without a VIN are bound by their ECU serials
    check_director_targets(
        director_targets(director_target(image_target()), vin=None), vin=VIN, ecu_hardware_ids=ECUS
    )


def test_director_checks_refuse_delegations() -> None:
    t = director_targets()
    t.delegations = Delegations(keys={}, roles={})
    with pytest.raises(DelegationNotAllowedError):
        check_director_targets(t, vin=VIN, ecu_hardware_ids=ECUS)


def test_director_checks_refuse_foreign_or_missing_vin() -> None:
    with pytest.raises(VehicleIdMismatchError):
        check_director_targets(director_targets(vin="OTHER"), vin=VIN, ecu_hardware_ids=ECUS)
    with pytest.raises(VehicleIdMismatchError):
        check_director_targets(director_targets(vin=None), vin=VIN, ecu_hardware_ids=ECUS)
    with pytest.raises(VehicleIdMismatchError):
        t = director_targets(director_target(image_target()), vin="OTHER")
        check_director_targets(t, vin=VIN, ecu_hardware_ids=ECUS)
    check_director_targets(director_targets(), vin=VIN, ecu_hardware_ids=ECUS)


def test_director_checks_refuse_unknown_and_duplicate_ecus() -> None:
    img = image_target()
    with pytest.raises(UnknownEcuError):
        check_director_targets(
            director_targets(director_target(img, "ecu-x")), vin=VIN, ecu_hardware_ids=ECUS
        )
    second = director_target(image_target("b.wasm"), "ecu-a")
    with pytest.raises(DuplicateEcuError):
        check_director_targets(
            director_targets(director_target(img), second), vin=VIN, ecu_hardware_ids=ECUS
        )


def test_director_checks_refuse_hardware_mismatch_and_bad_names() -> None:
    img = image_target()
    with pytest.raises(HardwareIdMismatchError):
        check_director_targets(
            director_targets(director_target(img, "primary")), vin=VIN, ecu_hardware_ids=ECUS
        )
    with pytest.raises(UnsafeTargetPathError):
        check_director_targets(
            director_targets(director_target(img, path="../x.wasm")), vin=VIN, ecu_hardware_ids=ECUS
        )
    no_serial = director_target(img)
    del no_serial.unrecognized_fields["custom"]["ecu_serial"]
    with pytest.raises(MetadataError):
        check_director_targets(director_targets(no_serial), vin=VIN, ecu_hardware_ids=ECUS)


def test_release_counter_must_not_go_down() -> None:
    target = UptaneTarget.from_target_file(director_target(image_target(counter=4)), director=True)
    check_release_counter(target, None)
    check_release_counter(target, 4)
    with pytest.raises(ReleaseCounterRollbackError):
        check_release_counter(target, 5)


# --- Director / Image agreement ----------------------------------------------------


def test_match_target_accepts_identical_targets() -> None:
    img = image_target()
    match_target(director_target(img), img)


@pytest.mark.parametrize(
    "changes",
    [
        {"length": 6},
        {"hashes": {"sha256": "0" * 64}},
        {"hashes": {"blake2b": "0" * 64}},
        {"custom": {"release_counter": 2}},
        {"custom": {"hardware_ids": ["hw-a", "hw-b"]}},
        {"custom": {"capabilities": ["log"]}},
    ],
)
def test_match_target_refuses_any_difference(changes: dict[str, Any]) -> None:
    img = image_target()
    with pytest.raises(TargetMismatchError):
        match_target(director_target(img, **changes), img)


def test_match_target_refuses_missing_or_renamed_image() -> None:
    img = image_target()
    with pytest.raises(TargetMismatchError, match="not in the Image"):
        match_target(director_target(img), None)
    with pytest.raises(TargetMismatchError):
        match_target(director_target(img), image_target("other.wasm", b"image"))


@pytest.mark.parametrize("custom", [None, "a string", ["hardware_ids"], 7])
def test_match_target_refuses_malformed_image_custom_with_a_typed_error(custom: Any) -> None:
    """Issue 10 item 11: a missing or non-object ``custom`` is a MetadataError, no crash."""
    img = image_target()
    bad = TargetFile(img.length, dict(img.hashes), img.path)
    if custom is not None:
        bad.unrecognized_fields["custom"] = custom
    with pytest.raises(MetadataError, match="custom must be an object"):
        match_target(director_target(img), bad)
    with pytest.raises(MetadataError, match="custom must be an object"):
        match_target(bad, img)


@pytest.mark.parametrize(
    "name", ["my app.wasm", "100%.wasm", "a@b.wasm", "~x/y.wasm", "_lead.wasm", "a\\b", "ü.wasm"]
)
def test_target_names_accept_what_tuf_accepts(name: str) -> None:
    img = image_target(name)
    assert UptaneTarget.from_target_file(img).name == name
    match_target(director_target(img), img)


# --- Image repository delegations (How to resolve delegations; 5.4.4.2 step 7) ---------


def delegate(
    r: Repo,
    parent: str,
    name: str,
    paths: list[str],
    hw: Any = None,
    *,
    terminating: bool = False,
) -> None:
    """``parent`` delegates ``paths`` to a new role ``name``; ``hw``: its custom.hardware_ids."""
    signer = CryptoSigner.generate_ed25519()
    r.repo.add_signers([signer])
    fields = {} if hw is None else {"custom": {"hardware_ids": hw}}
    with r.repo.edit_targets(parent) as t:
        if t.delegations is None:
            t.delegations = Delegations(keys={}, roles={})
        assert t.delegations.roles is not None
        t.delegations.roles[name] = DelegatedRole(
            name, [], 1, terminating, paths=paths, unrecognized_fields=fields
        )
        t.add_key(signer.public_key, name)
    with r.repo.edit_targets(name):
        pass
    r.repo.publish(force=True)


def publish_image(r: Repo, role: str, name: str, hw: tuple[str, ...] = ("hw-a",)) -> TargetFile:
    t = TargetFile.from_data(name, name.encode(), ["sha256"])
    t.unrecognized_fields["custom"] = build_custom(hardware_ids=hw, release_counter=1)
    with r.repo.edit_targets(role) as targets:
        targets.targets[name] = t
    r.repo.publish(force=True)
    return t


def verified(r: Repo) -> VerifiedRepository:
    roles = tuple(x for x in r.repo.targets_roles() if x != Targets.type)
    return verify_repository("image", r.data(delegated=roles), NOW)


def test_find_image_target_walks_delegations_like_ngclient() -> None:
    """Preorder depth-first in listed order, paths only, terminating ends the search."""
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"])
    delegate(r, "acme", "acme-sub", ["apps/deep*"], ["hw-a"])
    delegate(r, Targets.type, "other", ["*", "apps/*"])
    top = publish_image(r, Targets.type, "top.wasm")
    deep = publish_image(r, "acme-sub", "apps/deep.wasm")
    shadowed = publish_image(r, "acme", "apps/both.wasm")
    publish_image(r, "other", "apps/both.wasm", ("hw-b",))
    later = publish_image(r, "other", "apps/later.wasm")
    image = verified(r)

    found = find_image_target(image, "top.wasm")
    assert found is not None and found.target == top and found.role == "targets"
    assert found.chain == ()
    found = find_image_target(image, "apps/deep.wasm")
    assert found is not None and found.target == deep and found.role == "acme-sub"
    assert [step.role for step in found.chain] == ["acme", "acme-sub"]
    found = find_image_target(image, "apps/both.wasm")  # the first delegation wins
    assert found is not None and found.target == shadowed and found.role == "acme"
    found = find_image_target(image, "apps/later.wasm")  # acme has none: backtrack
    assert found is not None and found.target == later and found.role == "other"
    assert find_image_target(image, "ghost.wasm") is None
    assert find_image_target(image, "apps/later.wasm", max_delegations=0) is None


def test_find_image_target_stops_at_a_terminating_delegation() -> None:
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"], terminating=True)
    delegate(r, Targets.type, "other", ["*", "apps/*"])
    publish_image(r, "other", "apps/x.wasm")
    publish_image(r, "other", "y.wasm")
    image = verified(r)
    assert find_image_target(image, "apps/x.wasm") is None
    found = find_image_target(image, "y.wasm")  # acme's paths do not match: not followed
    assert found is not None and found.role == "other"


def test_find_image_target_visits_each_role_once() -> None:
    """A delegation cycle (acme -> sub -> acme) ends: each role is looked at once."""
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"])
    delegate(r, "acme", "sub", ["apps/*"], ["hw-a"])
    signer = CryptoSigner.generate_ed25519()
    with r.repo.edit_targets("sub") as t:
        back = DelegatedRole("acme", [], 1, False, paths=["apps/*"])
        t.delegations = Delegations(keys={}, roles={"acme": back})
        t.add_key(signer.public_key, "acme")
    r.repo.publish(force=True)
    assert find_image_target(verified(r), "apps/missing.wasm") is None


def test_find_image_target_refuses_a_role_that_was_not_verified() -> None:
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"])
    image = verified(r)
    with pytest.raises(tuf_exc.RepositoryError, match="not verified"):
        find_image_target(replace(image, delegated={}), "apps/x.wasm")


def test_find_image_target_follows_succinct_delegations() -> None:
    """Hash-bin delegations (TAP 15) are terminating and may restrict hardware too."""
    r = make_repo()
    signer = CryptoSigner.generate_ed25519()
    succinct = SuccinctRoles(
        [], 1, 1, "bin", unrecognized_fields={"custom": {"hardware_ids": ["hw-a"]}}
    )
    with r.repo.edit_targets() as t:
        t.delegations = Delegations(keys={}, succinct_roles=succinct)
        t.add_key(signer.public_key)
    r.repo.publish(force=True)
    # SigningRepository does not sign hash bins: sign the bin and list it by hand
    bin_name = succinct.get_role_for_target("apps/x.wasm")
    image = TargetFile.from_data("apps/x.wasm", b"x", ["sha256"])
    image.unrecognized_fields["custom"] = build_custom(
        hardware_ids=["hw-a", "hw-b"], release_counter=1
    )
    bin_md = Metadata(Targets(expires=NOW + timedelta(days=1), targets={image.path: image}))
    bin_md.sign(signer)
    with r.repo.edit_snapshot() as snapshot:
        snapshot.meta[f"{bin_name}.json"] = MetaFile(version=1)
    r.repo.do_timestamp(force=True)
    verified_image = verify_repository(
        "image", replace(r.data(), delegated={bin_name: bin_md.to_bytes()}), NOW
    )
    found = find_image_target(verified_image, "apps/x.wasm")
    assert found is not None and found.role == bin_name and found.target == image
    assert [step.role for step in found.chain] == [bin_name]
    with pytest.raises(DelegationViolationError, match="hw-b"):
        check_delegated_hardware(found, "hw-a")


def test_check_delegated_hardware_needs_every_delegation_to_allow_it() -> None:
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a", "hw-b"])
    delegate(r, "acme", "acme-a", ["apps/*"], ["hw-a"])
    delegate(r, Targets.type, "open", ["open/*"])
    delegate(r, "open", "open-b", ["open/*"], ["hw-b"])
    publish_image(r, "acme-a", "apps/a.wasm")
    publish_image(r, "acme-a", "apps/ab.wasm", ("hw-a", "hw-b"))
    publish_image(r, "acme", "apps/b.wasm", ("hw-b",))
    publish_image(r, "open", "open/any.wasm", ("hw-c",))
    publish_image(r, "open-b", "open/b.wasm", ("hw-b",))
    publish_image(r, Targets.type, "top.wasm", ("hw-c",))
    image = verified(r)

    def check(name: str, ecu_hw: str) -> None:
        found = find_image_target(image, name)
        assert found is not None
        check_delegated_hardware(found, ecu_hw)

    check("apps/a.wasm", "hw-a")
    check("apps/b.wasm", "hw-b")
    check("open/any.wasm", "hw-c")  # a delegation without hardware ids restricts none
    check("top.wasm", "hw-c")  # top-level targets: no delegation
    check("open/b.wasm", "hw-b")
    with pytest.raises(DelegationViolationError, match=r"'acme-a'.*hw-b"):
        check("apps/a.wasm", "hw-b")  # the ECU's hardware id, inner delegation
    with pytest.raises(DelegationViolationError, match="hw-b"):
        check("apps/ab.wasm", "hw-a")  # one of the image's own hardware ids
    with pytest.raises(DelegationViolationError, match=r"'open-b'.*hw-c"):
        check("open/b.wasm", "hw-c")


@pytest.mark.parametrize("hw", ["hw-a", [1], [""]])
def test_check_delegated_hardware_refuses_malformed_delegation_fields(hw: Any) -> None:
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], hw)
    publish_image(r, "acme", "apps/a.wasm")
    found = find_image_target(verified(r), "apps/a.wasm")
    assert found is not None
    with pytest.raises(MetadataError):
        check_delegated_hardware(found, "hw-a")


def _director_for(*images: TargetFile, serial: str = "ecu-a") -> Targets:
    targets = Targets(expires=NOW, targets={i.path: director_target(i, serial) for i in images})
    set_vehicle_id(targets, VIN)
    return targets


def test_match_director_targets_matches_each_target_and_its_delegations() -> None:
    """Issue 16: one Uptane parse per target; the Director's validated copy is what counts."""
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"])
    img = publish_image(r, "acme", "apps/a.wasm")
    image = verified(r)
    director = _director_for(img)
    by_ecu = check_director_targets(director, vin=VIN, ecu_hardware_ids=ECUS).by_ecu
    assert match_director_targets(director, by_ecu, image, ECUS) == {"apps/a.wasm": img}
    # the delegation allows hw-a only: an ECU of other hardware is refused
    with pytest.raises(DelegationViolationError, match="hw-b"):
        match_director_targets(director, by_ecu, image, {**ECUS, "ecu-a": "hw-b"})
    # and the Director's target must be the Image repository's
    other = _director_for(image_target("apps/a.wasm", b"other"))
    other_by_ecu = check_director_targets(other, vin=VIN, ecu_hardware_ids=ECUS).by_ecu
    with pytest.raises(TargetMismatchError):
        match_director_targets(other, other_by_ecu, image, ECUS)


def test_match_director_targets_checks_the_images_own_ecu_serial() -> None:
    """The one Uptane field of the image's copy that matching does not compare."""
    r = make_repo()
    img = image_target("app.wasm")
    img.unrecognized_fields["custom"]["ecu_serial"] = "no spaces allowed"
    with r.repo.edit_targets() as t:
        t.targets[img.path] = img
    r.repo.publish(force=True)
    image = verified(r)
    good = image_target("app.wasm")
    director = _director_for(good)
    by_ecu = check_director_targets(director, vin=VIN, ecu_hardware_ids=ECUS).by_ecu
    with pytest.raises(MetadataError, match="ecu_serial"):
        match_director_targets(director, by_ecu, image, ECUS)
    img.unrecognized_fields["custom"]["ecu_serial"] = "ecu-z"  # well formed: not compared
    resign(r, Targets.type, lambda t: t.targets.__setitem__(img.path, img))
    assert match_director_targets(director, by_ecu, verified(r), ECUS) == {"app.wasm": img}


# --- repository map (TAP 4) ------------------------------------------------------------


def good_map(**mapping: Any) -> dict[str, Any]:
    entry = {"paths": ["*"], "repositories": ["director", "image"], "threshold": 2} | mapping
    return {
        "repositories": {"director": ["http://127.0.0.1:1"], "image": ["http://127.0.0.1:2/"]},
        "mapping": [entry],
    }


def test_repository_map_parses_and_covers_paths() -> None:
    m = RepositoryMap.from_dict(good_map(paths=["apps/*"], terminating=True))
    assert m.image_urls == ("http://127.0.0.1:2",)
    assert m.check_covered("apps/x.wasm").terminating
    with pytest.raises(TargetMismatchError, match="no repository mapping"):
        m.check_covered("other.wasm")


@pytest.mark.parametrize(
    "raw",
    [
        good_map(threshold=1),
        good_map(repositories=["director"]),
        good_map(repositories=["director", "image", "evil"]),
        good_map(paths=[]),
        good_map(terminating="yes"),
        {"repositories": {"director": ["ftp://x"], "image": ["http://y"]}, "mapping": []},
        {"repositories": {"director": ["http://x"]}, "mapping": good_map()["mapping"]},
        [],
    ],
)
def test_repository_map_refuses_what_uptane_cannot_verify(raw: Any) -> None:
    with pytest.raises(ConfigError):
        RepositoryMap.from_dict(raw)


# --- DER forms --------------------------------------------------------------------------


def director_with_der() -> tuple[Repo, dict[int, bytes], bytes]:
    r = make_repo()
    with r.repo.edit_targets() as t:
        t.targets["app.wasm"] = director_target(image_target())
        set_vehicle_id(t, VIN)
    r.repo.publish()
    roots = {1: der_metadata.to_der_metadata(r.repo.open(Root.type), [r.keys[Root.type]])}
    targets = der_metadata.to_der_metadata(r.repo.open(Targets.type), [r.keys[Targets.type]])
    return r, roots, targets


def test_der_forms_verify_against_json() -> None:
    r, roots, targets = director_with_der()
    der = verify_director_der(verify_repository("director", r.data(), NOW), roots, targets)
    assert der.root_versions == (1,) and der.targets_version == 2
    assert der.targets == targets and der.root_chain == (roots[1],)


def test_der_forms_refuse_other_content_keys_or_gaps() -> None:
    r, roots, targets = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    old_targets = der_metadata.to_der_metadata(
        Metadata.from_bytes(r.store.files["1.targets.json"]), [r.keys[Targets.type]]
    )
    with pytest.raises(MetadataError, match="same"):
        verify_director_der(verified, roots, old_targets)
    forged = der_metadata.to_der_metadata(
        r.repo.open(Targets.type), [CryptoSigner.generate_ed25519()]
    )
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(verified, roots, forged)
    forged_root = der_metadata.to_der_metadata(r.repo.open(Root.type), [r.keys[Targets.type]])
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(verified, {1: forged_root}, targets)
    with pytest.raises(MetadataError, match="missing"):
        verify_director_der(verified, {}, targets)
    with pytest.raises(MetadataError, match="decoded"):
        verify_director_der(verified, roots, b"\x30\x03junk")


def test_der_root_chain_needs_the_previous_root_keys() -> None:
    """DER root v2 signed by its own keys alone cannot be followed from v1."""
    r, roots, targets = director_with_der()
    new_root_key = CryptoSigner.generate_ed25519()
    r.repo.add_signers([new_root_key])
    with r.repo.edit_root() as root:
        root.revoke_key(r.keys[Root.type].public_key.keyid, Root.type)
        root.add_key(new_root_key.public_key, Root.type)
    r.repo.publish(force=True)
    verified = verify_repository("director", r.data(), NOW)
    v2 = r.repo.open(Root.type)
    good = {**roots, 2: der_metadata.to_der_metadata(v2, [r.keys[Root.type], new_root_key])}
    targets = der_metadata.to_der_metadata(r.repo.open(Targets.type), [r.keys[Targets.type]])
    assert verify_director_der(verified, good, targets).root_versions == (1, 2)
    only_new = {**roots, 2: der_metadata.to_der_metadata(v2, [new_root_key])}
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(verified, only_new, targets)


# --- DER: one decode, one encode-and-compare (issue 16) ---------------------------


def _tlv(tag: int, content: bytes, *, long_form: bool = False) -> bytes:
    """A DER TLV; ``long_form``: the length in four octets (BER, not DER)."""
    n = len(content)
    length = b"\x84" + n.to_bytes(4, "big") if long_form else bytes(encode_length_definite(n))
    return bytes([tag]) + length + content


def _envelope(signed: bytes, signer: Signer) -> bytes:
    """A DER ``Metadata`` around ``signed`` (any bytes), validly signed by ``signer``."""
    sig = signer.sign(signed)
    entry = codec.encode("Signature", {"keyid": sig.keyid, "value": bytes.fromhex(sig.signature)})
    return _tlv(0x30, _tlv(0xA0, signed) + _tlv(0xA1, entry))  # [0] signed, [1] signatures


def test_der_envelope_helper_builds_what_to_der_metadata_builds() -> None:
    r, _, targets = director_with_der()
    signed = der_metadata.der_signed_bytes(r.repo.open(Targets.type).signed)
    assert _envelope(signed, r.keys[Targets.type]) == targets


def test_der_targets_one_byte_off_the_verified_json_is_refused() -> None:
    """Validly signed DER targets whose signed part differs from the JSON's by one byte."""
    r, roots, _ = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    signed = der_metadata.der_signed_bytes(r.repo.open(Targets.type).signed)
    other = signed.replace(b"app.wasm", b"app.wasn")
    assert (
        len(other) == len(signed) and sum(a != b for a, b in zip(signed, other, strict=True)) == 1
    )
    forged = _envelope(other, r.keys[Targets.type])
    md = der_metadata.DERMetadataDeserializer().deserialize(forged)  # canonical, well signed
    verified.root.verify_delegate(Targets.type, other, md.signatures)
    with pytest.raises(MetadataError, match="same"):
        verify_director_der(verified, roots, forged)


def test_non_canonical_der_is_refused_even_when_validly_signed() -> None:
    """The signed part's outer length in long form, and signed over those very bytes."""
    r, roots, targets = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    signed = der_metadata.der_signed_bytes(r.repo.open(Targets.type).signed)
    length, content = ber_codec.decode_length(signed, 1)
    assert content + length == len(signed)
    ber = _tlv(signed[0], signed[content:], long_form=True)
    forged = _envelope(ber, r.keys[Targets.type])
    with pytest.raises(MetadataError, match="canonical"):
        verify_director_der(verified, roots, forged)
    with pytest.raises(der_metadata.DERDeserializationError, match="canonical"):
        der_metadata.DERMetadataDeserializer().deserialize(forged)
    # the envelope's own length in long form (signatures untouched)
    assert targets[1] & 0x80
    _, start = ber_codec.decode_length(targets, 1)
    long_outer = _tlv(0x30, targets[start:], long_form=True)
    with pytest.raises(MetadataError, match="canonical"):
        verify_director_der(verified, roots, long_outer)
    with pytest.raises(der_metadata.DERDeserializationError, match="canonical"):
        der_metadata.DERMetadataDeserializer().deserialize(long_outer)


def test_der_signed_bytes_of_decoded_metadata_is_the_received_slice() -> None:
    _, _, targets = director_with_der()
    md = der_metadata.DERMetadataDeserializer().deserialize(targets)
    signed = der_metadata.der_signed_bytes(md.signed)
    assert signed == der_metadata.DERSignedSerializer().serialize(md.signed)
    assert signed in targets and len(signed) < len(targets)
    copied = copy.deepcopy(md.signed)  # a copy is encoded, not given the received bytes
    copied.version += 1
    assert der_metadata.der_signed_bytes(copied) != signed


def test_der_cache_reuses_only_envelopes_it_verified() -> None:
    r, roots, targets = director_with_der()
    verified = verify_repository("director", r.data(), NOW)
    cache = DerCache()
    verify_director_der(verified, roots, targets, cache=cache)
    # another cycle parses equal JSON again: the same envelopes need no new check
    again = verify_repository("director", r.data(), NOW)
    assert cache.targets_for(again.targets) == targets
    assert cache.root(again.roots[0], None) == roots[1]
    # other bytes for the same version are checked, not taken from the cache
    forged = der_metadata.to_der_metadata(
        r.repo.open(Targets.type), [CryptoSigner.generate_ed25519()]
    )
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(again, roots, forged, cache=cache)
    forged_root = der_metadata.to_der_metadata(r.repo.open(Root.type), [r.keys[Targets.type]])
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify_director_der(again, {1: forged_root}, targets, cache=cache)
    # new JSON targets (a new version): the cached envelope does not match it
    resign(r, Targets.type)
    newer = verify_repository("director", r.data(), NOW)
    assert cache.targets_for(newer.targets) is None
    with pytest.raises(MetadataError, match="same"):
        verify_director_der(newer, roots, targets, cache=cache)


# --- delegation walk on verified keys only (issue 10, item 10) --------------------


def test_delegation_walk_checks_the_delegator_on_the_walked_path() -> None:
    """A role signed for one delegator is not accepted where another one delegates it."""
    r = make_repo()
    delegate(r, Targets.type, "shared", ["apps/*"], ["hw-a"])
    delegate(r, Targets.type, "vendor", ["*"], ["hw-a"])
    vendor_key = CryptoSigner.generate_ed25519()
    with r.repo.edit_targets("vendor") as t:
        role = DelegatedRole("shared", [], 1, False, paths=["apps/*"])
        t.delegations = Delegations(keys={}, roles={"shared": role})
        t.add_key(vendor_key.public_key, "shared")
    r.repo.publish(force=True)
    publish_image(r, "shared", "apps/x.wasm")
    data = r.data(delegated=("shared", "vendor"))
    md = Metadata[Targets].from_bytes(data.delegated["shared"])
    md.signatures.clear()
    md.sign(vendor_key)  # signed for vendor's delegation only
    resigned = replace(data, delegated={**data.delegated, "shared": md.to_bytes()})
    image = verify_repository("image", resigned, NOW)
    assert image.edges == {(Targets.type, "vendor"), ("vendor", "shared")}
    # the walk for apps/x.wasm reaches 'shared' from top-level targets first
    with pytest.raises(tuf_exc.UnsignedMetadataError, match="shared"):
        find_image_target(image, "apps/x.wasm")
    found = find_image_target(verify_repository("image", data, NOW), "apps/x.wasm")
    assert found is not None and found.role == "shared"


# --- over ngclient's trusted set (what the primary runs) --------------------------


class MemoryFetcher(FetcherInterface):
    """ngclient's fetcher plug point over a repository's files in memory."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def _fetch(self, url: str) -> Iterator[bytes]:
        name = url.rsplit("/", 1)[-1]
        if name not in self.files:
            raise tuf_exc.DownloadHTTPError(f"{name} not found", 404)
        return iter([self.files[name]])


def refreshed(r: Repo, tmp: Path) -> Updater:
    """An ngclient ``Updater`` over ``r``'s files, from its first root, refreshed."""
    updater = Updater(
        str(tmp),
        "http://repo/",
        fetcher=MemoryFetcher(r.store.files),
        bootstrap=r.store.files["1.root.json"],
    )
    updater.refresh()
    return updater


def ngclient_image(r: Repo, tmp: Path, *paths: str) -> VerifiedRepository:
    updater = refreshed(r, tmp)
    for path in paths:
        updater.get_targetinfo(path)
    roots = verify_root_chain((r.store.files["1.root.json"],), "image")
    return verify_trusted("image", updater._trusted_set, roots, NOW)


def test_verify_trusted_accepts_a_snapshot_listing_root(tmp_path: Path) -> None:
    """TUF lets snapshot list top-level roles: only delegated targets roles are delegated."""
    r = make_repo()
    delegate(r, Targets.type, "acme", ["apps/*"], ["hw-a"])
    publish_image(r, "acme", "apps/x.wasm")
    with r.repo.edit_snapshot() as snapshot:
        snapshot.meta["root.json"] = MetaFile(version=1)
    r.repo.do_timestamp(force=True)
    image = ngclient_image(r, tmp_path, "apps/x.wasm")
    assert set(image.delegated) == {"acme"}
    assert image.edges == {(Targets.type, "acme")}
    found = find_image_target(image, "apps/x.wasm")
    assert found is not None and found.role == "acme"


def test_verify_trusted_rechecks_expiry_and_version_links(tmp_path: Path) -> None:
    r = make_repo(short_lived=Targets.type)
    image = ngclient_image(r, tmp_path)
    check_expiry(image, NOW + timedelta(minutes=59))
    with pytest.raises(tuf_exc.ExpiredMetadataError, match="targets"):
        check_expiry(image, NOW + timedelta(minutes=61))
    resign(r, Targets.type)
    newer = ngclient_image(r, tmp_path / "newer")
    with pytest.raises(tuf_exc.BadVersionNumberError):
        verify_trusted(
            "image",
            _Trusted(newer, newer, newer, image, image),
            newer.roots,
            NOW,  # snapshot of one, targets of another
        )
    with pytest.raises(tuf_exc.RepositoryError, match="trusted root"):
        verify_trusted("image", _same(newer), (), NOW)


@dataclass
class _Trusted:
    """A trusted set whose roles come from the given verified repositories.

    ngclient never holds such a set: ``verify_trusted`` must refuse it anyway.
    ``contains``: the ``(delegator, role)`` pairs the set claims it verified.
    """

    root_of: VerifiedRepository
    timestamp_of: VerifiedRepository
    snapshot_of: VerifiedRepository
    targets_of: VerifiedRepository
    delegated_of: VerifiedRepository
    claims: frozenset[tuple[str, str]] | None = None

    @property
    def root(self) -> Root:
        return self.root_of.root

    @property
    def timestamp(self) -> Timestamp:
        return self.timestamp_of.timestamp

    @property
    def snapshot(self) -> Snapshot:
        return self.snapshot_of.snapshot

    @property
    def targets(self) -> Targets:
        return self.targets_of.targets

    def get(self, role: str) -> Any:
        return self.delegated_of.delegated.get(role)

    def contains(self, role: str, delegator: str) -> bool:
        claims = self.delegated_of.edges if self.claims is None else self.claims
        return (delegator, role) in claims


def _same(v: VerifiedRepository, **changes: Any) -> _Trusted:
    return replace(_Trusted(v, v, v, v, v), **changes)
