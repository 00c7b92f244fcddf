"""Partial verification of DER Director metadata (Uptane 2.1, 5.4.4.1)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from helpers.director_sim import T0, VIN, DirectorSim, target_file
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import DelegatedRole, Delegations, TargetFile, Targets
from tuf.api.serialization import DeserializationError

from uptane import der_metadata
from uptane.errors import (
    ATTACK_ARBITRARY_SOFTWARE,
    ATTACK_FREEZE,
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_ROLLBACK,
    ATTACK_WRONG_ECU,
    ATTACK_WRONG_VEHICLE,
    DelegationNotAllowedError,
    DuplicateEcuError,
    HardwareIdMismatchError,
    MetadataError,
    ReleaseCounterRollbackError,
    UnsafeTargetPathError,
    VehicleIdMismatchError,
    attack_name,
)
from uptane.verification.partial import (
    MAX_ROOT_ROTATIONS,
    SecondaryIdentity,
    TrustedDirectorState,
    find_target,
    load_targets,
    verify,
)

ME = SecondaryIdentity("ecu-1", "hw-a", VIN)
IMAGE = b"\0asm\x01\0\0\0 partial verification test image"


def mine(**kw: object) -> TargetFile:
    fields: dict[str, object] = {"ecu_serial": "ecu-1", "hardware_ids": ["hw-a"]}
    fields.update(kw)
    return target_file("apps/app.wasm", IMAGE, **fields)  # type: ignore[arg-type]


@pytest.fixture
def sim() -> DirectorSim:
    return DirectorSim()


def trusted(sim: DirectorSim, targets_version: int = 0) -> TrustedDirectorState:
    return TrustedDirectorState(sim.root_ders[1], targets_version)


def test_target_for_this_ecu_is_returned(sim: DirectorSim) -> None:
    der = sim.publish_targets(
        [
            mine(release_counter=3),
            target_file("apps/other.wasm", b"other", ecu_serial="ecu-2", hardware_ids=["hw-b"]),
        ]
    )
    result = verify(ME, trusted(sim), der, T0, installed_release_counter=2)
    assert result.target is not None
    assert result.target.name == "apps/app.wasm"
    assert result.target.ecu_serial == "ecu-1"
    assert result.target.length == len(IMAGE)
    assert result.target.release_counter == 3
    assert result.targets_version == result.state.targets_version == 2
    assert result.state.root_der == sim.root_ders[1]


def test_no_target_for_this_ecu_means_no_update(sim: DirectorSim) -> None:
    der = sim.publish_targets(
        [target_file("apps/other.wasm", b"x", ecu_serial="ecu-2", hardware_ids=["hw-a"])]
    )
    result = verify(ME, trusted(sim), der, T0, 0)
    assert result.target is None
    assert result.targets_version == 2


def test_empty_targets_mean_no_update(sim: DirectorSim) -> None:
    result = verify(ME, trusted(sim), sim.targets_ders[1], T0, 0)
    assert result.target is None


# --- root rotation (TUF 5.3.4) ------------------------------------------------


def test_root_rotation_chain_is_accepted(sim: DirectorSim) -> None:
    sim.rotate_root()
    sim.rotate_root(targets_key=True)
    der = sim.publish_targets([mine()])  # signed by the new targets key only
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify(ME, trusted(sim), der, T0, 0)  # without the chain: unknown key
    result = verify(ME, trusted(sim), der, T0, 0, new_roots=sim.root_chain())
    assert result.state.root_der == sim.root_ders[3]
    assert result.state.root.version == 3
    assert result.target is not None


def test_already_trusted_roots_in_chain_are_skipped(sim: DirectorSim) -> None:
    sim.rotate_root()
    der = sim.publish_targets([mine()])
    chain = (sim.root_ders[1], sim.root_ders[2], sim.root_ders[1])
    result = verify(ME, trusted(sim), der, T0, 0, new_roots=chain)
    assert result.state.root.version == 2


def test_root_not_signed_by_previous_root_is_refused(sim: DirectorSim) -> None:
    sim.rotate_root()
    new_root_signers = sim.role_signers("root")  # only the new root key
    forged = der_metadata.to_der_metadata(sim.root_json(2), new_root_signers)
    der = sim.publish_targets([mine()])
    with pytest.raises(tuf_exc.UnsignedMetadataError) as e:
        verify(ME, trusted(sim), der, T0, 0, new_roots=[forged])
    assert attack_name(e.value) == ATTACK_ARBITRARY_SOFTWARE


def test_root_not_signed_by_its_own_keys_is_refused(sim: DirectorSim) -> None:
    old_root_signers = sim.role_signers("root")
    sim.rotate_root()
    forged = der_metadata.to_der_metadata(sim.root_json(2), old_root_signers)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify(ME, trusted(sim), sim.publish_targets([]), T0, 0, new_roots=[forged])


def test_root_chain_with_skipped_version_is_refused(sim: DirectorSim) -> None:
    sim.rotate_root()
    sim.rotate_root()
    der = sim.publish_targets([mine()])
    with pytest.raises(tuf_exc.BadVersionNumberError) as e:
        verify(ME, trusted(sim), der, T0, 0, new_roots=[sim.root_ders[3]])
    assert attack_name(e.value) == ATTACK_ROLLBACK


def test_too_many_root_rotations_are_refused(sim: DirectorSim) -> None:
    chain = [sim.root_ders[1]] * (MAX_ROOT_ROTATIONS + 1)
    with pytest.raises(tuf_exc.RepositoryError, match="rotations"):
        verify(ME, trusted(sim), sim.targets_ders[1], T0, 0, new_roots=chain)


def test_targets_pushed_as_root_are_refused(sim: DirectorSim) -> None:
    with pytest.raises(tuf_exc.RepositoryError, match="expected root"):
        verify(ME, trusted(sim), sim.targets_ders[1], T0, 0, new_roots=[sim.targets_ders[1]])


def test_root_pushed_as_targets_is_refused(sim: DirectorSim) -> None:
    with pytest.raises(tuf_exc.RepositoryError, match="expected targets"):
        verify(ME, trusted(sim), sim.root_ders[1], T0, 0)


def test_targets_key_rotation_forgets_the_old_version_floor(sim: DirectorSim) -> None:
    """Recovery from a fast-forward attack with a stolen targets key (TUF 5.3.11)."""
    sim.rotate_root(root_key=False, targets_key=True)
    der = sim.publish_targets([mine()])  # version 2
    floor = TrustedDirectorState(sim.root_ders[1], targets_version=1000)
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify(ME, floor, der, T0, 0)  # without the new root the new key is unknown
    result = verify(ME, floor, der, T0, 0, new_roots=sim.root_chain())
    assert result.targets_version == 2


def test_root_rotation_keeping_targets_keys_keeps_the_version_floor(sim: DirectorSim) -> None:
    sim.rotate_root()
    der = sim.publish_targets([mine()])  # version 2
    with pytest.raises(tuf_exc.BadVersionNumberError):
        verify(ME, trusted(sim, 3), der, T0, 0, new_roots=sim.root_chain())


# --- signatures, freshness, rollback -----------------------------------------


def test_targets_signed_by_unpinned_key_are_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()], signers=[CryptoSigner.generate_ed25519()])
    with pytest.raises(tuf_exc.UnsignedMetadataError) as e:
        verify(ME, trusted(sim), der, T0, 0)
    assert attack_name(e.value) == ATTACK_ARBITRARY_SOFTWARE


def test_targets_signed_by_root_key_are_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()], signers=sim.role_signers("root"))
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify(ME, trusted(sim), der, T0, 0)


def test_tampered_targets_are_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine(release_counter=1)])
    md = der_metadata.DERMetadataDeserializer().deserialize(der)
    md.signed.targets["apps/app.wasm"].unrecognized_fields["custom"]["release_counter"] = 9
    tampered = md.to_bytes(der_metadata.DERMetadataSerializer())  # old signatures, new content
    with pytest.raises(tuf_exc.UnsignedMetadataError):
        verify(ME, trusted(sim), tampered, T0, 0)


def test_expired_targets_are_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()])
    assert verify(ME, trusted(sim), der, T0 + timedelta(hours=23), 0).target is not None
    with pytest.raises(tuf_exc.ExpiredMetadataError, match="targets") as e:
        verify(ME, trusted(sim), der, T0 + timedelta(days=2), 0)
    assert attack_name(e.value) == ATTACK_FREEZE


def test_expired_root_is_refused() -> None:
    sim = DirectorSim(root_expiry=timedelta(hours=1), targets_expiry=timedelta(days=1))
    der = sim.publish_targets([mine()])
    with pytest.raises(tuf_exc.ExpiredMetadataError, match="root") as e:
        verify(ME, trusted(sim), der, T0 + timedelta(hours=2), 0)
    assert attack_name(e.value) == ATTACK_FREEZE


def test_expired_root_is_fine_when_the_chain_brings_a_fresh_one() -> None:
    sim = DirectorSim(root_expiry=timedelta(hours=1))
    sim.now = T0 + timedelta(hours=2)
    sim.rotate_root()
    der = sim.publish_targets([mine()])
    result = verify(ME, trusted(sim), der, sim.now, 0, new_roots=sim.root_chain())
    assert result.state.root.version == 2


def test_targets_version_rollback_is_refused(sim: DirectorSim) -> None:
    old = sim.publish_targets([mine()])  # v2
    sim.publish_targets([mine()])  # v3
    new = sim.publish_targets([mine()])  # v4
    state = verify(ME, trusted(sim), new, T0, 0).state
    with pytest.raises(tuf_exc.BadVersionNumberError) as e:
        verify(ME, state, old, T0, 0)
    assert attack_name(e.value) == ATTACK_ROLLBACK
    assert verify(ME, state, new, T0, 0).targets_version == 4  # same version: a resend


def test_release_counter_rollback_is_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine(release_counter=3)])
    assert verify(ME, trusted(sim), der, T0, 3).target is not None  # equal is fine
    with pytest.raises(ReleaseCounterRollbackError) as e:
        verify(ME, trusted(sim), der, T0, 4)
    assert attack_name(e.value) == ATTACK_ROLLBACK


# --- Director-only rules ---------------------------------------------------------


def test_duplicate_ecu_is_refused(sim: DirectorSim) -> None:
    second = target_file("apps/second.wasm", b"two", ecu_serial="ecu-1", hardware_ids=["hw-a"])
    der = sim.publish_targets([mine(), second])
    with pytest.raises(DuplicateEcuError) as e:
        verify(ME, trusted(sim), der, T0, 0)
    assert attack_name(e.value) == ATTACK_PARTIAL_BUNDLE


def test_another_ecu_listed_twice_is_refused(sim: DirectorSim) -> None:
    """No ECU identifier may appear twice, even one that is not this ECU's."""
    other = [
        target_file(f"apps/other{i}.wasm", b"x%d" % i, ecu_serial="ecu-2", hardware_ids=["hw-b"])
        for i in range(2)
    ]
    der = sim.publish_targets([mine(), *other])
    with pytest.raises(DuplicateEcuError):
        verify(ME, trusted(sim), der, T0, 0)


