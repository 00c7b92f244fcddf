"""The network attacker: drop request, slow retrieval, endless data (Uptane 2.1, 4.3.1-4.3.2)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from starlette.responses import StreamingResponse
from tuf.api import exceptions as tuf_exc

from ecus.sim.scenarios import ensure_updates
from image_repo.layout import blob_relpath
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


def test_truncated_image(car: Car) -> None:
    """A download that closes halfway through its announced length fails closed, typed."""
    outcome = car.run("truncated-image")
    error = assert_blocked(
        car, outcome, tuf_exc.DownloadError, errors.ATTACK_DROP_REQUEST, stage="download"
    )
    assert not isinstance(error, tuf_exc.DownloadHTTPError)
    assert "connection broken" in str(error)
    images = car.vehicle.primary.config.images_dir
    assert not list(images.rglob("*.part")), "a partial download was left behind"
    # the image came whole in the next cycle and was installed
    recovery = car.cycles[-1].outcome
    assert any((e.release_counter or 0) > 1 for e in recovery.ecus.values())


def test_abandoned_download_is_closed(car: Car) -> None:
    """An endless image is dropped at its signed length, and the connection with it: the
    server's stream ends although the primary still holds the error (and its traceback)."""
    finished = threading.Event()

    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"\0" * 65536
                await asyncio.sleep(0)
        finally:
            finished.set()

    pending = ensure_updates(car.world, car.vehicle, 1)
    _, assignment = next(iter(pending.items()))
    _, target = car.world.image_repo.targets()[assignment.image]
    path = "/targets/" + blob_relpath(target.path, target.hashes["sha256"])
    car.world.image_board.overrides[path] = lambda: StreamingResponse(body())
    try:
        outcome = car.vehicle.cycle()
    finally:
        car.world.image_board.overrides.pop(path)
    assert isinstance(outcome.cycle.error, errors.EndlessDataError)
    assert finished.wait(timeout=10), "the endless stream was never closed"
    assert car.vehicle.cycle().ok
