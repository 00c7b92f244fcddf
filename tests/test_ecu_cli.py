"""``uptane ecu``: keygen, a primary and a secondary on a python-can virtual bus.

The primary's cycle line names each ECU's outcome and ``--once`` fails (exit
1) when the Director refused the manifest or an update did not install.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import wasmtime
from click.testing import CliRunner

from director.service import EcuSpec
from ecus import cli as ecus_cli
from ecus.cli import serve_secondary
from ecus.primary.can_config import load_primary
from ecus.secondary import Secondary
from ecus.secondary.config import SecondaryConfig
from ecus.sim.world import World, image_name
from ecus.transport.isotp import CanBusConfig
from uptane.cli import cli as uptane_cli
from uptane.keys import load_public_key

HW = "brake-ctl"
WAT_DIR = Path(__file__).parent / "wat"


def ecu(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(uptane_cli, ["ecu", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World(tmp_path_factory.mktemp("ecu-cli-world"))
    yield w
    w.close()


def write_configs(world: World, d: Path, vin: str, channel: str) -> tuple[Path, Path, str]:
    """Keys via ``uptane ecu keygen``, the vehicle registered, both config files written."""
    keys = d / "keys"
    code, out = ecu("keygen", str(keys), "primary")
    assert code == 0 and out.strip() == str((keys / "primary.pub.json").resolve())
    code, out = ecu("keygen", str(keys), "brake")
    assert code == 0
    primary_serial, serial = f"{vin}-primary", f"{vin}-brake"
    world.director.register_vehicle(
        vin,
        [
            EcuSpec(primary_serial, "gateway", load_public_key(keys / "primary.pub.json"), True),
            EcuSpec(serial, HW, load_public_key(Path(out.strip()))),
        ],
    )
    (d / "director-root.json").write_bytes(world.director_root_json)
    (d / "director-root.der").write_bytes(world.director_root_der)
    (d / "image-root.json").write_bytes(world.image_repo.root_bytes(1))
    primary_cfg = d / "primary.json"
    primary_cfg.write_text(
        json.dumps(
            {
                "vin": vin,
                "ecu_serial": primary_serial,
                "hardware_id": "gateway",
                # key files as `uptane ecu keygen` wrote them, like the secondary's config
                "key": {"uri": "file2:keys/primary.pem", "public": "keys/primary.pub.json"},
                "repository_map": {
                    "repositories": {
                        "director": [world.director_url],
                        "image": [world.image_url],
                    },
                    "mapping": [
                        {
                            "paths": ["*"],
                            "repositories": ["director", "image"],
                            "terminating": True,
                            "threshold": 2,
                        }
                    ],
                },
                "director_root": "director-root.json",
                "image_root": "image-root.json",
                "state_dir": "primary-state",
                "secondaries": [
                    {
                        "serial": serial,
                        "hardware_id": HW,
                        "public_key": "keys/brake.pub.json",
                    }
                ],
                "can": {"ids": {serial: {"request_id": "0x610", "response_id": "0x611"}}},
            }
        )
    )
    secondary_cfg = d / "secondary.json"
    secondary_cfg.write_text(
        json.dumps(
            {
                "serial": serial,
                "hardware_id": HW,
                "vin": vin,
                "key": {"uri": "file2:keys/brake.pem", "public": "keys/brake.pub.json"},
                "director_root": "director-root.der",
                "primary_key": "keys/primary.pub.json",
                "slot_dir": "slots",
                "can": {"request_id": "0x610", "response_id": "0x611"},
                "bus": {"interface": "virtual", "channel": channel},
            }
        )
    )
    return primary_cfg, secondary_cfg, serial


def test_primary_updates_a_secondary_over_virtual_can(world: World, tmp_path: Path) -> None:
    vin = f"CLI{uuid.uuid4().hex[:8]}"
    channel = f"ecu-cli-{uuid.uuid4().hex[:8]}"
    primary_cfg, secondary_cfg, serial = write_configs(world, tmp_path, vin, channel)
    _, can_setup = load_primary(primary_cfg)
    assert can_setup.ids == {serial: (0x610, 0x611)}

    stop = threading.Event()
    ready = threading.Event()
    ecus: list[Secondary] = []

    def on_ready(ecu: Secondary) -> None:
        ecus.append(ecu)
        ready.set()

    config = SecondaryConfig.load(secondary_cfg)
    thread = threading.Thread(
        target=lambda: serve_secondary(config, stop, on_ready=on_ready), daemon=True
    )
    thread.start()
    try:
        assert ready.wait(10)
        world.publish(1, [HW])
        assert len(world.director.assign(image_name(HW, 1), ecu_serials=[serial])) == 1
        code, out = ecu(
            "primary", str(primary_cfg), "--once", "--interface", "virtual", "--channel", channel
        )
        assert code == 0, out
        assert out.startswith("cycle 1: ok") and len(out.splitlines()) == 1
        assert "manifest: accepted" in out
        assert f"{serial} installed {image_name(HW, 1)}" in out
        active = ecus[0].store.active_target()
        assert active is not None and active.name == image_name(HW, 1)
        assert ecus[0].report_state.last_result == "ok"
        assert ecus[0].report_state.attacks == ()  # the primary's signed time was accepted
        assert ecus[0].store.time_floor is not None
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()


@contextmanager
def running_secondary(config_path: Path, channel: str) -> Iterator[Secondary]:
    """``serve_secondary`` in a thread on ``channel`` until the block ends."""
    stop, ready = threading.Event(), threading.Event()
    ecus: list[Secondary] = []

    def on_ready(ecu: Secondary) -> None:
        ecus.append(ecu)
        ready.set()

    config = replace(
        SecondaryConfig.load(config_path),
        bus=CanBusConfig(interface="virtual", channel=channel),
    )
    thread = threading.Thread(
        target=lambda: serve_secondary(config, stop, on_ready=on_ready), daemon=True
    )
    thread.start()
    try:
        assert ready.wait(10)
        yield ecus[0]
    finally:
        stop.set()
        thread.join(10)


def test_once_fails_when_a_secondary_is_unreachable(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ecus_cli, "LINK_TIMEOUT", 0.5)
    vin = f"CLI{uuid.uuid4().hex[:8]}"
    channel = f"ecu-cli-{uuid.uuid4().hex[:8]}"  # nobody answers on it
    primary_cfg, _, serial = write_configs(world, tmp_path, vin, channel)
    code, out = ecu(
        "primary", str(primary_cfg), "--once", "--interface", "virtual", "--channel", channel
    )
    assert code == 1, out
    assert out.startswith("cycle 1: FAILED") and len(out.splitlines()) == 1
    assert f"{serial} unreachable" in out
    assert "manifest: accepted" in out  # the Director hears from the rest of the vehicle


def test_loop_mode_prints_the_same_line_every_cycle(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ecus_cli, "LINK_TIMEOUT", 0.5)
    vin = f"CLI{uuid.uuid4().hex[:8]}"
    channel = f"ecu-cli-{uuid.uuid4().hex[:8]}"  # nobody answers on it
    primary_cfg, _, serial = write_configs(world, tmp_path, vin, channel)
    config, can_setup = load_primary(primary_cfg)
    can_setup = replace(can_setup, bus=CanBusConfig(interface="virtual", channel=channel))
    lines: list[str] = []
    stop = threading.Event()

    def echo(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            stop.set()

    ok = ecus_cli.run_cycles(config, can_setup, once=False, interval=0, echo=echo, stop=stop)
    assert not ok and len(lines) == 2
    for n, line in enumerate(lines, 1):
        assert line.startswith(f"cycle {n}: FAILED") and f"{serial} unreachable" in line
        assert "manifest: accepted" in line


def test_once_fails_and_director_list_shows_why_when_the_secondary_refuses(
    world: World, tmp_path: Path
) -> None:
    vin = f"CLI{uuid.uuid4().hex[:8]}"
    channel = f"ecu-cli-{uuid.uuid4().hex[:8]}"
    primary_cfg, secondary_cfg, serial = write_configs(world, tmp_path, vin, channel)
    failing = bytes(wasmtime.wat2wasm((WAT_DIR / "self_test_fails.wat").read_text()))
    name = "apps/cli/self-test-fails.wasm"
    world.image_repo.add_target(
        failing, name=name, hardware_ids=[HW], release_counter=1, capabilities=[]
    )
    assert len(world.director.assign(name, ecu_serials=[serial])) == 1
    args = ("primary", str(primary_cfg), "--once", "--interface", "virtual", "--channel", channel)
    with running_secondary(secondary_cfg, channel) as secondary:
        code, out = ecu(*args)
        assert code == 1, out
        assert out.startswith("cycle 1: FAILED") and "manifest: accepted" in out
        assert f"{serial} refused {name} (trialFailed: " in out
        assert secondary.store.active_target() is None  # rolled back: nothing installed
        code, out = ecu(*args)  # the next manifest carries the ECU's result to the Director
        assert code == 1 and f"{serial} refused {name}" in out
    listing = CliRunner().invoke(
        uptane_cli, ["director", "list", str(world.directory / "director")]
    )
    assert listing.exit_code == 0, listing.output
    [row] = [line for line in listing.output.splitlines() if serial in line]
    assert "trialFailed" in row
    [vehicle] = [
        v
        for v in json.loads(
            CliRunner()
            .invoke(uptane_cli, ["director", "list", str(world.directory / "director"), "--json"])
            .output
        )
        if v["vin"] == vin
    ]
    [brake] = [e for e in vehicle["ecus"] if e["serial"] == serial]
    assert brake["last_result"] == "trialFailed" and "self_test" in brake["last_result_text"]


def test_secondary_command_runs_for_max_seconds(world: World, tmp_path: Path) -> None:
    vin = f"CLI{uuid.uuid4().hex[:8]}"
    _, secondary_cfg, serial = write_configs(world, tmp_path, vin, "ignored")
    code, out = ecu(
        "secondary", str(secondary_cfg), "--max-seconds", "0.1", "--channel", uuid.uuid4().hex
    )
    assert code == 0, out
    assert f"{serial}: installed nothing" in out and "request 0x610" in out
    assert out.strip().endswith("stopped")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read secondary config"),
        ("{not json", "cannot read secondary config"),
        ('{"serial": "x"}', "secondary config misses"),
    ],
)
def test_bad_secondary_config_is_one_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    cfg = tmp_path / "secondary.json"
    if content is not None:
        cfg.write_text(content)
    code, out = ecu("secondary", str(cfg))
    assert code == 1
    assert message in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_bad_primary_config_is_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "primary.json"
    cfg.write_text('{"vin": "V", "can": {"ids": 3}}')
    code, out = ecu("primary", str(cfg), "--once")
    assert code == 1 and "Error:" in out and "Traceback" not in out
    code, out = ecu("primary", str(tmp_path / "missing.json"), "--once")
    assert code == 1 and "cannot read primary config" in out


def test_keygen_refuses_to_overwrite(tmp_path: Path) -> None:
    assert ecu("keygen", str(tmp_path), "k")[0] == 0
    code, out = ecu("keygen", str(tmp_path), "k")
    assert code == 1 and "refusing to overwrite" in out
