"""Attacks on a secondary's own protections: spoofed time, a rogue report reader, and
signed images that misbehave on the ECU (a trap in ``version()``, limits above its
ceilings) (DESIGN 5, 7; Uptane 2.1, 4.3, 5.4.3).

The rogue node is another ISO-TP node on the vehicle's bus using a secondary's
CAN ids, as the primary does: anything it sends reaches the secondary's
handler exactly like the primary's requests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import wasmtime
from securesystemslib.signer import CryptoSigner, Signer

from ecus.sim.world import SimSecondary, SimVehicle, World
from ecus.transport.isotp import CanNode
from uptane import codec
from uptane.errors import ATTACK_WRONG_ECU
from uptane.manifest import InstalledImage, SignedEcuVersionReport, sign_statement
from uptane.metadata import Limits

from .base import ScenarioOutcome, _cycle_ok, _Run, default_error
from .updates import next_release, publish_release

#: How far ahead the spoofed time is: inside the ECU's one-day bound, past the
#: Director metadata's remaining validity (it expires a day after signing).
SPOOFED_AHEAD = timedelta(hours=23, minutes=30)

Send = Callable[[str, dict[str, Any]], tuple[str, Any]]


@contextlib.contextmanager
def rogue_node(vehicle: SimVehicle, sec: SimSecondary) -> Iterator[Send]:
    """A rogue ISO-TP node sending requests on ``sec``'s CAN ids; yields ``send(kind, value)``."""
    node = CanNode(vehicle.bus.open())
    try:
        link = node.link(sec.config)

        def send(kind: str, value: dict[str, Any]) -> tuple[str, Any]:
            answer = link.request(codec.encode_message(kind, value), sec.config.timeout)
            return codec.decode_message(answer, sec.config.max_response)

        yield send
    finally:
        node.close()


def _time_message(send: Send, serial: str, when: int, signer: Signer) -> dict[str, Any]:
    """A time message for ``serial`` signed by ``signer``, with a nonce the ECU issued."""
    _, answer = send("timeNonceRequest", {"protocolVersion": 1})
    nonce = bytes(answer["nonce"])
    statement = {"ecuSerial": serial, "nonce": nonce, "time": when}
    return {"time": when, "nonce": nonce, "signatures": sign_statement("time", statement, signer)}


def _victim(vehicle: SimVehicle) -> SimSecondary:
    return next(iter(vehicle.secondaries.values()))


