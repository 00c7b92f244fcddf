"""Freeze, rollback, mix-and-match and wrong-vehicle metadata (Uptane 2.1, 4.3.3)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import timedelta

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Snapshot, Timestamp

from director.errors import UnknownVehicleError
from director.service import EcuSpec
from ecus.sim.compromise import director_resign
from ecus.sim.world import SimVehicle, World

from .base import ScenarioOutcome, _director_path, _overrides, _play, _Run


@contextlib.contextmanager
def _primary_clock(vehicle: SimVehicle, delta: timedelta) -> Iterator[None]:
    """The primary's clock moved by ``delta`` (secondaries keep theirs: their time floors
    persist, so moving their clocks would outlive the scenario)."""
    clock = vehicle.primary.clock
    vehicle.primary.clock = lambda: clock() + delta
    try:
        yield
    finally:
        vehicle.primary.clock = clock


def _freeze_director(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    delta = world.director_config.metadata_expiry + timedelta(hours=1)
    stack = contextlib.ExitStack()
    return _play(
        _Run(world, vehicle, "freeze-director"),
        lambda: stack.enter_context(_primary_clock(vehicle, delta)),
        stack.close,
        detail=f"the network withholds new Director metadata; the vehicle's clock is {delta} on",
    )


def _freeze_image(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    # The Director re-signs before its metadata has less than refresh_margin left,
    # so within that margin only the Image repository's timestamp expires.
    margin = world.director.refresh_margin
    stack = contextlib.ExitStack()

    def arm() -> None:
        world.image_repo.resign([Timestamp.type], expires_in=margin / 4)
        stack.enter_context(_primary_clock(vehicle, margin / 2))

    def disarm() -> None:
        stack.close()
        world.image_repo.resign([Timestamp.type])

    return _play(
        _Run(world, vehicle, "freeze-image"),
        arm,
        disarm,
        detail="the network serves the last Image timestamp after it expired",
    )


def _served(world: World, vin: str, filename: str) -> bytes:
    return world.director.metadata(vin, filename)


def _rollback_director(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "rollback-director-metadata")
    old = _served(world, vehicle.vin, "timestamp.json")
    director_resign(world.director, vehicle.vin)
    vehicle.primary.run_cycle()  # the primary now trusts the newer timestamp
    arm, disarm = _overrides(
        world.director_board.overrides, {_director_path(vehicle.vin, "timestamp.json"): old}
    )
    version = Metadata.from_bytes(old).signed.version
    return _play(r, arm, disarm, detail=f"Director timestamp v{version} replayed")


def _rollback_image(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "rollback-image-metadata")
    old = (world.image_repo.metadata_dir / "timestamp.json").read_bytes()
    world.image_repo.resign()
    vehicle.primary.run_cycle()  # the primary now trusts the newer timestamp
    arm, disarm = _overrides(world.image_board.overrides, {"/metadata/timestamp.json": old})
    version = Metadata.from_bytes(old).signed.version
    return _play(r, arm, disarm, detail=f"Image timestamp v{version} replayed")


def _mix_and_match(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "mix-and-match")
    vin = vehicle.vin
    director_resign(world.director, vin)
    timestamp = _served(world, vin, "timestamp.json")
    snapshot_version = Metadata[Timestamp].from_bytes(timestamp).signed.snapshot_meta.version
    snapshot = _served(world, vin, f"{snapshot_version}.snapshot.json")
    targets_version = Metadata[Snapshot].from_bytes(snapshot).signed.meta["targets.json"].version
    newer = director_resign(world.director, vin)
    newer_targets = _served(world, vin, f"{newer}.targets.json")
    arm, disarm = _overrides(
        world.director_board.overrides,
        {
            _director_path(vin, "timestamp.json"): timestamp,
            _director_path(vin, f"{snapshot_version}.snapshot.json"): snapshot,
            _director_path(vin, f"{targets_version}.targets.json"): newer_targets,
        },
    )
    return _play(
        r,
        arm,
        disarm,
        detail=f"snapshot v{snapshot_version} names targets v{targets_version}, "
        f"targets v{newer} served under that name",
    )


def _decoy_vin(vin: str) -> str:
    return f"{vin}-OTHER"


def _decoy(world: World, vin: str) -> str:
    """Another vehicle known to the Director (registered once), whose metadata is replayed."""
    decoy = _decoy_vin(vin)
    try:
        world.director.vehicle_status(decoy)
    except UnknownVehicleError:
        key = CryptoSigner.generate_ed25519().public_key
        world.director.register_vehicle(decoy, [EcuSpec(f"{decoy}-gw", "gateway", key, True)])
    return decoy


def _versions(world: World, vin: str) -> tuple[int, int, int]:
    """(timestamp, snapshot, targets) versions the Director serves for ``vin``."""
    ts = Metadata[Timestamp].from_bytes(_served(world, vin, "timestamp.json")).signed
    snap = (
        Metadata[Snapshot]
        .from_bytes(_served(world, vin, f"{ts.snapshot_meta.version}.snapshot.json"))
        .signed
    )
    return ts.version, snap.version, snap.meta["targets.json"].version


def _wrong_vehicle(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "wrong-vehicle")
    vin = vehicle.vin
    decoy = _decoy(world, vin)
    ours = _versions(world, vin)
    theirs = _versions(world, decoy)
    # the replayed files must not look older than ours (that is a rollback, caught first)
    while any(t <= o for t, o in zip(theirs, ours, strict=True)):
        director_resign(world.director, decoy)
        theirs = _versions(world, decoy)
    _, snap_v, targets_v = theirs
    files = {
        _director_path(vin, "timestamp.json"): _served(world, decoy, "timestamp.json"),
        _director_path(vin, f"{snap_v}.snapshot.json"): _served(
            world, decoy, f"{snap_v}.snapshot.json"
        ),
        _director_path(vin, f"{targets_v}.targets.json"): _served(
            world, decoy, f"{targets_v}.targets.json"
        ),
    }
    arm, disarm = _overrides(world.director_board.overrides, files)
    return _play(r, arm, disarm, detail=f"Director metadata of {decoy} (targets v{targets_v})")
