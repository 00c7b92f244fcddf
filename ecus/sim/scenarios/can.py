"""Attack and fault scenarios against simulated vehicles (Uptane 2.1, 4.3; DESIGN 9).

Each ``Scenario`` plays one attacker (in the network, on the CAN bus, or
holding the keys of ONE repository) or one fault against a ``SimVehicle`` of
a ``World`` with real servers, and returns a ``ScenarioOutcome``: whether the
attack was blocked (no slot changed, nothing untrusted installed), the attack
names seen (the primary's result, the ECUs' reports, the Director's
inventory), the typed error, and whether a normal cycle works again once the
attack is undone. Every scenario undoes what it did (overrides, clocks,
faults, servers), so a demo can run them in sequence on one vehicle; an
update that was pending before a scenario is installed by its recovery cycle.

Scenarios that need an update in flight (slow retrieval, swapped image,
transfer faults...) use the vehicle's pending assignments, or publish and
assign a new release of its secondaries' apps when there is none.

``run_scenario(world, vehicle, name)`` runs one by name; ``SCENARIOS`` lists
them all (``power_cut(point)`` builds the power-cut fault for any write point
of ``ecus.slots.WRITE_POINTS``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import can
import httpx
import isotp
from securesystemslib.signer import CryptoSigner
from sqlalchemy import select
from starlette.types import Receive, Scope, Send
from tuf.api.metadata import Metadata, Snapshot, TargetFile, Targets, Timestamp

from director.db import Vehicle, VehicleManifestRecord
from director.errors import UnknownVehicleError
from director.service import AssignmentInfo, Director, EcuSpec
from ecus.primary import safe_target_path
from ecus.sim.compromise import (
    ImageRepoCompromise,
    craft_director_targets,
    director_resign,
    evil_target,
)
from ecus.sim.http import endless, trickle, truncated, unavailable
from ecus.sim.world import (
    APPS_DIR,
    SimSecondary,
    SimVehicle,
    VehicleOutcome,
    World,
    app_module,
)
from ecus.slots import WRITE_POINTS
from ecus.transport.accounting import PacedBus
from ecus.transport.faults import FrameFault
from ecus.transport.isotp import CanNode, IsoTpConfig
from image_repo.layout import blob_relpath
from uptane import codec
from uptane.errors import (
    ATTACK_ARBITRARY_SOFTWARE,
    ATTACK_DROP_REQUEST,
    ATTACK_ENDLESS_DATA,
    ATTACK_FREEZE,
    ATTACK_MIX_AND_MATCH,
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_REPLAYED_REPORT,
    ATTACK_ROLLBACK,
    ATTACK_SLOW_RETRIEVAL,
    ATTACK_SPOOFED_MESSAGE,
    ATTACK_WRONG_VEHICLE,
    CodecError,
)
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import ECU_SERIAL, HARDWARE_IDS, RELEASE_COUNTER

# Client limits while a secondary is made to fail (power cut, bus off, dropped
# traffic): a dead ECU is noticed within seconds instead of the normal timeouts.
FAULT_TIMEOUT = 1.5
FAULT_INSTALL_TIMEOUT = 3.0
FAULT_RETRIES = 1

# The secondary's result codes that name a typed error (for ScenarioOutcome.error).
_RESULT_ERRORS = {
    "imageMismatch": "ImageMismatchError",
    "metadataRejected": "MetadataRejectedError",
    "trialFailed": "WasmError",
    "transferIncomplete": "TransferFailedError",
}


@dataclass
class ScenarioOutcome:
    """What a scenario did to the vehicle (see the module docstring)."""

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


# --- updates in flight ---------------------------------------------------------


def _leb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def release_module(release: int, tag: str = "release") -> bytes:
    """A valid demo WASM app for ``release``: ``blink_v{release}`` if it exists, else
    ``blink_v2`` (``blink_v1`` below 1) with a custom section naming the release."""
    if (APPS_DIR / f"blink_v{release}.wat").exists() and tag == "release":
        return app_module(release)
    name = tag.encode()
    payload = _leb(len(name)) + name + str(release).encode()
    return app_module(2 if release >= 2 else 1) + b"\x00" + _leb(len(payload)) + payload


def pending_assignments(world: World, vin: str) -> dict[str, AssignmentInfo]:
    """The vehicle's pending assignments by ECU serial (what the Director wants installed)."""
    return {a.ecu_serial: a for a in world.director.vehicle_status(vin).pending}


def _installed_counter(sec: SimSecondary) -> int:
    active = None if sec.ecu is None else sec.ecu.store.active_target()
    return -1 if active is None else active.release_counter


def next_release(world: World, vehicle: SimVehicle, hardware_id: str) -> int:
    """A release counter above everything published for ``hardware_id`` and installed."""
    counters = [
        int(t.custom.get(RELEASE_COUNTER, 0))
        for _, t in world.image_repo.targets().values()
        if hardware_id in (t.custom or {}).get(HARDWARE_IDS, ())
    ]
    counters += [
        _installed_counter(s) for s in vehicle.secondaries.values() if s.hardware_id == hardware_id
    ]
    return max(counters, default=0) + 1


def publish_release(world: World, hardware_id: str, release: int, tag: str = "release") -> str:
    """Publish ``release`` of the demo app for ``hardware_id``; returns the image name."""
    data = release_module(release, tag)
    (name,) = world.publish(release, [hardware_id], data=data)
    return name


def _runs(sec: SimSecondary, assignment: AssignmentInfo) -> bool:
    """Does the secondary already run the assigned image (the Director may not know yet)?"""
    name, hashes = _running(sec)
    common = set(hashes) & set(assignment.hashes)
    return (
        name == assignment.image
        and bool(common)
        and all(hashes[a] == assignment.hashes[a] for a in common)
    )


