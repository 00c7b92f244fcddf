"""Attacks on the CAN bus between the primary and its secondaries (DESIGN 4; Uptane 2.1, 5.4.2)."""

from __future__ import annotations

import hashlib

from ecus.primary.can_link import TransferFailedError
from ecus.sim.scenarios import ROGUE_BYTES, ROGUE_CHUNK_SIZE
from uptane import errors
from uptane.errors import ManifestError

from .harness import Car, assert_blocked


def test_spoofed_secondary_report(car: Car) -> None:
    """An impostor answers for a secondary with a report signed by another key."""
    victim = car.serials[0]
    outcome = car.run("can-spoofed-report")
    error = assert_blocked(car, outcome, ManifestError, errors.ATTACK_SPOOFED_MESSAGE)
    assert isinstance(error, ManifestError) and error.reason == "bad_ecu_signature"
    assert car.attack.issue(victim).attack == errors.ATTACK_SPOOFED_MESSAGE
    # the forged report never reached the Director: the primary left it out, and the
    # Director recorded the rest of the vehicle without that ECU (it is "unreported")
    cycle = car.attack.outcome.cycle
    assert cycle.manifest is not None and cycle.manifest.accepted
    assert victim not in cycle.reports


def test_replayed_secondary_report(car: Car) -> None:
    """A genuine report recorded earlier is replayed for a new request."""
    victim = car.serials[0]
    outcome = car.run("can-replayed-report")
    error = assert_blocked(car, outcome, ManifestError, errors.ATTACK_REPLAYED_REPORT)
    assert isinstance(error, ManifestError) and error.reason == "replayed_report"
    assert car.attack.issue(victim).attack == errors.ATTACK_REPLAYED_REPORT


def test_corrupted_image_frame_mid_transfer(car: Car) -> None:
    """One bit of image data flipped on the bus: the secondary refuses to activate it."""
    victim = car.serials[0]
    outcome = car.run("can-corrupted-frames")
    attack = car.attack
    ecu = attack.outcome.ecus[victim]
    assert ecu.last_result == "imageMismatch"
    assert errors.ATTACK_ARBITRARY_SOFTWARE in ecu.attacks
    assert outcome.error is not None and outcome.error.startswith("ImageMismatchError:")
    # the running image did not change; the bad copy sits in the inactive slot, failed
    before, after = attack.before[victim], attack.after[victim]
    assert (after["active"], after["target"]) == (before["active"], before["target"])
    assert after["slots"][after["active"]] == before["slots"][before["active"]]
    sec = car.vehicle.secondaries[victim]
    assert sec.ecu is not None
    assert errors.ATTACK_ARBITRARY_SOFTWARE in outcome.director_attacks
    assert errors.ATTACK_ARBITRARY_SOFTWARE in car.director_attacks()[victim]
    assert outcome.blocked and outcome.slots_unchanged
    # the next cycle sent the image again and it was installed
    assert outcome.recovered
    assert (car.cycles[-1].outcome.ecus[victim].release_counter or 0) > 1


def test_injected_frames_mid_transfer(car: Car) -> None:
    """A rogue node on the bus injects its own imageChunk at the offset the secondary
    wants next; its first frame makes the secondary drop the primary's chunk for it. The
    secondary writes the forged bytes to the inactive slot but never activates them."""
    victim = car.serials[0]
    outcome = car.run("can-injected-frames")
    assert_blocked(
        car,
        outcome,
        errors.ImageMismatchError,
        errors.ATTACK_ARBITRARY_SOFTWARE,
        reporter=victim,
        strict=False,
    )
    assert outcome.error is not None and "hash does not match" in outcome.error, outcome.error
    assert "in place of the primary's" in outcome.detail, outcome.detail
    attack = car.attack
    assert attack.outcome.ecus[victim].last_result == "imageMismatch"
    # the inactive slot holds the image with the rogue's bytes at the forged offset
    update = attack.outcome.cycle.updates[victim]
    _, target = car.world.image_repo.targets()[update.target.name]
    image = bytearray(car.world.image_repo.blob_path(target).read_bytes())
    offset = ROGUE_CHUNK_SIZE
    image[offset : offset + len(ROGUE_BYTES)] = ROGUE_BYTES
    before, after = attack.before[victim], attack.after[victim]
    (inactive,) = set(after["slots"]) - {before["active"]}
    assert after["slots"][inactive] == hashlib.sha256(image).hexdigest()
    assert (after["active"], after["target"]) == (before["active"], before["target"])
    assert after["slots"][before["active"]] == before["slots"][before["active"]]
    # the next cycle sent the image again and it was installed
    assert (car.cycles[-1].outcome.ecus[victim].release_counter or 0) > 1


def test_partial_bundle_installation(car: Car) -> None:
    """Traffic to one of two updated ECUs is dropped: the other installs, the primary
    reports a partial bundle installation, the Director keeps the interrupted assignment
    pending, and the next cycle completes the bundle."""
    first, second = car.serials
    outcome = car.run("partial-bundle")
    # the primary reports it in its own next report (the interrupted ECU never installed)
    error = assert_blocked(
        car, outcome, TransferFailedError, errors.ATTACK_PARTIAL_BUNDLE, strict=False
    )
    attack = car.attack
    assert attack.outcome.errors[second] is error
    assert errors.ATTACK_PARTIAL_BUNDLE not in car.director_attacks().get(second, set())
    assert (attack.outcome.ecus[first].release_counter or 0) > 1
    before, after = attack.before[second], attack.after[second]
    assert (after["active"], after["target"]) == (before["active"], before["target"])
    assert "kept its assignment pending: True" in outcome.detail
    assert outcome.blocked and outcome.slots_unchanged and outcome.recovered
    final = car.cycles[-1].outcome
    assert all((e.release_counter or 0) > 1 for e in final.ecus.values())
    assert car.pending() == {}
