"""Attacks on a secondary's own protections: time, recorded attacks, misbehaving signed
images (DESIGN 5, 7; issue 10, items 1-5)."""

from __future__ import annotations

from uptane import errors

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
