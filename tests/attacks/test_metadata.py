"""Freeze, rollback, mix-and-match and wrong-vehicle metadata (Uptane 2.1, 4.3.3)."""

from __future__ import annotations

import pytest
from tuf.api import exceptions as tuf_exc

from uptane import errors

from .harness import Car, assert_blocked


@pytest.mark.parametrize("repository", ["director", "image"])
def test_freeze(car: Car, repository: str) -> None:
    clock = car.vehicle.primary.clock
    outcome = car.run(f"freeze-{repository}")
    assert_blocked(
        car, outcome, tuf_exc.ExpiredMetadataError, errors.ATTACK_FREEZE, stage=repository
    )
    assert car.vehicle.primary.clock is clock  # the scenario gave the clock back


@pytest.mark.parametrize("repository", ["director", "image"])
def test_rollback_of_metadata(car: Car, repository: str) -> None:
    outcome = car.run(f"rollback-{repository}-metadata")
    error = assert_blocked(
        car, outcome, tuf_exc.BadVersionNumberError, errors.ATTACK_ROLLBACK, stage=repository
    )
    assert not isinstance(error, errors.MixAndMatchError)
    assert "timestamp" in str(error)


def test_rollback_of_release_counter(car: Car) -> None:
    """A compromised Director assigns release 0 to an ECU that runs release 1."""
    outcome = car.run("rollback-release-counter")
    error = assert_blocked(
        car, outcome, errors.ReleaseCounterRollbackError, errors.ATTACK_ROLLBACK, stage="match"
    )
    assert "lower than the installed 1" in str(error)
    assert car.pending() == {}  # the real Director signed its own targets again


def test_mix_and_match(car: Car) -> None:
    outcome = car.run("mix-and-match")
    assert_blocked(
        car, outcome, errors.MixAndMatchError, errors.ATTACK_MIX_AND_MATCH, stage="director"
    )


def test_wrong_vehicle(car: Car) -> None:
    outcome = car.run("wrong-vehicle")
    error = assert_blocked(
        car, outcome, errors.VehicleIdMismatchError, errors.ATTACK_WRONG_VEHICLE, stage="director"
    )
    assert f"{car.vin}-OTHER" in str(error)