def test_delegations_are_refused(sim: DirectorSim) -> None:
    def delegate(targets: Targets) -> None:
        role = DelegatedRole("supplier", [], 1, True, paths=["*"])
        targets.delegations = Delegations(keys={}, roles={"supplier": role})

    der = sim.publish_targets([mine()], mutate=delegate)
    with pytest.raises(DelegationNotAllowedError):
        verify(ME, trusted(sim), der, T0, 0)


def test_vin_mismatch_is_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()])
    other_car = SecondaryIdentity("ecu-1", "hw-a", "VIN-OTHER-0002")
    with pytest.raises(VehicleIdMismatchError) as e:
        verify(other_car, trusted(sim), der, T0, 0)
    assert attack_name(e.value) == ATTACK_WRONG_VEHICLE
    # an ECU that was not told its VIN cannot check it
    assert verify(SecondaryIdentity("ecu-1", "hw-a"), trusted(sim), der, T0, 0).target


def test_empty_targets_for_another_vehicle_are_refused(sim: DirectorSim) -> None:
    other_car = SecondaryIdentity("ecu-1", "hw-a", "VIN-OTHER-0002")
    with pytest.raises(VehicleIdMismatchError):
        verify(other_car, trusted(sim), sim.targets_ders[1], T0, 0)


