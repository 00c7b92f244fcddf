"""What all scenarios share: Scenario, ScenarioOutcome, book-keeping of a run (Uptane 2.1, 4.3)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from director.db import Vehicle
from director.service import AssignmentInfo
from ecus.sim.world import SimSecondary, SimVehicle, VehicleOutcome, World

# The secondary's result codes that name a typed error (for ScenarioOutcome.error).
_RESULT_ERRORS = {
    "imageMismatch": "ImageMismatchError",
    "metadataRejected": "MetadataRejectedError",
    "trialFailed": "WasmError",
    "transferIncomplete": "TransferFailedError",
}


@dataclass
class ScenarioOutcome:
    """What a scenario did to the vehicle (see the ``ecus.sim.scenarios`` docstring)."""

    name: str
    blocked: bool  # the attack had no effect: no slot changed, nothing untrusted installed
    detected: tuple[str, ...]  # attack names seen (primary result, ECU reports, Director inventory)
    error: str | None  # the typed error observed (class name: message)
    director_attacks: tuple[str, ...]  # attacks the Director recorded for the vehicle afterwards
    slots_unchanged: bool
    recovered: bool  # after undoing the attack a normal cycle works (faults: the update completed)
    detail: str = ""


@dataclass(frozen=True)
class Scenario:
    """One attack (Uptane 2.1, 4.3) or fault the simulator can play."""

    name: str
    attack: str | None  # the uptane.errors ATTACK_* name expected in reports (None: pure fault)
    title: str
    defeated_by: str
    run: Callable[[World, SimVehicle], ScenarioOutcome]


# --- observing a vehicle ----------------------------------------------------------


def pending_assignments(world: World, vin: str) -> dict[str, AssignmentInfo]:
    """The vehicle's pending assignments by ECU serial (what the Director wants installed)."""
    return {a.ecu_serial: a for a in world.director.vehicle_status(vin).pending}


def last_manifest(world: World, vin: str) -> bytes | None:
    """The last vehicle version manifest the Director accepted from ``vin`` (as sent)."""
    with world.director.db.transaction() as session:
        body = session.scalars(select(Vehicle.last_manifest).where(Vehicle.vin == vin)).first()
    return None if body is None else bytes(body)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _attack_records(world: World, vin: str) -> set[tuple[str, str, int, datetime]]:
    return {
        (a.ecu_serial, a.attack, a.report_counter, a.detected_at)
        for a in world.director.vehicle_status(vin).attacks
    }


def _running(sec: SimSecondary) -> tuple[str | None, dict[str, str]]:
    """Name and hashes of the image a secondary runs."""
    active = None if sec.ecu is None else sec.ecu.store.active_target()
    return (None, {}) if active is None else (active.name, dict(active.hashes))


def _verified_image(sec: SimSecondary) -> bool:
    """The active slot's bytes match the target it was installed for (or nothing is active)."""
    assert sec.ecu is not None
    store = sec.ecu.store
    active = store.active_target()
    if active is None or store.active is None:
        return True
    data = store.slot_path(store.active).read_bytes()
    return len(data) == active.length and all(
        hashlib.new(alg, data).hexdigest() == digest for alg, digest in active.hashes.items()
    )