def spoofed_time(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """A rogue node sends ``timeMessage(now + 23 h 30 min)``: unsigned, signed by its own
    key, and a genuine signed one replayed. Accepted, any of them would push the ECU's
    persisted time floor past the Director metadata's expiry (a freeze)."""
    r = _Run(world, vehicle, "can-spoofed-time")
    sec = _victim(vehicle)
    ecu = sec.ecu
    assert ecu is not None
    r.mark()
    ahead = int((vehicle.clock() + SPOOFED_AHEAD).timestamp())
    answers = []
    with rogue_node(vehicle, sec) as send:
        answers.append(send("timeMessage", {"time": ahead}))
        rogue_key = CryptoSigner.generate_ed25519()
        answers.append(send("timeMessage", _time_message(send, sec.serial, ahead, rogue_key)))
        # a genuine time message of the primary, recorded on the bus when it was sent
        now = int(vehicle.clock().timestamp())
        genuine = _time_message(send, sec.serial, now, vehicle.primary_signer)
        send("timeMessage", genuine)
        answers.append(send("timeMessage", genuine))
    refused = [a for a in answers if a[0] == "ack" and a[1]["code"] == "badRequest"]
    floor = ecu.store.time_floor
    held = floor is None or floor <= vehicle.clock()
    attack = vehicle.cycle()  # the reports carry what the ECU saw
    unchanged, trusted = r.unchanged(), not r.untrusted()
    # an update now: its Director metadata would look expired at the spoofed time
    serial = sec.serial
    name = publish_release(world, sec.hardware_id, next_release(world, vehicle, sec.hardware_id))
    world.director.assign(name, ecu_serials=[serial])
    recovery = vehicle.cycle()
    installed = recovery.ecus[serial].installed == name
    return r.finish(
        attack,
        recovery,
        slots_unchanged=unchanged,
        error=(
            f"SpoofedMessageError: {refused[0][1]['text']}" if refused else default_error(attack)
        ),
        blocked=unchanged and held and len(refused) == 3 and trusted,
        recovered=_cycle_ok(recovery) and installed,
        detail=(
            f"{len(refused)} of 3 time messages refused by {serial}; its time floor "
            f"{'stayed' if held else 'moved ahead'}; the next update "
            f"{'installed' if installed else 'did not install'}"
        ),
    )


def rogue_report_reader(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
    """A rogue node gets an attack recorded (it offers an image nobody assigned), then
    tries to make it vanish before the Director sees it: it reads version reports and
    sends a receipt signed by its own key naming the last report it read."""
    r = _Run(world, vehicle, "can-rogue-report-reader")
    sec = _victim(vehicle)
    assert sec.ecu is not None
    r.mark()
    image = InstalledImage("rogue/app.wasm", 64, {"sha256": "ab" * 32}, 1 << 20)
    with rogue_node(vehicle, sec) as send:
        offered = send("imageOffer", {"image": image.to_asn1()})
        counter = 0
        for _ in range(3):
            _, answer = send("versionReportRequest", {"nonce": os.urandom(16)})
            read = SignedEcuVersionReport.from_der(bytes(answer["signedReport"])).report
            counter = read.report_counter
        receipt = {"ecuSerial": sec.serial, "reportCounter": counter}
        forged = sign_statement("reportReceipt", receipt, CryptoSigner.generate_ed25519())
        send(
            "versionReportRequest",
            {"nonce": os.urandom(16), "lastAccepted": counter, "receiptSignatures": forged},
        )
    kept = ATTACK_WRONG_ECU in sec.ecu.report_state.attacks
    attack = vehicle.cycle()
    unchanged = r.unchanged()
    recovery = vehicle.cycle()  # its request carries the primary's genuine receipt
    cleared = sec.ecu.report_state.attacks == ()
    outcome = r.finish(
        attack,
        recovery,
        slots_unchanged=unchanged,
        error=default_error(attack),
        recovered=_cycle_ok(recovery) and r.installed_legit(recovery) and cleared,
        detail=(
            f"offer answered {offered[1]['code']}; after 3 rogue reads and a forged receipt "
            f"the recorded attack was {'kept' if kept else 'lost'}; the primary's receipt "
            f"{'cleared' if cleared else 'did not clear'} it once the Director had it"
        ),
    )
    outcome.blocked = outcome.blocked and kept and ATTACK_WRONG_ECU in outcome.director_attacks
    return outcome


# --- signed images that misbehave on the ECU -------------------------------------

_VERSION_TRAPS = """
(module
  (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t))
  (func (export "version") (result i32) unreachable))
"""

#: Signed limits far above any ECU's ceilings (the metadata accepts up to these).
HUGE_LIMITS = Limits(fuel_per_call=2**62, memory_pages=65536, confirm_ticks=5)


def _bad_release(
    run_name: str, data: Callable[[], bytes], limits: Limits | None, expect: str
) -> Callable[[World, SimVehicle], ScenarioOutcome]:
    """Both repositories sign a release that misbehaves on the ECU; it must not stick."""

    def run(world: World, vehicle: SimVehicle) -> ScenarioOutcome:
        r = _Run(world, vehicle, run_name)
        sec = _victim(vehicle)
        ecu = sec.ecu
        assert ecu is not None
        release = next_release(world, vehicle, sec.hardware_id)
        (bad,) = world.publish(
            release, [sec.hardware_id], data=data(), limits=limits, capabilities=()
        )
        world.director.assign(bad, ecu_serials=[sec.serial])
        r.mark()
        attack = vehicle.cycle()
        result = ecu.report_state
        unchanged = r.unchanged([sec.serial], strict=False)
        free = ecu.store.trial is None
        # the fix: a good release; the ECU must take it at once (no reboot)
        good = publish_release(world, sec.hardware_id, release + 1)
        world.director.assign(good, ecu_serials=[sec.serial])
        recovery = vehicle.cycle()
        installed = recovery.ecus[sec.serial].installed == good
        return r.finish(
            attack,
            recovery,
            slots_unchanged=unchanged,
            error=f"{sec.serial} reported {result.last_result}: {result.last_result_text}",
            blocked=unchanged and free and result.last_result == expect,
            recovered=_cycle_ok(recovery) and installed,
            detail=(
                f"{bad}: {result.last_result}; "
                f"{'nothing left on trial' if free else 'an image is stuck on trial'}; "
                f"the next release {'installed' if installed else 'did not install'}"
            ),
        )

    return run


stuck_trial = _bad_release(
    "trial-version-trap",
    lambda: bytes(wasmtime.wat2wasm(_VERSION_TRAPS)),
    None,
    "trialFailed",
)
over_limit_image = _bad_release(
    "over-limit-image",
    lambda: bytes(wasmtime.wat2wasm(_VERSION_TRAPS.replace("unreachable", "i32.const 9"))),
    HUGE_LIMITS,
    "limitsExceeded",
)
