"""Campaigns: phases advance on explicit time, halt rules, operator controls (issue 14).

The Director under test is ``test_director``'s (real HTTP, SQLite and
PostgreSQL); vehicles report through real signed manifests. Each test
targets its own vehicles by VIN (or attribute), so tests share the Director.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from helpers.director_env import (
    Car,
    Env,
    installed_image,
    new_car,
    register,
)

from director.campaign_spec import CampaignSpec, parse_rule
from director.campaigns import (
    ABORTED,
    ACTIVE,
    COMPLETED,
    HALTED,
    PAUSED,
    CampaignInfo,
    CampaignStateError,
)
from director.errors import InvalidRequestError, ReleaseCounterError
from director.fleet_db import Base
from uptane.manifest import EcuHealth


def fleet(env: Env, n: int) -> list[Car]:
    cars = [register(env, new_car()) for _ in range(n)]
    return sorted(cars, key=lambda c: c.vin)


def spec(cars: list[Car], phases: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": f"camp-{uuid.uuid4().hex[:8]}",
        "images": {"brake-ecu": "brake-2.wasm"},
        "target": {"vins": [c.vin for c in cars]},
        "phases": phases,
    }
    doc.update(extra)
    return doc


def brake(car: Car) -> str:
    return next(s for s, e in car.ecus.items() if e.hardware_id == "brake-ecu")


def report(env: Env, car: Car, **kw: Any) -> None:
    """One accepted manifest from ``car``; ``kw`` goes into its brake ECU's report."""
    reports = {s: car.report(s, **(kw if s == brake(car) else {})) for s in car.ecus}
    env.director.receive_manifest(car.vin, car.manifest(reports=reports))


def pending(env: Env, car: Car) -> list[str]:
    return [a.image for a in env.director.vehicle_status(car.vin).pending]


def tick(env: Env, name: str, now: datetime) -> CampaignInfo:
    """Tick every campaign at ``now``; return ``name``'s state.

    (The server's own ticker also ticks, at the Director's clock: assertions
    look at the state, not at whether this tick changed it.)
    """
    env.director.tick(now)
    return env.director.campaign(name)


CANARY_THEN_ALL = [
    {"name": "canary", "vehicles": 1, "minutes": 30},
    {"name": "half", "percent": 50, "minutes": 60},
    {"name": "all", "percent": 100},
]


def test_phases_advance_when_their_duration_passed(env: Env) -> None:
    cars = fleet(env, 4)
    for car in cars:  # first reports: every ECU runs nothing yet
        report(env, car)
    c = env.director.create_campaign(spec(cars, CANARY_THEN_ALL))
    t0 = c.phase_started_at
    assert (c.status, c.phase_name, c.group_size) == (ACTIVE, "canary", 4)
    assert [pending(env, car) for car in cars] == [["brake-2.wasm"], [], [], []]
    assert [p.target for p in c.progress] == [1, 2, 4]
    assert c.progress[0].assigned == 1

    assert tick(env, c.name, t0 + timedelta(minutes=29)).phase_name == "canary"  # too early
    c = tick(env, c.name, t0 + timedelta(minutes=30))
    assert (c.phase_name, c.progress[1].assigned) == ("half", 1)
    assert [bool(pending(env, car)) for car in cars] == [True, True, False, False]

    # the canary installs: counted as installed, its assignment completes
    cars[0].ecus[brake(cars[0])].installed = installed_image(env, "brake-2.wasm")
    report(env, cars[0])
    c = env.director.campaign(c.name)
    assert c.progress[0].installed == 1 and c.totals()["installed"] == 1
    assert pending(env, cars[0]) == []

    c = tick(env, c.name, t0 + timedelta(minutes=90))
    assert c.phase_name == "all" and c.totals()["assigned"] == 4
    c = tick(env, c.name, t0 + timedelta(minutes=91))
    assert c.status == COMPLETED
    assert tick(env, c.name, t0 + timedelta(days=1)).status == COMPLETED


