"""A World and fresh vehicles for the attack suite (Uptane 2.1, 4.3; DESIGN 9).

One ``World`` (Image repository + Director on loopback) serves the whole
suite: every scenario undoes what it did, and each test gets its own vehicle
(two secondaries running release 1, nothing pending).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from ecus.sim.world import VehicleOutcome, World, image_name

from .harness import HARDWARE_IDS, Car, Cycle

_vins = itertools.count(1)


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(Path(tmp_path_factory.mktemp("attacks")))
    try:
        w.publish(1, HARDWARE_IDS)
        yield w
    finally:
        w.close()


@pytest.fixture
def car(world: World) -> Iterator[Car]:
    """A new vehicle: its secondaries run release 1 and the Director knows it."""
    vin = f"ATTACK{next(_vins):05d}"
    vehicle = world.add_vehicle(vin, HARDWARE_IDS)
    car = Car(world, vehicle)
    try:
        world.assign_version(1, HARDWARE_IDS, vins=[vin])
        installed = vehicle.cycle()
        assert installed.ok, installed.cycle.issues
        assert installed.installed() == {
            s: image_name(sec.hardware_id, 1) for s, sec in vehicle.secondaries.items()
        }
        assert vehicle.cycle().ok  # the Director learns what is installed
        assert car.pending() == {}
        cycle = vehicle.cycle

        def recorded() -> VehicleOutcome:
            before = car.snapshots()
            outcome = cycle()
            car.cycles.append(Cycle(before, outcome, car.snapshots()))
            return outcome

        vehicle.cycle = recorded  # type: ignore[method-assign]
        yield car
    finally:
        vehicle.close()
        world.vehicles.pop(vin, None)
