"""Health from the module: the secondary's signed report carries it, campaigns read it (issue 14)."""

from __future__ import annotations

from datetime import timedelta

import pytest
import test_secondary
from helpers.director_env import (
    Env,
    installed_image,
)
from test_campaigns import CANARY_THEN_ALL, brake, fleet, pending, report, spec, tick
from test_secondary import Ecu, bad_module

from director.campaigns import HALTED
from uptane.errors import WasmTrapError
from uptane.manifest import EcuHealth, SignedEcuVersionReport

ecu = test_secondary.ecu  # the fixture, under its own name


def test_report_carries_the_module_health_after_its_trial(ecu: Ecu) -> None:
    ecu.install_v1()
    h = ecu.report().health
    assert h is not None and (h.status, h.traps, dict(h.rollbacks)) == ("healthy", 0, {})
    tf = ecu.target("apps/late.wasm", bad_module("health_late"), release_counter=2)
    result = SignedEcuVersionReport.from_der(ecu.update(tf, bad_module("health_late")))
    after_trial = result.verify(ecu.signer.public_key)
    assert after_trial.last_result == "ok"  # it passed its trial
    assert after_trial.health is not None and after_trial.health.status == "healthy"
    assert ecu.secondary.tick(100) == 100
    h = ecu.report().health
    assert h is not None and (h.status, h.health_code) == ("unhealthy", 5)
    ecu.secondary.tick(101)
    h = ecu.report().health
    assert h is not None and h.status == "unhealthy"


def test_report_counts_traps_and_rollbacks_by_reason(ecu: Ecu) -> None:
    ecu.install_v1()
    tf = ecu.target("apps/trap.wasm", bad_module("trap_self_test"), release_counter=2)
    ecu.update(tf, bad_module("trap_self_test"))
    h = ecu.report().health
    assert h is not None
    assert (h.status, h.traps, dict(h.rollbacks)) == ("healthy", 1, {"trap": 1})  # v1 runs again
    ecu.boot()  # the counts survive a restart
    h = ecu.report().health
    assert h is not None and (h.traps, dict(h.rollbacks)) == (1, {"trap": 1})


def test_a_module_that_traps_after_its_trial_is_unhealthy(ecu: Ecu) -> None:
    ecu.install_v1()
    tf = ecu.target("apps/trap-late.wasm", bad_module("trap_late"), release_counter=2)
    ecu.update(tf, bad_module("trap_late"))
    assert ecu.report().health == EcuHealth("healthy")  # passed its trial
    for t in (100, 101):  # a stopped app raises its error again: counted once
        with pytest.raises(WasmTrapError):
            ecu.secondary.tick(t)
    h = ecu.report().health
    assert h is not None and (h.status, h.traps) == ("unhealthy", 1)


def test_unhealthy_after_install_is_a_campaign_health_failure(env: Env) -> None:
    cars = fleet(env, 3)
    for car in cars:
        report(env, car)
    c = env.director.create_campaign(spec(cars, CANARY_THEN_ALL, halt={"health_failures": 0}))
    canary = cars[0]
    # unhealthy while still running the old image: not this campaign's failure
    report(env, canary, health=EcuHealth("unhealthy", 3))
    assert env.director.campaign(c.name).totals()["health_failures"] == 0
    canary.ecus[brake(canary)].installed = installed_image(env, "brake-2.wasm")
    report(env, canary, health=EcuHealth("healthy"))
    assert env.director.campaign(c.name).totals()["installed"] == 1
    assert tick(env, c.name, c.phase_started_at + timedelta(minutes=1)).status == "active"
    report(env, canary, health=EcuHealth("unhealthy", 5, traps=0))
    assert env.director.campaign(c.name).totals()["health_failures"] == 1
    halted = tick(env, c.name, c.phase_started_at + timedelta(minutes=2))
    assert halted.status == HALTED
    assert "health_failures" in (halted.halt_reason or "")
    assert [pending(env, car) for car in cars[1:]] == [[], []]  # the rest untouched
    stored = env.op.get(f"/api/vehicles/{canary.vin}/health").json()
    assert stored[brake(canary)]["status"] == "unhealthy"
    assert stored[brake(canary)]["payload"] == "brake-2.wasm"
