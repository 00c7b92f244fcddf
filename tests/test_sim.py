"""``uptane sim`` (fleet runs) and the ``sim_world``/``sim_vehicle`` fixtures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from ecus.sim.cli import cli
from ecus.sim.fixtures import VehicleFactory, hardware_ids
from ecus.sim.runner import FleetConfig, percentile
from ecus.sim.world import World, image_name


def sim(*args: str) -> tuple[int, dict[str, Any], str]:
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    return result.exit_code, json.loads(result.stdout), result.output


def test_fleet_updates_to_v2() -> None:
    code, report, output = sim("--vehicles", "3", "--secondaries", "2", "--update-to", "2")
    assert code == 0, output
    assert report["ok"] is True
    assert report["ecus_total"] == 6 and report["ecus_updated"] == 6
    assert report["target_version"] == 2
    assert {e["vin"] for e in report["ecus"]} == {f"SIMVIN{i:011d}" for i in (1, 2, 3)}
    for ecu in report["ecus"]:
        assert ecu["release_counter"] == 2
        assert ecu["installed"] == image_name(ecu["hardware_id"], 2)
        assert ecu["last_result"] == "ok"
    assert [p["version"] for p in report["phases"]] == [1, 2]
    assert all(p["converged"] for p in report["phases"])
    timings = report["timings"]
    assert timings["cycles"] >= 6
    assert 0 < timings["cycle_p50"] <= timings["cycle_p95"] <= timings["cycle_max"]
    assert report["director_url"].startswith("http://127.0.0.1:")


def test_fleet_converges_despite_bus_off() -> None:
    code, report, output = sim(
        "--vehicles", "2", "--secondaries", "2", "--fault", "bus-off", "--fault-fraction", "0.5"
    )
    assert code == 0, output
    assert len(report["faults"]) == 1 and report["faults"][0]["fault"] == "bus-off"
    faulty = report["faults"][0]["ecu_serial"]
    (phase,) = report["phases"]
    # the fault did bite: a cycle failed and the vehicle needed a second round ...
    assert phase["failed_cycles"] == 1 and phase["rounds"] == 2
    assert any(faulty in line for line in report["failures"])
    # ... and the fleet still converged
    assert phase["converged"] and report["ecus_updated"] == report["ecus_total"] == 4


def test_fleet_converges_despite_slow_http() -> None:
    code, report, output = sim("--vehicles", "2", "--secondaries", "1", "--fault", "slow-http")
    assert code == 0, output
    assert report["attacks"].get("slow_retrieval", 0) >= 1
    assert report["ecus_updated"] == report["ecus_total"] == 2


def test_fleet_converges_despite_delayed_frame() -> None:
    code, report, output = sim(
        "--vehicles", "2", "--secondaries", "2", "--fault", "delay-frame", "--fault-fraction", "0.5"
    )  # fmt: skip
    assert code == 0, output
    (fault,) = report["faults"]
    assert fault["fault"] == "delay-frame" and "by 1.5 s" in fault["detail"]
    # the frame came later than ISO-TP allows: that exchange failed with a typed timeout ...
    assert any(
        fault["ecu_serial"] in line and "TransportTimeout" in line for line in report["failures"]
    ), report["failures"]
    # ... and the fleet converged
    (phase,) = report["phases"]
    assert phase["converged"] and report["ecus_updated"] == report["ecus_total"] == 4


def test_fleet_converges_despite_truncated_http() -> None:
    code, report, output = sim(
        "--vehicles", "2", "--secondaries", "2", "--fault", "truncated-http",
        "--fault-fraction", "0.5",
    )  # fmt: skip
    assert code == 0, output
    (fault,) = report["faults"]
    assert fault["fault"] == "truncated-http" and fault["ecu_serial"].endswith("-primary")
    (phase,) = report["phases"]
    assert phase["failed_cycles"] == 1 and phase["rounds"] == 2
    assert any(
        fault["vin"] in line and "DownloadError" in line and "connection broken" in line
        for line in report["failures"]
    ), report["failures"]
    assert report["attacks"].get("drop_request", 0) >= 1
    assert phase["converged"] and report["ecus_updated"] == report["ecus_total"] == 4


def test_fleet_converges_across_server_restarts() -> None:
    code, report, output = sim(
        "--vehicles", "2", "--secondaries", "2", "--update-to", "2", "--fault", "server-restart"
    )  # fmt: skip
    assert code == 0, output
    # one restart per release, after it was published and assigned
    assert [f["fault"] for f in report["faults"]] == ["server-restart"] * 2
    assert "v1" in report["faults"][0]["detail"] and "v2" in report["faults"][1]["detail"]
    assert all(p["converged"] and p["rounds"] == 1 for p in report["phases"])
    assert report["ecus_updated"] == report["ecus_total"] == 4 and report["target_version"] == 2
    human = CliRunner().invoke(
        cli, ["--vehicles", "1", "--secondaries", "1", "--fault", "server-restart"]
    )
    assert human.exit_code == 0 and "server-restart x1" in human.output


def test_fleet_that_does_not_converge_exits_nonzero() -> None:
    code, report, output = sim(
        "--vehicles", "1", "--secondaries", "2", "--cycles", "1",
        "--fault", "bus-off", "--fault-fraction", "1",
    )  # fmt: skip
    assert code == 1
    assert report["ok"] is False
    assert report["ecus_updated"] == 1 and report["ecus_total"] == 2
    assert "1 of 2 ECUs are not on v1" in output


def test_bad_options() -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["--update-to", "9"])
    assert result.exit_code == 2 and "--update-to" in result.output
    result = runner.invoke(cli, ["--fault", "meteor"])
    assert result.exit_code == 2
    with pytest.raises(ValueError, match="unknown fault"):
        FleetConfig(fault="meteor")


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_fixtures_build_independent_vehicles(sim_world: World, sim_vehicle: VehicleFactory) -> None:
    updated = sim_vehicle(2)
    other = sim_vehicle(["lamp-ctl"])
    assert updated.vin != other.vin
    assert {updated.vin, other.vin} <= set(sim_world.vehicles)
    hws = hardware_ids(updated)
    assert hws == ["brake-ctl", "body-ctl"]
    sim_world.publish(1, hws)
    assert sim_world.assign_version(1, hws, [updated.vin]) == 2
    outcome = updated.cycle()
    assert outcome.ok
    assert outcome.installed() == {
        s.serial: image_name(s.hardware_id, 1) for s in updated.secondaries.values()
    }
    assert [updated.tick(s, 5) for s in updated.secondaries] == [5, 5]
    untouched = other.cycle()
    assert untouched.ok and set(untouched.installed().values()) == {None}


def test_fixture_world_is_shared_and_vehicles_closed(
    sim_world: World, sim_vehicle: VehicleFactory
) -> None:
    # the vehicles of the previous test were closed and dropped from the world
    assert all(not vin.startswith("TESTVIN") for vin in sim_world.vehicles)
    vehicle = sim_vehicle(1, vin="FIXTUREVIN000001")
    assert vehicle.vin == "FIXTUREVIN000001"
    assert sim_world.director.vehicle_status(vehicle.vin).vin == vehicle.vin


# --- sharded runs ------------------------------------------------------------------------


def test_sharded_run_merges_every_worker() -> None:
    code, report, output = sim(
        "--vehicles", "3", "--secondaries", "2", "--workers", "2", "--update-to", "2",
        "--fault", "bus-off", "--fault-fraction", "0.3",
    )  # fmt: skip
    assert code == 0, output
    assert report["config"]["workers"] == 2
    # vehicles 1 and 3 ran in one worker, vehicle 2 in the other: all are in the summary
    assert [e["vin"] for e in report["ecus"]] == [f"SIMVIN{i:011d}" for i in (1, 1, 2, 2, 3, 3)]
    assert report["ecus_updated"] == report["ecus_total"] == 6
    v1, v2 = report["phases"]
    assert v1["total"] == v2["total"] == 6 and v1["updated"] == v2["updated"] == 6
    # the bus-off fault, planned by the coordinator, struck in its vehicle's worker
    (fault,) = report["faults"]
    assert v1["failed_cycles"] == 1 and v1["rounds"] == 2
    assert any(fault["ecu_serial"] in line for line in report["failures"])
    assert report["timings"]["cycles"] == 3 + 1 + 3


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_run_leaves_no_temporary_directory(tmp_path: Path, sig: str) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("uptane")), "sim", "--vehicles", "2", "--secondaries", "1",
         "--workers", "2", "--update-to", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:  # until the workers are up and the run is under way
        if "worker processes" in line:
            break
    assert list(tmp_path.glob("uptane-sim-*")), "the run made its directory"
    proc.send_signal(getattr(signal, sig))
    proc.communicate(timeout=60)
    for _ in range(300):  # the orphaned workers clean up after a SIGKILL
        if not list(tmp_path.glob("uptane-sim-*")):
            break
        time.sleep(0.1)
    assert not list(tmp_path.glob("uptane-sim-*"))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_fleet_updates_over_mutual_tls(workers: str) -> None:
    """``--tls``: every vehicle reaches the Director with its own client certificate, in
    one process or from worker processes (which register vehicles on the operator port)."""
    code, report, output = sim(
        "--vehicles", "2", "--secondaries", "1", "--tls", "--workers", workers
    )  # fmt: skip
    assert code == 0, output
    assert report["director_url"].startswith("https://")
    assert report["ecus_updated"] == report["ecus_total"] == 2
