"""The primary polls the Director's timestamp with ``If-None-Match`` (issue 12).

A real Director (``sim_world``) and a real primary: a cycle that finds nothing
new gets ``304`` for ``timestamp.json`` and still succeeds on the kept bytes;
a changed timestamp is fetched in full; a 304 for bytes the primary does not
hold is a download error, never an empty or stale "nothing new".
"""

from __future__ import annotations

import json

import pytest
from starlette.responses import Response
from tuf.api import exceptions as tuf_exc

from ecus.primary.config import DownloadPolicy
from ecus.primary.fetch import PolicyFetcher
from ecus.sim.compromise import director_resign
from ecus.sim.fixtures import VehicleFactory
from ecus.sim.world import World


def _timestamp_url(world: World, vin: str) -> str:
    return f"{world.director_url}/vehicles/{vin}/metadata/timestamp.json"


def _version(data: bytes) -> int:
    return int(json.loads(data)["signed"]["version"])


def test_a_cycle_with_nothing_new_gets_304_and_a_changed_timestamp_is_fetched(
    sim_world: World, sim_vehicle: VehicleFactory
) -> None:
    vehicle = sim_vehicle(1)
    url = _timestamp_url(sim_world, vehicle.vin)
    fetcher = vehicle.primary.fetcher
    first = vehicle.primary.run_cycle()
    assert first.ok, first.error
    assert fetcher.not_modified[url] == 0  # the first poll: the whole file
    served = sim_world.director.metadata(vehicle.vin, "timestamp.json")

    again = vehicle.primary.run_cycle()
    assert again.ok, again.error
    assert fetcher.not_modified[url] == 1  # nothing new: 304, the kept bytes
    assert fetcher.last_metadata is not None

    version = director_resign(sim_world.director, vehicle.vin)  # new signed metadata
    changed = sim_world.director.metadata(vehicle.vin, "timestamp.json")
    assert changed != served and _version(changed) > _version(served)
    third = vehicle.primary.run_cycle()
    assert third.ok, third.error
    assert fetcher.not_modified[url] == 1  # the changed timestamp came in full
    # ... and ngclient now trusts it (the targets version the Director just signed)
    trusted = json.loads(
        (vehicle.primary.state.current() / "director" / "timestamp.json").read_bytes()
    )
    assert trusted["signed"]["version"] == _version(changed)
    assert version >= 2

    fourth = vehicle.primary.run_cycle()
    assert fourth.ok, fourth.error
    assert fetcher.not_modified[url] == 2  # and is the one revalidated from now on


def test_a_304_for_bytes_not_held_is_a_download_error(sim_world: World) -> None:
    vin = "COND-NOT-HELD-1"
    path = f"/vehicles/{vin}/metadata/timestamp.json"
    url = f"{sim_world.director_url}{path}"
    fetcher = PolicyFetcher(DownloadPolicy())
    board = sim_world.director_board
    try:
        # a 304 to a primary that sent no If-None-Match (it holds nothing)
        board.overrides[path] = lambda: Response(status_code=304, headers={"ETag": '"x"'})
        with pytest.raises(tuf_exc.DownloadHTTPError):
            fetcher.download_bytes(url, 10_000)
        # it now holds a body under one tag; a 304 naming another tag is refused too
        board.overrides[path] = lambda: Response(b'{"a": 1}', headers={"ETag": '"one"'})
        assert fetcher.download_bytes(url, 10_000) == b'{"a": 1}'
        board.overrides[path] = lambda: Response(status_code=304, headers={"ETag": '"two"'})
        with pytest.raises(tuf_exc.DownloadHTTPError):
            fetcher.download_bytes(url, 10_000)
        # the same tag: the kept bytes
        board.overrides[path] = lambda: Response(status_code=304, headers={"ETag": '"one"'})
        assert fetcher.download_bytes(url, 10_000) == b'{"a": 1}'
        assert fetcher.not_modified[url] == 1
        # a body cut short by the length cap is never kept for a later 304
        other = f"{url}?cut"
        board.overrides[path] = lambda: Response(b"x" * 5000, headers={"ETag": '"big"'})
        with pytest.raises(tuf_exc.DownloadLengthMismatchError):
            fetcher.download_bytes(other, 100)
        board.overrides[path] = lambda: Response(status_code=304, headers={"ETag": '"big"'})
        with pytest.raises(tuf_exc.DownloadHTTPError):
            fetcher.download_bytes(other, 100)
    finally:
        board.overrides.pop(path, None)
