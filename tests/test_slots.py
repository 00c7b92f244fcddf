"""A/B slot store: install, trial, commit, rollback, resume, power cuts (ecus/slots.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ecus.secondary.slots import (
    COMMITTED,
    FAILED,
    VERIFIED,
    WRITE_POINTS,
    WRITING,
    BootedImage,
    InstalledTarget,
    PowerCut,
    SlotStore,
)
from uptane.errors import EndlessDataError, ImageMismatchError, InstallError, MetadataError
from uptane.metadata import Limits

V1 = bytes(range(256)) * 3 + b"v1"
V2 = b"second image " * 61 + b"!"
CHUNK = 200


def target_for(name: str, data: bytes, **kw: object) -> InstalledTarget:
    fields: dict[str, object] = {
        "name": name,
        "length": len(data),
        "hashes": {
            "sha256": hashlib.sha256(data).hexdigest(),
            "sha512": hashlib.sha512(data).hexdigest(),
        },
        "release_counter": 1,
        "hardware_ids": ("brake-ctl",),
        "capabilities": ("health", "log"),
        "limits": Limits(confirm_ticks=3),
    }
    fields.update(kw)
    return InstalledTarget(**fields)  # type: ignore[arg-type]


T1 = target_for("apps/blink-1.wasm", V1)
T2 = target_for("apps/blink-2.wasm", V2, release_counter=2)


def write_all(store: SlotStore, target: InstalledTarget, data: bytes) -> None:
    writer = store.resume_image(target)
    for offset in range(writer.offset, len(data), CHUNK):
        writer.write(offset, data[offset : offset + CHUNK])
    writer.finish()


def install(
    store: SlotStore, target: InstalledTarget, data: bytes, outcome: str = "commit"
) -> None:
    write_all(store, target, data)
    trial = store.start_trial()
    assert trial.image == data and trial.trial
    if outcome == "commit":
        store.commit()
    else:
        store.rollback("self_test_failed")


def assert_verified(booted: BootedImage | None) -> BootedImage:
    """The booted image is one of the verified ones and matches its recorded info."""
    assert booted is not None
    t = booted.target
    assert (booted.image, t) in ((V1, T1), (V2, T2))
    assert len(booted.image) == t.length
    assert hashlib.sha256(booted.image).hexdigest() == t.hashes["sha256"]
    assert hashlib.sha512(booted.image).hexdigest() == t.hashes["sha512"]
    return booted


@pytest.fixture
def v1_store(tmp_path: Path) -> SlotStore:
    store = SlotStore(tmp_path / "ecu")
    install(store, T1, V1)
    return store


# --- install, commit, rollback ----------------------------------------------


def test_fresh_store_has_nothing_to_boot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "ecu")
    assert store.boot() is None
    assert store.active is None and store.active_target() is None


def test_install_and_commit(v1_store: SlotStore) -> None:
    assert v1_store.active == "a"
    install(v1_store, T2, V2)
    assert v1_store.active == "b" and v1_store.trial is None
    assert v1_store.active_target() == T2
    assert v1_store.slot_info("a").status == COMMITTED  # previous image kept as fallback
    reopened = SlotStore(v1_store.path)
    booted = assert_verified(reopened.boot())
    assert booted.image == V2 and booted.slot == "b" and not booted.trial
    assert reopened.active_target() == T2


def test_rollback_keeps_previous_image(v1_store: SlotStore) -> None:
    install(v1_store, T2, V2, outcome="rollback")
    assert v1_store.active == "a" and v1_store.trial is None
    assert v1_store.slot_info("b").status == FAILED
    failure = v1_store.last_failure
    assert failure is not None
    assert (failure.slot, failure.target, failure.reason) == ("b", T2.name, "self_test_failed")
    booted = assert_verified(SlotStore(v1_store.path).boot())
    assert booted.image == V1
    # A failed slot is never offered for a trial again.
    with pytest.raises(RuntimeError, match="no verified image"):
        v1_store.start_trial()


def test_next_install_alternates_slots(v1_store: SlotStore) -> None:
    install(v1_store, T2, V2)
    t3 = target_for("apps/blink-3.wasm", V1, release_counter=3)
    install(v1_store, t3, V1)
    assert v1_store.active == "a"
    assert v1_store.active_target() == t3
    assert v1_store.last_failure is None


def test_no_new_image_while_one_is_on_trial(v1_store: SlotStore) -> None:
    write_all(v1_store, T2, V2)
    v1_store.start_trial()
    with pytest.raises(RuntimeError):
        v1_store.begin_image(T2)
    with pytest.raises(RuntimeError):
        v1_store.start_trial()


def test_interrupted_trial_is_rolled_back_on_boot(v1_store: SlotStore) -> None:
    write_all(v1_store, T2, V2)
    v1_store.start_trial()
    reopened = SlotStore(v1_store.path)
    booted = assert_verified(reopened.boot())
    assert booted.image == V1
    assert booted.rolled_back == "trial interrupted by a restart"
    assert reopened.trial is None and reopened.slot_info("b").status == FAILED
    failure = reopened.last_failure
    assert failure is not None and failure.reason == "trial interrupted by a restart"


def test_trial_may_be_retried_for_a_few_boots(v1_store: SlotStore) -> None:
    write_all(v1_store, T2, V2)
    v1_store.start_trial()
    first = SlotStore(v1_store.path, max_trial_boots=2).boot()
    assert first is not None and first.trial and first.image == V2
    second = SlotStore(v1_store.path, max_trial_boots=2).boot()
    assert second is not None and second.trial
    third_store = SlotStore(v1_store.path, max_trial_boots=2)
    third = assert_verified(third_store.boot())
    assert not third.trial and third.image == V1 and third.rolled_back
    assert third_store.boot_attempts == 0


# --- verification -----------------------------------------------------------


def test_short_image_never_activates(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    writer.write(0, V2[:-1])
    with pytest.raises(ImageMismatchError, match="length"):
        writer.finish()
    assert v1_store.slot_info("b").status == FAILED
    with pytest.raises(RuntimeError):
        v1_store.start_trial()
    assert assert_verified(SlotStore(v1_store.path).boot()).image == V1


def test_bytes_beyond_length_are_refused(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    with pytest.raises(EndlessDataError):
        writer.write(0, V2 + b"x")
    assert writer.offset == 0
    assert v1_store.slot_path("b").stat().st_size == 0


@pytest.mark.parametrize("algo", ["sha256", "sha512"])
def test_every_hash_is_checked(v1_store: SlotStore, algo: str) -> None:
    # Same length, one hash right and one wrong: never verified.
    hashes = dict(T2.hashes)
    hashes[algo] = hashlib.new(algo, b"something else").hexdigest()
    bad = target_for(T2.name, V2, hashes=hashes)
    with pytest.raises(ImageMismatchError, match=algo):
        write_all(v1_store, bad, V2)
    assert v1_store.slot_info("b").status == FAILED
    with pytest.raises(RuntimeError):
        v1_store.start_trial()
    failure = v1_store.last_failure
    assert failure is not None and failure.reason == "image_mismatch"
    assert assert_verified(SlotStore(v1_store.path).boot()).image == V1


def test_tampered_byte_never_activates(v1_store: SlotStore) -> None:
    tampered = bytearray(V2)
    tampered[100] ^= 1
    with pytest.raises(ImageMismatchError):
        write_all(v1_store, T2, bytes(tampered))
    assert v1_store.active == "a"
    assert assert_verified(v1_store.boot()).image == V1


def test_slot_changed_after_finish_is_not_tried(v1_store: SlotStore) -> None:
    write_all(v1_store, T2, V2)
    assert v1_store.slot_info("b").status == VERIFIED
    with v1_store.slot_path("b").open("r+b") as f:
        f.write(b"X")
    with pytest.raises(ImageMismatchError):
        v1_store.start_trial()
    assert v1_store.trial is None


def test_corrupt_active_slot_falls_back_to_previous(v1_store: SlotStore) -> None:
    install(v1_store, T2, V2)
    with v1_store.slot_path("b").open("r+b") as f:
        f.write(b"X")
    store = SlotStore(v1_store.path)
    booted = assert_verified(store.boot())
    assert booted.image == V1 and booted.slot == "a"
    assert store.active == "a" and store.slot_info("b").status == FAILED
    # With both slots corrupt there is nothing verified left to run.
    v1_store.slot_path("a").write_bytes(b"")
    store = SlotStore(v1_store.path)
    assert store.boot() is None
    assert store.active is None


def test_out_of_order_chunk(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    writer.write(0, V2[:10])
    with pytest.raises(InstallError, match="expected 10"):
        writer.write(20, V2[20:30])
    with pytest.raises(InstallError):
        writer.write(0, V2[:10])
    assert writer.write(10, V2[10:20]) == 20


def test_unverifiable_hash_function_is_refused(v1_store: SlotStore) -> None:
    bad = target_for(T2.name, V2, hashes={"md5": hashlib.md5(V2).hexdigest()})
    with pytest.raises(InstallError, match="md5"):
        v1_store.begin_image(bad)
    with pytest.raises(MetadataError):
        target_for(T2.name, V2, hashes={})


def test_image_larger_than_slot(tmp_path: Path) -> None:
    store = SlotStore(tmp_path / "ecu", slot_size=100)
    with pytest.raises(InstallError, match="do not fit"):
        store.begin_image(T2)


def test_stale_writer_cannot_write(v1_store: SlotStore) -> None:
    old = v1_store.begin_image(T2)
    v1_store.begin_image(T2)
    with pytest.raises(RuntimeError):
        old.write(0, V2[:10])


def test_invalid_state_record(tmp_path: Path) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"format": 1, "active": "c"}))
    with pytest.raises(InstallError, match="invalid"):
        SlotStore(tmp_path)
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(InstallError):
        SlotStore(tmp_path)


# --- resume -------------------------------------------------------------------


def test_resume_after_restart(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    writer.write(0, V2[:CHUNK])
    writer.write(CHUNK, V2[CHUNK : 2 * CHUNK])
    # A chunk whose bytes reached the disk but whose offset was never recorded.
    with v1_store.slot_path("b").open("r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"garbage")

    store = SlotStore(v1_store.path)
    assert store.slot_info("b").status == WRITING
    assert store.slot_info("b").written == 2 * CHUNK
    resumed = store.resume_image(T2)
    assert resumed.offset == 2 * CHUNK
    assert store.slot_path("b").stat().st_size == 2 * CHUNK
    for offset in range(resumed.offset, len(V2), CHUNK):
        resumed.write(offset, V2[offset : offset + CHUNK])
    assert resumed.finish() == T2


def test_resume_checks_bytes_written_before_the_restart(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    writer.write(0, V2[:CHUNK])
    with v1_store.slot_path("b").open("r+b") as f:
        f.write(b"Y")  # the durable prefix changed while the ECU was off
    store = SlotStore(v1_store.path)
    resumed = store.resume_image(T2)
    for offset in range(resumed.offset, len(V2), CHUNK):
        resumed.write(offset, V2[offset : offset + CHUNK])
    with pytest.raises(ImageMismatchError):
        resumed.finish()
    assert store.slot_info("b").status == FAILED


def test_resume_for_another_target_starts_over(v1_store: SlotStore) -> None:
    writer = v1_store.begin_image(T2)
    writer.write(0, V2[:CHUNK])
    other = target_for("apps/other.wasm", V2)
    resumed = SlotStore(v1_store.path).resume_image(other)
    assert resumed.offset == 0


# --- persisted ECU state --------------------------------------------------------


def test_ecu_state_persists(tmp_path: Path) -> None:
    store = SlotStore(tmp_path)
    store.set_trusted_metadata({"root": b"\x30\x01root", "targets": b"\x30\x02tg"})
    assert store.next_report_counter() == 1
    assert store.next_report_counter() == 2
    now = datetime(2030, 1, 2, tzinfo=UTC)
    assert store.advance_time_floor(now) == now
    assert store.advance_time_floor(now - timedelta(days=1)) == now  # never backwards
    store.set_extra("attacks", ["freeze"])

    again = SlotStore(tmp_path)
    assert again.trusted_metadata("root") == b"\x30\x01root"
    assert again.trusted_metadata("targets") == b"\x30\x02tg"
    assert again.trusted_metadata("snapshot") is None
    assert again.report_counter == 2 and again.next_report_counter() == 3
    assert again.time_floor == now
    assert again.get_extra("attacks") == ["freeze"]
    again.set_trusted_metadata({"targets": None})
    assert SlotStore(tmp_path).trusted_metadata("targets") is None


def test_report_counter_is_persisted_before_use(tmp_path: Path) -> None:
    def cut(point: str) -> None:
        raise PowerCut(point)

    store = SlotStore(tmp_path, fault=cut)
    with pytest.raises(PowerCut):
        store.next_report_counter()
    assert SlotStore(tmp_path).report_counter == 0
    assert SlotStore(tmp_path).next_report_counter() == 1


# --- power cut at every write point ------------------------------------------------


class Faults:
    """A ``fault`` hook that records write points and cuts the power at the n-th."""

    def __init__(self, cut_at: int | None = None) -> None:
        self.points: list[str] = []
        self.cut_at = cut_at

    def __call__(self, point: str) -> None:
        assert point in WRITE_POINTS
        self.points.append(point)
        if self.cut_at is not None and len(self.points) - 1 == self.cut_at:
            raise PowerCut(point)


def run_install(path: Path, fault: Faults, outcome: str) -> None:
    install(SlotStore(path, fault=fault), T2, V2, outcome)


def check_recovers(path: Path, expect_v2_possible: bool) -> None:
    """Reboot (with a power cut at each of boot's own writes, too), then finish the update."""
    boot_points = Faults()
    base = path.with_name(path.name + "-boot")
    shutil.copytree(path, base)
    assert_verified(SlotStore(path, fault=boot_points).boot())
    for i in range(len(boot_points.points)):
        again = path.with_name(f"{path.name}-boot{i}")
        shutil.copytree(base, again)
        with pytest.raises(PowerCut):
            SlotStore(again, fault=Faults(cut_at=i)).boot()
        assert_verified(SlotStore(again).boot())

    store = SlotStore(path)
    booted = assert_verified(store.boot())
    if not expect_v2_possible:
        assert booted.image == V1
    if booted.image == V1:
        # The ECU can still complete the update after the cut.
        install(store, T2, V2)
        assert assert_verified(SlotStore(path).boot()).image == V2


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_power_cut_at_every_write_point(tmp_path: Path, outcome: str) -> None:
    template = tmp_path / "template"
    install(SlotStore(template), T1, V1)
    dry = tmp_path / "dry"
    shutil.copytree(template, dry)
    clean = Faults()
    run_install(dry, clean, outcome)
    points = clean.points
    chunks = -(-len(V2) // CHUNK)
    assert points == [
        "begin",
        "begin_truncate",
        *["chunk", "chunk_state"] * chunks,
        "finish",
        "start_trial",
        outcome,
    ]

    resumed_offsets = []
    for i, point in enumerate(points):
        path = tmp_path / f"cut{i}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut) as cut:
            run_install(path, Faults(cut_at=i), outcome)
        assert str(cut.value) == point
        reopened = SlotStore(path)
        booted = assert_verified(reopened.boot())
        # Until the commit is durable, the old image runs.
        assert booted.image == V1, (i, point)
        if point in ("chunk", "chunk_state"):
            resumed_offsets.append(SlotStore(path).resume_image(T2).offset)
        check_recovers(path, expect_v2_possible=False)
    # A cut mid-transfer resumes where the durable bytes end instead of starting over.
    assert max(resumed_offsets) == (chunks - 1) * CHUNK
    # And the uncut run ends with the expected image.
    assert assert_verified(SlotStore(dry).boot()).image == (V2 if outcome == "commit" else V1)


def test_power_cut_enumeration_covers_resumed_install(tmp_path: Path) -> None:
    """Cut again at every write point of an install that resumes an earlier one."""
    template = tmp_path / "template"
    install(SlotStore(template), T1, V1)
    writer = SlotStore(template).begin_image(T2)
    writer.write(0, V2[:CHUNK])
    writer.write(CHUNK, V2[CHUNK : 2 * CHUNK])
    with SlotStore(template).slot_path("b").open("r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"torn")  # bytes past the durable offset
    clean = Faults()
    dry = tmp_path / "dry"
    shutil.copytree(template, dry)
    run_install(dry, clean, "commit")
    assert clean.points[0] == "resume_truncate"
    for i in range(len(clean.points)):
        path = tmp_path / f"cut{i}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            run_install(path, Faults(cut_at=i), "commit")
        check_recovers(path, expect_v2_possible=False)


def test_write_points_are_documented() -> None:
    assert {"begin", "chunk", "finish", "start_trial", "commit", "rollback"} <= WRITE_POINTS
