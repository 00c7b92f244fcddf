"""Updates in flight for the scenarios that need one: pending, or a new demo release assigned."""

from __future__ import annotations

from tuf.api.metadata import TargetFile

from director.service import AssignmentInfo
from ecus.primary import safe_target_path
from ecus.sim.world import APPS_DIR, SimSecondary, SimVehicle, World, app_module
from image_repo.layout import blob_relpath
from uptane.metadata import HARDWARE_IDS, RELEASE_COUNTER

from .base import _running, pending_assignments


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def release_module(release: int, tag: str = "release") -> bytes:
    """A valid demo WASM app for ``release``: ``blink_v{release}`` if it exists, else
    ``blink_v2`` (``blink_v1`` below 1) with a custom section naming the release."""
    if (APPS_DIR / f"blink_v{release}.wat").exists() and tag == "release":
        return app_module(release)
    name = tag.encode()
    payload = _leb(len(name)) + name + str(release).encode()
    return app_module(2 if release >= 2 else 1) + b"\x00" + _leb(len(payload)) + payload


def _installed_counter(sec: SimSecondary) -> int:
    active = None if sec.ecu is None else sec.ecu.store.active_target()
    return -1 if active is None else active.release_counter


def next_release(world: World, vehicle: SimVehicle, hardware_id: str) -> int:
    """A release counter above everything published for ``hardware_id`` and installed."""
    counters = [
        int(t.custom.get(RELEASE_COUNTER, 0))
        for _, t in world.image_repo.targets().values()
        if hardware_id in (t.custom or {}).get(HARDWARE_IDS, ())
    ]
    counters += [
        _installed_counter(s) for s in vehicle.secondaries.values() if s.hardware_id == hardware_id
    ]
    return max(counters, default=0) + 1


def publish_release(world: World, hardware_id: str, release: int, tag: str = "release") -> str:
    """Publish ``release`` of the demo app for ``hardware_id``; returns the image name."""
    data = release_module(release, tag)
    (name,) = world.publish(release, [hardware_id], data=data)
    return name


def _runs(sec: SimSecondary, assignment: AssignmentInfo) -> bool:
    """Does the secondary already run the assigned image (the Director may not know yet)?"""
    name, hashes = _running(sec)
    common = set(hashes) & set(assignment.hashes)
    return (
        name == assignment.image
        and bool(common)
        and all(hashes[a] == assignment.hashes[a] for a in common)
    )


def waiting_updates(world: World, vehicle: SimVehicle) -> dict[str, AssignmentInfo]:
    """Pending assignments of the vehicle's secondaries that they do not run yet."""
    pending = pending_assignments(world, vehicle.vin)
    return {
        s: a
        for s, a in pending.items()
        if s in vehicle.secondaries and not _runs(vehicle.secondaries[s], a)
    }


def ensure_updates(world: World, vehicle: SimVehicle, count: int = 1) -> dict[str, AssignmentInfo]:
    """At least ``count`` secondaries with an update to install; returns all of them.

    Pending assignments are kept as they are (the scenario uses them); the
    first secondaries without one get a new release of their app.
    """
    if count > len(vehicle.secondaries):
        raise ValueError(
            f"{vehicle.vin} has {len(vehicle.secondaries)} secondaries, {count} needed"
        )
    waiting = waiting_updates(world, vehicle)
    missing = count - len(waiting)
    for serial, sec in vehicle.secondaries.items():
        if missing <= 0:
            break
        if serial in waiting:
            continue
        name = publish_release(
            world, sec.hardware_id, next_release(world, vehicle, sec.hardware_id)
        )
        world.director.assign(name, ecu_serials=[serial])
        missing -= 1
    return waiting_updates(world, vehicle)


def _image(world: World, name: str) -> tuple[TargetFile, bytes, str]:
    """An Image repository target, its bytes and the URL path it is downloaded from."""
    _, target = world.image_repo.targets()[name]
    data = world.image_repo.blob_path(target).read_bytes()
    return target, data, "/targets/" + blob_relpath(target.path, target.hashes["sha256"])


def _forget_download(vehicle: SimVehicle, name: str) -> None:
    """Drop the primary's cached copy of an image so that the next cycle downloads it."""
    safe_target_path(vehicle.primary.config.images_dir, name).unlink(missing_ok=True)
