"""Arbitrary software with ONE repository compromised, and replayed manifests
(Uptane 2.1, 4.3.4, 5.4.2)."""

from __future__ import annotations

import hashlib

import pytest
from tuf.api import exceptions as tuf_exc

from ecus.sim.scenarios import last_manifest
from uptane import errors
from uptane.errors import ManifestError

from .harness import Car, assert_blocked


def test_director_compromised_alone(car: Car) -> None:
    """The Director's online keys sign an image the Image repository does not have."""
    outcome = car.run("arbitrary-software-director")
    assert_blocked(
        car, outcome, errors.TargetMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE, stage="match"
    )
    # nothing but what the Image repository signed was ever downloaded
    signed = {t.hashes["sha256"] for _, t in car.world.image_repo.targets().values()}
    for path in car.vehicle.primary.config.images_dir.rglob("*.wasm"):
        assert hashlib.sha256(path.read_bytes()).hexdigest() in signed, path


def test_image_repository_server_swaps_the_image(car: Car) -> None:
    outcome = car.run("arbitrary-software-image-swap")
    assert_blocked(
        car, outcome, errors.ImageMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE, stage="download"
    )


def test_image_repository_key_below_threshold(car: Car) -> None:
    """One of the Image repository's two targets keys re-signs targets with another image."""
    assert car.world.image_repo.status().role("targets").threshold == 2
    outcome = car.run("arbitrary-software-image-threshold")
    error = assert_blocked(
        car, outcome, tuf_exc.UnsignedMetadataError, errors.ATTACK_ARBITRARY_SOFTWARE, stage="image"
    )
    assert "1/2" in str(error)


def test_replayed_manifest_is_refused_by_the_director(car: Car) -> None:
    outcome = car.run("replayed-manifest")
    assert outcome.error is not None and outcome.error.startswith("ManifestError: replayed_report")
    assert "HTTP 409" in outcome.detail
    assert errors.ATTACK_REPLAYED_REPORT in outcome.detected
    assert outcome.blocked and outcome.slots_unchanged and outcome.recovered
    recovery = car.cycles[-1].outcome.cycle.manifest
    assert recovery is not None and recovery.accepted
    # the typed refusal, and nothing recorded: replay the last manifest once more
    body = last_manifest(car.world, car.vin)
    assert body is not None
    status = car.world.director.vehicle_status(car.vin)
    with pytest.raises(ManifestError) as refused:
        car.world.director.receive_manifest(car.vin, body)
    assert refused.value.reason == "replayed_report"
    assert car.world.director.vehicle_status(car.vin) == status
