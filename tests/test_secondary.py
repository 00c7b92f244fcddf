"""The secondary ECU over an in-memory link: partial verification, transfer, trial.

Every attack test checks three things (DESIGN 9): the typed result the
primary-side client gets, the attack or reason in the ECU's next signed
version report, and that the slots did not change (active slot and its bytes).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.director_sim import T0, VIN, DirectorSim, target_file, wasm_from_wat
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import TargetFile

from ecus.primary.can_link import (
    CanSecondaryClient,
    ImageRefusedError,
    MetadataRejectedError,
    SecondaryRefusedError,
)
from ecus.secondary import Secondary
from ecus.secondary.ceilings import WasmCeilings
from ecus.secondary.config import SecondaryConfig
from ecus.secondary.slots import COMMITTED, FAILED
from ecus.secondary.wasm_host import SimPeripherals
from ecus.transport.memory import MemoryEndpoint, memory_pair
from uptane import codec
from uptane.errors import (
    ATTACK_ARBITRARY_SOFTWARE,
    ATTACK_ENDLESS_DATA,
    ATTACK_FREEZE,
    ATTACK_REPLAYED_MESSAGE,
    ATTACK_ROLLBACK,
    ATTACK_SPOOFED_MESSAGE,
    ATTACK_WRONG_ECU,
    ATTACK_WRONG_VEHICLE,
    CodecError,
    ConfigError,
)
from uptane.keys import generate_ed25519
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    sign_statement,
)
from uptane.metadata import Limits

REPO = Path(__file__).resolve().parents[1]
SERIAL, HW = "ecu-1", "blink-hw"
V1_CAPS = ("actuator.write", "health", "log")
V2_CAPS = ("actuator.write", "health", "log", "sensor.read")
LIMITS = Limits(confirm_ticks=3)


@functools.cache
def app(name: str) -> bytes:
    return wasm_from_wat(REPO / "demo" / "apps" / f"{name}.wat")


@functools.cache
def bad_module(name: str) -> bytes:
    return wasm_from_wat(REPO / "tests" / "wat" / f"{name}.wat")


@dataclass
class Clock:
    now: datetime = T0

    def __call__(self) -> datetime:
        return self.now


@dataclass(frozen=True)
class Slots:
    """What must not change when an update is refused."""

    active: str | None
    name: str | None
    digest: str | None
    statuses: tuple[str, ...]


@dataclass
class Ecu:
    tmp: Path
    sim: DirectorSim = field(default_factory=DirectorSim)
    signer: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    primary: CryptoSigner = field(default_factory=CryptoSigner.generate_ed25519)
    clock: Clock = field(default_factory=Clock)
    peripherals: SimPeripherals = field(default_factory=lambda: SimPeripherals(sensors={0: 5}))
    secondary: Secondary = field(init=False)
    client: CanSecondaryClient = field(init=False)
    endpoint: MemoryEndpoint | None = None

    def __post_init__(self) -> None:
        self.secondary = self.boot()

    def boot(self, **kw: Any) -> Secondary:
        """(Re)start the ECU over the same slot directory, with a fresh link."""
        if self.endpoint is not None:
            self.endpoint.close()
        kw.setdefault("primary_key", self.primary.public_key)
        self.secondary = Secondary(
            ecu_serial=SERIAL,
            hardware_id=HW,
            vin=VIN,
            signer=self.signer,
            director_root=self.sim.root_ders[1],
            slot_dir=self.tmp / "slots",
            clock=self.clock,
            peripherals=self.peripherals,
            **kw,
        )
        link, self.endpoint = memory_pair(self.secondary.handle, timeout=10.0)
        self.endpoint.start()
        self.client = CanSecondaryClient(link, SERIAL, chunk_size=100, signer=self.primary)
        return self.secondary

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()

    # --- helpers ------------------------------------------------------------

    def target(self, name: str, data: bytes, **kw: Any) -> TargetFile:
        fields: dict[str, Any] = {
            "ecu_serial": SERIAL,
            "hardware_ids": [HW],
            "release_counter": 1,
            "capabilities": V2_CAPS,
            "limits": LIMITS,
        }
        fields.update(kw)
        return target_file(name, data, **fields)

    def update(self, target: TargetFile, data: bytes) -> bytes:
        path = self.tmp / "images" / target.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.sim.publish_targets([target])
        return self.client.send_update(self.sim.update_for(target, path))

    def install_v1(self) -> Slots:
        self.update(
            self.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS),
            app("blink_v1"),
        )
        assert self.secondary.tick(7) == 7
        self.report()  # a clean slate of attacks
        return self.slots()

    def report(self, nonce: bytes | None = None) -> EcuVersionReport:
        nonce = os.urandom(16) if nonce is None else nonce
        report = self.client.get_report(nonce).verify(self.signer.public_key)
        assert report.nonce == nonce
        assert report.ecu_serial == SERIAL
        return report

    def slots(self) -> Slots:
        store = self.secondary.store
        active = store.active
        target = store.active_target()
        digest = None
        if active is not None:
            digest = hashlib.sha256(store.slot_path(active).read_bytes()).hexdigest()
        return Slots(
            active,
            None if target is None else target.name,
            digest,
            tuple(store.slot_info(s).status for s in ("a", "b")),
        )

    def ask(self, kind: str, value: Any) -> tuple[str, Any]:
        return codec.decode_message(self.secondary.handle(codec.encode_message(kind, value)))

    def info_of(self, target: TargetFile) -> InstalledImage:
        return InstalledImage(
            filename=target.path,
            length=target.length,
            hashes=dict(target.hashes),
            release_counter=target.custom["release_counter"],
        )


@pytest.fixture
def ecu(tmp_path: Path) -> Iterator[Ecu]:
    e = Ecu(tmp_path)
    yield e
    e.close()


def assert_unchanged_and_running_v1(ecu: Ecu, before: Slots) -> None:
    assert ecu.slots().active == before.active
    assert ecu.slots().name == before.name == "apps/blink_v1.wasm"
    assert ecu.slots().digest == before.digest
    assert ecu.secondary.tick(9) == 9  # still blink v1


# --- normal operation -----------------------------------------------------------


def test_info_response(ecu: Ecu) -> None:
    info = ecu.client.get_info()
    assert info.ecu_serial == SERIAL
    assert info.hardware_id == HW
    assert info.public_key.keyid == ecu.signer.public_key.keyid
    assert info.protocol_version == 1
    assert info.verification_mode == "partial"
    assert info.free_slot_size > 0


def test_fresh_ecu_reports_nothing_installed(ecu: Ecu) -> None:
    first = ecu.report(b"n1")
    second = ecu.report(b"n2")
    assert first.installed is None
    assert second.report_counter > first.report_counter
    assert first.latest_time == T0
    assert ecu.secondary.tick(1) is None


def test_install_then_update_keeps_old_slot(ecu: Ecu) -> None:
    ecu.install_v1()
    v1_slot = ecu.secondary.store.active
    assert ecu.report().installed.filename == "apps/blink_v1.wasm"  # type: ignore[union-attr]

    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    result = SignedEcuVersionReport.from_der(ecu.update(v2, app("blink_v2"))).verify(
        ecu.signer.public_key
    )
    assert result.last_result == "ok"
    assert result.installed is not None and result.installed.filename == "apps/blink_v2.wasm"
    report = ecu.report()
    assert report.installed is not None
    assert report.installed.filename == "apps/blink_v2.wasm"
    assert report.installed.release_counter == 2
    assert report.installed.hashes == dict(v2.hashes)
    assert ecu.secondary.tick(7) == 2 * 7 + 5  # blink v2: 2t + sensor 0
    store = ecu.secondary.store
    assert store.active != v1_slot
    old = store.slot_info(v1_slot)  # type: ignore[arg-type]
    assert old.status == COMMITTED and old.target is not None
    assert old.target.name == "apps/blink_v1.wasm"
    assert store.read_image(v1_slot) == app("blink_v1")  # type: ignore[arg-type]


def test_restart_boots_the_installed_module(ecu: Ecu) -> None:
    before = ecu.install_v1()
    ecu.boot()
    assert ecu.slots() == before
    assert ecu.secondary.tick(11) == 11
    assert ecu.report().installed is not None


def test_same_update_again_is_no_update(ecu: Ecu) -> None:
    ecu.install_v1()
    counter = ecu.report().report_counter
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    assert ecu.client.push_metadata([], ecu.sim.publish_targets([tf])) == "noUpdate"
    with pytest.raises(ImageRefusedError) as e:
        ecu.client.offer(ecu.info_of(tf))
    assert e.value.code == "noUpdate"
    report = ecu.report()
    assert report.attacks_detected == ()
    assert report.report_counter > counter


# --- attacks: metadata ------------------------------------------------------------


def test_metadata_signed_by_unpinned_key(ecu: Ecu) -> None:
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    der = ecu.sim.publish_targets([v2], signers=[CryptoSigner.generate_ed25519()])
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], der)
    assert e.value.code == "metadataRejected"
    with pytest.raises(ImageRefusedError):  # and the image is not accepted either
        ecu.client.offer(ecu.info_of(v2))
    report = ecu.report()
    assert ATTACK_ARBITRARY_SOFTWARE in report.attacks_detected
    assert report.installed is not None and report.installed.filename == "apps/blink_v1.wasm"
    assert_unchanged_and_running_v1(ecu, before)


def test_targets_for_another_ecu(ecu: Ecu) -> None:
    before = ecu.install_v1()
    other = ecu.target("apps/blink_v2.wasm", app("blink_v2"), ecu_serial="ecu-2")
    assert ecu.client.push_metadata([], ecu.sim.publish_targets([other])) == "noUpdate"
    with pytest.raises(ImageRefusedError) as e:
        ecu.client.send_image(app("blink_v2"), ecu.info_of(other))
    assert e.value.code == "noUpdate"
    outcome = ecu.client.install("apps/blink_v2.wasm")
    assert outcome.code == "noUpdate"
    report = ecu.report()
    assert ATTACK_WRONG_ECU in report.attacks_detected
    assert_unchanged_and_running_v1(ecu, before)


def test_targets_for_another_hardware_id(ecu: Ecu) -> None:
    before = ecu.install_v1()
    tf = ecu.target("apps/blink_v2.wasm", app("blink_v2"), hardware_ids=["other-hw"])
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    assert e.value.code == "metadataRejected"
    assert "wrong_ecu" in e.value.text
    report = ecu.report()
    assert ATTACK_WRONG_ECU in report.attacks_detected
    assert report.last_result == "metadataRejected"
    assert_unchanged_and_running_v1(ecu, before)


def test_targets_for_another_vehicle(ecu: Ecu) -> None:
    before = ecu.install_v1()
    ecu.sim.vin = "VIN-OTHER-0002"
    tf = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    assert ATTACK_WRONG_VEHICLE in ecu.report().attacks_detected
    assert_unchanged_and_running_v1(ecu, before)


@pytest.mark.parametrize("after_empty_targets", [False, True], ids=["installed", "then_no_target"])
def test_release_counter_rollback(ecu: Ecu, after_empty_targets: bool) -> None:
    """A target below the running image's release counter is a rollback attack. The
    installed image's counter is a floor of its own: also after Director targets that
    assign this ECU nothing (the trusted release floor is then 0)."""
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS, release_counter=5)
    ecu.update(tf, app("blink_v1"))
    if after_empty_targets:
        assert ecu.client.push_metadata([], ecu.sim.publish_targets([])) == "noUpdate"
        assert ecu.secondary.trusted.release_counter == 0
    ecu.report()
    before = ecu.slots()
    old = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=4)
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], ecu.sim.publish_targets([old]))
    assert e.value.code == "metadataRejected"
    report = ecu.report()
    assert ATTACK_ROLLBACK in report.attacks_detected
    assert report.installed is not None and report.installed.release_counter == 5
    assert ecu.secondary.pending_target is None
    assert_unchanged_and_running_v1(ecu, before)


def test_expired_metadata(ecu: Ecu) -> None:
    before = ecu.install_v1()
    tf = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    der = ecu.sim.publish_targets([tf])  # expires at T0 + 1 day
    ecu.clock.now = T0 + timedelta(days=2)
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], der)
    assert e.value.code == "metadataRejected"
    report = ecu.report()
    assert ATTACK_FREEZE in report.attacks_detected
    assert report.latest_time == T0 + timedelta(days=2)
    assert_unchanged_and_running_v1(ecu, before)


def test_expired_metadata_after_clock_goes_back(ecu: Ecu) -> None:
    """The persisted time floor: a clock set back cannot revive expired metadata."""
    before = ecu.install_v1()
    ecu.clock.now = T0 + timedelta(days=2)
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    with pytest.raises(MetadataRejectedError):  # the v1 bundle has expired by now
        ecu.client.push_metadata([], ecu.sim.targets_ders[ecu.sim.targets_version])
    ecu.clock.now = T0  # an attacker (or a flat battery) resets the clock
    ecu.boot()
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))  # signed at T0, exp T0+1d
    assert "freeze" in e.value.text
    report = ecu.report()
    assert ATTACK_FREEZE in report.attacks_detected
    assert report.latest_time == T0 + timedelta(days=2)
    assert_unchanged_and_running_v1(ecu, before)


def test_replayed_old_targets(ecu: Ecu) -> None:
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    old = ecu.sim.publish_targets([tf])
    ecu.update(tf, app("blink_v1"))  # publishes a newer version with the same target
    ecu.report()
    before = ecu.slots()
    with pytest.raises(MetadataRejectedError) as e:
        ecu.client.push_metadata([], old)
    assert e.value.code == "metadataRejected"
    report = ecu.report()
    assert ATTACK_ROLLBACK in report.attacks_detected
    assert report.last_result == "metadataRejected"
    assert_unchanged_and_running_v1(ecu, before)


def test_root_rotation_is_persisted(ecu: Ecu) -> None:
    ecu.install_v1()
    ecu.sim.rotate_root(targets_key=True)
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.update(v2, app("blink_v2"))
    assert ecu.secondary.trusted.root.version == 2
    ecu.boot()  # provisioned with root v1, but trusts the persisted v2
    assert ecu.secondary.trusted.root.version == 2
    assert ecu.secondary.tick(1) == 2 + 5
    # targets signed by the revoked targets key are refused from now on
    old_key = [
        s
        for k, s in ecu.sim.pool.items()
        if k in ecu.sim.root_json(1).signed.roles["targets"].keyids
    ]
    der = ecu.sim.publish_targets([v2], signers=old_key)
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], der)


def test_metadata_from_the_image_repository_is_refused(ecu: Ecu) -> None:
    before = ecu.slots()
    kind, value = ecu.ask(
        "metadataPush",
        {"repository": "image", "role": "targets", "version": 2, "der": ecu.sim.targets_ders[1]},
    )
    assert (kind, value["code"]) == ("ack", "badRequest")
    assert ecu.slots() == before


# --- attacks: images ------------------------------------------------------------


def test_tampered_image_bytes(ecu: Ecu) -> None:
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    tampered = bytearray(app("blink_v2"))
    tampered[-3] ^= 0x01
    ecu.client.send_image(bytes(tampered), ecu.info_of(v2))
    outcome = ecu.client.install(v2.path)
    assert outcome.code == "imageMismatch"
    assert outcome.report.verify(ecu.signer.public_key).last_result == "imageMismatch"
    report = ecu.report()
    assert ATTACK_ARBITRARY_SOFTWARE in report.attacks_detected
    assert report.last_result == "imageMismatch"
    assert_unchanged_and_running_v1(ecu, before)
    assert FAILED in ecu.slots().statuses  # the written slot can never be booted


def test_offer_that_differs_from_the_verified_target(ecu: Ecu) -> None:
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    info = ecu.info_of(v2)
    for wrong in (
        InstalledImage("apps/evil.wasm", info.length, info.hashes, 2),
        InstalledImage(info.filename, info.length + 1, info.hashes, 2),
        InstalledImage(info.filename, info.length, {"sha256": info.hashes["sha256"]}, 2),
        InstalledImage(info.filename, info.length, {**info.hashes, "sha256": "00" * 32}, 2),
        InstalledImage(info.filename, info.length, info.hashes, 3),
    ):
        with pytest.raises(ImageRefusedError) as e:
            ecu.client.offer(wrong)
        assert e.value.code == "imageMismatch"
    assert ATTACK_ARBITRARY_SOFTWARE in ecu.report().attacks_detected
    assert_unchanged_and_running_v1(ecu, before)


def test_chunk_past_the_target_length_is_endless_data(ecu: Ecu) -> None:
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    assert ecu.client.offer(ecu.info_of(v2)) == 0
    data = app("blink_v2") + b"more and more"
    kind, value = ecu.ask("imageChunk", {"offset": 0, "data": data})
    assert (kind, value["code"], value["nextOffset"]) == ("chunkAck", "imageMismatch", 0)
    report = ecu.report()
    assert ATTACK_ENDLESS_DATA in report.attacks_detected
    store = ecu.secondary.store
    assert store.slot_info(store.inactive_slot()).written == 0
    assert_unchanged_and_running_v1(ecu, before)


def test_chunk_at_wrong_offset_writes_nothing(ecu: Ecu) -> None:
    v1 = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v1]))
    assert ecu.client.offer(ecu.info_of(v1)) == 0
    data = app("blink_v1")
    assert ecu.client.send_chunk(0, data[:100], len(data)) == 100
    kind, value = ecu.ask("imageChunk", {"offset": 150, "data": data[150:200]})
    assert (kind, value["code"], value["nextOffset"]) == ("chunkAck", "transferIncomplete", 100)
    kind, value = ecu.ask("imageChunk", {"offset": 0, "data": data[:100]})
    assert (value["code"], value["nextOffset"]) == ("transferIncomplete", 100)
    store = ecu.secondary.store
    assert store.slot_info(store.inactive_slot()).written == 100
    # and the transfer completes correctly from there
    result = ecu.client.send_image(data, ecu.info_of(v1))
    assert result.start_offset == 100
    assert ecu.client.install(v1.path).ok


def test_chunk_without_offer_is_not_accepted(ecu: Ecu) -> None:
    kind, value = ecu.ask("imageChunk", {"offset": 0, "data": b"\0asm"})
    assert (kind, value["code"]) == ("chunkAck", "notReady")


def test_install_before_the_transfer_is_complete(ecu: Ecu) -> None:
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    assert ecu.client.install(v2.path).code == "transferIncomplete"  # not offered
    ecu.client.offer(ecu.info_of(v2))
    ecu.client.send_chunk(0, app("blink_v2")[:100], v2.length)
    outcome = ecu.client.install(v2.path)
    assert outcome.code == "transferIncomplete"
    assert "100 of" in outcome.text
    assert_unchanged_and_running_v1(ecu, before)


# --- attacks: modules that fail their trial ---------------------------------------


@pytest.mark.parametrize(
    ("module", "capabilities", "reason"),
    [
        ("trap_self_test", (), "trap"),
        ("loop_forever", (), "fuel_exhausted"),
        ("forbidden_import", ("log",), "forbidden_import"),
        ("self_test_fails", (), "self_test_failed"),
    ],
)
def test_module_that_fails_its_trial_rolls_back(
    ecu: Ecu, module: str, capabilities: tuple[str, ...], reason: str
) -> None:
    before = ecu.install_v1()
    tf = ecu.target(
        f"apps/{module}.wasm", bad_module(module), release_counter=2, capabilities=capabilities
    )
    outcome_report = ecu.update(tf, bad_module(module))
    signed = SignedEcuVersionReport.from_der(outcome_report)
    in_result = signed.verify(ecu.signer.public_key)
    assert in_result.last_result == "trialFailed"
    assert in_result.last_result_text.startswith(reason)
    report = ecu.report()
    assert report.last_result == "trialFailed"
    assert report.last_result_text.startswith(reason)
    assert report.installed is not None and report.installed.filename == "apps/blink_v1.wasm"
    assert_unchanged_and_running_v1(ecu, before)
    store = ecu.secondary.store
    assert store.trial is None
    assert store.slot_info(store.inactive_slot()).status == FAILED
    ecu.boot()  # and after a restart the ECU still runs v1
    assert_unchanged_and_running_v1(ecu, before)


# --- bad messages -----------------------------------------------------------------


def test_oversized_and_malformed_messages_change_nothing(ecu: Ecu) -> None:
    ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    ecu.client.offer(ecu.info_of(v2))
    state = (ecu.tmp / "slots" / "state.json").read_bytes()
    before = ecu.slots()
    good_chunk = codec.encode_message("imageChunk", {"offset": 0, "data": app("blink_v2")[:50]})
    oversized = codec.encode_message(
        "imageChunk", {"offset": 0, "data": b"\0" * ecu.secondary.max_message}
    )
    bad = [
        b"",
        b"\x00",
        b"garbage that is not DER",
        good_chunk[:-1],
        good_chunk + b"\0",
        oversized,
        codec.encode_message("ack", {"code": "ok", "text": "I am the primary"}),
        codec.encode_message("chunkAck", {"code": "ok", "nextOffset": 10}),
        codec.encode_message("installResult", {"code": "ok", "text": "", "signedReport": b"x"}),
    ]
    for request in bad:
        kind, value = codec.decode_message(ecu.secondary.handle(request))
        assert (kind, value["code"]) == ("ack", "badRequest"), request[:20]
    assert (ecu.tmp / "slots" / "state.json").read_bytes() == state
    assert ecu.slots() == before
    # the link still works and the transfer goes on where it was
    assert ecu.client.send_image(app("blink_v2"), ecu.info_of(v2)).start_offset == 0
    assert ecu.client.install(v2.path).ok


def test_client_typed_errors_for_unexpected_answers() -> None:
    answers = [
        codec.encode_message("ack", {"code": "busy", "text": "later"}),
        codec.encode_message("chunkAck", {"code": "ok", "nextOffset": 0}),
        b"not DER",
        codec.encode_message("chunkAck", {"code": "ok", "nextOffset": 99}),
    ]
    link, endpoint = memory_pair(lambda _: answers.pop(0), timeout=5.0)
    endpoint.start()
    try:
        client = CanSecondaryClient(link, SERIAL)
        with pytest.raises(SecondaryRefusedError) as e:
            client.get_info()
        assert (e.value.code, e.value.text) == ("busy", "later")
        with pytest.raises(CodecError, match="expected versionReportResponse"):
            client.version_report(b"n")
        with pytest.raises(CodecError):
            client.version_report(b"n")
        with pytest.raises(CodecError, match="offset 99"):  # past the image's end
            client.offer(InstalledImage("a.wasm", 10, {"sha256": "00" * 32}, 1))
    finally:
        endpoint.close()


# --- time (DESIGN 7) ----------------------------------------------------------------


def test_time_message_only_moves_the_floor_forward(ecu: Ecu) -> None:
    ecu.client.send_time(T0 + timedelta(hours=5))
    assert ecu.secondary.reference_time() == T0 + timedelta(hours=5)
    with pytest.raises(SecondaryRefusedError) as e:
        ecu.client.send_time(T0 + timedelta(hours=4))
    assert e.value.code == "badRequest"
    with pytest.raises(SecondaryRefusedError):  # too far ahead of the ECU's own clock
        ecu.client.send_time(T0 + timedelta(days=3))
    assert ecu.secondary.reference_time() == T0 + timedelta(hours=5)
    ecu.boot()
    assert ecu.secondary.reference_time() == T0 + timedelta(hours=5)  # persisted
    assert ecu.report().latest_time == T0 + timedelta(hours=5)


def test_time_message_without_bound_for_clockless_ecu(ecu: Ecu) -> None:
    ecu.boot(max_time_ahead=None)
    ecu.client.send_time(T0 + timedelta(days=3))
    assert ecu.secondary.reference_time() == T0 + timedelta(days=3)


def test_time_message_makes_metadata_expire(ecu: Ecu) -> None:
    ecu.boot(max_time_ahead=None)
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    der = ecu.sim.publish_targets([tf])
    ecu.client.send_time(T0 + timedelta(days=2))
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], der)
    assert ATTACK_FREEZE in ecu.report().attacks_detected


# --- report state ---------------------------------------------------------------------


def test_attacks_stay_until_the_primary_confirms_the_director_recorded_them(ecu: Ecu) -> None:
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), hardware_ids=["other-hw"])
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    ecu.boot()  # survives a restart
    first = ecu.report()
    assert first.attacks_detected == (ATTACK_WRONG_ECU,)
    # read again without a receipt: still there (the Director may not have it)
    again = ecu.report()
    assert again.attacks_detected == (ATTACK_WRONG_ECU,)
    # the primary confirms the Director recorded ``first``: cleared
    n = os.urandom(16)
    second = SignedEcuVersionReport.from_der(
        ecu.client.version_report(n, last_accepted=first.report_counter)
    ).verify(ecu.signer.public_key)
    assert second.attacks_detected == ()
    assert second.last_result == "metadataRejected"
    assert second.report_counter > again.report_counter


def test_restart_keeps_the_verified_target(ecu: Ecu) -> None:
    v1 = ecu.target("apps/blink_v1.wasm", app("blink_v1"), capabilities=V1_CAPS)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v1]))
    ecu.boot()
    assert ecu.secondary.pending_target is not None
    assert ecu.secondary.pending_target.name == v1.path
    ecu.client.send_image(app("blink_v1"), ecu.info_of(v1))
    assert ecu.client.install(v1.path).ok
    assert ecu.secondary.pending_target is None


# --- issue 10: stuck trial, ceilings, spoofed time, release floor, rogue reader ---------


def _rollback_report(ecu: Ecu, tf: TargetFile, data: bytes) -> EcuVersionReport:
    """Send ``data``: the install must roll back with a signed report naming why."""
    before = ecu.slots()
    outcome = SignedEcuVersionReport.from_der(ecu.update(tf, data))
    report = outcome.verify(ecu.signer.public_key)
    assert report.last_result == "trialFailed"
    assert ecu.secondary.store.trial is None  # nothing is left on trial
    assert (ecu.slots().active, ecu.slots().name, ecu.slots().digest) == (
        before.active,
        before.name,
        before.digest,
    )
    return report


@pytest.mark.parametrize(
    ("module", "reason"), [("version_traps", "trap"), ("version_loops", "fuel_exhausted")]
)
def test_version_export_failure_rolls_back_not_stuck_on_trial(
    ecu: Ecu, module: str, reason: str
) -> None:
    """Issue 10 item 1: ``version()`` is inside the trial; the next offer is not blocked."""
    ecu.install_v1()
    bad = ecu.target("apps/bad.wasm", bad_module(module), release_counter=2, capabilities=())
    report = _rollback_report(ecu, bad, bad_module(module))
    assert report.last_result_text.startswith(f"{reason}:")
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=3)
    good = SignedEcuVersionReport.from_der(ecu.update(v2, app("blink_v2")))
    assert good.verify(ecu.signer.public_key).last_result == "ok"


def test_host_error_during_trial_rolls_back(ecu: Ecu) -> None:
    """A peripheral failing under the module is a ``host_error`` rollback, not internalError."""
    ecu.install_v1()

    def broken(channel: int) -> int:
        raise OSError("sensor bus fault")

    ecu.peripherals.read_sensor = broken  # type: ignore[method-assign]
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    report = _rollback_report(ecu, v2, app("blink_v2"))
    assert report.last_result_text.startswith("host_error:")


def test_limits_above_the_ecu_ceilings_are_refused_at_the_offer(ecu: Ecu) -> None:
    """Issue 10 item 2: refused before any byte moves, typed result in the report."""
    before = ecu.slots()
    huge = Limits(fuel_per_call=2**62, memory_pages=65536, confirm_ticks=3)
    tf = ecu.target("apps/blink_v2.wasm", app("blink_v2"), limits=huge)
    assert ecu.client.push_metadata([], ecu.sim.publish_targets([tf])) == "ok"
    with pytest.raises(ImageRefusedError) as e:
        ecu.client.offer(ecu.info_of(tf))
    assert e.value.code == "limitsExceeded"
    assert ecu.slots() == before
    report = ecu.report()
    assert report.last_result == "limitsExceeded"
    assert "fuel_per_call" in report.last_result_text
    assert "memory_pages" in report.last_result_text


def _time_message(ecu: Ecu, when: datetime, signer: Any, nonce: bytes | None = None) -> bytes:
    if nonce is None:
        kind, value = codec.decode_message(
            ecu.secondary.handle(codec.encode_message("timeNonceRequest", {"protocolVersion": 1}))
        )
        assert kind == "timeNonceResponse"
        nonce = bytes(value["nonce"])
    seconds = int(when.timestamp())
    statement = {"ecuSerial": SERIAL, "nonce": nonce, "time": seconds}
    return codec.encode_message(
        "timeMessage",
        {"time": seconds, "nonce": nonce, "signatures": sign_statement("time", statement, signer)},
    )


def _ack(ecu: Ecu, request: bytes) -> tuple[str, str]:
    kind, value = codec.decode_message(ecu.secondary.handle(request))
    assert kind == "ack"
    return value["code"], value["text"]


def test_unsigned_or_rogue_time_message_is_refused_and_reported(ecu: Ecu) -> None:
    """Issue 10 item 3: any bus node could send ``timeMessage(now + 23 h)``; now refused."""
    ahead = T0 + timedelta(hours=23)
    unsigned = codec.encode_message("timeMessage", {"time": int(ahead.timestamp())})
    assert _ack(ecu, unsigned)[0] == "badRequest"
    assert ecu.report().attacks_detected == (ATTACK_SPOOFED_MESSAGE,)
    rogue = _time_message(ecu, ahead, CryptoSigner.generate_ed25519())
    code, text = _ack(ecu, rogue)
    assert code == "badRequest" and ATTACK_SPOOFED_MESSAGE in text
    assert ecu.secondary.reference_time() == T0  # the floor did not move
    ecu.boot()
    assert ecu.secondary.reference_time() == T0


def test_replayed_time_message_is_refused_and_reported(ecu: Ecu) -> None:
    """A genuine signed time message is good once, and only with a nonce the ECU issued."""
    genuine = _time_message(ecu, T0 + timedelta(hours=1), ecu.primary)
    assert _ack(ecu, genuine)[0] == "ok"
    assert _ack(ecu, genuine)[0] == "badRequest"  # replayed: its nonce is used up
    assert ecu.report().attacks_detected == (ATTACK_REPLAYED_MESSAGE,)
    made_up = _time_message(ecu, T0 + timedelta(hours=2), ecu.primary, nonce=b"\x07" * 16)
    assert _ack(ecu, made_up)[0] == "badRequest"
    assert ecu.secondary.reference_time() == T0 + timedelta(hours=1)


def test_clockless_ecu_refuses_an_unsigned_far_future_time(ecu: Ecu) -> None:
    """With ``max_time_ahead=None`` an unsigned 9999-12-31 used to brick updates for good."""
    ecu.boot(max_time_ahead=None)
    end = datetime(9999, 12, 31, tzinfo=T0.tzinfo)
    assert _ack(ecu, codec.encode_message("timeMessage", {"time": int(end.timestamp())}))[0] == (
        "badRequest"
    )
    ecu.install_v1()  # metadata valid at T0 still verifies
    assert ecu.report().installed is not None


def test_time_message_without_a_provisioned_primary_key_is_refused(ecu: Ecu) -> None:
    ecu.boot(primary_key=None)
    code, text = _ack(ecu, _time_message(ecu, T0 + timedelta(hours=1), ecu.primary))
    assert code == "badRequest" and "no primary key" in text
    assert ecu.secondary.reference_time() == T0


def test_signed_time_within_the_bound_is_what_a_compromised_primary_can_do(ecu: Ecu) -> None:
    """The bound stays: even the primary's key cannot move time more than a day ahead."""
    assert _ack(ecu, _time_message(ecu, T0 + timedelta(days=2), ecu.primary))[0] == "badRequest"
    assert ecu.secondary.reference_time() == T0