def test_hardware_id_mismatch_is_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine(hardware_ids=["hw-b", "hw-c"])])
    with pytest.raises(HardwareIdMismatchError) as e:
        verify(ME, trusted(sim), der, T0, 0)
    assert attack_name(e.value) == ATTACK_WRONG_ECU


def test_target_without_ecu_serial_is_refused(sim: DirectorSim) -> None:
    loose = TargetFile.from_data("apps/loose.wasm", b"loose", ["sha256"])
    loose.unrecognized_fields["custom"] = {"hardware_ids": ["hw-a"], "release_counter": 1}
    with pytest.raises(MetadataError, match="ecu_serial"):
        verify(ME, trusted(sim), sim.publish_targets([loose]), T0, 0)
    bare = TargetFile.from_data("apps/bare.wasm", b"bare", ["sha256"])
    with pytest.raises(MetadataError, match="custom"):
        verify(ME, trusted(sim), sim.publish_targets([bare]), T0, 0)


def test_unsafe_target_path_is_refused(sim: DirectorSim) -> None:
    def escape(targets: Targets) -> None:
        tf = targets.targets.pop("apps/app.wasm")
        tf.path = "../boot.wasm"
        targets.targets[tf.path] = tf

    der = sim.publish_targets([mine()], mutate=escape)
    with pytest.raises(UnsafeTargetPathError):
        verify(ME, trusted(sim), der, T0, 0)


