"""Every scenario in a row on one vehicle, as the demo plays them (DESIGN 9).

Each scenario must undo what it did, so the next one starts from a working
world, and an update pending before the attacks is installed after the first.
"""

from __future__ import annotations

from ecus.sim.scenarios import SCENARIOS, pending_assignments, run_scenario
from ecus.sim.world import World, hardware_ids_for, image_name


def test_all_scenarios_in_sequence_on_one_vehicle(world: World) -> None:
    hardware_ids = hardware_ids_for(3)
    vehicle = world.add_vehicle("ATTACK-SEQUENCE", hardware_ids)
    try:
        world.publish(2, hardware_ids)
        world.assign_version(2, hardware_ids, vins=[vehicle.vin])  # pending, legit
        failures = []
        for index, sc in enumerate(SCENARIOS):
            outcome = run_scenario(world, vehicle, sc.name)
            if index == 0:  # the attack is undone and the pending update installed
                assert all(
                    e.installed == image_name(e.hardware_id, 2) or (e.release_counter or 0) > 2
                    for e in vehicle.cycle().ecus.values()
                )
            problems = [
                what
                for what, ok in (
                    ("not blocked", outcome.blocked),
                    ("not recovered", outcome.recovered),
                    ("not detected", sc.attack is None or sc.attack in outcome.detected),
                )
                if not ok
            ]
            if problems:
                failures.append(f"{sc.name}: {', '.join(problems)}: {outcome}")
        assert not failures, "\n".join(failures)
        final = vehicle.cycle()
        assert final.ok and final.cycle.updates == {}
        assert pending_assignments(world, vehicle.vin) == {}
        assert all((e.release_counter or 0) >= 2 for e in final.ecus.values())
    finally:
        vehicle.close()
        world.vehicles.pop(vehicle.vin, None)
