"""Counter-jam of the Director: one ECU's report cannot silence its vehicle
(Uptane 2.1, 5.4.2.1; issue 10 item 12).

A compromised secondary signs one version report with the largest counter
the ASN.1 module allows (2^63-1). The Director accepts it once; after that
no report of that ECU is fresh again. Every later manifest whose primary
signature and primary report are good is still recorded, without that ECU's
report, which is recorded as an attack on that ECU; the operator resets the
counter (as after a reflash) with an audit entry and the ECU is heard again.
"""

from __future__ import annotations

import dataclasses

import httpx

from ecus.sim.world import TOKEN
from uptane.errors import ATTACK_REPLAYED_REPORT
from uptane.manifest import SignedEcuVersionReport, VehicleVersionManifest

from .harness import Car

JAM = 2**63 - 1


def _jam(car: Car, serial: str) -> bytes:
    """A manifest the vehicle's own primary signs, carrying ``serial``'s jammed report."""
    vehicle = car.vehicle
    reports = {vehicle.primary_serial: vehicle.primary.own_report()}
    for s, sec in vehicle.secondaries.items():
        report = vehicle.report(s)  # genuine, fresh
        if s == serial:
            report = dataclasses.replace(report, report_counter=JAM)
        reports[s] = SignedEcuVersionReport.sign(report, sec.signer)
    manifest = VehicleVersionManifest(vehicle.vin, vehicle.primary_serial, reports)
    return manifest.sign(vehicle.primary_key.signer())


def test_counter_jam_of_the_director(car: Car) -> None:
    world, jammed = car.world, car.serials[0]
    director = world.director
    with httpx.Client(base_url=world.director_url, timeout=30) as http:
        r = http.put(f"/vehicles/{car.vin}/manifest", content=_jam(car, jammed))
        assert r.status_code == 200, r.text
        assert {e.serial: e.report_counter for e in director.vehicle_status(car.vin).ecus}[
            jammed
        ] == JAM

        # the vehicle's next real cycles still reach the Director
        primary_before = {
            e.serial: e.report_counter for e in director.vehicle_status(car.vin).ecus
        }[car.vehicle.primary_serial]
        receipts_before = dict(car.vehicle.primary._accepted)
        outcome = car.vehicle.cycle()
        manifest = outcome.cycle.manifest
        assert manifest is not None and manifest.accepted, manifest
        # the primary learns which report was left out, and sends no receipt for it: the
        # ECU keeps the attacks that report carried until a report of it is recorded
        assert manifest.refused_reports.get(jammed) == ATTACK_REPLAYED_REPORT, manifest
        receipts, other = car.vehicle.primary._accepted, car.serials[1]
        assert receipts.get(jammed) == receipts_before.get(jammed), receipts
        assert receipts[other] > receipts_before.get(other, 0), receipts
        status = director.vehicle_status(car.vin)
        counters = {e.serial: e.report_counter for e in status.ecus}
        assert counters[car.vehicle.primary_serial] is not None
        assert counters[car.vehicle.primary_serial] > (primary_before or 0)
        assert counters[jammed] == JAM  # its report was left out
        assert ATTACK_REPLAYED_REPORT in car.director_attacks().get(jammed, set())
        other = car.serials[1]
        assert ATTACK_REPLAYED_REPORT not in car.director_attacks().get(other, set())

        # the operator resets the jammed counter: an audit entry, and the ECU is heard again
        op = {"Authorization": f"Bearer {TOKEN}"}
        r = http.post(
            f"/api/vehicles/{car.vin}/ecus/{jammed}/reset-counter",
            json={"reason": "ECU reflashed after a jammed report counter"},
            headers=op,
        )
        assert r.status_code == 200, r.text
        entry = http.get("/api/audit", headers=op).json()[0]
        assert (entry["action"], entry["ecu_serial"], entry["detail"]["previous_counter"]) == (
            "reset_report_counter",
            jammed,
            JAM,
        )
    attacks_before = len(director.vehicle_status(car.vin).attacks)
    outcome = car.vehicle.cycle()
    assert outcome.cycle.manifest is not None and outcome.cycle.manifest.accepted
    status = director.vehicle_status(car.vin)
    counter = {e.serial: e.report_counter for e in status.ecus}[jammed]
    assert counter is not None and counter < JAM  # the ECU's real counter again
    assert len(status.attacks) == attacks_before  # nothing left out any more