@pytest.mark.parametrize(
    ("rule", "result"),
    [("install_failures", "imageMismatch"), ("rollbacks", "trialFailed")],
)
def test_campaign_halts_when_a_rule_is_broken(env: Env, rule: str, result: str) -> None:
    cars = fleet(env, 3)
    for car in cars:
        report(env, car)
    c = env.director.create_campaign(spec(cars, CANARY_THEN_ALL, halt={rule: 0}))
    t0 = c.phase_started_at
    canary = cars[0]
    report(env, canary, last_result=result, last_result_text="the canary failed")
    c = env.director.campaign(c.name)
    assert c.totals()[rule] == 1
    c = tick(env, c.name, t0 + timedelta(minutes=1))
    assert c.status == HALTED
    assert c.halt_reason is not None and rule in c.halt_reason and "canary" in c.halt_reason
    # halted: the canary's assignment is withdrawn, nobody else was touched, time changes nothing
    assert [pending(env, car) for car in cars] == [[], [], []]
    assert tick(env, c.name, t0 + timedelta(days=2)).status == HALTED
    assert env.director.campaign(c.name).totals()["assigned"] == 0  # cancelled, not counted
    actions = [e["action"] for e in env.director.fleet_audit_log() if e["subject"] == c.name]
    assert actions[0] == "campaign_halt"


def test_a_failure_within_the_limit_does_not_halt(env: Env) -> None:
    cars = fleet(env, 3)
    for car in cars:
        report(env, car)
    phases = [{"name": "canary", "vehicles": 2, "minutes": 10}, {"name": "all", "percent": 100}]
    c = env.director.create_campaign(spec(cars, phases, halt={"install_failures": 1}))
    report(env, cars[0], last_result="transferIncomplete", last_result_text="bus off")
    # the same result again is the same failure, not a second one
    report(env, cars[0], last_result="transferIncomplete", last_result_text="bus off")
    assert env.director.campaign(c.name).totals()["install_failures"] == 1
    c = tick(env, c.name, c.phase_started_at + timedelta(minutes=10))
    assert (c.status, c.phase_name) == (ACTIVE, "all")


def test_rate_rule_counts_against_vehicles_assigned(env: Env) -> None:
    cars = fleet(env, 4)
    for car in cars:
        report(env, car)
    phases = [{"name": "canary", "vehicles": 2, "minutes": 10}, {"name": "all", "percent": 100}]
    c = env.director.create_campaign(spec(cars, phases, halt={"rollbacks": "49%"}))
    report(env, cars[1], last_result="rolledBack", last_result_text="trial failed")
    c = tick(env, c.name, c.phase_started_at)  # 1 of 2 = 50 % > 49 %
    assert c.status == HALTED and "49%" in (c.halt_reason or "")


def test_pause_resume_abort(env: Env) -> None:
    cars = fleet(env, 2)
    c = env.director.create_campaign(spec(cars, CANARY_THEN_ALL))
    t0 = c.phase_started_at
    assert env.director.pause_campaign(c.name, actor="alice").status == PAUSED
    assert tick(env, c.name, t0 + timedelta(hours=5)).status == PAUSED  # no advance
    assert env.director.campaign(c.name).phase == 0
    with pytest.raises(CampaignStateError):
        env.director.pause_campaign(c.name)
    resumed = env.director.resume_campaign(c.name, actor="alice")
    assert resumed.status == ACTIVE and resumed.phase_started_at > t0  # the phase runs again
    assert tick(env, c.name, resumed.phase_started_at + timedelta(minutes=29)).phase == 0
    c = tick(env, c.name, resumed.phase_started_at + timedelta(minutes=30))
    assert c.phase_name == "half"
    assert [bool(pending(env, car)) for car in cars] == [True, False]  # half of 2: the canary
    aborted = env.director.abort_campaign(c.name, actor="bob")
    assert aborted.status == ABORTED
    assert [pending(env, car) for car in cars] == [[], []]  # withdrawn
    with pytest.raises(CampaignStateError):
        env.director.resume_campaign(c.name)
    log = [
        (e["actor"], e["action"]) for e in env.director.fleet_audit_log() if e["subject"] == c.name
    ]
    assert ("alice", "campaign_pause") in log and ("bob", "campaign_abort") in log


