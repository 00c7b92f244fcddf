"""Fleet rollout control over HTTP and the CLI: campaign API, quarantine, ``/metrics`` (issue 14)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import yaml
from click.testing import CliRunner
from helpers.director_env import (
    Env,
    installed_image,
)
from prometheus_client.parser import text_string_to_metric_families
from test_campaigns import brake, fleet, report, spec

from uptane.cli import cli as uptane_cli
from uptane.manifest import EcuHealth

PHASES = [{"name": "canary", "vehicles": 1, "minutes": 30}, {"name": "all", "percent": 100}]


def test_campaign_api(env: Env) -> None:
    cars = fleet(env, 2)
    doc = spec(cars, PHASES, halt={"health_failures": 0})
    assert env.http.post("/api/campaigns", json=doc).status_code == 401  # no token
    r = env.op.post("/api/campaigns", json=doc)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["status"], body["phase_name"], body["progress"][0]["assigned"]) == (
        "active",
        "canary",
        1,
    )
    assert env.op.post("/api/campaigns", json=doc).json()["error"] == "already_registered"
    bad = env.op.post("/api/campaigns", json={**doc, "name": "x", "phases": []})
    assert (bad.status_code, bad.json()["error"]) == (422, "invalid_request")
    names = [c["name"] for c in env.op.get("/api/campaigns").json()]
    assert doc["name"] in names
    shown = env.op.get(f"/api/campaigns/{doc['name']}").json()
    assert shown["totals"]["assigned"] == 1 and shown["phases"][0]["halt"] == {"health_failures": 0}
    assert env.op.get("/api/campaigns/nope").status_code == 404
    r = env.op.post(f"/api/campaigns/{doc['name']}/pause", json={"actor": "carol"})
    assert r.json()["status"] == "paused"
    r = env.op.post(f"/api/campaigns/{doc['name']}/pause")
    assert (r.status_code, r.json()["error"]) == (409, "campaign_state")
    assert env.op.post(f"/api/campaigns/{doc['name']}/abort").json()["status"] == "aborted"
    audit = env.op.get("/api/audit/fleet").json()
    assert any(e["actor"] == "carol" and e["action"] == "campaign_pause" for e in audit)
    r = env.op.put(f"/api/vehicles/{cars[0].vin}/attributes", json={"trim": "sport"})
    assert r.json() == {"trim": "sport"}
    r = env.op.put(f"/api/vehicles/{cars[0].vin}/attributes", json={"bad name!": "x"})
    assert r.status_code == 422


def test_campaign_cli(env: Env, tmp_path: Path) -> None:
    cars = fleet(env, 2)
    doc = spec(cars, PHASES)
    file = tmp_path / "phases.yaml"
    file.write_text(yaml.safe_dump(doc))
    d = str(env.config.directory)

    def run(*args: str) -> str:
        result = CliRunner().invoke(uptane_cli, ["director", *args, "--dir", d])
        assert result.exit_code == 0, (result.output, result.exception)
        return result.output

    out = run("campaign", "create", str(file), "--by", "dave")
    assert doc["name"] in out and "canary" in out
    assert f"{doc['name']}: active, phase 1/2 (canary), 1 assigned" in run("campaign", "list")
    shown = json.loads(run("campaign", "show", doc["name"], "--json"))
    assert shown["progress"][0]["assigned"] == 1
    assert "paused" in run("campaign", "pause", doc["name"])
    assert "active" in run("campaign", "resume", doc["name"])
    assert "aborted" in run("campaign", "abort", doc["name"])
    result = CliRunner().invoke(
        uptane_cli, ["director", "campaign", "resume", doc["name"], "--dir", d]
    )
    assert result.exit_code == 1 and "cannot resume" in result.output
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    result = CliRunner().invoke(
        uptane_cli, ["director", "campaign", "create", str(broken), "--dir", d]
    )
    assert (
        result.exit_code == 1
        and result.output.startswith("Error: ")
        and "not valid JSON" in result.output
    )
    assert "region=eu" in run("attributes", cars[0].vin, "region=eu")
    assert f"dave campaign_create {doc['name']}" in run("audit")
    # counter resets (and certificates) are in the same list, newest first
    run("reset-counter", brake(cars[0]), "--vin", cars[0].vin, "--reason", "reflashed")
    both = run("audit").splitlines()
    assert f"cli reset_report_counter {cars[0].vin}/{brake(cars[0])}:" in both[0]
    assert any(f"campaign_abort {doc['name']}" in line for line in both[1:])
    assert "reset_report_counter" not in run("audit", "--only", "fleet")
    assert "campaign_" not in run("audit", "--only", "checks")
    assert len(run("audit", "--limit", "2").splitlines()) == 2
    cars[0].ecus[brake(cars[0])].installed = installed_image(env, "brake-2.wasm")
    report(env, cars[0], health=EcuHealth("unhealthy", 2, traps=1, rollbacks={"trap": 1}))
    line = run("health", cars[0].vin)
    assert f"{brake(cars[0])}: unhealthy running brake-2.wasm, traps 1, rollbacks trap=1" in line


def test_unassigned_image_quarantines_the_vehicle_until_released(env: Env) -> None:
    (car,) = fleet(env, 1)
    car.ecus[brake(car)].installed = installed_image(env, "brake-1.wasm")
    report(env, car)  # first report: what it runs is its baseline
    assert env.director.list_quarantined() == [] or car.vin not in {
        q.vin for q in env.director.list_quarantined()
    }
    # it now reports an image the Director never assigned to it
    car.ecus[brake(car)].installed = installed_image(env, "brake-2.wasm")
    report(env, car)
    held = {q.vin: q for q in env.director.list_quarantined()}
    assert held[car.vin].reason == "unexpected_image"
    listed = env.op.get("/api/quarantine").json()
    assert any(q["vin"] == car.vin for q in listed)
    r = env.op.post("/api/assignments", json={"image": "brake-2.wasm", "ecu_serials": [brake(car)]})
    assert (r.status_code, r.json()["error"]) == (409, "quarantined")
    # a campaign passes it by
    c = env.director.create_campaign(spec([car], [{"name": "all", "percent": 100}]))
    assert c.group_size == 1 and c.totals()["assigned"] == 0
    env.director.abort_campaign(c.name)

    r = env.op.post(
        f"/api/quarantine/{car.vin}/release", json={"actor": "erin", "note": "bench test"}
    )
    assert r.status_code == 200 and r.json()["released_by"] == "erin"
    assert car.vin not in {q.vin for q in env.director.list_quarantined()}
    audit = env.director.fleet_audit_log()
    assert any(
        e["action"] == "quarantine_release"
        and e["subject"] == car.vin
        and "bench test" in e["detail"]
        for e in audit
    )
    r = env.op.post(f"/api/quarantine/{car.vin}/release", json={"actor": "erin"})
    assert r.json()["error"] == "not_quarantined"
    # released: the image it runs now is accepted, and it gets assignments again
    report(env, car)
    assert car.vin not in {q.vin for q in env.director.list_quarantined()}
    r = env.op.post("/api/assignments", json={"image": "brake-2.wasm", "ecu_serials": [brake(car)]})
    assert r.status_code == 201, r.text


def test_assigned_and_previous_images_do_not_quarantine(env: Env) -> None:
    (car,) = fleet(env, 1)
    serial = brake(car)
    car.ecus[serial].installed = installed_image(env, "brake-1.wasm")
    report(env, car)
    env.director.assign("brake-2.wasm", ecu_serials=[serial])
    car.ecus[serial].installed = installed_image(env, "brake-2.wasm")
    report(env, car)  # the assigned image
    car.ecus[serial].installed = installed_image(env, "brake-1.wasm")
    report(
        env, car, last_result="rolledBack", last_result_text="trial failed"
    )  # back to its previous
    assert car.vin not in {q.vin for q in env.director.list_quarantined()}


def test_repeated_attack_reports_quarantine(env: Env) -> None:
    (car,) = fleet(env, 1)
    for attack in ("drop_request", "freeze", "rollback", "mix_and_match"):
        report(env, car, attacks_detected=(attack,))  # network or repository: never counts
    assert car.vin not in {q.vin for q in env.director.list_quarantined()}
    report(env, car, attacks_detected=("spoofed_message",))
    report(env, car, attacks_detected=("replayed_report", "freeze"))
    assert car.vin not in {q.vin for q in env.director.list_quarantined()}
    report(env, car, attacks_detected=("spoofed_message",))
    held = {q.vin: q for q in env.director.list_quarantined()}
    assert held[car.vin].reason == "repeated_attacks"


def _scrape(env: Env) -> dict[str, Any]:
    r = env.op.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {m.name: m for m in text_string_to_metric_families(r.text)}


def test_metrics_are_served_over_http(env: Env) -> None:
    assert env.http.get("/metrics").status_code == 401  # operator token needed
    cars = fleet(env, 3)
    for car in cars:
        report(env, car)
    env.director.assign("brake-1.wasm", ecu_serials=[brake(car) for car in cars[:2]])
    for car in cars[:2]:
        car.ecus[brake(car)].installed = installed_image(env, "brake-1.wasm")
        report(env, car)
    # an ECU reports a name the Director never assigned: no series of its own
    rogue = f"evil-{cars[2].vin}.wasm"
    cars[2].ecus[brake(cars[2])].installed = installed_image(env, "brake-1.wasm", filename=rogue)
    report(env, cars[2])
    env.director.create_campaign(spec(cars, PHASES))
    families = _scrape(env)
    for name in (
        "iot_device_payload_version",
        "iot_device_payload_health",
        "iot_ota_attempts",
        "iot_ota_rollback",
        "iot_attestation_reports",
        "iot_wasm_runtime_crashes",
        "iot_capability_denied",
        "uptane_campaign_phase",
        "uptane_campaign_vehicles",
        "uptane_director_requests",
    ):
        assert name in families, name
    version = {
        (s.labels["device_id"], s.labels["payload_id"]): s.value
        for s in families["iot_device_payload_version"].samples
    }
    assert version[("brake-ecu", "brake-1.wasm")] >= 2  # by hardware id, not per ECU
    assert version[("brake-ecu", "unknown")] >= 1 and rogue not in str(version)
    assert not any(
        s.labels["device_id"].startswith(cars[0].vin)
        for s in families["iot_device_payload_version"].samples
    )
    attest = {
        (s.labels["device_id"], s.labels["status"]): s.value
        for s in families["iot_attestation_reports"].samples
        if s.name.endswith("_total")
    }
    assert attest[("brake-ecu", "accepted")] >= 2
    requests = {
        (s.labels["endpoint"], s.labels["code"])
        for s in families["uptane_director_requests"].samples
    }
    assert ("operator", "200") in requests or ("metrics", "200") in requests


def test_per_ecu_metrics_are_optional(env: Env) -> None:
    from director.metrics import FleetCollector

    (car,) = fleet(env, 1)
    car.ecus[brake(car)].installed = installed_image(env, "brake-1.wasm")
    report(env, car)
    per_ecu = {m.name: m for m in FleetCollector(env.director, per_ecu=True).collect()}
    samples = per_ecu["iot_device_payload_version"].samples
    assert any(s.labels["device_id"] == brake(car) and s.value == 1 for s in samples)
    default = {m.name: m for m in FleetCollector(env.director, per_ecu=False).collect()}
    assert all(
        s.labels["device_id"] != brake(car) for s in default["iot_device_payload_version"].samples
    )


def test_ticker_ticks_campaigns_in_the_background(env: Env) -> None:
    from director.fleet_api import Ticker

    cars = fleet(env, 2)
    c = env.director.create_campaign(spec(cars, [{"name": "all", "percent": 100, "minutes": 0}]))
    ticker = Ticker(env.director, 0.05)
    ticker.start()
    try:
        deadline = time.monotonic() + 20
        while env.director.campaign(c.name).status != "completed":
            assert time.monotonic() < deadline, "the ticker did not complete the campaign"
            time.sleep(0.05)
    finally:
        ticker.stop()