def waiting_updates(world: World, vehicle: SimVehicle) -> dict[str, AssignmentInfo]:
    """Pending assignments of the vehicle's secondaries that they do not run yet."""
    pending = pending_assignments(world, vehicle.vin)
    return {
        s: a
        for s, a in pending.items()
        if s in vehicle.secondaries and not _runs(vehicle.secondaries[s], a)
    }


def ensure_updates(world: World, vehicle: SimVehicle, count: int = 1) -> dict[str, AssignmentInfo]:
    """At least ``count`` secondaries with an update to install; returns all of them.

    Pending assignments are kept as they are (the scenario uses them); the
    first secondaries without one get a new release of their app.
    """
    if count > len(vehicle.secondaries):
        raise ValueError(
            f"{vehicle.vin} has {len(vehicle.secondaries)} secondaries, {count} needed"
        )
    waiting = waiting_updates(world, vehicle)
    missing = count - len(waiting)
    for serial, sec in vehicle.secondaries.items():
        if missing <= 0:
            break
        if serial in waiting:
            continue
        name = publish_release(
            world, sec.hardware_id, next_release(world, vehicle, sec.hardware_id)
        )
        world.director.assign(name, ecu_serials=[serial])
        missing -= 1
    return waiting_updates(world, vehicle)


def _image(world: World, name: str) -> tuple[TargetFile, bytes, str]:
    """An Image repository target, its bytes and the URL path it is downloaded from."""
    _, target = world.image_repo.targets()[name]
    data = world.image_repo.blob_path(target).read_bytes()
    return target, data, "/targets/" + blob_relpath(target.path, target.hashes["sha256"])


def _forget_download(vehicle: SimVehicle, name: str) -> None:
    """Drop the primary's cached copy of an image so that the next cycle downloads it."""
    safe_target_path(vehicle.primary.config.images_dir, name).unlink(missing_ok=True)


# --- observing a vehicle ----------------------------------------------------------


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


# --- network: drop request, slow retrieval, endless data (4.3.1, 4.3.2) --------------


async def _dropping_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A server that answers every request with 503 (``unavailable()``)."""
    await unavailable()()(scope, receive, send)


def _drop_request(repository: str) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        board = world.director_board if repository == "director" else world.image_board
        app = board.app

        def arm() -> None:
            board.app = _dropping_app

        def disarm() -> None:
            board.app = app

        return _play(_Run(world, vehicle, f"drop-request-{repository}"), arm, disarm)

    return run


def _download_attack(
    name: str, respond: Callable[[bytes], Any]
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """An attack on the download of one pending image: ``respond(data)`` is served instead."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        pending = ensure_updates(world, vehicle, 1)
        serial, assignment = next(iter(pending.items()))
        _, data, path = _image(world, assignment.image)
        _forget_download(vehicle, assignment.image)
        arm, disarm = _overrides(world.image_board.overrides, {path: respond(data)})
        return _play(r, arm, disarm, detail=f"{assignment.image} for {serial}")

    return run


def _swapped(data: bytes) -> bytes:
    """Other bytes of the same length (a compromised Image server, no keys)."""
    return bytes(b ^ 0xFF for b in data)


