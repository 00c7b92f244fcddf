"""Tests that pin the secondary ECU's checks found unprotected by a mutation review.

Each test here fails when the check it names is removed (the condition made
``False`` or the ``raise`` deleted) and passes with it: partial verification
and image checks (Uptane 2.1, 5.4.4.1-5.4.4.4), rollback protection, the
primary's signed statements (DESIGN 7), the A/B slots and the WASM trial
(DESIGN 5). Real parts throughout: real DER, real signatures, real wasmtime.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import detools
import pytest
import test_secondary
import test_slots
import wasmtime
from helpers.delta_ecu import DeltaEcu, patch_v1_v2, running_v1
from helpers.delta_images import release
from helpers.director_sim import VIN, DirectorSim
from securesystemslib.signer import CryptoSigner
from test_secondary import HW, REPO, SERIAL, V1_CAPS, Clock, Ecu, app
from test_slots import T2, V1, V2, write_all
from tuf.api import exceptions as tuf_exc

from ecus.primary.can_link import ImageRefusedError, MetadataRejectedError
from ecus.primary.links import EcuUpdate
from ecus.secondary import Secondary
from ecus.secondary.delta import DELTA_FILE, DELTA_KEY
from ecus.secondary.report_state import ReportState
from ecus.secondary.slots import COMMITTED, FAILED, SlotStore
from ecus.secondary.wasm_host import MAX_LOG_BYTES, MAX_LOGS_PER_CALL, SimPeripherals, WasmHost
from uptane import codec
from uptane.errors import (
    ATTACK_SPOOFED_MESSAGE,
    ATTACK_WRONG_ECU,
    CodecError,
    InstallError,
    ManifestError,
    SpoofedMessageError,
)
from uptane.manifest import (
    MAX_REPORT_SIZE,
    EcuVersionReport,
    SignedEcuVersionReport,
    SignedVehicleManifest,
    VehicleVersionManifest,
    sign_statement,
    split_signed_report,
    verify_statement,
)
from uptane.metadata import Limits
from uptane.verification import partial

ecu = test_secondary.ecu  # the fixtures, under their own names
v1_store = test_slots.v1_store


# --- the image the ECU believes it runs (ecu._is_installed) ---------------------


def test_new_build_under_the_installed_name_and_length_is_installed(ecu: Ecu) -> None:
    """A target with the installed image's name and length but other hashes is an update:
    the ECU must not take it for the image it already runs (ecu._is_installed, hashes)."""
    ecu.install_v1()
    v1 = app("blink_v1")
    rebuilt = v1.replace(b"blink v1: self-test ok", b"blink v1: self-test OK")
    assert len(rebuilt) == len(v1) and rebuilt != v1
    tf = ecu.target("apps/blink_v1.wasm", rebuilt, release_counter=2, capabilities=V1_CAPS)
    result = SignedEcuVersionReport.from_der(ecu.update(tf, rebuilt))
    report = result.verify(ecu.signer.public_key)
    assert report.installed is not None
    assert report.installed.hashes == dict(tf.hashes)
    assert report.installed.release_counter == 2
    store = ecu.secondary.store
    assert store.active is not None
    assert store.slot_path(store.active).read_bytes() == rebuilt


# --- provisioning (ecu.Secondary.__init__) ----------------------------------------


@pytest.mark.parametrize("what", ["garbage", "targets"])
def test_a_bad_director_root_is_refused_at_provisioning(tmp_path: Path, what: str) -> None:
    """A Director root that is not root metadata is refused when the ECU is made, with a
    typed error, not accepted and found out at the first metadata push (5.4.4.1)."""
    sim = DirectorSim()
    bad = b"\x30\x03\x02\x01\x00" if what == "garbage" else sim.publish_targets([])
    with pytest.raises(tuf_exc.RepositoryError):
        Secondary(
            ecu_serial=SERIAL,
            hardware_id=HW,
            vin=VIN,
            signer=CryptoSigner.generate_ed25519(),
            director_root=bad,
            slot_dir=tmp_path / "slots",
            clock=Clock(),
        )
    assert not (tmp_path / "slots" / "state.json").exists()


# --- metadata pushes (ecu._on_metadata) -------------------------------------------


def test_root_versions_buffered_are_bounded(ecu: Ecu) -> None:
    """A primary cannot make the ECU buffer more root versions than partial verification
    would ever take: the one past ``MAX_ROOT_ROTATIONS`` is refused, a resent one is not."""
    before = ecu.slots()
    junk = b"\x30\x00" * 64
    for version in range(2, 2 + partial.MAX_ROOT_ROTATIONS):
        push = {"repository": "director", "role": "root", "version": version, "der": junk}
        assert ecu.ask("metadataPush", push)[1]["code"] == "ok"
    extra = {"repository": "director", "role": "root", "version": 99, "der": junk}
    kind, value = ecu.ask("metadataPush", extra)
    assert (kind, value["code"]) == ("ack", "badRequest")
    assert "too many root versions" in value["text"]
    again = {"repository": "director", "role": "root", "version": 2, "der": junk}
    assert ecu.ask("metadataPush", again)[1]["code"] == "ok"
    assert ecu.slots() == before


def test_a_push_of_another_director_role_is_refused_and_keeps_the_buffered_root(
    ecu: Ecu,
) -> None:
    """Only root and targets are pushed to a partial-verification ECU: any other role is a
    bad request that changes nothing, not even the root versions already buffered."""
    ecu.install_v1()
    root_v2 = ecu.sim.rotate_root(targets_key=True)
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    targets = ecu.sim.publish_targets([v2])
    push = {"repository": "director", "role": "root", "version": 2, "der": root_v2}
    assert ecu.ask("metadataPush", push)[1]["code"] == "ok"
    for role in ("snapshot", "timestamp"):
        other = {"repository": "director", "role": role, "version": 2, "der": targets}
        kind, value = ecu.ask("metadataPush", other)
        assert (kind, value["code"]) == ("ack", "badRequest")
    assert ecu.report().attacks_detected == ()
    assert ecu.client.push_metadata([], targets) == "ok"  # root v2 was still buffered
    assert ecu.secondary.trusted.root.version == 2


# --- offers and chunks (ecu._on_offer, ecu._on_chunk) -------------------------------


def test_offer_of_an_unassigned_image_while_running_the_assigned_one_is_reported(
    ecu: Ecu,
) -> None:
    """With nothing pending, only the image the ECU already runs is a quiet ``noUpdate``;
    any other offer is refused and reported as ``wrong_ecu`` (5.4.4.1: the ECU takes only
    what verified Director metadata assigns it)."""
    before = ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    with pytest.raises(ImageRefusedError) as e:
        ecu.client.offer(ecu.info_of(v2))
    assert e.value.code == "noUpdate"
    report = ecu.report()
    assert ATTACK_WRONG_ECU in report.attacks_detected
    assert ecu.slots() == before


@pytest.mark.parametrize("assign_next", [True, False])
def test_new_director_targets_stop_the_transfer_of_the_old_image(
    ecu: Ecu, assign_next: bool
) -> None:
    """Once verified Director targets assign another image (or none), chunks of the image
    they replaced are no longer written: the writer of the old transfer is dropped."""
    ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    assert ecu.client.offer(ecu.info_of(v2)) == 0
    data = app("blink_v2")
    assert ecu.client.send_chunk(0, data[:100], len(data)) == 100
    store = ecu.secondary.store
    slot = store.inactive_slot()
    entries = []
    if assign_next:
        rebuilt = data.replace(b"blink v2", b"blink v3")
        assert rebuilt != data
        entries = [ecu.target("apps/blink_v3.wasm", rebuilt, release_counter=3)]
    ecu.client.push_metadata([], ecu.sim.publish_targets(entries))
    kind, value = ecu.ask("imageChunk", {"offset": 100, "data": data[100:200]})
    assert (kind, value["code"]) == ("chunkAck", "notReady")
    assert store.slot_info(slot).written == 100
    assert store.slot_path(slot).stat().st_size == 100


# --- install requests (ecu._on_install) ---------------------------------------------


def test_install_request_for_another_filename_installs_nothing(ecu: Ecu) -> None:
    """An install request must name the pending verified target: a complete transfer is
    not installed under another name, and stays ready for the right request."""
    ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    ecu.client.send_image(app("blink_v2"), ecu.info_of(v2))
    before = ecu.slots()
    outcome = ecu.client.install("apps/blink_v1.wasm")
    assert outcome.code == "noUpdate"
    assert ecu.slots() == before
    assert ecu.secondary.store.trial is None
    assert ecu.secondary.tick(9) == 9  # still blink v1
    assert ecu.client.install(v2.path).ok
    assert ecu.slots().name == "apps/blink_v2.wasm"


# --- boot (ecu._boot, slots.SlotStore.boot) ------------------------------------------


def test_trial_interrupted_by_a_restart_is_run_again_then_committed(ecu: Ecu) -> None:
    """With ``max_trial_boots`` set, an image whose trial a restart interrupted is tried
    again at boot and committed only once it passes: it never runs off trial unchecked."""
    ecu.install_v1()
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    ecu.client.push_metadata([], ecu.sim.publish_targets([v2]))
    ecu.client.send_image(app("blink_v2"), ecu.info_of(v2))
    writer = ecu.secondary._writer
    assert writer is not None
    writer.finish()
    ecu.secondary.store.start_trial()  # the power is cut here, mid-trial
    secondary = ecu.boot(max_trial_boots=1)
    store = secondary.store
    assert store.trial is None
    assert store.slot_info(store.active or "").status == COMMITTED
    assert ecu.slots().name == "apps/blink_v2.wasm"
    assert secondary.tick(7) == 2 * 7 + 5  # blink v2 runs, after passing its trial
    assert ecu.report().last_result == "ok"


# --- the primary's signed statements (primary_statements, DESIGN 7) -------------------


def test_receipt_signatures_without_a_counter_are_a_spoofed_receipt(ecu: Ecu) -> None:
    """A report request carrying receipt signatures but no counter clears nothing, is
    reported as ``spoofed_message``, and is still answered with a signed report."""
    tf = ecu.target("apps/blink_v1.wasm", app("blink_v1"), hardware_ids=["other-hw"])
    with pytest.raises(MetadataRejectedError):
        ecu.client.push_metadata([], ecu.sim.publish_targets([tf]))
    carried = ecu.report()
    receipt = {"ecuSerial": SERIAL, "reportCounter": carried.report_counter}
    request = codec.encode_message(
        "versionReportRequest",
        {"nonce": b"n", "receiptSignatures": sign_statement("reportReceipt", receipt, ecu.primary)},
    )
    kind, value = codec.decode_message(ecu.secondary.handle(request))
    assert kind == "versionReportResponse"
    answered = SignedEcuVersionReport.from_der(bytes(value["signedReport"]))
    report = answered.verify(ecu.signer.public_key)
    assert report.nonce == b"n"
    assert set(report.attacks_detected) == {ATTACK_WRONG_ECU, ATTACK_SPOOFED_MESSAGE}


# --- the A/B slot store (slots.SlotStore) ------------------------------------------------


def test_no_image_is_resumed_while_one_is_on_trial(v1_store: SlotStore) -> None:
    """``resume_image`` refuses like ``begin_image`` while a trial runs: the slot on trial
    (the inactive one) is never handed out for writing (DESIGN 5)."""
    write_all(v1_store, T2, V2)
    v1_store.start_trial()
    with pytest.raises(RuntimeError):
        v1_store.resume_image(T2)
    assert v1_store.trial is not None
    assert v1_store.read_image(v1_store.trial) == V2


def test_a_finished_writer_cannot_touch_its_slot_on_trial_or_after_commit(
    v1_store: SlotStore,
) -> None:
    """Once its slot is on trial, and after it is committed, the writer that filled it is
    no longer current: finishing it again would mark the running slot merely verified."""
    writer = v1_store.resume_image(T2)
    for offset in range(0, len(V2), 200):
        writer.write(offset, V2[offset : offset + 200])
    writer.finish()
    trial = v1_store.start_trial().slot
    with pytest.raises(RuntimeError):
        writer.finish()
    assert v1_store.trial == trial
    v1_store.commit()
    with pytest.raises(RuntimeError):
        writer.finish()
    assert v1_store.active == trial
    assert v1_store.slot_info(trial).status == COMMITTED
    booted = SlotStore(v1_store.path).boot()
    assert booted is not None and booted.slot == trial and booted.image == V2


def test_a_slot_that_failed_its_trial_is_never_read_as_verified(v1_store: SlotStore) -> None:
    """A slot whose image failed its trial keeps bytes that match its target, yet
    ``read_image`` refuses it: only verified or committed slots are handed out to run."""
    write_all(v1_store, T2, V2)
    slot = v1_store.start_trial().slot
    v1_store.rollback("self_test_failed")
    assert v1_store.slot_info(slot).status == FAILED
    assert v1_store.slot_path(slot).read_bytes() == V2
    with pytest.raises(InstallError, match="no verified image"):
        v1_store.read_image(slot)


def test_a_trial_image_changed_before_its_retry_is_rolled_back_at_boot(
    v1_store: SlotStore,
) -> None:
    """With ``max_trial_boots`` set, the image of an interrupted trial is checked again at
    boot: bytes that no longer match their target are rolled back and the previous image
    boots, instead of the ECU failing to start."""
    write_all(v1_store, T2, V2)
    slot = v1_store.start_trial().slot
    path = v1_store.slot_path(slot)
    path.write_bytes(b"X" + path.read_bytes()[1:])
    reopened = SlotStore(v1_store.path, max_trial_boots=1)
    booted = reopened.boot()
    assert booted is not None and booted.image == V1 and not booted.trial
    assert booted.rolled_back == "trial image no longer matches its metadata"
    assert reopened.trial is None
    assert reopened.slot_info(slot).status == FAILED


def test_commit_or_rollback_without_a_trial_is_refused(v1_store: SlotStore) -> None:
    """Commit and rollback need an image on trial: a typed refusal, nothing changes."""
    state = (v1_store.path / "state.json").read_bytes()
    with pytest.raises(RuntimeError, match="no image is on trial"):
        v1_store.commit()
    with pytest.raises(RuntimeError, match="no image is on trial"):
        v1_store.rollback("self_test_failed")
    assert (v1_store.path / "state.json").read_bytes() == state


@pytest.mark.parametrize("length", [-1, True, "768"])
def test_a_state_record_with_a_bad_target_length_is_refused(
    v1_store: SlotStore, length: object
) -> None:
    """A slot target whose length is not a non-negative integer makes the state record
    invalid: a typed ``InstallError`` at load, never a store that trusts it."""
    path = v1_store.path / "state.json"
    state = json.loads(path.read_bytes())
    state["slots"][v1_store.active]["target"]["length"] = length
    path.write_text(json.dumps(state))
    with pytest.raises(InstallError, match="invalid"):
        SlotStore(v1_store.path)


def test_a_state_record_with_a_non_hex_digest_is_refused(v1_store: SlotStore) -> None:
    """A slot target digest that is not hex makes the state record invalid (typed error),
    rather than a slot that can never be verified."""
    path = v1_store.path / "state.json"
    state = json.loads(path.read_bytes())
    state["slots"][v1_store.active]["target"]["hashes"]["sha256"] = "zz" * 32
    path.write_text(json.dumps(state))
    with pytest.raises(InstallError, match="invalid"):
        SlotStore(v1_store.path)


def _set(path: tuple[object, ...], value: object) -> Callable[[dict[str, Any], str], None]:
    """An edit of the state record: ``value`` at ``path`` ("ACTIVE" names the active slot)."""

    def edit(state: dict[str, Any], active: str) -> None:
        keys = [active if k == "ACTIVE" else k for k in path]
        node: Any = state
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_set(("format",), 2), id="format"),
        pytest.param(lambda s, a: s.update(trial=a), id="trial-is-active"),
        pytest.param(_set(("slots", "ACTIVE", "status"), "booted"), id="status"),
        pytest.param(_set(("slots", "ACTIVE", "target", "name"), "../x.wasm"), id="target"),
        pytest.param(_set(("slots", "ACTIVE", "written"), -1), id="written"),
        pytest.param(_set(("slots", "ACTIVE", "target"), None), id="active-without-target"),
        pytest.param(_set(("report_counter",), "7"), id="report-counter"),
        pytest.param(_set(("boot_attempts",), None), id="boot-attempts"),
        pytest.param(_set(("metadata",), []), id="metadata"),
        pytest.param(_set(("extra",), "x"), id="extra"),
        pytest.param(_set(("time_floor",), "yesterday"), id="time-floor"),
    ],
)
def test_an_invalid_state_record_is_refused_at_load(
    v1_store: SlotStore, edit: Callable[[dict[str, Any], str], None]
) -> None:
    """Every field of the slot state record is checked when the ECU starts: a record it
    did not write (or a newer format) is a typed ``InstallError``, never half-trusted."""
    path = v1_store.path / "state.json"
    state = json.loads(path.read_bytes())
    assert v1_store.active is not None
    edit(state, v1_store.active)
    path.write_text(json.dumps(state))
    with pytest.raises(InstallError, match="invalid"):
        SlotStore(v1_store.path)


# --- deltas (delta.DeltaWriter, delta.start_delta; docs/deltas.md) -----------------------


@pytest.fixture
def delta_ecu(tmp_path: Path) -> Iterator[DeltaEcu]:
    yield from running_v1(tmp_path)


def test_a_delta_that_does_not_decode_marks_its_slot_failed(delta_ecu: DeltaEcu) -> None:
    """A delta refused mid-transfer leaves its slot failed (it can never go on trial), the
    failure recorded and no transfer record or patch bytes behind."""
    patch = bytearray(patch_v1_v2())
    patch[5] ^= 0x10  # the patch no longer decodes
    update = delta_ecu.with_delta(delta_ecu.update(2), bytes(patch))
    assert update.delta is not None
    delta_ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    with pytest.raises(ImageRefusedError) as e:
        delta_ecu.client.send_image(bytes(patch), update.installed_image, delta=update.delta.offer)
    assert e.value.code == "imageMismatch"
    store = delta_ecu.secondary.store
    slot = store.inactive_slot()
    assert store.slot_info(slot).status == FAILED
    failure = store.last_failure
    assert failure is not None and (failure.slot, failure.target) == (slot, update.target.name)
    assert store.get_extra(DELTA_KEY) is None
    assert not (store.path / DELTA_FILE).exists()
    assert delta_ecu.active_bytes() == release(1)


def _interrupted(delta_ecu: DeltaEcu, update: EcuUpdate, patch: bytes) -> None:
    """``patch`` sent 64 bytes at a time until the ECU dies at its third delta chunk."""
    assert update.delta is not None
    delta_ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    delta_ecu.client.chunk_size = 64
    delta_ecu.cut_at = ("delta_chunk", 3)
    with pytest.raises(CodecError):  # the ECU died mid-exchange
        delta_ecu.client.send_image(patch, update.installed_image, delta=update.delta.offer)


def test_a_delta_whose_patch_bytes_were_lost_starts_over(delta_ecu: DeltaEcu) -> None:
    """After a restart that lost the received patch bytes (the record says more than the
    file holds), the next offer starts the delta from 0 and it installs: no stale offset
    is trusted, nothing is padded with zeros."""
    patch = patch_v1_v2()
    update = delta_ecu.with_delta(delta_ecu.update(2), patch)
    _interrupted(delta_ecu, update, patch)
    assert update.delta is not None
    store_path = delta_ecu.secondary.store.path
    record = delta_ecu.secondary.store.get_extra(DELTA_KEY)
    assert record is not None and record["received"] > 0
    (store_path / DELTA_FILE).write_bytes(b"")  # the patch bytes did not survive
    delta_ecu.boot()
    delta_ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    assert delta_ecu.client.offer(update.installed_image, update.delta.offer) == 0
    delta_ecu.client.send_update(update)
    assert delta_ecu.report().installed == delta_ecu.installed(2)
    assert delta_ecu.active_bytes() == release(2)


def test_another_delta_for_the_same_target_does_not_resume_the_first(
    delta_ecu: DeltaEcu,
) -> None:
    """The durable bytes of an interrupted delta are resumed only by the same delta (its
    base, result and length): another patch for the same target starts from 0."""
    first = patch_v1_v2()
    out = io.BytesIO()
    detools.create_patch(
        io.BytesIO(release(1)),
        io.BytesIO(release(2)),
        out,
        compression="heatshrink",
        patch_type="sequential",
        heatshrink_window_sz2=8,
        heatshrink_lookahead_sz2=4,
    )
    second = out.getvalue()
    assert len(second) != len(first)
    update = delta_ecu.with_delta(delta_ecu.update(2), first)
    _interrupted(delta_ecu, update, first)
    delta_ecu.boot()
    other = delta_ecu.with_delta(update, second)
    assert other.delta is not None
    delta_ecu.client.push_metadata(other.director_root_chain, other.director_targets)
    assert delta_ecu.client.offer(other.installed_image, other.delta.offer) == 0
    delta_ecu.client.send_update(other)
    assert delta_ecu.report().installed == delta_ecu.installed(2)
    assert delta_ecu.active_bytes() == release(2)


# --- the WASM host (wasm_host.WasmApp, DESIGN 5) -----------------------------------------

_LOG_FLOOD = """
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hello")
  (func (export "self_test") (result i32)
    (local $i i32)
    (loop $again
      (call $log (i32.const 0) (i32.const 5))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 100))))
    (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t)))
