"""Attacks on a secondary's own protections: time, recorded attacks, misbehaving signed
images (DESIGN 5, 7; issue 10, items 1-5)."""

from __future__ import annotations

import httpx
import pytest
from tuf.api.metadata import TargetFile, Targets

from ecus.primary.can_link import MetadataRejectedError
from ecus.sim.compromise import craft_director_targets
from ecus.sim.scenarios import next_release, publish_release
from uptane import errors
from uptane.metadata import ECU_SERIAL

from .harness import Car


def test_spoofed_time_message(car: Car) -> None:
    """Unsigned, rogue-signed and replayed time messages are refused and reported; the
    ECU's time floor stays, so the next update's metadata is not taken for expired."""
    victim = car.serials[0]
    ecu = car.vehicle.secondaries[victim].ecu
    assert ecu is not None
    outcome = car.run("can-spoofed-time")
    assert outcome.error is not None and outcome.error.startswith("SpoofedMessageError:")
    assert "3 of 3 time messages refused" in outcome.detail, outcome.detail
    floor = ecu.store.time_floor
    assert floor is None or floor <= car.vehicle.clock()
    assert car.attack.after == car.attack.before, "a slot changed during the attack"
    recorded = car.director_attacks()[victim]
    assert {errors.ATTACK_SPOOFED_MESSAGE, errors.ATTACK_REPLAYED_MESSAGE} <= recorded
    assert outcome.blocked and outcome.slots_unchanged and outcome.recovered, outcome


def test_rogue_report_reader(car: Car) -> None:
    """Reading reports and a forged receipt do not clear a recorded attack: it reaches
    the Director, and the primary's genuine receipt clears it afterwards."""
    victim = car.serials[0]
    outcome = car.run("can-rogue-report-reader")
    assert "the recorded attack was kept" in outcome.detail, outcome.detail
    attack_report = car.attack.outcome.cycle.reports[victim]
    assert errors.ATTACK_WRONG_ECU in attack_report.attacks_detected
    assert errors.ATTACK_SPOOFED_MESSAGE in attack_report.attacks_detected  # the forged receipt
    assert {errors.ATTACK_WRONG_ECU, errors.ATTACK_SPOOFED_MESSAGE} <= car.director_attacks()[
        victim
    ]
    assert car.cycles[-1].outcome.cycle.reports[victim].attacks_detected == ()
    assert outcome.blocked and outcome.slots_unchanged and outcome.recovered, outcome


def test_stuck_trial_version_trap(car: Car) -> None:
    """A signed release that traps in ``version()`` rolls back with a signed trialFailed
    report; nothing stays on trial and the next release installs without a reboot."""
    victim = car.serials[0]
    outcome = car.run("trial-version-trap")
    report = car.attack.outcome.ecus[victim]
    assert report.last_result == "trialFailed"
    assert outcome.error is not None and "trap" in outcome.error, outcome.error
    assert "nothing left on trial" in outcome.detail, outcome.detail
    before, after = car.attack.before[victim], car.attack.after[victim]
    assert (after["active"], after["target"]) == (before["active"], before["target"])
    assert outcome.blocked and outcome.recovered, outcome


def test_unbounded_signed_limits(car: Car) -> None:
    """Signed limits above the ECU's ceilings are refused at the offer: not a byte moves."""
    victim = car.serials[0]
    outcome = car.run("over-limit-image")
    assert car.attack.outcome.ecus[victim].last_result == "limitsExceeded"
    assert outcome.error is not None and "fuel_per_call" in outcome.error, outcome.error
    assert car.attack.after == car.attack.before, "a slot changed: bytes were transferred"
    assert outcome.blocked and outcome.recovered, outcome


def _director_assigns(car: Car, serial: str, name: str) -> bytes:
    """DER Director targets assigning image ``name`` to ``serial``, signed by the Director's
    online keys (as a compromised Director would sign them)."""
    world = car.world
    _, image = world.image_repo.targets()[name]
    target = TargetFile(
        length=image.length,
        hashes=dict(image.hashes),
        path=image.path,
        unrecognized_fields={"custom": {**image.custom, ECU_SERIAL: serial}},
    )

    def mutate(targets: Targets) -> None:
        targets.targets = {
            p: t for p, t in targets.targets.items() if t.custom.get(ECU_SERIAL) != serial
        }
        targets.targets[target.path] = target

    version = craft_director_targets(
        world.director,
        world.director_config.online_signers(),
        car.vin,
        mutate,
        expiry=world.director_config.metadata_expiry,
    )
    url = f"{world.director_url}/vehicles/{car.vin}/metadata/{version}.targets.der"
    response = httpx.get(url, timeout=10.0)
    response.raise_for_status()
    return response.content


def test_release_counter_below_previous_director_targets(car: Car) -> None:
    """Uptane 5.4.4.2 step 5: the secondary trusted targets assigning a release it has
    not installed yet; later targets assigning an older release (still above the
    installed one) are refused, and the slots do not change."""
    victim = car.serials[0]
    sec = car.vehicle.secondaries[victim]
    assert sec.client is not None and sec.ecu is not None
    base = next_release(car.world, car.vehicle, sec.hardware_id)
    older = publish_release(car.world, sec.hardware_id, base)
    newer = publish_release(car.world, sec.hardware_id, base + 2)
    assert sec.client.push_metadata([], _director_assigns(car, victim, newer)) == "ok"
    before = sec.slot_snapshot()
    with pytest.raises(MetadataRejectedError, match="previously trusted"):
        sec.client.push_metadata([], _director_assigns(car, victim, older))
    assert sec.slot_snapshot() == before
    pending = sec.ecu.pending_target
    assert pending is not None and pending.name == newer  # the newer release stays
    assert errors.ATTACK_ROLLBACK in car.vehicle.report(victim).attacks_detected
