"""Faults: power cuts at secondary write points, bus off, server restarts (DESIGN 5, 9)."""

from __future__ import annotations

import httpx

from director.service import Director
from ecus.secondary.slots import WRITE_POINTS
from ecus.sim.world import SimSecondary, SimVehicle, World
from ecus.transport.faults import FrameFault

from .base import (
    Scenario,
    ScenarioOutcome,
    _cycle_ok,
    _Run,
    _running,
    _verified_image,
    default_error,
    last_manifest,
    pending_assignments,
)
from .bus import _fast_failure, _frames_after
from .updates import ensure_updates


def _primary_bus_off(vehicle: SimVehicle, sec: SimSecondary, response: bytes) -> None:
    """The primary's controller goes bus-off in the middle of the chunk it sends next."""
    vehicle.primary_faults.add(
        FrameFault(
            "bus_off",
            nth=_frames_after(sec, response) + 2,
            direction="tx",
            arbitration_id=sec.config.request_id,
        )
    )


def power_cut(point: str) -> Scenario:
    """The power-cut fault at secondary write point ``point`` (``ecus.secondary.slots.WRITE_POINTS``)."""
    if point not in WRITE_POINTS:
        raise ValueError(f"unknown write point {point!r}; one of {sorted(WRITE_POINTS)}")
    name = f"power-cut-{point.replace('_', '-')}"

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        pending = ensure_updates(world, vehicle, 1)
        serial, assignment = next(iter(pending.items()))
        sec = vehicle.secondaries[serial]
        r.mark()
        with _fast_failure(vehicle, sec):
            sec.power_cut_at = point
            try:
                attack = vehicle.cycle()
            finally:
                cut = sec.power_cut_at is None
                sec.power_cut_at = None
                vehicle.boot(serial)  # power comes back
        verified = all(_verified_image(s) for s in vehicle.secondaries.values())
        unchanged = r.unchanged([serial], strict=False)
        error = default_error(attack, vehicle)
        detail = (
            f"power cut at {point!r} while installing {assignment.image} on {serial}"
            if cut
            else f"the install of {assignment.image} never reached {point!r}"
        ) + f"; after reboot it runs {_running(sec)[0]}"
        recovery = vehicle.cycle()
        return r.finish(
            attack,
            recovery,
            slots_unchanged=unchanged,
            error=error,
            blocked=cut and verified and not r.untrusted(),
            detail=detail,
        )

    return Scenario(
        name=name,
        attack=None,
        title=f"Power cut on a secondary at write point {point!r} during an install",
        defeated_by="A/B slots with atomic state writes: only a verified image is activated, "
        "an interrupted trial rolls back at boot, an interrupted transfer resumes",
        run=run,
    )


def restart_servers(world: World) -> Director:
    """Restart the Director and Image repository servers (``World.restart_servers``)."""
    return world.restart_servers()


def _server_restart(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "server-restart")
    ensure_updates(world, vehicle, 1)
    r.mark()
    attack = vehicle.cycle()  # installs; the Director learns it in the next manifest
    before_restart = last_manifest(world, vehicle.vin)
    restart_servers(world)
    recovery = vehicle.cycle()
    replay_refused = True
    if before_restart is not None:  # replay protection survived the restart
        response = httpx.put(
            f"{world.director_url}/vehicles/{vehicle.vin}/manifest",
            content=before_restart,
            headers={"content-type": "application/json"},
            timeout=10.0,
        )
        replay_refused = response.status_code == 409
    done = not set(r.legit) & set(pending_assignments(world, vehicle.vin))
    return r.finish(
        attack,
        recovery,
        slots_unchanged=r.unchanged(strict=False),
        blocked=not r.untrusted(),
        recovered=_cycle_ok(recovery) and r.installed_legit(recovery) and done and replay_refused,
        detail=f"Director pending cleared after restart: {done}; "
        f"pre-restart manifest replay refused: {replay_refused}",
    )