def test_release_counter_below_the_previously_trusted_targets_is_refused(ecu: Ecu) -> None:
    """Issue 10 item 4 (5.4.4.2 step 5): release 5 trusted, not installed; release 3 refused."""
    v5 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=5)
    assert ecu.client.push_metadata([], ecu.sim.publish_targets([v5])) == "ok"
    v3 = ecu.target("apps/blink_v1.wasm", app("blink_v1"), release_counter=3, capabilities=V1_CAPS)
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([v3]))
    assert ATTACK_ROLLBACK in ecu.report().attacks_detected
    ecu.boot()  # the floor comes from the persisted targets
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([v3]))
    pending = ecu.secondary.pending_target
    assert pending is not None and pending.release_counter == 5


def _receipt_request(counter: int, signer: Any, serial: str = SERIAL) -> bytes:
    receipt = {"ecuSerial": serial, "reportCounter": counter}
    return codec.encode_message(
        "versionReportRequest",
        {
            "nonce": os.urandom(16),
            "lastAccepted": counter,
            "receiptSignatures": sign_statement("reportReceipt", receipt, signer),
        },
    )


def test_rogue_report_reader_cannot_make_attacks_vanish(ecu: Ecu) -> None:
    """Issue 10 item 5: reading reports, or a forged receipt, clears nothing."""
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), hardware_ids=["other-hw"])
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    for _ in range(3):  # a rogue node asks for reports first
        ecu.secondary.handle(codec.encode_message("versionReportRequest", {"nonce": b"r"}))
    carried = ecu.report()
    assert ATTACK_WRONG_ECU in carried.attacks_detected
    rogue = CryptoSigner.generate_ed25519()
    ecu.secondary.handle(_receipt_request(carried.report_counter, rogue))
    ecu.secondary.handle(_receipt_request(carried.report_counter, ecu.primary, serial="ecu-2"))
    unsigned = codec.encode_message(
        "versionReportRequest", {"nonce": b"", "lastAccepted": carried.report_counter}
    )
    ecu.secondary.handle(unsigned)
    ecu.secondary.handle(_receipt_request(10**12, ecu.primary))  # never issued
    report = ecu.report()
    assert set(report.attacks_detected) == {ATTACK_WRONG_ECU, ATTACK_SPOOFED_MESSAGE}
    # the genuine receipt for ``carried`` clears what it carried, not what came later
    ecu.secondary.handle(_receipt_request(carried.report_counter, ecu.primary))
    assert ecu.report().attacks_detected == (ATTACK_SPOOFED_MESSAGE,)
    ecu.secondary.handle(_receipt_request(report.report_counter, ecu.primary))
    assert ecu.report().attacks_detected == ()


