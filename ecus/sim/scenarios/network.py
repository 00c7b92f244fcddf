"""The network attacker: drop request, slow retrieval, endless data (Uptane 2.1, 4.3.1-4.3.2)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from ecus.sim.http import endless, unavailable
from ecus.sim.world import SimVehicle, World

from .base import ScenarioOutcome, _director_path, _overrides, _play, _Run
from .updates import _forget_download, _image, ensure_updates


async def _dropping_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A server that answers every request with 503 (``unavailable()``)."""
    await unavailable()()(scope, receive, send)


def _drop_request(repository: str) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        board = world.director_board if repository == "director" else world.image_board
        app = board.app

        def arm() -> None:
            board.app = _dropping_app

        def disarm() -> None:
            board.app = app

        return _play(_Run(world, vehicle, f"drop-request-{repository}"), arm, disarm)

    return run


def _download_attack(
    name: str, respond: Callable[[bytes], Any]
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """An attack on the download of one pending image: ``respond(data)`` is served instead."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        pending = ensure_updates(world, vehicle, 1)
        serial, assignment = next(iter(pending.items()))
        _, data, path = _image(world, assignment.image)
        _forget_download(vehicle, assignment.image)
        arm, disarm = _overrides(world.image_board.overrides, {path: respond(data)})
        return _play(r, arm, disarm, detail=f"{assignment.image} for {serial}")

    return run


def _endless_metadata(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    path = _director_path(vehicle.vin, "timestamp.json")
    arm, disarm = _overrides(world.director_board.overrides, {path: endless()})
    return _play(_Run(world, vehicle, "endless-metadata"), arm, disarm)
