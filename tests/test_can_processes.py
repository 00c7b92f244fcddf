"""A primary and two secondaries as three OS processes on a cross-process CAN bus.

python-can's ``virtual`` interface connects the buses of one process only, so
``uptane ecu primary`` and ``uptane ecu secondary`` in separate processes use
``udp_multicast`` (shipped with python-can; TTL 0, so frames stay on this
host; each test its own multicast port, so parallel runs do not meet).
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from director.service import EcuSpec
from ecus.sim.world import World, image_name
from uptane.keys import generate_ed25519, load_keyref, load_public_key

UPTANE = str(Path(sys.executable).with_name("uptane"))
GROUP = "239.74.163.2"
SECONDARIES = (("brake-ctl", 0x610, 0x611), ("body-ctl", 0x612, 0x613))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("can-processes-world"))
    yield w
    w.close()


def write_configs(world: World, d: Path, vin: str, bus: dict[str, object]) -> list[Path]:
    """Keys, the vehicle registered, and the configs: [primary, secondary 1, secondary 2]."""
    keys = d / "keys"
    generate_ed25519(keys, "primary")
    specs = [EcuSpec(f"{vin}-primary", "gateway", load_public_key(keys / "primary.pub.json"), True)]
    entries, ids, paths = [], {}, []
    for hw, request_id, response_id in SECONDARIES:
        serial = f"{vin}-{hw}"
        generate_ed25519(keys, hw)
        public = json.loads((keys / f"{hw}.pub.json").read_text())
        specs.append(EcuSpec(serial, hw, load_public_key(keys / f"{hw}.pub.json")))
        entries.append({"serial": serial, "hardware_id": hw, "public_key": public})
        ids[serial] = {"request_id": hex(request_id), "response_id": hex(response_id)}
        cfg = d / f"{hw}.json"
        cfg.write_text(
            json.dumps(
                {
                    "serial": serial,
                    "hardware_id": hw,
                    "vin": vin,
                    "key": {"uri": f"file2:keys/{hw}.pem", "public": f"keys/{hw}.pub.json"},
                    "director_root": "director-root.der",
                    "slot_dir": f"slots-{hw}",
                    "can": {"request_id": hex(request_id), "response_id": hex(response_id)},
                    "bus": bus,
                }
            )
        )
        paths.append(cfg)
    world.director.register_vehicle(vin, specs)
    (d / "director-root.json").write_bytes(world.director_root_json)
    (d / "director-root.der").write_bytes(world.director_root_der)
    (d / "image-root.json").write_bytes(world.image_repo.root_bytes(1))
    primary = d / "primary.json"
    primary.write_text(
        json.dumps(
            {
                "vin": vin,
                "ecu_serial": f"{vin}-primary",
                "hardware_id": "gateway",
                "key": load_keyref(keys, "primary").to_dict(),
                "repository_map": json.loads(json.dumps(_repository_map(world))),
                "director_root": "director-root.json",
                "image_root": "image-root.json",
                "state_dir": "primary-state",
                "secondaries": entries,
                "can": {"ids": ids, "bus": bus},
            }
        )
    )
    return [primary, *paths]


def _repository_map(world: World) -> dict[str, object]:
    return {
        "repositories": {"director": [world.director_url], "image": [world.image_url]},
        "mapping": [
            {
                "paths": ["*"],
                "repositories": ["director", "image"],
                "terminating": True,
                "threshold": 2,
            }
        ],
    }


def start_secondary(config: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [UPTANE, "ecu", "secondary", str(config), "--max-seconds", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once its endpoint is on the bus
    assert "listening on udp_multicast:" in line, line
    return proc


@pytest.mark.parametrize("fd", [False, True], ids=["classic", "fd"])
def test_primary_and_two_secondaries_in_three_processes(
    world: World, tmp_path: Path, fd: bool
) -> None:
    vin = f"PROC{uuid.uuid4().hex[:8]}"
    port = random.randint(20_000, 60_000)
    bus = {"interface": "udp_multicast", "channel": GROUP, "fd": fd, "options": {"port": port}}
    primary, *secondaries = write_configs(world, tmp_path, vin, bus)
    procs = [start_secondary(cfg) for cfg in secondaries]
    try:
        hws = [hw for hw, _, _ in SECONDARIES]
        world.publish(1, hws)
        assigned = world.director.assign(
            image_name(hws[0], 1), hardware_id=hws[0], vins=[vin]
        ) + world.director.assign(image_name(hws[1], 1), hardware_id=hws[1], vins=[vin])
        assert len(assigned) == 2
        run = subprocess.run(
            [UPTANE, "ecu", "primary", str(primary), "--once"],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.startswith("cycle 1: ok"), run.stdout
        for hw in hws:  # each secondary's signed install report, verified by the primary
            assert f"{vin}-{hw} installed {image_name(hw, 1)}" in run.stdout
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.communicate(timeout=30)
    for hw in hws:  # and each secondary process left its new image active on disk
        state = json.loads((tmp_path / f"slots-{hw}" / "state.json").read_text())
        assert image_name(hw, 1) in json.dumps(state)
