"""Faults: power cuts at secondary write points, bus off, server restarts (DESIGN 5, 9)."""

from __future__ import annotations

import pytest

from ecus.primary.can_link import TransferFailedError
from uptane.errors import BusOffError, TransportError

from .harness import Car


def _runs_verified_image(car: Car) -> bool:
    for sec in car.vehicle.secondaries.values():
        assert sec.ecu is not None
        store = sec.ecu.store
        active = store.active_target()
        if active is None or store.active is None:
            return False
        if store.read_image(store.active) is None:  # read_image checks length and hashes
            return False
    return True


@pytest.mark.parametrize("point", ["chunk", "finish", "start_trial", "commit"])
def test_power_cut_during_install(car: Car, point: str) -> None:
    victim = car.serials[0]
    outcome = car.run(f"power-cut-{point.replace('_', '-')}")
    attack = car.attack
    assert f"power cut at {point!r}" in outcome.detail
    assert isinstance(attack.outcome.errors[victim], TransportError)
    # after the reboot the ECU ran a verified image: the old one, never half of the new
    before, after = attack.before[victim], attack.after[victim]
    assert (after["active"], after["target"]) == (before["active"], before["target"])
    assert outcome.blocked and outcome.slots_unchanged
    assert outcome.detected == ()
    # the next cycle completed the update
    assert outcome.recovered
    assert (car.cycles[-1].outcome.ecus[victim].release_counter or 0) > 1
    assert _runs_verified_image(car)


def test_bus_off_during_transfer(car: Car) -> None:
    victim = car.serials[0]
    outcome = car.run("bus-off")
    error = car.attack.outcome.errors[victim]
    assert isinstance(error, TransferFailedError)
    assert isinstance(error.__cause__, BusOffError)
    assert outcome.error is not None and outcome.error.startswith("TransferFailedError:")
    assert outcome.blocked and outcome.slots_unchanged and outcome.recovered
    assert not car.vehicle.primary_faults.is_bus_off
    assert (car.cycles[-1].outcome.ecus[victim].release_counter or 0) > 1


def test_server_restart_between_cycles(car: Car) -> None:
    director = car.world.director
    outcome = car.run("server-restart")
    assert car.world.director is not director  # a new Director over the same database
    assert outcome.blocked and outcome.recovered, outcome
    assert "pre-restart manifest replay refused: True" in outcome.detail
    assert car.pending() == {}
    assert any((e.release_counter or 0) > 1 for e in car.cycles[-1].outcome.ecus.values())
