"""One repository compromised: arbitrary software; replayed manifests (Uptane 2.1, 4.3.4, 5.4.2)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp

from ecus.sim.compromise import (
    ImageRepoCompromise,
    craft_director_targets,
    director_resign,
    evil_target,
)
from ecus.sim.world import SimVehicle, World
from uptane.metadata import ECU_SERIAL, HARDWARE_IDS, RELEASE_COUNTER

from .base import ScenarioOutcome, _overrides, _play, _Run, last_manifest
from .updates import (
    _forget_download,
    _image,
    _installed_counter,
    ensure_updates,
    next_release,
    publish_release,
    release_module,
)


def _swapped(data: bytes) -> bytes:
    """Other bytes of the same length (a compromised Image server, no keys)."""
    return bytes(b ^ 0xFF for b in data)


def _craft(world: World, vin: str, mutate: Callable[[Targets], None]) -> int:
    """Sign Director metadata for ``vin`` as an attacker holding the Director's online keys."""
    return craft_director_targets(
        world.director,
        world.director_config.online_signers(),
        vin,
        mutate,
        expiry=world.director_config.metadata_expiry,
    )


def _replace_ecu_target(serial: str, target: TargetFile) -> Callable[[Targets], None]:
    def mutate(t: Targets) -> None:
        t.targets = {p: tf for p, tf in t.targets.items() if tf.custom.get(ECU_SERIAL) != serial}
        t.targets[target.path] = target

    return mutate


def _latest_image(world: World, hardware_id: str) -> TargetFile | None:
    found = [
        t
        for _, t in world.image_repo.targets().values()
        if hardware_id in (t.custom or {}).get(HARDWARE_IDS, ())
    ]
    return max(found, key=lambda t: int(t.custom.get(RELEASE_COUNTER, 0)), default=None)


def _compromised_director(
    name: str, choose: Callable[[World, SimVehicle], tuple[str, TargetFile, str]]
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """The Director's online keys sign a target ``choose`` picks for one ECU; then the
    real Director signs again from its inventory."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        serial, target, detail = choose(world, vehicle)

        def arm() -> None:
            _craft(world, vehicle.vin, _replace_ecu_target(serial, target))

        def disarm() -> None:
            director_resign(world.director, vehicle.vin)

        return _play(r, arm, disarm, detail=detail)

    return run


def _evil_director_target(world: World, vehicle: SimVehicle) -> tuple[str, TargetFile, str]:
    serial, sec = next(iter(vehicle.secondaries.items()))
    like = _latest_image(world, sec.hardware_id)
    if like is None:
        publish_release(world, sec.hardware_id, next_release(world, vehicle, sec.hardware_id))
        like = _latest_image(world, sec.hardware_id)
        assert like is not None
    counter = max(_installed_counter(sec) + 1, int(like.custom.get(RELEASE_COUNTER, 0)))
    evil = evil_target(
        like,
        release_module(counter, "evil"),
        **{ECU_SERIAL: serial, RELEASE_COUNTER: counter},
    )
    return serial, evil, f"{like.path} with the hashes of other bytes, for {serial}"


def _release_rollback_target(world: World, vehicle: SimVehicle) -> tuple[str, TargetFile, str]:
    """An older release of an installed app, assigned by the Director's keys."""
    installed = {
        s: c for s, sec in vehicle.secondaries.items() if (c := _installed_counter(sec)) >= 1
    }
    if not installed:  # a fresh vehicle: install a release first (setup, not the attack)
        pending = ensure_updates(world, vehicle, 1)
        vehicle.cycle()
        installed = {
            s: c for s in pending if (c := _installed_counter(vehicle.secondaries[s])) >= 1
        }
        if not installed:
            raise RuntimeError(f"{vehicle.vin}: could not install a first release")
    serial, counter = next(iter(installed.items()))
    hw = vehicle.secondaries[serial].hardware_id
    older = [
        t
        for _, t in world.image_repo.targets().values()
        if hw in (t.custom or {}).get(HARDWARE_IDS, ())
        and int(t.custom.get(RELEASE_COUNTER, 0)) < counter
    ]
    if older:
        old = max(older, key=lambda t: int(t.custom.get(RELEASE_COUNTER, 0)))
    else:
        legacy = publish_release(world, hw, counter - 1, tag="legacy")
        _, old = world.image_repo.targets()[legacy]
    target = TargetFile(
        length=old.length,
        hashes=dict(old.hashes),
        path=old.path,
        unrecognized_fields={"custom": {**old.custom, ECU_SERIAL: serial}},
    )
    old_counter = old.custom.get(RELEASE_COUNTER)
    return serial, target, f"{old.path} (release {old_counter}) for {serial}, which runs {counter}"


def _image_threshold(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "arbitrary-software-image-threshold")
    pending = ensure_updates(world, vehicle, 1)
    serial, assignment = next(iter(pending.items()))
    like, _, _ = _image(world, assignment.image)
    evil = evil_target(like, release_module(int(like.custom[RELEASE_COUNTER]), "evil"))
    attacker = ImageRepoCompromise(world.image_repo.path)
    served = attacker.sign_targets(lambda t: t.targets.__setitem__(evil.path, evil))
    _forget_download(vehicle, assignment.image)
    arm, undo = _overrides(world.image_board.overrides, served.files)

    def disarm() -> None:
        undo()
        # the attacker's timestamp/snapshot verified and stay trusted (TUF 5.4.5, 5.5.7):
        # the repository recovers from leaked online keys by replacing them (TUF 5.3.11)
        for role in (Snapshot.type, Timestamp.type):
            keyids = Metadata[Root].from_bytes(world.image_repo.root_bytes()).signed.roles[role]
            world.image_repo.rotate_key(role, keyids.keyids[0])

    return _play(
        r,
        arm,
        disarm,
        detail=f"Image targets v{served.targets_version} signed by "
        f"{len(attacker.targets_signers)} targets key(s): {evil.path} for {serial}",
    )


# --- manifests (5.4.2) ---------------------------------------------------------------


def _replayed_manifest(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "replayed-manifest")
    body = last_manifest(world, vehicle.vin)
    if body is None:  # nothing captured yet: let the vehicle send one first
        vehicle.primary.run_cycle()
        body = last_manifest(world, vehicle.vin)
        assert body is not None
    r.mark()
    inventory = world.director.vehicle_status(vehicle.vin).ecus
    response = httpx.put(
        f"{world.director_url}/vehicles/{vehicle.vin}/manifest",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10.0,
    )
    answer = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    reason = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    refused = response.status_code >= 400
    if refused and reason:
        r.detected.append(reason)
    unchanged_inventory = world.director.vehicle_status(vehicle.vin).ecus == inventory
    unchanged = r.unchanged()
    recovery = vehicle.cycle()
    detail = str(answer.get("detail", "")) if isinstance(answer, dict) else ""
    return r.finish(
        None,
        recovery,
        slots_unchanged=unchanged,
        error=f"ManifestError: {reason}: {detail}" if refused else None,
        blocked=refused and unchanged_inventory and unchanged,
        detail=f"HTTP {response.status_code} for the replayed manifest",
    )