"""


def test_a_module_cannot_flood_the_log_sink() -> None:
    """At most ``MAX_LOGS_PER_CALL`` messages per call reach the log sink; the rest are
    counted as dropped, and the module keeps running."""
    peripherals = SimPeripherals()
    limits = Limits(confirm_ticks=1)
    result = WasmHost().trial(bytes(wasmtime.wat2wasm(_LOG_FLOOD)), ("log",), limits, peripherals)
    assert result.passed, result
    assert len(peripherals.logs) == MAX_LOGS_PER_CALL
    assert result.app is not None and result.app.logs_dropped == 100 - MAX_LOGS_PER_CALL


@pytest.mark.parametrize("value", [True, 2**63, -(2**63) - 1, 1.5])
def test_a_sensor_value_that_is_not_an_i64_is_a_host_error(value: object) -> None:
    """A peripheral returning anything but a signed 64-bit integer (a bool included) fails
    the trial as ``host_error``: the module never sees a converted value."""
    peripherals = SimPeripherals(sensors={0: value})  # type: ignore[dict-item]
    sensor_tick = bytes(wasmtime.wat2wasm((REPO / "tests" / "wat" / "sensor_tick.wat").read_text()))
    result = WasmHost().trial(sensor_tick, ("sensor.read",), Limits(confirm_ticks=2), peripherals)
    assert not result.passed and result.reason == "host_error", result
    assert "not a signed 64-bit integer" in result.detail


_LONG_LOG = """
(module
  (import "uptane" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (func (export "self_test") (result i32)
    (memory.fill (i32.const 0) (i32.const 65) (i32.const 65536))
    (call $log (i32.const 0) (i32.const 65536))
    (i32.const 0))
  (func (export "tick") (param $t i64) (result i64) (local.get $t)))
"""


def test_a_log_message_is_cut_to_max_log_bytes() -> None:
    """A module logging its whole memory gets at most ``MAX_LOG_BYTES`` into the sink."""
    peripherals = SimPeripherals()
    module = bytes(wasmtime.wat2wasm(_LONG_LOG))
    result = WasmHost().trial(module, ("log",), Limits(confirm_ticks=1), peripherals)
    assert result.passed, result
    assert peripherals.logs == ["A" * MAX_LOG_BYTES]


# --- what the next reports carry (report_state.ReportState, DESIGN 7) ----------------------


def test_a_receipt_keeps_the_attacks_recorded_after_the_report_it_names(ecu: Ecu) -> None:
    """An attack recorded after report N was signed is not in report N: the receipt for N
    clears what N carried and keeps that one, whose counter is N itself."""
    ecu.install_v1()
    unsigned = ecu.ask("timeMessage", {"time": 0})
    assert unsigned[1]["code"] == "badRequest"
    carried = ecu.report()
    assert carried.attacks_detected == (ATTACK_SPOOFED_MESSAGE,)
    v2 = ecu.target("apps/blink_v2.wasm", app("blink_v2"), release_counter=2)
    with pytest.raises(ImageRefusedError):
        ecu.client.offer(ecu.info_of(v2))  # recorded at counter N: after report N
    receipt = {"ecuSerial": SERIAL, "reportCounter": carried.report_counter}
    request = codec.encode_message(
        "versionReportRequest",
        {
            "nonce": b"r",
            "lastAccepted": carried.report_counter,
            "receiptSignatures": sign_statement("reportReceipt", receipt, ecu.primary),
        },
    )
    ecu.secondary.handle(request)
    assert ecu.report().attacks_detected == (ATTACK_WRONG_ECU,)


def test_a_persisted_report_state_is_read_defensively() -> None:
    """Unknown attack names and result codes in the persisted report state never reach a
    signed report: the names are dropped, the code becomes ``internalError``."""
    state = ReportState.from_dict(
        {
            "attacks": ["not_an_attack", ATTACK_WRONG_ECU],
            "since": [1, 2],
            "last_result": "allGood",
            "last_result_text": "x",
        }
    )
    assert state.attacks == (ATTACK_WRONG_ECU,)
    assert state.since == (2,)
    assert state.last_result == "internalError"


# --- the signed report envelope and its health (uptane.manifest, 5.4.2.1) ------------------


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    length = bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else b"\x82" + n.to_bytes(2)
    return bytes([tag]) + length + content


def _envelope(report: bytes, sigs: list[tuple[bytes, bytes]]) -> bytes:
    entries = b"".join(_tlv(0x30, _tlv(0x80, k) + _tlv(0x81, v)) for k, v in sigs)
    return _tlv(0x30, _tlv(0x80, report) + _tlv(0xA1, entries))


def test_the_report_envelope_reader_refuses_lengths_not_in_their_shortest_form() -> None:
    """DER lengths in their shortest form only (X.690 10.1): a short length in the long
    form (0x81) and a one-byte length in the two-byte form (0x82) are refused."""
    short = _envelope(b"\x30\x00", [(b"a" * 64, b"\x01")])
    assert short[1] < 0x80 and split_signed_report(short)[0] == b"\x30\x00"
    with pytest.raises(CodecError, match="shortest form"):
        split_signed_report(b"\x30\x81" + short[1:])
    medium = _envelope(b"\x30\x00", [(b"a" * 64, b"\x01" * 120)])
    assert medium[1] == 0x81 and split_signed_report(medium)[0] == b"\x30\x00"
    with pytest.raises(CodecError, match="shortest form"):
        split_signed_report(b"\x30\x82\x00" + medium[2:])


def test_the_report_envelope_reader_refuses_more_than_max_report_size() -> None:
    """An envelope over ``MAX_REPORT_SIZE`` is refused even when every part is in range."""
    sigs = [(bytes([0x41 + i]) * 64, b"\x01" * 512) for i in range(8)]
    data = _envelope(b"\x30" * 4096, sigs)
    assert len(data) > MAX_REPORT_SIZE
    with pytest.raises(CodecError, match="exceeds"):
        split_signed_report(data)


def test_the_report_envelope_reader_refuses_data_after_the_signatures() -> None:
    """Nothing may follow the signatures inside the envelope's SEQUENCE."""
    report, sigs = (
        _tlv(0x80, b"\x30\x00"),
        _tlv(0xA1, _tlv(0x30, _tlv(0x80, b"a" * 64) + _tlv(0x81, b"\x01"))),
    )
    assert split_signed_report(_tlv(0x30, report + sigs))[0] == b"\x30\x00"
    with pytest.raises(CodecError, match="after the signatures"):
        split_signed_report(_tlv(0x30, report + sigs + b"\x04\x00"))


def _report_with_health(status: str, rollbacks: list[dict[str, Any]]) -> bytes:
    value = EcuVersionReport("ecu-1", "hw", None, 1, datetime(2026, 5, 1, tzinfo=UTC)).to_der()
    decoded = codec.decode("EcuVersionReport", value, MAX_REPORT_SIZE)
    decoded["health"] = {
        "status": status,
        "healthCode": 0,
        "traps": 0,
        "capabilityDenials": [],
        "rollbacks": rollbacks,
    }
    return codec.encode("EcuVersionReport", decoded)


@pytest.mark.parametrize(
    "rollbacks",
    [
        [{"name": "trap", "count": 1}, {"name": "trap", "count": 2}],
        [{"name": "trap", "count": 1}, {"name": "fuel_exhausted", "count": 2}],
    ],
    ids=["duplicate", "unsorted"],
)
def test_health_counts_must_be_unique_and_sorted(rollbacks: list[dict[str, Any]]) -> None:
    """Health counts in a report are one per name, sorted: anything else is a CodecError."""
    with pytest.raises(CodecError, match="health counts"):
        EcuVersionReport.from_der(_report_with_health("healthy", rollbacks))


def test_a_statement_is_checked_with_the_signature_of_the_primary_key_only() -> None:
    """``verify_statement`` looks for the primary key's signature by key id: another key's
    signature before it is skipped, not taken for a bad signature of the primary."""
    primary, other = CryptoSigner.generate_ed25519(), CryptoSigner.generate_ed25519()
    value = {"ecuSerial": SERIAL, "reportCounter": 3}
    both = sign_statement("reportReceipt", value, other) + sign_statement(
        "reportReceipt", value, primary
    )
    verify_statement("reportReceipt", value, both, primary.public_key)
    with pytest.raises(SpoofedMessageError):
        verify_statement("reportReceipt", value, both[:1], primary.public_key)


def test_a_vehicle_manifest_with_more_than_256_reports_is_refused() -> None:
    """The Director parses at most 256 ECU reports per vehicle manifest (5.4.2.2)."""
    signer = CryptoSigner.generate_ed25519()
    report = EcuVersionReport("ecu-0", "hw", None, 1, datetime(2026, 5, 1, tzinfo=UTC))
    signed = SignedEcuVersionReport.sign(report, signer)
    ok = VehicleVersionManifest(VIN, "primary", {f"ecu-{i}": signed for i in range(256)})
    assert len(SignedVehicleManifest.from_bytes(ok.sign(signer)).manifest.reports) == 256
    big = VehicleVersionManifest(VIN, "primary", {f"ecu-{i}": signed for i in range(257)})
    with pytest.raises(ManifestError) as e:
        SignedVehicleManifest.from_bytes(big.sign(signer))
    assert e.value.reason == "malformed"


@pytest.mark.parametrize("serial", ["", "ecu 1", "x" * 300, "../ecu"])
def test_a_vehicle_manifest_keyed_by_a_bad_ecu_serial_is_refused(serial: str) -> None:
    """Every ECU serial that keys a report in a vehicle manifest must be an identifier."""
    signer = CryptoSigner.generate_ed25519()
    report = EcuVersionReport("ecu-0", "hw", None, 1, datetime(2026, 5, 1, tzinfo=UTC))
    signed = SignedEcuVersionReport.sign(report, signer)
    manifest = VehicleVersionManifest(VIN, "primary", {serial: signed})
    with pytest.raises(ManifestError) as e:
        SignedVehicleManifest.from_bytes(manifest.sign(signer))
    assert e.value.reason == "malformed"


@pytest.mark.parametrize(("count", "accepted"), [(0, False), (1, True), (8, True), (9, False)])
def test_a_vehicle_manifest_carries_one_to_eight_signatures(count: int, accepted: bool) -> None:
    """``SignedVehicleManifest.from_bytes`` takes 1-8 signatures (the module's bound)."""
    signer = CryptoSigner.generate_ed25519()
    report = EcuVersionReport("ecu-0", "hw", None, 1, datetime(2026, 5, 1, tzinfo=UTC))
    manifest = VehicleVersionManifest(
        VIN, "primary", {"ecu-0": SignedEcuVersionReport.sign(report, signer)}
    )
    doc = json.loads(manifest.sign(signer))
    doc["signatures"] = doc["signatures"] * count
    data = json.dumps(doc).encode()
    if accepted:
        assert len(SignedVehicleManifest.from_bytes(data).signatures) == count
        return
    with pytest.raises(ManifestError) as e:
        SignedVehicleManifest.from_bytes(data)
    assert e.value.reason == "malformed"
