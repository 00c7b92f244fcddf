"""A secondary applies a delta into its inactive slot, streaming (docs/deltas.md; 5.4.3)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.delta_ecu import DeltaEcu, patch_v1_v2
from helpers.delta_images import release

from ecus.primary.can_link import ImageRefusedError
from ecus.secondary.delta import DELTA_FILE, DELTA_KEY, decoder_memory
from ecus.secondary.slots import COMMITTED
from uptane import codec
from uptane.delta import DELTA_FORMAT, DeltaOffer


@pytest.fixture
def ecu(tmp_path: Path) -> Iterator[DeltaEcu]:
    e = DeltaEcu(tmp_path)
    e.install_v1()
    yield e
    e.close()


def test_delta_offer_round_trips_in_der() -> None:
    offer = DeltaOffer(DELTA_FORMAT, DeltaEcu.installed(1), 1234)
    image = DeltaEcu.installed(2).to_asn1()
    kind, value = codec.decode_message(
        codec.encode_message("imageOffer", {"image": image, "delta": offer.to_asn1()})
    )
    assert kind == "imageOffer"
    back = DeltaOffer.from_asn1(value["delta"])
    assert (back.format, back.length, back.base.hashes) == (
        offer.format,
        offer.length,
        offer.base.hashes,
    )
    # an offer without a delta still decodes as before (additive change)
    _, plain = codec.decode_message(codec.encode_message("imageOffer", {"image": image}))
    assert "delta" not in plain


def test_delta_installs_release_2(ecu: DeltaEcu) -> None:
    patch = patch_v1_v2()
    assert len(patch) < len(release(2)) // 10
    update = ecu.with_delta(ecu.update(2), patch)
    assert ecu.client.push_metadata(update.director_root_chain, update.director_targets) == "ok"
    assert update.delta is not None
    sent = ecu.client.send_image(
        update.delta.path, update.installed_image, delta=update.delta.offer
    )
    assert sent.bytes_sent == len(patch)  # only the delta crossed the bus
    outcome = ecu.client.install(update.target.name)
    assert outcome.ok, outcome.text
    assert ecu.report().installed == ecu.installed(2)
    assert ecu.active_bytes() == release(2)
    assert ecu.secondary.tick(3) == 6 + 5  # blink v2: t * 2 + sensor 0
    store = ecu.secondary.store
    assert store.get_extra(DELTA_KEY) is None  # transfer record and patch bytes dropped
    assert not (store.path / DELTA_FILE).exists()
    assert {store.slot_info(s).status for s in "ab"} == {COMMITTED}


def test_result_is_written_as_chunks_arrive(ecu: DeltaEcu) -> None:
    patch = patch_v1_v2()
    update = ecu.with_delta(ecu.update(2), patch)
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    assert update.delta is not None
    offset = ecu.client.offer(update.installed_image, update.delta.offer)
    assert offset == 0
    store = ecu.secondary.store
    slot = store.inactive_slot()
    sizes = []
    while offset < len(patch):
        chunk = patch[offset : offset + 64]
        offset = ecu.client.send_chunk(offset, chunk, len(patch))
        sizes.append(store.slot_path(slot).stat().st_size)
    # the output grew while the delta was still arriving, not only at the end
    assert 0 < sizes[len(sizes) // 2] < len(release(2))
    assert sizes[-1] == len(release(2))
    assert ecu.client.install(update.target.name).ok
    assert store.slot_info(slot).status == COMMITTED


def test_primary_falls_back_to_the_image_when_the_base_is_not_active(ecu: DeltaEcu) -> None:
    # a delta made against other bytes than the ECU runs: refused at the offer
    other = dataclasses.replace(ecu.installed(1), hashes={"sha256": "ab" * 32})
    update = ecu.with_delta(ecu.update(2), patch_v1_v2(), base=other)
    assert update.delta is not None
    ecu.client.push_metadata(update.director_root_chain, update.director_targets)
    with pytest.raises(ImageRefusedError) as exc:
        ecu.client.offer(update.installed_image, update.delta.offer)
    assert exc.value.code == "badRequest"
    assert "not the active image" in ecu.report().last_result_text
    ecu.client.send_update(update)
    assert ecu.report().installed == ecu.installed(2)
    assert ecu.active_bytes() == release(2)


def test_memory_limit_refuses_a_delta_needing_more(tmp_path: Path) -> None:
    e = DeltaEcu(tmp_path)
    try:
        e.boot(delta_memory_limit=decoder_memory(9, 8) - 1)
        e.install_v1()
        update = e.with_delta(e.update(2), patch_v1_v2())
        e.client.push_metadata(update.director_root_chain, update.director_targets)
        assert update.delta is not None
        with pytest.raises(ImageRefusedError) as exc:
            e.client.send_image(update.delta.path, update.installed_image, delta=update.delta.offer)
        assert exc.value.code == "imageMismatch"
        assert "decoder memory" in e.report().last_result_text
        assert e.active_bytes() == release(1)
        # and the primary's send_update still gets the image there, in full
        e.client.send_update(update)
        assert e.report().installed == e.installed(2)
    finally:
        e.close()


def test_default_limit_fits_the_repository_deltas() -> None:
    from ecus.secondary.delta import DEFAULT_DELTA_MEMORY
    from image_repo.delta import HEATSHRINK_LOOKAHEAD_SZ2, HEATSHRINK_WINDOW_SZ2

    need = decoder_memory(HEATSHRINK_WINDOW_SZ2, HEATSHRINK_LOOKAHEAD_SZ2)
    assert need <= DEFAULT_DELTA_MEMORY


def test_secondary_config_carries_the_delta_memory_limit(tmp_path: Path) -> None:
    from ecus.secondary.config import SecondaryConfig
    from uptane.errors import ConfigError

    (tmp_path / "root.der").write_bytes(b"x")
    raw = {
        "serial": "ecu-1",
        "hardware_id": "brake-ctl",
        "key": {"uri": "file2:k.pem", "public": {"keytype": "ed25519"}},
        "director_root": "root.der",
        "slot_dir": "slots",
    }
    with pytest.raises(ConfigError, match="delta_memory_bytes"):
        SecondaryConfig.from_dict({**raw, "delta_memory_bytes": 0}, base_dir=tmp_path)