def test_target_group_by_vehicle_attributes(env: Env) -> None:
    cars = fleet(env, 3)
    tag = uuid.uuid4().hex[:8]
    for car in cars[:2]:
        env.director.set_vehicle_attributes(car.vin, {"region": "eu", "batch": tag})
    env.director.set_vehicle_attributes(cars[2].vin, {"region": "us", "batch": tag})
    doc = spec(cars, [{"name": "all", "percent": 100}])
    doc["target"] = {"attributes": {"region": "eu", "batch": tag}}
    c = env.director.create_campaign(doc)
    assert c.group_size == 2
    assert [bool(pending(env, car)) for car in cars] == [True, True, False]


def test_campaign_documents_are_checked() -> None:
    good = {"name": "x", "images": {"hw": "a.wasm"}, "phases": [{"vehicles": 1}]}
    assert CampaignSpec.from_dict(good).phases[0].size(10) == 1
    bad: list[dict[str, Any]] = [
        {**good, "phases": []},
        {**good, "phases": [{"vehicles": 1, "percent": 5}]},
        {**good, "phases": [{"percent": 0}]},
        {**good, "phases": [{"vehicles": 1, "minutes": -1}]},
        {**good, "images": {"hw": "../etc/passwd"}},
        {**good, "target": {"vins": []}},
        {**good, "halt": {"crashes": 1}},
        {**good, "halt": {"rollbacks": "150%"}},
        {**good, "halt": {"rollbacks": -1}},
        {**good, "extra": 1},
    ]
    for doc in bad:
        with pytest.raises(InvalidRequestError):
            CampaignSpec.from_dict(doc)
    assert parse_rule("rollbacks", "5%").violated(1, 10) is True
    assert parse_rule("rollbacks", "10%").violated(1, 10) is False
    assert parse_rule("rollbacks", 1).violated(1, 10) is False


def test_migrations_create_the_fleet_tables(env: Env) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with env.db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0008"
        tables = set(conn.dialect.get_table_names(conn))
    assert {
        "campaigns",
        "campaign_vehicles",
        "quarantines",
        "ecu_health",
        "fleet_audit_log",
    } <= tables


def test_halt_rolls_back_installed_vehicles_when_the_campaign_says_so(env: Env) -> None:
    previous = f"brake-1r3-{uuid.uuid4().hex[:6]}.wasm"  # release 1 re-published as release 3
    env.image.add(previous, ["brake-ecu"], 3)
    cars = fleet(env, 3)
    for car in cars:
        report(env, car)
    phases = [{"name": "canary", "vehicles": 2, "minutes": 30}, {"name": "all", "percent": 100}]
    lower = spec(cars, phases, rollback={"brake-ecu": "brake-1.wasm"})
    with pytest.raises(ReleaseCounterError):  # the ECUs would refuse it
        env.director.create_campaign(lower)
    c = env.director.create_campaign(
        spec(cars, phases, halt={"health_failures": 0}, rollback={"brake-ecu": previous})
    )
    assert c.rollback == {"brake-ecu": previous}
    for car in cars[:2]:
        car.ecus[brake(car)].installed = installed_image(env, "brake-2.wasm")
    report(env, cars[0])
    report(env, cars[1], health=EcuHealth("unhealthy", 4))
    c = tick(env, c.name, c.phase_started_at + timedelta(minutes=1))
    assert c.status == HALTED
    # the canaries that installed get the previous release back; the rest is untouched
    assert [pending(env, car) for car in cars] == [[previous], [previous], []]
    log = [e for e in env.director.fleet_audit_log() if e["subject"] == c.name]
    assert log[0]["action"] == "campaign_rollback"


def test_a_vehicle_is_in_one_rollout_at_a_time(env: Env) -> None:
    cars = fleet(env, 2)
    first = env.director.create_campaign(spec(cars, CANARY_THEN_ALL))
    assert [pending(env, car) for car in cars] == [["brake-2.wasm"], []]
    doc = spec(cars, [{"name": "all", "percent": 100}])
    doc["images"] = {"door-ecu": "door-1.wasm"}
    second = env.director.create_campaign(doc)
    # the first campaign's canary is skipped while its update is on its way
    assert second.totals()["assigned"] == 1
    assert [sorted(pending(env, car)) for car in cars] == [["brake-2.wasm"], ["door-1.wasm"]]
    env.director.abort_campaign(first.name)
    env.director.abort_campaign(second.name)