def test_malformed_der_is_refused(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()])
    for bad in (der[:-1], der + b"\0", b"\x30\x00", b"not der at all"):
        with pytest.raises(DeserializationError):
            verify(ME, trusted(sim), bad, T0, 0)


def test_find_target_and_load_targets(sim: DirectorSim) -> None:
    der = sim.publish_targets([mine()])
    targets = load_targets(der)
    found = find_target(ME, targets)
    assert found is not None and found.name == "apps/app.wasm"
    assert find_target(SecondaryIdentity("ecu-9", "hw-a"), targets) is None


def test_naive_reference_time_is_a_caller_bug(sim: DirectorSim) -> None:
    with pytest.raises(ValueError):
        verify(ME, trusted(sim), sim.targets_ders[1], T0.replace(tzinfo=None), 0)


def test_release_counter_below_previous_director_targets_is_refused(sim: DirectorSim) -> None:
    """5.4.4.2 step 5: trusted targets assigned release 5 (not installed yet); a later
    bundle assigning release 3 is refused although the installed release is 1."""
    first = verify(ME, trusted(sim), sim.publish_targets([mine(release_counter=5)]), T0, 1)
    assert first.state.release_counter == 5
    older = sim.publish_targets([mine(release_counter=3)])
    with pytest.raises(ReleaseCounterRollbackError, match="previously trusted") as e:
        verify(ME, first.state, older, T0, 1)
    assert attack_name(e.value) == ATTACK_ROLLBACK
    same = verify(ME, first.state, sim.publish_targets([mine(release_counter=5)]), T0, 1)
    assert same.target is not None and same.target.release_counter == 5
    none = verify(ME, first.state, sim.publish_targets([]), T0, 1)
    assert none.state.release_counter == 0  # no target for this ECU: no previous release


def test_targets_key_rotation_forgets_the_previous_release_floor(sim: DirectorSim) -> None:
    """Like the version floor (TUF 5.3.11): a floor signed by replaced keys may be forged."""
    floor = TrustedDirectorState(sim.root_ders[1], targets_version=1, release_counter=1000)
    sim.rotate_root(root_key=False, targets_key=True)
    der = sim.publish_targets([mine(release_counter=3)])
    result = verify(ME, floor, der, T0, 1, new_roots=sim.root_chain())
    assert result.target is not None and result.target.release_counter == 3
    kept = DirectorSim()
    kept_floor = TrustedDirectorState(kept.root_ders[1], targets_version=1, release_counter=1000)
    kept.rotate_root()  # same targets keys: the floor stays
    with pytest.raises(ReleaseCounterRollbackError):
        verify(
            ME,
            kept_floor,
            kept.publish_targets([mine(release_counter=3)]),
            T0,
            1,
            kept.root_chain(),
        )