@dataclass
class _Run:
    """Book-keeping of one scenario run on one vehicle."""

    world: World
    vehicle: SimVehicle
    name: str
    attacks_before: set[tuple[str, str, int, datetime]] = field(default_factory=set)
    before: dict[str, dict[str, Any]] = field(default_factory=dict)
    running_before: dict[str, tuple[str | None, dict[str, str]]] = field(default_factory=dict)
    legit: dict[str, AssignmentInfo] = field(default_factory=dict)
    detected: list[str] = field(default_factory=list)

    @property
    def vin(self) -> str:
        return self.vehicle.vin

    def __post_init__(self) -> None:
        self.attacks_before = _attack_records(self.world, self.vin)

    def mark(self) -> None:
        """The state the attack must not change (taken after the scenario's setup)."""
        secs = self.vehicle.secondaries
        self.before = {s: sec.slot_snapshot() for s, sec in secs.items()}
        self.running_before = {s: _running(sec) for s, sec in secs.items()}
        self.legit = pending_assignments(self.world, self.vin)

    def unchanged(self, serials: Sequence[str] | None = None, *, strict: bool = True) -> bool:
        """No slot changed: every slot file (``strict``) or the active slot and its image.

        Without ``strict`` the inactive slot may hold a partial or failed copy:
        a transfer writes there, and only a verified image is ever activated.
        """
        secs = self.vehicle.secondaries
        for serial in serials if serials is not None else list(secs):
            now = secs[serial].slot_snapshot()
            old = self.before[serial]
            if strict and now != old:
                return False
            active = now["active"]
            if (now["active"], now["target"]) != (old["active"], old["target"]):
                return False
            if active is not None and now["slots"][active] != old["slots"].get(active):
                return False
        return True

    def untrusted(self) -> list[str]:
        """Secondaries running something that is neither what they ran nor a legit update."""
        bad = []
        for serial, sec in self.vehicle.secondaries.items():
            name, hashes = _running(sec)
            if (name, hashes) == self.running_before.get(serial):
                continue
            legit = self.legit.get(serial)
            if (
                legit is None
                or name != legit.image
                or any(legit.hashes.get(a) != h for a, h in hashes.items())
                or not _verified_image(sec)
            ):
                bad.append(serial)
        return bad

    def installed_legit(self, outcome: VehicleOutcome) -> bool:
        """Every update pending before the attack is installed now."""
        return all(
            outcome.ecus[s].installed == a.image for s, a in self.legit.items() if s in outcome.ecus
        )

    def finish(
        self,
        attack: VehicleOutcome | None,
        recovery: VehicleOutcome,
        *,
        slots_unchanged: bool,
        error: str | None = None,
        blocked: bool | None = None,
        recovered: bool | None = None,
        detail: str = "",
    ) -> ScenarioOutcome:
        new = _attack_records(self.world, self.vin) - self.attacks_before
        director_attacks = tuple(sorted({a for _, a, _, _ in new}))
        seen = set(self.detected) | set(director_attacks)
        if attack is not None:
            seen.update(attack.attacks)
            if error is None:
                error = default_error(attack)
        if blocked is None:
            blocked = slots_unchanged and not self.untrusted()
        if recovered is None:
            recovered = _cycle_ok(recovery) and self.installed_legit(recovery)
        return ScenarioOutcome(
            name=self.name,
            blocked=blocked,
            detected=tuple(sorted(seen)),
            error=error,
            director_attacks=director_attacks,
            slots_unchanged=slots_unchanged,
            recovered=recovered,
            detail=detail,
        )


def _cycle_ok(outcome: VehicleOutcome) -> bool:
    manifest = outcome.cycle.manifest
    return outcome.ok and manifest is not None and manifest.accepted


def default_error(outcome: VehicleOutcome, vehicle: SimVehicle | None = None) -> str | None:
    """The typed error a cycle ended with: verification, distribution, a report, an ECU."""
    if outcome.cycle.error is not None:
        return _describe(outcome.cycle.error)
    for issue in outcome.cycle.issues:
        if issue.attack is not None:
            return _describe(issue.error)
    for error in outcome.errors.values():
        return _describe(error)
    for serial, ecu in outcome.ecus.items():
        if ecu.last_result in _RESULT_ERRORS:
            text = f"ECU {serial} reported {ecu.last_result}"
            sec = None if vehicle is None else vehicle.secondaries[serial].ecu
            if sec is not None and sec.report_state.last_result == ecu.last_result:
                text = f"{serial}: {sec.report_state.last_result_text}"
            return f"{_RESULT_ERRORS[ecu.last_result]}: {text}"
    return None


def _play(
    run: _Run,
    arm: Callable[[], None],
    disarm: Callable[[], None],
    *,
    serials: Sequence[str] | None = None,
    strict: bool = True,
    detail: str = "",
) -> ScenarioOutcome:
    """Mark, attack for one cycle, undo, recover with one normal cycle."""
    run.mark()
    try:
        arm()
        attack = run.vehicle.cycle()
    finally:
        disarm()
    unchanged = run.unchanged(serials, strict=strict)
    error = default_error(attack, run.vehicle)
    if attack.cycle.stage is not None:
        detail = (
            f"{detail}; refused at stage {attack.cycle.stage}"
            if detail
            else (f"refused at stage {attack.cycle.stage}")
        )
    recovery = run.vehicle.cycle()
    return run.finish(attack, recovery, slots_unchanged=unchanged, error=error, detail=detail)


def _director_path(vin: str, filename: str) -> str:
    return f"/vehicles/{vin}/metadata/{filename}"


def _overrides(
    board_overrides: dict[str, Any], files: Mapping[str, Any]
) -> tuple[Callable[[], None], Callable[[], None]]:
    def arm() -> None:
        board_overrides.update(files)

    def disarm() -> None:
        for path in files:
            board_overrides.pop(path, None)

    return arm, disarm