def test_secondary_config_provisions_primary_key_and_ceilings(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    brake, primary = generate_ed25519(keys, "brake"), generate_ed25519(keys, "primary")
    (tmp_path / "root.der").write_bytes(DirectorSim().root_ders[1])
    raw: dict[str, Any] = {
        "serial": SERIAL,
        "hardware_id": HW,
        "key": {"uri": "file2:keys/brake.pem", "public": "keys/brake.pub.json"},
        "director_root": "root.der",
        "slot_dir": "slots",
        "primary_key": "keys/primary.pub.json",
        "ceilings": {"fuel_per_call": 1000, "memory_pages": 2, "call_seconds": 0.5},
    }
    config = SecondaryConfig.from_dict(raw, base_dir=tmp_path)
    assert config.key.public.keyid == brake.public.keyid
    assert config.primary_key is not None and config.primary_key.keyid == primary.public.keyid
    assert config.ceilings == WasmCeilings(fuel_per_call=1000, memory_pages=2, call_seconds=0.5)
    default = SecondaryConfig.from_dict(
        {k: v for k, v in raw.items() if k not in ("primary_key", "ceilings")}, base_dir=tmp_path
    )
    assert default.primary_key is None and default.ceilings == WasmCeilings()
    for bad, message in (
        ({"ceilings": {"fuel": 1}}, "unknown ceilings"),
        ({"ceilings": {"memory_pages": 0}}, "memory_pages"),
        ({"ceilings": []}, "'ceilings' must be an object"),
        ({"primary_key": "keys/missing.pub.json"}, "primary_key"),
    ):
        with pytest.raises(ConfigError, match=message):
            SecondaryConfig.from_dict({**raw, **bad}, base_dir=tmp_path)


def test_without_a_primary_key_receipts_clear_nothing(ecu: Ecu) -> None:
    """An ECU not provisioned with the primary's key keeps reporting its attacks."""
    ecu.boot(primary_key=None)
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), hardware_ids=["other-hw"])
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    carried = ecu.report()
    ecu.secondary.handle(_receipt_request(carried.report_counter, ecu.primary))
    assert ecu.report().attacks_detected == (ATTACK_WRONG_ECU,)