def _endless_metadata(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    path = _director_path(vehicle.vin, "timestamp.json")
    arm, disarm = _overrides(world.director_board.overrides, {path: endless()})
    return _play(_Run(world, vehicle, "endless-metadata"), arm, disarm)


# --- freeze, rollback, mix-and-match (4.3.3) --------------------------------------------


@contextlib.contextmanager
def _primary_clock(vehicle: SimVehicle, delta: timedelta) -> Iterator[None]:
    """The primary's clock moved by ``delta`` (secondaries keep theirs: their time floors
    persist, so moving their clocks would outlive the scenario)."""
    clock = vehicle.primary.clock
    vehicle.primary.clock = lambda: clock() + delta
    try:
        yield
    finally:
        vehicle.primary.clock = clock


def _freeze_director(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    delta = world.director_config.metadata_expiry + timedelta(hours=1)
    stack = contextlib.ExitStack()
    return _play(
        _Run(world, vehicle, "freeze-director"),
        lambda: stack.enter_context(_primary_clock(vehicle, delta)),
        stack.close,
        detail=f"the network withholds new Director metadata; the vehicle's clock is {delta} on",
    )


def _freeze_image(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    # The Director re-signs before its metadata has less than refresh_margin left,
    # so within that margin only the Image repository's timestamp expires.
    margin = world.director.refresh_margin
    stack = contextlib.ExitStack()

    def arm() -> None:
        world.image_repo.resign([Timestamp.type], expires_in=margin / 4)
        stack.enter_context(_primary_clock(vehicle, margin / 2))

    def disarm() -> None:
        stack.close()
        world.image_repo.resign([Timestamp.type])

    return _play(
        _Run(world, vehicle, "freeze-image"),
        arm,
        disarm,
        detail="the network serves the last Image timestamp after it expired",
    )


def _served(world: World, vin: str, filename: str) -> bytes:
    return world.director.metadata(vin, filename)


def _rollback_director(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "rollback-director-metadata")
    old = _served(world, vehicle.vin, "timestamp.json")
    director_resign(world.director, vehicle.vin)
    vehicle.primary.run_cycle()  # the primary now trusts the newer timestamp
    arm, disarm = _overrides(
        world.director_board.overrides, {_director_path(vehicle.vin, "timestamp.json"): old}
    )
    version = Metadata.from_bytes(old).signed.version
    return _play(r, arm, disarm, detail=f"Director timestamp v{version} replayed")


def _rollback_image(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "rollback-image-metadata")
    old = (world.image_repo.metadata_dir / "timestamp.json").read_bytes()
    world.image_repo.resign()
    vehicle.primary.run_cycle()  # the primary now trusts the newer timestamp
    arm, disarm = _overrides(world.image_board.overrides, {"/metadata/timestamp.json": old})
    version = Metadata.from_bytes(old).signed.version
    return _play(r, arm, disarm, detail=f"Image timestamp v{version} replayed")


def _mix_and_match(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "mix-and-match")
    vin = vehicle.vin
    director_resign(world.director, vin)
    timestamp = _served(world, vin, "timestamp.json")
    snapshot_version = Metadata[Timestamp].from_bytes(timestamp).signed.snapshot_meta.version
    snapshot = _served(world, vin, f"{snapshot_version}.snapshot.json")
    targets_version = Metadata[Snapshot].from_bytes(snapshot).signed.meta["targets.json"].version
    newer = director_resign(world.director, vin)
    newer_targets = _served(world, vin, f"{newer}.targets.json")
    arm, disarm = _overrides(
        world.director_board.overrides,
        {
            _director_path(vin, "timestamp.json"): timestamp,
            _director_path(vin, f"{snapshot_version}.snapshot.json"): snapshot,
            _director_path(vin, f"{targets_version}.targets.json"): newer_targets,
        },
    )
    return _play(
        r,
        arm,
        disarm,
        detail=f"snapshot v{snapshot_version} names targets v{targets_version}, "
        f"targets v{newer} served under that name",
    )


# --- one repository compromised (4.3.4) ----------------------------------------------


def _craft(world: World, vin: str, mutate: Callable[[Targets], None]) -> int:
    """Sign Director metadata for ``vin`` as an attacker holding the Director's online keys."""
    return craft_director_targets(
        world.director,
        world.director_config.online_signers(),
        vin,
        mutate,
        expiry=world.director_config.metadata_expiry,
    )


def _replace_ecu_target(serial: str, target: TargetFile) -> Callable[[Targets], None]:
    def mutate(t: Targets) -> None:
        t.targets = {p: tf for p, tf in t.targets.items() if tf.custom.get(ECU_SERIAL) != serial}
        t.targets[target.path] = target

    return mutate


def _latest_image(world: World, hardware_id: str) -> TargetFile | None:
    found = [
        t
        for _, t in world.image_repo.targets().values()
        if hardware_id in (t.custom or {}).get(HARDWARE_IDS, ())
    ]
    return max(found, key=lambda t: int(t.custom.get(RELEASE_COUNTER, 0)), default=None)


def _compromised_director(
    name: str, choose: Callable[[World, SimVehicle], tuple[str, TargetFile, str]]
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """The Director's online keys sign a target ``choose`` picks for one ECU; then the
    real Director signs again from its inventory."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        serial, target, detail = choose(world, vehicle)

        def arm() -> None:
            _craft(world, vehicle.vin, _replace_ecu_target(serial, target))

        def disarm() -> None:
            director_resign(world.director, vehicle.vin)

        return _play(r, arm, disarm, detail=detail)

    return run


def _evil_director_target(world: World, vehicle: SimVehicle) -> tuple[str, TargetFile, str]:
    serial, sec = next(iter(vehicle.secondaries.items()))
    like = _latest_image(world, sec.hardware_id)
    if like is None:
        publish_release(world, sec.hardware_id, next_release(world, vehicle, sec.hardware_id))
        like = _latest_image(world, sec.hardware_id)
        assert like is not None
    counter = max(_installed_counter(sec) + 1, int(like.custom.get(RELEASE_COUNTER, 0)))
    evil = evil_target(
        like,
        release_module(counter, "evil"),
        **{ECU_SERIAL: serial, RELEASE_COUNTER: counter},
    )
    return serial, evil, f"{like.path} with the hashes of other bytes, for {serial}"


def _release_rollback_target(world: World, vehicle: SimVehicle) -> tuple[str, TargetFile, str]:
    """An older release of an installed app, assigned by the Director's keys."""
    installed = {
        s: c for s, sec in vehicle.secondaries.items() if (c := _installed_counter(sec)) >= 1
    }
    if not installed:  # a fresh vehicle: install a release first (setup, not the attack)
        pending = ensure_updates(world, vehicle, 1)
        vehicle.cycle()
        installed = {
            s: c for s in pending if (c := _installed_counter(vehicle.secondaries[s])) >= 1
        }
        if not installed:
            raise RuntimeError(f"{vehicle.vin}: could not install a first release")
    serial, counter = next(iter(installed.items()))
    hw = vehicle.secondaries[serial].hardware_id
    older = [
        t
        for _, t in world.image_repo.targets().values()
        if hw in (t.custom or {}).get(HARDWARE_IDS, ())
        and int(t.custom.get(RELEASE_COUNTER, 0)) < counter
    ]
    if older:
        old = max(older, key=lambda t: int(t.custom.get(RELEASE_COUNTER, 0)))
    else:
        legacy = publish_release(world, hw, counter - 1, tag="legacy")
        _, old = world.image_repo.targets()[legacy]
    target = TargetFile(
        length=old.length,
        hashes=dict(old.hashes),
        path=old.path,
        unrecognized_fields={"custom": {**old.custom, ECU_SERIAL: serial}},
    )
    old_counter = old.custom.get(RELEASE_COUNTER)
    return serial, target, f"{old.path} (release {old_counter}) for {serial}, which runs {counter}"


def _image_threshold(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "arbitrary-software-image-threshold")
    pending = ensure_updates(world, vehicle, 1)
    serial, assignment = next(iter(pending.items()))
    like, _, _ = _image(world, assignment.image)
    evil = evil_target(like, release_module(int(like.custom[RELEASE_COUNTER]), "evil"))
    attacker = ImageRepoCompromise(world.image_repo.path)
    served = attacker.sign_targets(lambda t: t.targets.__setitem__(evil.path, evil))
    _forget_download(vehicle, assignment.image)
    arm, disarm = _overrides(world.image_board.overrides, served.files)
    return _play(
        r,
        arm,
        disarm,
        detail=f"Image targets v{served.targets_version} signed by "
        f"{len(attacker.targets_signers)} targets key(s): {evil.path} for {serial}",
    )


def _decoy_vin(vin: str) -> str:
    return f"{vin}-OTHER"


def _decoy(world: World, vin: str) -> str:
    """Another vehicle known to the Director (registered once), whose metadata is replayed."""
    decoy = _decoy_vin(vin)
    try:
        world.director.vehicle_status(decoy)
    except UnknownVehicleError:
        key = CryptoSigner.generate_ed25519().public_key
        world.director.register_vehicle(decoy, [EcuSpec(f"{decoy}-gw", "gateway", key, True)])
    return decoy


def _versions(world: World, vin: str) -> tuple[int, int, int]:
    """(timestamp, snapshot, targets) versions the Director serves for ``vin``."""
    ts = Metadata[Timestamp].from_bytes(_served(world, vin, "timestamp.json")).signed
    snap = (
        Metadata[Snapshot]
        .from_bytes(_served(world, vin, f"{ts.snapshot_meta.version}.snapshot.json"))
        .signed
    )
    return ts.version, snap.version, snap.meta["targets.json"].version


def _wrong_vehicle(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "wrong-vehicle")
    vin = vehicle.vin
    decoy = _decoy(world, vin)
    ours = _versions(world, vin)
    theirs = _versions(world, decoy)
    # the replayed files must not look older than ours (that is a rollback, caught first)
    while any(t <= o for t, o in zip(theirs, ours, strict=True)):
        director_resign(world.director, decoy)
        theirs = _versions(world, decoy)
    _, snap_v, targets_v = theirs
    files = {
        _director_path(vin, "timestamp.json"): _served(world, decoy, "timestamp.json"),
        _director_path(vin, f"{snap_v}.snapshot.json"): _served(
            world, decoy, f"{snap_v}.snapshot.json"
        ),
        _director_path(vin, f"{targets_v}.targets.json"): _served(
            world, decoy, f"{targets_v}.targets.json"
        ),
    }
    arm, disarm = _overrides(world.director_board.overrides, files)
    return _play(r, arm, disarm, detail=f"Director metadata of {decoy} (targets v{targets_v})")


# --- manifests (5.4.2) ---------------------------------------------------------------


def last_manifest(world: World, vin: str) -> bytes | None:
    """The last vehicle version manifest the Director accepted from ``vin`` (as sent)."""
    with world.director.db.transaction() as session:
        body = session.scalars(
            select(VehicleManifestRecord.body)
            .join(Vehicle, Vehicle.id == VehicleManifestRecord.vehicle_id)
            .where(Vehicle.vin == vin)
            .order_by(VehicleManifestRecord.id.desc())
            .limit(1)
        ).first()
    return None if body is None else bytes(body)


def _replayed_manifest(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    r = _Run(world, vehicle, "replayed-manifest")
    body = last_manifest(world, vehicle.vin)
    if body is None:  # nothing captured yet: let the vehicle send one first
        vehicle.primary.run_cycle()
        body = last_manifest(world, vehicle.vin)
        assert body is not None
    r.mark()
    inventory = world.director.vehicle_status(vehicle.vin).ecus
    response = httpx.put(
        f"{world.director_url}/vehicles/{vehicle.vin}/manifest",
        content=body,
        headers={"content-type": "application/json"},
        timeout=10.0,
    )
    answer = (
        response.json()
        if response.headers.get("content-type", "").startswith("application/json")
        else {}
    )
    reason = str(answer.get("error", "")) if isinstance(answer, dict) else ""
    refused = response.status_code >= 400
    if refused and reason:
        r.detected.append(reason)
    unchanged_inventory = world.director.vehicle_status(vehicle.vin).ecus == inventory
    unchanged = r.unchanged()
    recovery = vehicle.cycle()
    detail = str(answer.get("detail", "")) if isinstance(answer, dict) else ""
    return r.finish(
        None,
        recovery,
        slots_unchanged=unchanged,
        error=f"ManifestError: {reason}: {detail}" if refused else None,
        blocked=refused and unchanged_inventory and unchanged,
        detail=f"HTTP {response.status_code} for the replayed manifest",
    )


# --- the CAN bus --------------------------------------------------------------------


def _single_frame_max(config: IsoTpConfig) -> int:
    return 7 if config.tx_data_length == 8 else config.tx_data_length - 2


def _frame_at(config: IsoTpConfig, length: int, offset: int) -> tuple[int, int]:
    """(1-based frame number, byte index in that frame) of byte ``offset`` of a
    ``length``-byte multi-frame ISO-TP message (first frame, then consecutive frames)."""
    first = config.tx_data_length - (6 if length > 4095 else 2)
    if offset < first:
        return 1, config.tx_data_length - first + offset
    cf = config.tx_data_length - 1
    k = (offset - first) // cf
    return 2 + k, 1 + (offset - first) % cf


def _next_chunk_length(sec: SimSecondary, response: bytes) -> int:
    """Length of the ``imageChunk`` message the primary sends after ``response`` (a chunkAck)."""
    assert sec.ecu is not None and sec.client is not None
    target = sec.ecu.pending_target
    _, ack = codec.decode_message(response, sec.config.max_response)
    offset = int(ack["nextOffset"])
    size = 0 if target is None else min(sec.client.chunk_size, target.length - offset)
    chunk = {"offset": offset, "data": bytes(max(size, 0))}
    return len(codec.encode_message("imageChunk", chunk))


@contextlib.contextmanager
def _after_message(sec: SimSecondary, kind: str, action: Callable[[bytes], None]) -> Iterator[None]:
    """Call ``action(response)`` once, when the secondary has answered a ``kind`` message
    (before the answer goes on the bus)."""
    endpoint = sec.endpoint
    assert endpoint is not None
    inner = endpoint.handler
    fired = False

    def handler(request: bytes) -> bytes:
        nonlocal fired
        response = inner(request)
        if not fired:
            try:
                got, _ = codec.decode_message(request, sec.config.max_request)
            except CodecError:
                got = None
            if got == kind:
                fired = True
                action(response)
        return response

    endpoint.handler = handler
    try:
        yield
    finally:
        endpoint.handler = inner


def _frames_after(sec: SimSecondary, response: bytes) -> int:
    """Frames the primary sends on the request id before its next request:
    a flow control for a multi-frame ``response``."""
    return 1 if len(response) > _single_frame_max(sec.config) else 0


@contextlib.contextmanager
def _fast_failure(vehicle: SimVehicle, sec: SimSecondary) -> Iterator[None]:
    """Short client timeouts and retries while a secondary is made to fail
    (longer on a paced bus, where a chunk takes its wire time)."""
    client = sec.client
    assert client is not None
    saved = (client.timeout, client.install_timeout, client.max_retries)
    scale = 4.0 if isinstance(vehicle.primary_faults.inner, PacedBus) else 1.0
    client.timeout, client.install_timeout, client.max_retries = (
        FAULT_TIMEOUT * scale,
        FAULT_INSTALL_TIMEOUT * scale,
        FAULT_RETRIES,
    )
    try:
        yield
    finally:
        client.timeout, client.install_timeout, client.max_retries = saved


@contextlib.contextmanager
def _impostor(vehicle: SimVehicle, serial: str, report: Callable[[bytes], bytes]) -> Iterator[None]:
    """A node that answers version report requests for ``serial`` with ``report(nonce)``.

    The real ECU is forced off the bus first (as an error-frame attack does),
    so only the impostor answers on its CAN ids.
    """
    sec = vehicle.secondaries[serial]
    sec.faults.go_bus_off()
    node = CanNode(vehicle.bus.open())

    def handle(request: bytes) -> bytes:
        try:
            kind, value = codec.decode_message(request, sec.config.max_request)
        except CodecError:
            kind, value = "", {}
        if kind == "versionReportRequest":
            signed = report(bytes(value["nonce"]))
            return codec.encode_message("versionReportResponse", {"signedReport": signed})
        return codec.encode_message("ack", {"code": "badRequest", "text": "busy"})

    try:
        endpoint = node.endpoint(sec.config, handle)
        endpoint.start()
        yield
    finally:
        node.close()
        sec.faults.clear_bus_off()


def _can_report_attack(
    name: str, forge: Callable[[SimVehicle, str], Callable[[bytes], bytes]], what: str
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        serial = next(iter(vehicle.secondaries))
        stack = contextlib.ExitStack()
        answer = forge(vehicle, serial)
        return _play(
            r,
            lambda: stack.enter_context(_impostor(vehicle, serial, answer)),
            stack.close,
            serials=[serial],
            detail=f"{what} for {serial}",
        )

    return run


def _spoofed(vehicle: SimVehicle, serial: str) -> Callable[[bytes], bytes]:
    """Reports for ``serial`` signed by a key that is not its registered key."""
    sec = vehicle.secondaries[serial]
    key = CryptoSigner.generate_ed25519()
    pending = pending_assignments(vehicle.world, vehicle.vin).get(serial)
    claim = None
    if pending is not None:  # claim the update is done, so the Director stops sending it
        claim = InstalledImage(pending.image, pending.length, dict(pending.hashes), 1 << 30)

    def answer(nonce: bytes) -> bytes:
        report = EcuVersionReport(
            ecu_serial=serial,
            hardware_id=sec.hardware_id,
            installed=claim,
            report_counter=1 << 40,
            latest_time=vehicle.clock().replace(microsecond=0),
            nonce=nonce,
        )
        return SignedEcuVersionReport.sign(report, key).to_der()

    return answer


def _replayed(vehicle: SimVehicle, serial: str) -> Callable[[bytes], bytes]:
    """A genuine report of ``serial`` recorded earlier (another request's nonce)."""
    ecu = vehicle.secondaries[serial].ecu
    assert ecu is not None
    recorded = ecu.signed_report(os.urandom(16))
    return lambda nonce: recorded


def _transfer_fault(
    name: str,
    fault: Callable[[SimVehicle, SimSecondary, bytes], None],
    *,
    count: int = 1,
    victim: int = 0,
    detail: str,
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """A fault armed when the ``victim``-th secondary with an update accepts the image offer."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, name)
        pending = ensure_updates(world, vehicle, count)
        serial = sorted(pending, key=list(vehicle.secondaries).index)[victim]
        sec = vehicle.secondaries[serial]
        stack = contextlib.ExitStack()

        def arm() -> None:
            stack.enter_context(_fast_failure(vehicle, sec))
            stack.enter_context(
                _after_message(sec, "imageOffer", functools.partial(fault, vehicle, sec))
            )

        def disarm() -> None:
            stack.close()
            sec.faults.clear_plan()
            sec.faults.clear_bus_off()
            vehicle.primary_faults.clear_plan()
            vehicle.primary_faults.clear_bus_off()

        return _play(r, arm, disarm, serials=[serial], strict=False, detail=f"{detail} ({serial})")

    return run


def _corrupt_chunk(vehicle: SimVehicle, sec: SimSecondary, response: bytes) -> None:
    """Flip one bit of image data in the chunk that follows the offer (received frames)."""
    length = _next_chunk_length(sec, response)
    frame, byte = _frame_at(sec.config, length, min(40, length - 1))  # past the DER header
    sec.faults.add(
        FrameFault(
            "corrupt",
            nth=_frames_after(sec, response) + frame,
            direction="rx",
            arbitration_id=sec.config.request_id,
            byte=byte,
        )
    )


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


# A rogue node on the vehicle's bus (Uptane 2.1, 4.3; DESIGN 4: nothing from the bus is
# trusted). It holds the secondary's receiver back for this long at the first frame of
# the primary's chunk (the "delay" frame fault), so that the rogue's own frames, sent as
# soon as it sees that first frame, reach the secondary before the primary's next ones.
ROGUE_WINDOW = 0.3
# The primary's chunk size while the rogue attacks: several chunks per image, so the
# forged one lands mid-transfer.
ROGUE_CHUNK_SIZE = 96
ROGUE_BYTES = b"\x00asm rogue code"


def isotp_frames(data: bytes, config: IsoTpConfig) -> list[can.Message]:
    """The CAN frames of one ISO-TP message on ``config.request_id``, framed by can-isotp
    (first and consecutive frames sent back to back, as after a flow control)."""
    out: list[isotp.CanMessage] = []
    flow = isotp.CanMessage(
        arbitration_id=config.response_id,
        data=isotp.protocol.PDU.craft_flow_control_data(
            isotp.protocol.PDU.FlowStatus.ContinueToSend, 0, 0
        ),
        is_fd=config.fd,
    )
    pending = [flow]

    def rx(timeout: float) -> isotp.CanMessage | None:
        return pending.pop() if pending and logic.transmitting() and out else None

    logic = isotp.TransportLayerLogic(
        rxfn=rx,
        txfn=out.append,
        address=isotp.Address(
            isotp.AddressingMode.Normal_11bits,
            txid=config.request_id,
            rxid=config.response_id,
        ),
        params={**config.stack_params(config.max_request), "blocking_send": False},
    )
    logic.send(bytes(data))
    for _ in range(len(data) + 16):
        logic.process()
        if not logic.transmitting():
            break
    else:
        raise RuntimeError("can-isotp did not frame the message")
    return [
        can.Message(
            arbitration_id=m.arbitration_id,
            data=m.data,
            is_extended_id=False,
            is_fd=m.is_fd,
            bitrate_switch=m.bitrate_switch,
        )
        for m in out
    ]


def _first_frame(msg: can.Message) -> bool:
    """Is ``msg`` the first frame of a multi-frame ISO-TP message (as can-isotp reads it)?"""
    frame = isotp.CanMessage(arbitration_id=msg.arbitration_id, data=bytes(msg.data))
    try:
        return bool(isotp.protocol.PDU(frame).type == isotp.protocol.PDU.Type.FIRST_FRAME)
    except ValueError:
        return False


class RogueNode:
    """An attacker's node on a vehicle's CAN bus: a raw python-can bus object on the same
    channel, no ISO-TP stack and no flow control. Once ``arm``ed it watches the traffic
    and sends its frames right after the first frame of the next multi-frame ISO-TP
    message on the watched id, which makes the receiver drop that message for its own.
    """

    def __init__(self, bus: can.BusABC) -> None:
        self.bus = bus
        self.injected: list[can.Message] = []
        self._armed: tuple[int, list[can.Message]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="sim-rogue", daemon=True)
        self._thread.start()

    def arm(self, arbitration_id: int, frames: Sequence[can.Message]) -> None:
        with self._lock:
            self._armed = (arbitration_id, list(frames))

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(0.05)
            except can.CanError:
                return
            if msg is None or not _first_frame(msg):
                continue
            with self._lock:
                armed = self._armed
                if armed is None or armed[0] != msg.arbitration_id:
                    continue
                self._armed = None
            for frame in armed[1]:
                self.bus.send(frame)
                self.injected.append(frame)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.bus.shutdown()


def _injected_frames(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """A rogue node replaces the primary's next image chunk with a forged one at the same
    offset: under ISO 15765-2 a new first (or single) frame aborts the reception in
    progress, so the secondary takes the rogue's message in place of the primary's."""
    r = _Run(world, vehicle, "can-injected-frames")
    pending = ensure_updates(world, vehicle, 1)
    serial = sorted(pending, key=list(vehicle.secondaries).index)[0]
    sec = vehicle.secondaries[serial]
    client = sec.client
    assert client is not None
    stack = contextlib.ExitStack()
    forged: dict[str, int] = {}
    rogues: list[RogueNode] = []

    def inject(rogue: RogueNode, response: bytes) -> None:
        # The ack the secondary is about to send says which offset it wants next.
        _, ack = codec.decode_message(response, sec.config.max_response)
        offset = int(ack["nextOffset"])
        chunk = codec.encode_message("imageChunk", {"offset": offset, "data": ROGUE_BYTES})
        forged["offset"] = offset
        sec.faults.add(
            FrameFault(
                "delay",
                nth=_frames_after(sec, response) + 1,
                direction="rx",
                arbitration_id=sec.config.request_id,
                delay=ROGUE_WINDOW,
            )
        )
        rogue.arm(sec.config.request_id, isotp_frames(chunk, sec.config))

    def arm() -> None:
        rogue = RogueNode(vehicle.bus.open())
        rogues.append(rogue)
        stack.callback(rogue.close)
        stack.enter_context(_fast_failure(vehicle, sec))
        saved = client.chunk_size
        client.chunk_size = ROGUE_CHUNK_SIZE
        stack.callback(setattr, client, "chunk_size", saved)
        stack.enter_context(_after_message(sec, "imageChunk", functools.partial(inject, rogue)))

    def disarm() -> None:
        stack.close()
        sec.faults.clear_plan()

    outcome = _play(
        r, arm, disarm, serials=[serial], strict=False, detail=f"rogue node on {serial}'s ids"
    )
    sent = sum(len(rogue.injected) for rogue in rogues)
    if sent and "offset" in forged:
        outcome.detail += (
            f"; {sent} injected frame(s): an imageChunk of {len(ROGUE_BYTES)} other bytes "
            f"at offset {forged['offset']} in place of the primary's"
        )
    else:
        outcome.detail += "; the rogue node injected nothing"
    return outcome


def _drop_traffic(vehicle: SimVehicle, sec: SimSecondary, response: bytes) -> None:
    """Traffic to this secondary is dropped from its next image chunk on."""
    sec.faults.add(
        FrameFault(
            "bus_off",
            nth=_frames_after(sec, response) + 1,
            direction="rx",
            arbitration_id=sec.config.request_id,
        )
    )


def _partial_bundle(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """Two ECUs have updates; traffic to the second is dropped during its transfer."""
    r = _Run(world, vehicle, "partial-bundle")
    pending = ensure_updates(world, vehicle, 2)
    order = sorted(pending, key=list(vehicle.secondaries).index)
    victim = vehicle.secondaries[order[1]]
    stack = contextlib.ExitStack()

    def arm() -> None:
        stack.enter_context(_fast_failure(vehicle, victim))
        stack.enter_context(
            _after_message(victim, "imageOffer", functools.partial(_drop_traffic, vehicle, victim))
        )

    def disarm() -> None:
        stack.close()
        victim.faults.clear_plan()
        victim.faults.clear_bus_off()

    r.mark()
    try:
        arm()
        attack = vehicle.cycle()
    finally:
        disarm()
    unchanged = r.unchanged([victim.serial], strict=False)
    others_done = all(
        attack.ecus[s].installed == a.image for s, a in r.legit.items() if s != victim.serial
    )
    error = default_error(attack, vehicle)
    recovery = vehicle.cycle()  # reports the partial install, completes the bundle
    # the Director saw the others installed and kept the interrupted ECU's assignment
    pending = pending_assignments(world, vehicle.vin)
    kept = victim.serial in pending and not any(
        s in pending
        for s in r.legit
        if s != victim.serial and attack.ecus[s].installed == r.legit[s].image
    )
    confirm = vehicle.cycle()  # the Director sees the whole bundle installed
    done = victim.serial not in pending_assignments(world, vehicle.vin)
    return r.finish(
        attack,
        confirm,
        slots_unchanged=unchanged,
        error=error,
        blocked=unchanged and not r.untrusted() and kept,
        recovered=_cycle_ok(recovery)
        and r.installed_legit(recovery)
        and _cycle_ok(confirm)
        and done,
        detail=(
            f"{'other ECUs installed' if others_done else 'no ECU installed'}, "
            f"{victim.serial} interrupted; the Director kept its assignment pending: {kept}"
        ),
    )


# --- faults --------------------------------------------------------------------------


def power_cut(point: str) -> Scenario:
    """The power-cut fault at secondary write point ``point`` (``ecus.slots.WRITE_POINTS``)."""
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


# --- the catalogue -------------------------------------------------------------------


def _scenario(
    name: str,
    attack: str | None,
    title: str,
    defeated_by: str,
    run: Callable[[World, SimVehicle], ScenarioOutcome],
) -> Scenario:
    return Scenario(name, attack, title, defeated_by, run)


SCENARIOS: tuple[Scenario, ...] = (
    _scenario(
        "drop-request-director",
        ATTACK_DROP_REQUEST,
        "The network drops every request to the Director",
        "The cycle fails closed: no trusted state changes; the primary reports the "
        "failed download and retries next cycle",
        _drop_request("director"),
    ),
    _scenario(
        "drop-request-image",
        ATTACK_DROP_REQUEST,
        "The network drops every request to the Image repository",
        "The cycle fails closed: no trusted state changes; the primary reports the "
        "failed download and retries next cycle",
        _drop_request("image"),
    ),
    _scenario(
        "slow-retrieval",
        ATTACK_SLOW_RETRIEVAL,
        "An image arrives one byte every 50 ms",
        "Minimum download rate after a grace period (DownloadPolicy, PolicyFetcher)",
        _download_attack("slow-retrieval", lambda data: trickle(data, piece=1, delay=0.05)),
    ),
    _scenario(
        "freeze-director",
        ATTACK_FREEZE,
        "Director metadata frozen: the vehicle's time passes its expiry",
        "Expiry of Director timestamp/snapshot/targets checked at the primary's clock",
        _freeze_director,
    ),
    _scenario(
        "freeze-image",
        ATTACK_FREEZE,
        "Image repository timestamp frozen past its expiry",
        "Expiry of the Image repository's timestamp checked at the primary's clock",
        _freeze_image,
    ),
    _scenario(
        "rollback-director-metadata",
        ATTACK_ROLLBACK,
        "An older Director timestamp is replayed",
        "TUF version check: a version below the trusted one is refused",
        _rollback_director,
    ),
    _scenario(
        "rollback-image-metadata",
        ATTACK_ROLLBACK,
        "An older Image repository timestamp is replayed",
        "TUF version check: a version below the trusted one is refused",
        _rollback_image,
    ),
    _scenario(
        "rollback-release-counter",
        ATTACK_ROLLBACK,
        "A compromised Director assigns an older release of an installed app",
        "Release counter check against the installed and last assigned release (5.4.4.2)",
        _compromised_director("rollback-release-counter", _release_rollback_target),
    ),
    _scenario(
        "endless-metadata",
        ATTACK_ENDLESS_DATA,
        "The Director timestamp never ends",
        "Length caps on every metadata file (MetadataLimits)",
        _endless_metadata,
    ),
    _scenario(
        "endless-image",
        ATTACK_ENDLESS_DATA,
        "An image download never ends",
        "Downloads are capped at the signed length",
        _download_attack("endless-image", lambda data: endless()),
    ),
    _scenario(
        "mix-and-match",
        ATTACK_MIX_AND_MATCH,
        "Snapshot served with a targets file of another version",
        "Snapshot's version for targets must equal the targets served (TUF 5.6)",
        _mix_and_match,
    ),
    _scenario(
        "arbitrary-software-director",
        ATTACK_ARBITRARY_SOFTWARE,
        "Director compromised alone: its keys sign an image the Image repository lacks",
        "Every Director target must match the Image repository's (length, hashes, custom)",
        _compromised_director("arbitrary-software-director", _evil_director_target),
    ),
    _scenario(
        "arbitrary-software-image-swap",
        ATTACK_ARBITRARY_SOFTWARE,
        "Image repository server compromised: image bytes swapped",
        "Downloaded images are checked against every signed hash",
        _download_attack("arbitrary-software-image-swap", lambda data: _swapped(data)),
    ),
    _scenario(
        "arbitrary-software-image-threshold",
        ATTACK_ARBITRARY_SOFTWARE,
        "Image repository compromised: targets re-signed with one of its threshold keys",
        "TUF signature threshold on Image targets (offline keys, threshold >= 2)",
        _image_threshold,
    ),
    _scenario(
        "wrong-vehicle",
        ATTACK_WRONG_VEHICLE,
        "Director metadata of another vehicle replayed",
        "Director targets must name only this vehicle's ECUs, or carry its VIN when empty",
        _wrong_vehicle,
    ),
    _scenario(
        "replayed-manifest",
        ATTACK_REPLAYED_REPORT,
        "A captured vehicle version manifest is replayed to the Director",
        "The Director requires every ECU report counter to increase (replayed_report)",
        _replayed_manifest,
    ),
    _scenario(
        "can-spoofed-report",
        ATTACK_SPOOFED_MESSAGE,
        "A CAN node answers for a secondary with a report signed by another key",
        "The primary verifies every report with the ECU's registered key",
        _can_report_attack("can-spoofed-report", _spoofed, "forged report"),
    ),
    _scenario(
        "can-replayed-report",
        ATTACK_REPLAYED_REPORT,
        "A CAN node replays a secondary's earlier signed report",
        "Every report must carry the nonce of the primary's request",
        _can_report_attack("can-replayed-report", _replayed, "recorded report"),
    ),
    _scenario(
        "can-corrupted-frames",
        ATTACK_ARBITRARY_SOFTWARE,
        "A frame of image data is altered on the CAN bus mid-transfer",
        "The secondary checks length and every hash before activating; the next "
        "cycle transfers the image again",
        _transfer_fault(
            "can-corrupted-frames", _corrupt_chunk, detail="one bit flipped in an image chunk"
        ),
    ),
    _scenario(
        "can-injected-frames",
        ATTACK_ARBITRARY_SOFTWARE,
        "A rogue CAN node injects its own image chunk mid-transfer",
        "The secondary writes only at the offset it expects and checks length and every "
        "hash before activating; the next cycle transfers the image again",
        _injected_frames,
    ),
    _scenario(
        "partial-bundle",
        ATTACK_PARTIAL_BUNDLE,
        "Partial bundle installation: traffic to one of two updated ECUs is dropped",
        "The primary reports partial_bundle_installation when one ECU of a bundle installed "
        "and another failed; the Director keeps the assignment pending until a manifest "
        "shows it installed, and the next cycle completes the bundle",
        _partial_bundle,
    ),
    power_cut("chunk"),
    power_cut("commit"),
    _scenario(
        "bus-off",
        None,
        "The primary's CAN controller goes bus-off mid-transfer",
        "Resumable transfer from the secondary's durable offset; nothing is activated "
        "until complete and verified",
        _transfer_fault(
            "bus-off", _primary_bus_off, detail="primary bus-off during an image chunk"
        ),
    ),
    _scenario(
        "truncated-image",
        None,
        "An image download breaks off halfway (the connection closes early)",
        "The download fails closed (DownloadError); the partial file is not kept and the "
        "next cycle downloads the image again",
        _download_attack("truncated-image", lambda data: truncated(data, len(data) // 2)),
    ),
    _scenario(
        "server-restart",
        None,
        "The Director and Image repository restart between two cycles",
        "All state is persisted (database, repository files): counters, pending "
        "assignments and metadata survive",
        _server_restart,
    ),
)

_BY_NAME = {s.name: s for s in SCENARIOS}


def scenario(name: str) -> Scenario:
    """The scenario called ``name`` (``power-cut-<point>`` for any write point)."""
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    if name.startswith("power-cut-"):
        return power_cut(name.removeprefix("power-cut-").replace("-", "_"))
    raise KeyError(f"no scenario {name!r}; known: {', '.join(_BY_NAME)}")


def run_scenario(world: World, vehicle: SimVehicle, name: str) -> ScenarioOutcome:
    """Run scenario ``name`` on ``vehicle``; the world is usable again afterwards."""
    return scenario(name).run(world, vehicle)


__all__ = [
    "ROGUE_BYTES",
    "ROGUE_CHUNK_SIZE",
    "SCENARIOS",
    "RogueNode",
    "Scenario",
    "ScenarioOutcome",
    "ensure_updates",
    "isotp_frames",
    "last_manifest",
    "next_release",
    "pending_assignments",
    "power_cut",
    "publish_release",
    "release_module",
    "restart_servers",
    "run_scenario",
    "scenario",
]
