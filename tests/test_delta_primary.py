"""The primary sends a signed delta when the ECU runs its base (docs/deltas.md; 5.4.4.2).

A whole vehicle against the real Image repository and Director on loopback,
its secondary on a virtual CAN bus (ISO-TP).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.delta_images import release

from ecus.sim.world import SimVehicle, World, image_name
from image_repo.delta import add_delta
from uptane.delta import DeltaInfo

HW = "brake-ctl"
VIN = "DELTA00001"


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path / "world")
    try:
        w.publish(1, [HW], data=release(1))
        w.publish(2, [HW], data=release(2))
        yield w
    finally:
        w.close()


def vehicle(world: World, progress: list[tuple[int, int]]) -> tuple[SimVehicle, str]:
    car = world.add_vehicle(VIN, [HW], progress=lambda _s, o, n: progress.append((o, n)))
    serial = next(iter(car.secondaries))
    world.assign_version(1, [HW], vins=[VIN])
    outcome = car.cycle()
    assert outcome.ok and outcome.ecus[serial].installed == image_name(HW, 1)
    return car, serial


def publish_delta(world: World) -> int:
    repo = world.image_repo
    base = repo.targets()[image_name(HW, 1)][1]
    delta = add_delta(repo, image_name(HW, 2), base)
    assert delta is not None
    info = DeltaInfo.from_target_file(delta)
    assert info is not None and info.base.name == image_name(HW, 1)
    return delta.length


def test_delta_goes_on_the_bus_when_the_ecu_runs_its_base(world: World) -> None:
    sent: list[tuple[int, int]] = []
    car, serial = vehicle(world, sent)
    assert sent[-1] == (len(release(1)), len(release(1)))  # release 1 went in full
    delta_length = publish_delta(world)
    world.assign_version(2, [HW], vins=[VIN])
    sent.clear()
    outcome = car.cycle()
    assert outcome.ok, outcome.errors
    update = outcome.cycle.updates[serial]
    assert update.delta is not None and update.delta.offer.length == delta_length
    assert sent and {n for _, n in sent} == {delta_length}  # only the delta's bytes
    assert outcome.ecus[serial].installed == image_name(HW, 2)
    assert car.report(serial).installed is not None
    assert car.report(serial).installed.hashes == dict(
        world.image_repo.targets()[image_name(HW, 2)][1].hashes
    )
    assert car.tick(serial, 3) == 3 * 2 + 7  # blink v2 runs


def test_full_image_when_no_delta_starts_from_the_ecu_image(world: World) -> None:
    sent: list[tuple[int, int]] = []
    car, serial = vehicle(world, sent)
    world.assign_version(2, [HW], vins=[VIN])  # no delta published
    sent.clear()
    outcome = car.cycle()
    assert outcome.ok
    assert outcome.cycle.updates[serial].delta is None
    assert {n for _, n in sent} == {len(release(2))}
    assert outcome.ecus[serial].installed == image_name(HW, 2)


@pytest.mark.parametrize(("part", "hash_name"), [("result", "sha256"), ("base", "sha512")])
def test_delta_naming_other_bytes_is_not_used(world: World, part: str, hash_name: str) -> None:
    sent: list[tuple[int, int]] = []
    car, serial = vehicle(world, sent)
    publish_delta(world)
    repo = world.image_repo
    # the Image repository signs a delta whose metadata names other result bytes
    # than the Director's target, or another base than the ECU runs: not sent
    with repo._edit() as edit:
        targets = edit.repo
        with targets.edit_targets() as signed:
            for target in signed.targets.values():
                delta = (target.custom or {}).get("delta")
                if delta is not None:
                    delta[part]["hashes"][hash_name] = "0" * len(delta[part]["hashes"][hash_name])
        targets.publish()
    world.assign_version(2, [HW], vins=[VIN])
    sent.clear()
    outcome = car.cycle()
    assert outcome.ok
    assert outcome.cycle.updates[serial].delta is None
    assert {n for _, n in sent} == {len(release(2))}
    assert outcome.ecus[serial].installed == image_name(HW, 2)


def test_a_warm_cycle_takes_the_delta_from_what_it_verified(world: World) -> None:
    """Nothing changed since the last cycle (a retry): the delta comes from the verified
    Image repository, not from a lookup that would make ngclient refresh again."""
    car, serial = vehicle(world, [])
    publish_delta(world)
    world.assign_version(2, [HW], vins=[VIN])
    first = car.primary.run_cycle()  # not distributed: the update stays pending
    assert first.ok, first.issues
    assert first.updates[serial].delta is not None
    world.image_board.requests.clear()
    second = car.primary.run_cycle()
    assert second.ok, second.issues
    update = second.updates[serial]
    assert update.delta is not None
    assert update.delta.target_name == first.updates[serial].delta.target_name
    fetched = [p.rsplit("/", 1)[-1] for _, p in world.image_board.requests if "/metadata/" in p]
    assert fetched == ["2.root.json", "timestamp.json"], fetched  # only the timestamp checks


def test_delta_signed_through_a_delegation_for_other_hardware_is_not_used(world: World) -> None:
    """A delta reached through a delegation that does not allow the ECU's hardware id
    (5.4.4.2 step 7, Uptane 2.1 delegation resolution) is not sent: the image goes."""
    sent: list[tuple[int, int]] = []
    car, serial = vehicle(world, sent)
    repo = world.image_repo
    base = repo.targets()[image_name(HW, 1)][1]
    delta = add_delta(repo, image_name(HW, 2), base)
    assert delta is not None
    repo.delegate("other-supplier", paths=[delta.path], hardware_ids=["other-hw"])
    # the delta moves from top-level targets to the delegated role (its blob stays)
    with repo._edit() as edit:
        signing = edit.repo
        with signing.edit_targets() as top:
            del top.targets[delta.path]
        with signing.edit_targets("other-supplier") as supplier:
            supplier.targets[delta.path] = delta
        signing.publish()
    world.assign_version(2, [HW], vins=[VIN])
    sent.clear()
    outcome = car.cycle()
    assert outcome.ok, outcome.errors
    assert outcome.cycle.updates[serial].delta is None
    assert {n for _, n in sent} == {len(release(2))}
    assert outcome.ecus[serial].installed == image_name(HW, 2)
