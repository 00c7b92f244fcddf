"""Attacks and faults on delta updates (docs/deltas.md; Uptane 2.1, 4.3.4, 5.4.3).

The secondary trusts nothing in a delta: whatever the patch bytes, only an
image whose length and every hash match the verified Director target can go
on trial. Each test checks the typed refusal the primary-side client gets,
the result code and attack in the ECU's next signed report, and that the
active slot (its record and its bytes) did not change; faults must resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
from collections.abc import Iterator
from pathlib import Path

import detools
import pytest
from helpers.delta_ecu import DeltaEcu, patch_v1_v2, running_v1
from helpers.delta_images import release

from ecus.primary.can_link import ImageRefusedError
from ecus.secondary.delta import DELTA_FILE, DELTA_KEY
from ecus.secondary.slots import COMMITTED, FAILED
from image_repo.delta import make_delta
from uptane.delta import DeltaOffer
from uptane.errors import ATTACK_ARBITRARY_SOFTWARE, ATTACK_ENDLESS_DATA, CodecError


@pytest.fixture
def ecu(tmp_path: Path) -> Iterator[DeltaEcu]:
    yield from running_v1(tmp_path)


def active_unchanged(ecu: DeltaEcu) -> None:
    """Release 1 still active, its slot committed and its bytes intact, and it runs."""
    store = ecu.secondary.store
    assert store.active_target() is not None
    assert store.active is not None and store.slot_info(store.active).status == COMMITTED
    assert ecu.active_bytes() == release(1)
    assert ecu.report().installed == ecu.installed(1)
    assert ecu.secondary.tick(9) == 9  # blink v1


def send(ecu: DeltaEcu, patch: bytes, *, length: int | None = None, **kw: object) -> str:
    """Offer ``patch`` as the delta to release 2, send it all, ask to install; the result."""
    update = ecu.with_delta(ecu.update(2), patch)
    assert update.delta is not None
    offer = update.delta.offer
    if length is not None:
        offer = dataclasses.replace(offer, length=length)
    assert ecu.client.push_metadata(update.director_root_chain, update.director_targets) == "ok"
    ecu.client.send_image(patch[: offer.length], update.installed_image, delta=offer)
    return ecu.client.install(update.target.name).code


def test_delta_from_another_base_is_an_image_mismatch(ecu: DeltaEcu) -> None:
    # a delta made against other bytes, offered as if from the active image
    other = release(1, assets=40 * 1024)
    code = send(ecu, make_delta(other, release(2)))
    report = ecu.report()
    assert code == "imageMismatch"
    assert report.last_result == "imageMismatch"
    assert ATTACK_ARBITRARY_SOFTWARE in report.attacks_detected
    active_unchanged(ecu)
    assert ecu.secondary.store.slot_info(ecu.secondary.store.inactive_slot()).status == FAILED


def test_offer_naming_another_base_is_refused_before_any_write(ecu: DeltaEcu) -> None:
    store = ecu.secondary.store
    inactive = store.inactive_slot()
    before = store.slot_info(inactive)
    update = ecu.with_delta(ecu.update(2), patch_v1_v2())
    assert update.delta is not None
    stale = dataclasses.replace(update.delta.offer.base, hashes={"sha256": "00" * 32})
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    with pytest.raises(ImageRefusedError) as exc:
        ecu.client.offer(
            update.installed_image, dataclasses.replace(update.delta.offer, base=stale)
        )
    assert exc.value.code == "badRequest"
    assert store.slot_info(inactive) == before  # the inactive slot was not touched
    active_unchanged(ecu)


@pytest.mark.parametrize("fmt", ["bsdiff4", "detools-sequential-lzma"])
def test_unknown_delta_format_is_refused(ecu: DeltaEcu, fmt: str) -> None:
    update = ecu.with_delta(ecu.update(2), patch_v1_v2())
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    with pytest.raises(ImageRefusedError) as exc:
        ecu.client.offer(
            update.installed_image, dataclasses.replace(update.delta.offer, format=fmt)
        )
    assert exc.value.code == "badRequest"
    active_unchanged(ecu)


def test_lzma_patch_is_refused_before_it_runs(ecu: DeltaEcu) -> None:
    # a patch detools could apply, but whose decoder needs an unbounded (8 MiB) dictionary
    out = io.BytesIO()
    detools.create_patch(io.BytesIO(release(1)), io.BytesIO(release(2)), out, compression="lzma")
    with pytest.raises(ImageRefusedError) as exc:
        send(ecu, out.getvalue())
    assert exc.value.code == "imageMismatch"
    assert "not a detools-sequential-heatshrink patch" in ecu.report().last_result_text
    active_unchanged(ecu)


def test_truncated_delta_never_installs(ecu: DeltaEcu) -> None:
    patch = patch_v1_v2()
    # the offer says the delta is shorter than it is: the patch runs out of data
    with pytest.raises(ImageRefusedError) as exc:
        send(ecu, patch, length=len(patch) // 2)
    assert exc.value.code == "imageMismatch"
    assert ecu.report().last_result == "imageMismatch"
    active_unchanged(ecu)
    # only part of an honest delta sent: the install is refused as incomplete
    update = ecu.with_delta(ecu.update(2), patch)
    assert update.delta is not None
    ecu.client.offer(update.installed_image, update.delta.offer)
    ecu.client.send_chunk(0, patch[:100], len(patch))
    assert ecu.client.install(update.target.name).code == "transferIncomplete"
    active_unchanged(ecu)


def test_delta_offer_longer_than_the_image_is_refused(ecu: DeltaEcu) -> None:
    update = ecu.with_delta(ecu.update(2), patch_v1_v2())
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    too_long = dataclasses.replace(update.delta.offer, length=len(release(2)) + 1)
    with pytest.raises(ImageRefusedError) as exc:
        ecu.client.offer(update.installed_image, too_long)
    assert exc.value.code == "badRequest"
    active_unchanged(ecu)


# Offsets in the release 1 -> 2 patch where flipping bit 4 makes the patch fail to
# decode (5) or decode into other bytes (8, 10): refused mid-transfer or at the
# result's hash check. (Some flips decode to the same bytes: those install,
# correctly, since only the result's hashes decide.)
@pytest.mark.parametrize("where", [5, 8, 10])
def test_corrupted_delta_frame(ecu: DeltaEcu, where: int) -> None:
    patch = bytearray(patch_v1_v2())
    patch[where] ^= 0x10  # one bit flipped on the bus
    try:
        code = send(ecu, bytes(patch))
    except ImageRefusedError as e:  # the patch no longer decodes: refused mid-transfer
        code = e.code
    report = ecu.report()
    assert code == "imageMismatch"
    assert report.last_result == "imageMismatch"
    assert set(report.attacks_detected) & {ATTACK_ARBITRARY_SOFTWARE, ATTACK_ENDLESS_DATA}
    active_unchanged(ecu)


def test_delta_whose_output_exceeds_the_target_is_endless_data(ecu: DeltaEcu) -> None:
    # a patch producing the image plus 64 KiB more: more than the verified target allows
    with pytest.raises(ImageRefusedError) as exc:
        send(ecu, make_delta(release(1), release(2) + b"\x00" * 65536))
    assert exc.value.code == "imageMismatch"
    report = ecu.report()
    assert ATTACK_ENDLESS_DATA in report.attacks_detected
    active_unchanged(ecu)


def test_delta_for_an_image_larger_than_the_slot_is_refused(tmp_path: Path) -> None:
    e = DeltaEcu(tmp_path)
    try:
        e.install_v1()
        e.boot(slot_size=len(release(2)) - 1)
        update = e.with_delta(e.update(2), patch_v1_v2())
        assert update.delta is not None
        e.client.push_metadata(update.director_root_chain, update.director_targets)
        with pytest.raises(ImageRefusedError) as exc:
            e.client.offer(update.installed_image, update.delta.offer)
        assert exc.value.code == "noSpace"
        active_unchanged(e)
    finally:
        e.close()


@pytest.mark.parametrize(
    ("point", "nth"),
    [("delta_chunk", 3), ("delta_state", 3), ("delta_truncate", 1), ("begin", 1), ("finish", 1)],
)
def test_power_cut_mid_apply_resumes(ecu: DeltaEcu, point: str, nth: int) -> None:
    patch = make_delta(release(1), release(2))
    update = ecu.with_delta(ecu.update(2), patch)
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    ecu.client.chunk_size = 64  # several chunks before the cut
    ecu.cut_at = (point, nth)
    with pytest.raises(CodecError):  # the ECU died mid-exchange
        ecu.client.send_image(update.delta.path, update.installed_image, delta=update.delta.offer)
        ecu.client.install(update.target.name)
    assert ecu.cuts == [point]
    ecu.boot()  # power back: release 1 boots, nothing half-installed
    active_unchanged(ecu)
    # the primary offers the same delta again: the ECU resumes from its durable offset
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    sent = ecu.client.send_image(
        update.delta.path, update.installed_image, delta=update.delta.offer
    )
    if point in ("delta_state", "delta_chunk"):
        assert sent.start_offset > 0  # bytes received before the cut are not sent again
        assert sent.bytes_sent == len(patch) - sent.start_offset
    assert ecu.client.install(update.target.name).ok
    assert ecu.active_bytes() == release(2)
    assert ecu.report().installed == ecu.installed(2)
    store = ecu.secondary.store
    assert store.get_extra(DELTA_KEY) is None
    assert not (store.path / DELTA_FILE).exists()
    assert hashlib.sha256(ecu.active_bytes()).hexdigest() == ecu.installed(2).hashes["sha256"]


def test_resumed_bytes_that_no_longer_apply_are_refused(ecu: DeltaEcu) -> None:
    patch = make_delta(release(1), release(2))
    update = ecu.with_delta(ecu.update(2), patch)
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    ecu.client.chunk_size = 64
    ecu.cut_at = ("delta_chunk", 3)
    with pytest.raises(CodecError):
        ecu.client.send_image(update.delta.path, update.installed_image, delta=update.delta.offer)
    store_path = ecu.secondary.store.path / DELTA_FILE
    kept = bytearray(store_path.read_bytes())
    kept[1] ^= 0xFF  # the stored patch bytes rot while the power is off
    store_path.write_bytes(bytes(kept))
    ecu.boot()
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    with pytest.raises(ImageRefusedError) as exc:
        ecu.client.offer(update.installed_image, update.delta.offer)
    assert exc.value.code == "imageMismatch"
    active_unchanged(ecu)
    # the next offer starts afresh and installs
    ecu.client.send_update(update)
    assert ecu.report().installed == ecu.installed(2)


def test_delta_offer_survives_the_der_codec() -> None:
    offer = DeltaOffer("detools-sequential-heatshrink", DeltaEcu.installed(1), 10)
    assert DeltaOffer.from_asn1(offer.to_asn1()).base.hashes == offer.base.hashes


def test_delta_bytes_past_the_offered_length_are_endless_data(ecu: DeltaEcu) -> None:
    patch = patch_v1_v2()
    update = ecu.with_delta(ecu.update(2), patch)
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    short = dataclasses.replace(update.delta.offer, length=len(patch) - 10)
    assert ecu.client.offer(update.installed_image, short) == 0
    with pytest.raises(ImageRefusedError) as exc:  # one chunk with 10 bytes too many
        ecu.client.send_chunk(0, patch, len(patch))
    assert exc.value.code == "imageMismatch"
    assert ATTACK_ENDLESS_DATA in ecu.report().attacks_detected
    active_unchanged(ecu)
