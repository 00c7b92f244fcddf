"""The network attacker: drop request, slow retrieval, endless data (Uptane 2.1, 4.3.1-4.3.2)."""

from __future__ import annotations

import pytest
from tuf.api import exceptions as tuf_exc

from uptane import errors

from .harness import Car, assert_blocked


@pytest.mark.parametrize("repository", ["director", "image"])
def test_drop_request(car: Car, repository: str) -> None:
    outcome = car.run(f"drop-request-{repository}")
    error = assert_blocked(
        car, outcome, tuf_exc.DownloadHTTPError, errors.ATTACK_DROP_REQUEST, stage=repository
    )
    assert isinstance(error, tuf_exc.DownloadHTTPError) and error.status_code == 503
    manifest = car.attack.outcome.cycle.manifest
    assert manifest is not None
    # the manifest went through unless the Director itself was unreachable
    assert manifest.accepted is (repository == "image")


def test_slow_retrieval(car: Car) -> None:
    outcome = car.run("slow-retrieval")
    assert_blocked(
        car, outcome, errors.SlowRetrievalError, errors.ATTACK_SLOW_RETRIEVAL, stage="download"
    )
    # the image came later, at full speed
    recovery = car.cycles[-1].outcome
    assert any((e.release_counter or 0) > 1 for e in recovery.ecus.values())


def test_endless_metadata(car: Car) -> None:
    outcome = car.run("endless-metadata")
    assert_blocked(
        car, outcome, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA, stage="director"
    )


def test_endless_image(car: Car) -> None:
    outcome = car.run("endless-image")
    assert_blocked(
        car, outcome, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA, stage="download"
    )
    images = car.vehicle.primary.config.images_dir
    assert not list(images.rglob("*.part")), "a partial download was left behind"
