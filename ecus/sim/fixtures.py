"""pytest fixtures for whole-vehicle tests (a pytest plugin: ``pytest_plugins``).

- ``sim_world``: a module-scoped ``World`` (Image repository + Director on
  loopback) in a temporary directory; closed after the module's tests.
- ``sim_vehicle``: a factory for ``SimVehicle`` objects in ``sim_world``, each
  with a unique VIN; the vehicles a test made are closed after it::

      def test_x(sim_world, sim_vehicle):
          vehicle = sim_vehicle(3)                  # 3 secondaries
          hws = hardware_ids(vehicle)
          sim_world.publish(1, hws)
          sim_world.assign_version(1, hws, [vehicle.vin])
          assert vehicle.cycle().ok

The world is shared by a module's tests: scope assignments to a test's own
vehicles (``vins=[vehicle.vin]``).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import pytest

from ecus.sim.world import SimVehicle, World, hardware_ids_for

_serial = itertools.count(1)


class VehicleFactory(Protocol):
    def __call__(
        self,
        secondaries: int | Sequence[str] = ...,
        *,
        vin: str | None = ...,
        **kwargs: Any,
    ) -> SimVehicle: ...


def hardware_ids(vehicle: SimVehicle) -> list[str]:
    """The distinct hardware ids of a vehicle's secondaries, in order."""
    return list(dict.fromkeys(s.hardware_id for s in vehicle.secondaries.values()))


@pytest.fixture(scope="module")
def sim_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """An Image repository and a Director as real servers on 127.0.0.1."""
    world = World(tmp_path_factory.mktemp("sim-world"))
    try:
        yield world
    finally:
        world.close()


@pytest.fixture
def sim_vehicle(sim_world: World) -> Iterator[VehicleFactory]:
    """``make(secondaries=3 | [hardware ids], *, vin=None, fd=, paced=, clock=, progress=)``."""
    made: list[SimVehicle] = []

    def make(
        secondaries: int | Sequence[str] = 3, *, vin: str | None = None, **kwargs: Any
    ) -> SimVehicle:
        hws = (
            hardware_ids_for(secondaries)
            if isinstance(secondaries, int)
            else [str(hw) for hw in secondaries]
        )
        vin = vin or f"TESTVIN{next(_serial):010d}"
        vehicle = sim_world.add_vehicle(vin, hws, **kwargs)
        made.append(vehicle)
        return vehicle

    yield make
    for vehicle in made:
        vehicle.close()
        sim_world.vehicles.pop(vehicle.vin, None)
