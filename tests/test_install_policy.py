"""Consent at the vehicle: install policies, deferred/declined reported and counted (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

from ecus.primary.policy import (
    INSTALL,
    AllOf,
    Ask,
    AskFile,
    Automatic,
    Conditions,
    UpdateDeclinedError,
    UpdateDeferredError,
    UpdateOffer,
)
from ecus.sim.fixtures import VehicleFactory, hardware_ids
from ecus.sim.world import World, image_name

OFFER = UpdateOffer("VIN1", {"ecu-1": "a.wasm", "ecu-2": "b.wasm"}, {"ecu-1": 2, "ecu-2": 3})


def test_policies_decide(tmp_path: Path) -> None:
    assert Automatic().decide(OFFER).verdict == INSTALL
    asked: list[UpdateOffer] = []

    def prompt(answer: bool | None) -> Ask:
        return Ask(lambda offer: asked.append(offer) or answer)

    assert prompt(True).decide(OFFER).verdict == "install" and asked == [OFFER]
    assert prompt(False).decide(OFFER).verdict == "decline"
    assert prompt(None).decide(OFFER).verdict == "defer"

    def broken(offer: UpdateOffer) -> bool:
        raise RuntimeError("HMI down")

    assert Ask(broken).decide(OFFER).verdict == "defer"  # a failing prompt never installs
    file = tmp_path / "approvals.json"
    assert AskFile(file).decide(OFFER).verdict == "defer"  # no file yet
    file.write_text("{not json")
    assert AskFile(file).decide(OFFER).verdict == "defer"
    file.write_text(json.dumps({"a.wasm": "approve"}))
    d = AskFile(file).decide(OFFER)
    assert d.verdict == "defer" and "b.wasm" in d.reason  # every image must be approved
    file.write_text(json.dumps({"a.wasm": "approve", "b.wasm": "decline"}))
    assert AskFile(file).decide(OFFER).verdict == "decline"
    file.write_text(json.dumps({"a.wasm": "approve", "b.wasm": "approve"}))
    assert AskFile(file).decide(OFFER).verdict == "install"

    def battery() -> bool:
        raise OSError("no reading")

    d = Conditions({"parked": lambda: True, "battery": battery}).decide(OFFER)
    assert d.verdict == "defer" and d.reason == "conditions not met: battery"
    d = AllOf(Conditions({"parked": lambda: True}), AskFile(file)).decide(OFFER)
    assert d.verdict == "install"
    d = AllOf(Conditions({"parked": lambda: False}), AskFile(file)).decide(OFFER)
    assert d.verdict == "defer"


def test_held_updates_are_reported_and_counted_not_failed(
    sim_world: World, sim_vehicle: VehicleFactory, tmp_path: Path
) -> None:
    vehicle = sim_vehicle(1)
    (hw,) = hardware_ids(vehicle)
    (serial,) = vehicle.secondaries
    sim_world.publish(1, [hw])
    image = image_name(hw, 1)
    director = sim_world.director
    c = director.create_campaign(
        {
            "name": f"consent-{vehicle.vin}",
            "images": {hw: image},
            "target": {"vins": [vehicle.vin]},
            "halt": {"install_failures": 0},
            "phases": [{"name": "all", "percent": 100}],
        }
    )
    ecu = vehicle.secondaries[serial].ecu
    assert ecu is not None

    parked = False
    vehicle.primary.install_policy = Conditions({"parked": lambda: parked})
    out = vehicle.cycle()
    assert (
        isinstance(out.ecus[serial].error, str) and "UpdateDeferredError" in out.ecus[serial].error
    )
    assert ecu.store.active_target() is None  # nothing went to the secondary
    vehicle.cycle()  # its manifest says deferred
    totals = director.campaign(c.name).totals()
    assert (totals["deferred"], totals["install_failures"], totals["installed"]) == (1, 0, 0)
    director.tick()
    assert director.campaign(c.name).status != "halted"  # held updates are no failures

    approvals = tmp_path / "approvals.json"
    approvals.write_text(json.dumps({image: "decline"}))
    parked = True
    vehicle.primary.install_policy = AllOf(
        Conditions({"parked": lambda: parked}), AskFile(approvals)
    )
    held = vehicle.primary.distribute(vehicle.primary.run_cycle())
    assert isinstance(held[serial], UpdateDeclinedError)
    vehicle.cycle()
    totals = director.campaign(c.name).totals()
    assert (totals["declined"], totals["deferred"], totals["install_failures"]) == (1, 0, 0)
    assert ecu.store.active_target() is None

    approvals.write_text(json.dumps({image: "approve"}))
    out = vehicle.cycle()
    assert out.ecus[serial].installed == image
    vehicle.cycle()
    totals = director.campaign(c.name).totals()
    assert (totals["installed"], totals["declined"], totals["deferred"]) == (1, 0, 0)
    assert director.campaign(c.name).status != "halted"


def test_deferred_error_is_typed() -> None:
    assert UpdateDeferredError.result == "deferred" and UpdateDeclinedError.result == "declined"


def test_ecu_primary_defers_until_the_approval_file_says_so(tmp_path: Path) -> None:
    import threading
    import uuid

    from test_ecu_cli import HW, ecu, write_configs

    from ecus.cli import serve_secondary
    from ecus.secondary import Secondary
    from ecus.secondary.config import SecondaryConfig

    with World(tmp_path / "world") as world:
        vin = f"CLI{uuid.uuid4().hex[:8]}"
        channel = f"policy-{uuid.uuid4().hex[:8]}"
        primary_cfg, secondary_cfg, serial = write_configs(world, tmp_path, vin, channel)
        stop, ready = threading.Event(), threading.Event()
        ecus: list[Secondary] = []

        def on_ready(e: Secondary) -> None:
            ecus.append(e)
            ready.set()

        config = SecondaryConfig.load(secondary_cfg)
        thread = threading.Thread(
            target=lambda: serve_secondary(config, stop, on_ready=on_ready), daemon=True
        )
        thread.start()
        try:
            assert ready.wait(10)
            world.publish(1, [HW])
            world.director.assign(image_name(HW, 1), ecu_serials=[serial])
            approvals = tmp_path / "approvals.json"
            args = ["primary", str(primary_cfg), "--once", "--approvals", str(approvals)]
            args += ["--interface", "virtual", "--channel", channel]
            code, out = ecu(*args)
            assert code == 0, out  # held is not a failure
            assert f"{serial} deferred {image_name(HW, 1)} (deferred: waiting for approval" in out
            assert ecus[0].store.active_target() is None
            approvals.write_text(json.dumps({image_name(HW, 1): "approve"}))
            code, out = ecu(*args)
            assert code == 0 and f"{serial} installed {image_name(HW, 1)}" in out, out
        finally:
            stop.set()
            thread.join(10)
