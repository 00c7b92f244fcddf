"""Shared pieces of the attack suite: the vehicle under test and its recorded cycles.

``Car`` records every cycle a scenario runs with the slot snapshots around it,
so a test can check the attack cycle itself: its typed error and that no
slot changed (Uptane 2.1, 4.3; DESIGN 9).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ecus.primary import CycleIssue
from ecus.sim.scenarios import ScenarioOutcome, run_scenario
from ecus.sim.world import SimVehicle, VehicleOutcome, World
from uptane.errors import ImageMismatchError, UptaneError

HARDWARE_IDS = ("brake-ctl", "body-ctl")
# Install results a secondary sends instead of an exception (the bus carries a result
# code): the typed error it raised when it refused to activate the image.
RESULT_ERRORS: dict[str, type[UptaneError]] = {"imageMismatch": ImageMismatchError}


@dataclass
class Cycle:
    """One vehicle cycle a scenario ran, with every secondary's slots before and after."""

    before: dict[str, dict[str, Any]]
    outcome: VehicleOutcome
    after: dict[str, dict[str, Any]]

    def error(self) -> BaseException | None:
        """The typed error of the cycle: verification, a report, a distribution, or
        the one an updated secondary names in its install result (``RESULT_ERRORS``)."""
        cycle = self.outcome.cycle
        if cycle.error is not None:
            return cycle.error
        for issue in cycle.issues:
            if issue.attack is not None:
                return issue.error
        if self.outcome.errors:
            return next(iter(self.outcome.errors.values()))
        for serial in cycle.updates:
            ecu = self.outcome.ecus.get(serial)
            if ecu is not None and ecu.last_result in RESULT_ERRORS:
                return RESULT_ERRORS[ecu.last_result](f"ECU {serial} reported {ecu.last_result}")
        return None

    def issue(self, serial: str) -> CycleIssue:
        return next(i for i in self.outcome.cycle.issues if i.ecu_serial == serial)


@dataclass
class Car:
    """A test's vehicle in the suite's world, with the cycles scenarios ran on it."""

    world: World
    vehicle: SimVehicle
    cycles: list[Cycle] = field(default_factory=list)

    @property
    def vin(self) -> str:
        return self.vehicle.vin

    @property
    def serials(self) -> list[str]:
        return list(self.vehicle.secondaries)

    def snapshots(self) -> dict[str, dict[str, Any]]:
        return {s: sec.slot_snapshot() for s, sec in self.vehicle.secondaries.items()}

    def run(self, name: str) -> ScenarioOutcome:
        self.cycles.clear()
        return run_scenario(self.world, self.vehicle, name)

    @property
    def attack(self) -> Cycle:
        """The first cycle of the last scenario: the one under attack."""
        return self.cycles[0]

    def director_attacks(self) -> dict[str, set[str]]:
        """Attack names the Director recorded, per ECU serial."""
        found: dict[str, set[str]] = {}
        for a in self.world.director.vehicle_status(self.vin).attacks:
            found.setdefault(a.ecu_serial, set()).add(a.attack)
        return found

    def pending(self) -> dict[str, str]:
        return {a.ecu_serial: a.image for a in self.world.director.vehicle_status(self.vin).pending}


def assert_blocked(
    car: Car,
    outcome: ScenarioOutcome,
    error_type: type[BaseException],
    attack: str,
    *,
    stage: str | None = None,
    reporter: str | None = None,
    strict: bool = True,
) -> BaseException:
    """The checks every attack test makes; returns the typed error of the attack cycle.

    The attack cycle failed with ``error_type`` (at ``stage``); no slot of any
    secondary changed (``strict``: not a byte of either slot file); ``attack``
    reached the Director, reported by ``reporter`` (default: the primary); and
    the scenario's own verdict agrees: blocked, recovered.
    """
    cycle = car.attack
    error = cycle.error()
    assert isinstance(error, error_type), repr(error)
    assert outcome.error is not None
    assert outcome.error.startswith(f"{type(error).__name__}:"), outcome.error
    if stage is not None:
        assert cycle.outcome.cycle.stage == stage, cycle.outcome.cycle.stage
    if strict:
        assert cycle.after == cycle.before, "a slot changed during the attack"
    assert outcome.slots_unchanged
    assert attack in outcome.detected, outcome.detected
    assert attack in outcome.director_attacks, outcome.director_attacks
    who = reporter if reporter is not None else car.vehicle.primary_serial
    assert attack in car.director_attacks().get(who, set()), car.director_attacks()
    assert outcome.blocked, outcome
    assert outcome.recovered, outcome
    return error
