"""Checks of the primary that no other test protected (mutation review).

Each test here fails when one refusal in ``ecus.primary`` is removed: the
sealed trusted state (Uptane 2.1, 5.4.4.2; DESIGN 2), version reports from
secondaries (5.4.2.1), the manifest answer, the install policy and the CAN
client's checks of what a secondary answers (DESIGN 4). Real parts only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.primary_fixtures import env_fixture, servers_fixture, template_fixture  # noqa: F401  (fixtures)
from helpers.servers import Switchboard, fixed, serve
from helpers.uptane_env import PRIMARY, VIN, Env, wasm
from securesystemslib.signer import CryptoSigner, Signer
from test_primary_units import root_bytes
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Targets

from ecus.primary import CycleResult, Primary
from ecus.primary.can_link import (
    CanSecondaryClient,
    ImageRefusedError,
    MetadataRejectedError,
    SecondaryRefusedError,
    TransferFailedError,
)
from ecus.primary.config import DownloadPolicy, EcuEntry, MetadataLimits, PrimaryConfig
from ecus.primary.fetch import PolicyFetcher
from ecus.primary.links import EcuUpdate, InMemorySecondary
from ecus.primary.policy import DEFER, INSTALL, Ask, AskFile, Conditions, UpdateOffer
from ecus.primary.result import MAX_RESPONSE_BYTES
from ecus.primary.state import (
    INSTALLED,
    MAX_RESULT_TEXT,
    REPORTS,
    SEAL,
    PrimaryState,
    ReportState,
    installed_to_bytes,
)
from ecus.transport.memory import memory_pair
from uptane import codec
from uptane.errors import (
    ATTACK_DROP_REQUEST,
    ATTACK_FREEZE,
    ATTACK_PARTIAL_BUNDLE,
    ATTACK_ROLLBACK,
    ATTACK_SLOW_RETRIEVAL,
    ATTACK_SPOOFED_MESSAGE,
    CodecError,
    ManifestError,
    ReleaseCounterRollbackError,
    SlowRetrievalError,
    StateError,
    TransportError,
)
from uptane.keys import generate_ed25519
from uptane.manifest import EcuVersionReport, InstalledImage, SignedEcuVersionReport
from uptane.metadata import UptaneTarget
from uptane.verification.matching import RepositoryMap

SIGNER = CryptoSigner.generate_ed25519()  # the primary's key, sealing its state
IMAGE = InstalledImage("a.wasm", 1, {"sha256": "00"}, 2)


# --- sealed trusted state (5.4.4.2, DESIGN 2) ------------------------------------------


def test_current_link_to_something_not_a_generation_is_a_state_error(tmp_path: Path) -> None:
    """``trusted/current`` pointing anywhere but ``gen-N`` is corrupt state, typed."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    gen = state.current()
    link = state.trusted_dir / "current"
    link.unlink()
    os.symlink(f"../{gen.parent.name}/{gen.name}", link)  # resolves to the same directory
    with pytest.raises(StateError, match="not a generation"):
        state.current()
    with pytest.raises(StateError, match="not a generation"):
        state.installed()


def test_installed_images_are_read_only_under_an_authentic_seal(tmp_path: Path) -> None:
    """Lowered release counters with a seal rewritten to match, but not re-signed: refused."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    state.update_installed({"ecu-a": IMAGE})
    gen = state.current()
    forged = installed_to_bytes({"ecu-a": replace(IMAGE, release_counter=0)})
    (gen / INSTALLED).write_bytes(forged)
    envelope = json.loads((gen / SEAL).read_bytes())
    envelope["signed"]["files"][INSTALLED] = hashlib.sha256(forged).hexdigest()
    (gen / SEAL).write_bytes(json.dumps(envelope).encode())  # the old signature kept
    with pytest.raises(StateError, match="failed authentication"):
        state.installed()
    with pytest.raises(StateError, match="failed authentication"):
        PrimaryState(tmp_path / "s", SIGNER).installed()


def test_only_a_scratch_of_this_state_can_be_committed(tmp_path: Path) -> None:
    """``commit`` takes ``begin``'s scratch copy only, never some other directory."""
    state = PrimaryState(tmp_path / "s", SIGNER)
    before = state.current()
    elsewhere = tmp_path / "gen-000001"  # the next generation's name, outside work/
    (elsewhere / "director").mkdir(parents=True)
    (elsewhere / "image").mkdir()
    (elsewhere / INSTALLED).write_bytes(installed_to_bytes({"ecu-a": IMAGE}))
    with pytest.raises(ValueError, match="not a scratch generation"):
        state.commit(elsewhere)
    assert state.current() == before and state.installed() == {}


def test_report_text_is_bounded_when_noted() -> None:
    """The text goes into a report whose ``lastResultText`` holds 512 characters at most."""
    state = ReportState()
    state.note_failure([ATTACK_FREEZE], "metadataRejected", "x" * 2000)
    assert len(state.last_result_text) == MAX_RESULT_TEXT <= 512


# --- a primary with two in-memory secondaries and a stand-in Director -----------------


@pytest.fixture(scope="module")
def director() -> Iterator[tuple[Switchboard, str]]:
    """A loopback server whose answers the tests set (``overrides``): a Director's front."""
    board = Switchboard()
    with serve(board) as url:
        yield board, url


class RecordingSecondary(InMemorySecondary):
    """An in-memory secondary that records the receipts (``last_accepted``) it is sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.receipts: list[int] = []

    def version_report(self, nonce: bytes, last_accepted: int = 0) -> bytes:
        self.receipts.append(last_accepted)
        return super().version_report(nonce, last_accepted)


def make_primary(
    tmp_path: Path, director_url: str = "http://127.0.0.1:9"
) -> tuple[Primary, dict[str, RecordingSecondary]]:
    """A primary (its own key) with secondaries ecu-a (hw-a) and ecu-b (hw-b), all linked."""
    signers = {s: CryptoSigner.generate_ed25519() for s in ("ecu-a", "ecu-b")}
    repo_map = RepositoryMap.from_dict(
        {
            "repositories": {"director": [director_url], "image": ["http://127.0.0.1:9"]},
            "mapping": [
                {
                    "paths": ["*"],
                    "repositories": ["director", "image"],
                    "terminating": True,
                    "threshold": 2,
                }
            ],
        }
    )
    config = PrimaryConfig(
        vin=VIN,
        ecu_serial=PRIMARY,
        hardware_id="gateway",
        key=generate_ed25519(tmp_path / "keys", "primary"),
        repository_map=repo_map,
        director_root=root_bytes(),
        image_root=root_bytes(),
        state_dir=tmp_path / "state",
        download_dir=tmp_path / "images",
        secondaries=tuple(EcuEntry(s, f"hw-{s[-1]}", k.public_key) for s, k in signers.items()),
        download=DownloadPolicy(socket_timeout=5.0),
        metadata_limits=MetadataLimits(),
    )
    ecus = {s: RecordingSecondary(s, f"hw-{s[-1]}", k) for s, k in signers.items()}
    return Primary(config, ecus.values()), ecus


def answer_manifest(board: Switchboard, body: bytes, status: int = 200) -> None:
    board.reset()
    board.overrides[f"/vehicles/{VIN}/manifest"] = fixed(
        body, status, **{"content-type": "application/json"}
    )


def relabelled(signer: Signer, **changes: Any) -> Callable[[bytes], bytes]:
    """A ``tamper`` re-signing the ECU's own report with ``changes`` made (its key, its nonce)."""

    def tamper(data: bytes) -> bytes:
        report = replace(SignedEcuVersionReport.from_der(data).report, **changes)
        return SignedEcuVersionReport.sign(report, signer).to_der()

    return tamper


def test_links_and_installs_only_for_ecus_of_this_vehicle(tmp_path: Path) -> None:
    primary, ecus = make_primary(tmp_path)
    stranger = InMemorySecondary("ecu-zz", "hw-a", CryptoSigner.generate_ed25519())
    with pytest.raises(ValueError, match="ecu-zz"):
        Primary(primary.config, [*ecus.values(), stranger])
    with pytest.raises(ValueError, match="ecu-zz"):
        primary.mark_installed("ecu-zz", IMAGE)
    assert primary.installed() == {}


# --- version reports from secondaries (5.4.2.1) -----------------------------------------


@pytest.mark.parametrize("claim", [{"ecu_serial": "ecu-b"}, {"hardware_id": "hw-b"}])
def test_report_signed_by_the_ecu_but_naming_another_ecu_is_refused(
    tmp_path: Path, claim: dict[str, str]
) -> None:
    """ecu-a's key signs a report saying it is ecu-b or ecu-b's hardware: spoofed, left out."""
    primary, ecus = make_primary(tmp_path)
    ecus["ecu-a"].tamper = relabelled(ecus["ecu-a"].signer, **claim)
    signed, reports, issues = primary.collect_reports()
    assert "ecu-a" not in signed and "ecu-a" not in reports
    assert "ecu-b" in reports  # the other ECU's report is unaffected
    (issue,) = issues
    assert issue.ecu_serial == "ecu-a" and issue.attack == ATTACK_SPOOFED_MESSAGE
    assert isinstance(issue.error, ManifestError)


# --- the Director's answer to the manifest (5.4.2.2) -------------------------------------


def test_manifest_answer_is_read_only_when_small_and_accepted_only_when_it_says_true(
    tmp_path: Path, director: tuple[Switchboard, str]
) -> None:
    board, url = director
    primary, _ = make_primary(tmp_path, url)
    signed, _, _ = primary.collect_reports()
    accepted = {"accepted": True, "metadata_version": 3}
    answer_manifest(board, json.dumps(accepted).encode())
    assert primary.upload_manifest(signed).accepted  # the real thing, as a baseline
    # "accepted" must be the JSON true, not any truthy value
    answer_manifest(board, json.dumps({"accepted": "yes"}).encode())
    assert not primary.upload_manifest(signed).accepted
    # an answer larger than MAX_RESPONSE_BYTES is not parsed: not accepted
    padded = {**accepted, "padding": "x" * MAX_RESPONSE_BYTES}
    answer_manifest(board, json.dumps(padded).encode())
    assert not primary.upload_manifest(signed).accepted
    # JSON that is no object: a refusal, not a crash
    answer_manifest(board, b"[1, 2]", 400)
    outcome = primary.upload_manifest(signed)
    assert not outcome.accepted and outcome.status == 400 and outcome.reason == "http_error"
    # a metadata version that is no integer is not passed on
    answer_manifest(board, json.dumps({"accepted": True, "metadata_version": "7"}).encode())
    outcome = primary.upload_manifest(signed)
    assert outcome.accepted and outcome.metadata_version is None


def test_refused_reports_name_only_ecus_of_this_manifest_and_get_no_receipt(
    tmp_path: Path, director: tuple[Switchboard, str]
) -> None:
    """A report the Director left out gets no receipt: its attacks must reach it (DESIGN 7)."""
    board, url = director
    primary, ecus = make_primary(tmp_path, url)
    signed, _, _ = primary.collect_reports()
    refused = {"ecu-a": "replayed_report", "ecu-zz": "whatever"}
    answer_manifest(board, json.dumps({"accepted": True, "refused_reports": refused}).encode())
    assert primary.upload_manifest(signed).refused_reports == {"ecu-a": "replayed_report"}
    result = primary.run_cycle()  # the manifest accepted but ecu-a's report left out
    assert result.manifest is not None and result.manifest.accepted
    assert any(i.ecu_serial == "ecu-a" and i.stage == "manifest" for i in result.issues)
    primary.run_cycle()
    assert ecus["ecu-a"].receipts[-1] == 0  # never a receipt for the refused report
    assert ecus["ecu-b"].receipts[-1] == ecus["ecu-b"].report_counter - 1


def test_attacks_stay_in_the_report_until_a_manifest_is_accepted(
    tmp_path: Path, director: tuple[Switchboard, str]
) -> None:
    board, url = director
    primary, _ = make_primary(tmp_path, url)
    state = primary.state.reports()
    state.note_failure([ATTACK_FREEZE], "metadataRejected", "an earlier cycle")
    primary.state.save_reports(state)
    answer_manifest(board, json.dumps({"error": "bad_manifest", "detail": "no"}).encode(), 400)
    result = primary.run_cycle()
    assert result.manifest is not None and not result.manifest.accepted
    assert ATTACK_FREEZE in primary.report_state().attacks
    assert ATTACK_FREEZE in primary.own_report().report.attacks_detected


def test_report_counter_is_never_reused_after_report_state_fails_authentication(
    tmp_path: Path,
) -> None:
    """A ``reports.json`` that fails authentication restarts the counter above any used."""
    primary, _ = make_primary(tmp_path)
    used = [primary.own_report().report.report_counter for _ in range(3)]
    (primary.config.state_dir / REPORTS).write_bytes(b"{}")  # not signed by the primary
    report = primary.own_report().report
    assert report.report_counter > max(used)
    assert report.last_result == "internalError"


# --- conditional timestamp polls (issue 12): a 304 only for the very bytes held -------------


def test_a_304_never_hands_back_bytes_a_weak_or_later_answer_did_not_validate(
    director: tuple[Switchboard, str],
) -> None:
    board, url = director
    board.reset()
    path = "/cond/timestamp.json"
    fetcher = PolicyFetcher(DownloadPolicy(socket_timeout=5.0))

    def answer(body: bytes = b"", status: int = 200, **headers: str) -> None:
        board.overrides[path] = fixed(body, status, **headers)

    # a weak tag is no promise of the same bytes: such a body is not kept
    answer(b'{"v": 1}', ETag='W/"1"')
    assert fetcher.download_bytes(url + path, 10_000) == b'{"v": 1}'
    answer(status=304, ETag='W/"1"')
    with pytest.raises(tuf_exc.DownloadHTTPError, match="304"):
        fetcher.download_bytes(url + path, 10_000)
    # a body kept under a strong tag, then a new body without one: the old is dropped
    answer(b'{"v": 2}', ETag='"2"')
    assert fetcher.download_bytes(url + path, 10_000) == b'{"v": 2}'
    answer(b'{"v": 3}')
    assert fetcher.download_bytes(url + path, 10_000) == b'{"v": 3}'
    answer(status=304)
    with pytest.raises(tuf_exc.DownloadHTTPError, match="304"):
        fetcher.download_bytes(url + path, 10_000)
    assert not fetcher.not_modified


# --- full verification against real Director and Image servers (5.4.4.2) -----------------


def test_a_mirror_that_answers_with_an_http_error_is_not_skipped(
    env: Env, director: tuple[Switchboard, str]
) -> None:
    """Only a mirror that cannot be reached is skipped; one that drops requests is reported."""
    board, url = director
    board.reset()  # no app: every request answered 503
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    config = env.primary_config()
    mirrors = RepositoryMap.from_dict(
        {
            "repositories": {
                "director": [url, *config.repository_map.director_urls],
                "image": list(config.repository_map.image_urls),
            },
            "mapping": [{"paths": ["*"], "repositories": ["director", "image"], "threshold": 2}],
        }
    )
    result = env.primary(repository_map=mirrors).run_cycle()
    assert not result.ok and result.stage == "director"
    assert isinstance(result.error, tuf_exc.DownloadHTTPError)
    assert ATTACK_DROP_REQUEST in result.attacks


def test_an_http_error_for_the_timestamp_is_a_dropped_request(env: Env) -> None:
    """The timestamp goes through the conditional GET (``If-None-Match``): an error status
    there is a download error too, never bytes handed to ngclient as metadata."""
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    env.servers.director.overrides[env.director_path("timestamp.json")] = fixed(b"gone", 503)
    result = env.primary().run_cycle()
    assert not result.ok and result.stage == "director"
    assert isinstance(result.error, tuf_exc.DownloadHTTPError), repr(result.error)
    assert ATTACK_DROP_REQUEST in result.attacks


def test_a_mirror_that_never_answers_is_slow_retrieval_not_skipped(env: Env) -> None:
    """Connected, request sent, no response within ``socket_timeout``: slow retrieval
    (4.3.1), reported; not taken for a mirror that cannot be reached."""
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the backlog; nothing ever answers
        config = env.primary_config()
        mirrors = RepositoryMap.from_dict(
            {
                "repositories": {
                    "director": [
                        f"http://127.0.0.1:{silent.getsockname()[1]}",
                        *config.repository_map.director_urls,
                    ],
                    "image": list(config.repository_map.image_urls),
                },
                "mapping": [
                    {"paths": ["*"], "repositories": ["director", "image"], "threshold": 2}
                ],
            }
        )
        primary = env.primary(repository_map=mirrors, download=DownloadPolicy(socket_timeout=0.3))
        primary._http = httpx.Client(timeout=0.3, trust_env=False)  # the manifest PUT too
        result = primary.run_cycle()
    assert not result.ok and result.stage == "director"
    assert isinstance(result.error, SlowRetrievalError), repr(result.error)
    assert ATTACK_SLOW_RETRIEVAL in result.attacks


def test_warm_cycle_looks_up_a_newly_assigned_image_behind_a_delegation(env: Env) -> None:
    """Image repository unchanged, but the Director now names an image not looked up before:
    ngclient must walk the delegations for it (not stop after the timestamp)."""
    env.add_image("app.wasm", 1, ("hw-a",))
    env.image_repo.delegate("supplier-b", paths=["apps/*"], hardware_ids=["hw-b"])
    env.image_repo.add_target(
        wasm(2), name="apps/b.wasm", hardware_ids=["hw-b"], release_counter=1, role="supplier-b"
    )
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    first = primary.run_cycle()
    assert first.ok, [str(i) for i in first.issues]
    assert not (primary.state.current() / "image" / "supplier-b.json").exists()
    env.assign("apps/b.wasm", "ecu-b")  # a new Director targets; the Image repository as it was
    second = primary.run_cycle()
    assert second.ok, [str(i) for i in second.issues]
    assert second.updates["ecu-b"].image_path.read_bytes() == wasm(2)
    assert (primary.state.current() / "image" / "supplier-b.json").is_file()


def test_warm_cycle_verifies_again_after_a_root_rotation_with_the_same_timestamp(
    env: Env,
) -> None:
    """A new Image root revokes the targets key; the timestamp served is the one the last
    cycle verified. The targets it names, signed by the revoked key, must be refused
    (TUF 5.3.11), not reused as unchanged."""
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    assert primary.run_cycle().ok
    old_timestamp = env.image_file("timestamp.json")
    old_targets = env.image_file("targets.json")
    revoked = Metadata.from_bytes(old_targets).signatures
    env.image_repo.rotate_key(Targets.type, next(iter(revoked)))
    env.servers.image.overrides["/metadata/timestamp.json"] = old_timestamp
    result = primary.run_cycle()
    assert not result.ok and result.stage == "image"
    assert isinstance(result.error, tuf_exc.UnsignedMetadataError), repr(result.error)
    assert (primary.state.current() / "image" / "root_history" / "2.root.json").is_file()


def test_recorded_release_counter_protects_an_ecu_that_does_not_report(env: Env) -> None:
    """installed.json's counter is a rollback floor even in a cycle where the ECU is silent
    (5.4.4.2: the release counter must not be lower than the installed image's)."""
    env.add_image("app.wasm", 1, ("hw-a",), counter=3)
    env.assign("app.wasm", "ecu-a")
    env.secondaries["ecu-a"].fail_with = TransportError("bus off")
    primary = env.primary()
    primary.mark_installed("ecu-a", InstalledImage("app-new.wasm", 30, {"sha256": "ab" * 32}, 5))
    result = primary.run_cycle()
    assert not result.ok and result.stage == "match"
    assert isinstance(result.error, ReleaseCounterRollbackError)
    assert ATTACK_ROLLBACK in result.attacks


def an_update(tmp_path: Path, serial: str, counter: int = 2) -> EcuUpdate:
    """A verified update of ``serial`` (as a cycle makes it), its image on disk."""
    data = f"\0asm image for {serial} v{counter}".encode()
    path = tmp_path / f"{serial}-{counter}.wasm"
    path.write_bytes(data)
    target = UptaneTarget(
        name=path.name,
        length=len(data),
        hashes={"sha256": hashlib.sha256(data).hexdigest()},
        hardware_ids=(f"hw-{serial[-1]}",),
        release_counter=counter,
        ecu_serial=serial,
    )
    return EcuUpdate(serial, f"hw-{serial[-1]}", target, path, (), (), b"", 1)


def test_install_reports_are_verified_before_anything_is_recorded(tmp_path: Path) -> None:
    """After an update, a report not signed by the ECU's key, or naming another ECU, is
    refused; nothing it says is recorded (5.4.2.1)."""
    primary, ecus = make_primary(tmp_path)
    updates = {s: an_update(tmp_path, s) for s in ecus}
    ecus["ecu-a"].signer = CryptoSigner.generate_ed25519()
    ecus["ecu-b"].tamper = relabelled(ecus["ecu-b"].signer, ecu_serial="ecu-a")
    outcomes = primary.distribute(CycleResult(ok=True, updates=updates))
    for serial in ecus:
        error = outcomes[serial]
        assert isinstance(error, ManifestError) and error.reason == "bad_ecu_signature"
    assert primary.installed() == {}
    assert ATTACK_PARTIAL_BUNDLE not in primary.report_state().attacks


def test_an_install_report_never_lowers_the_recorded_release_counter(tmp_path: Path) -> None:
    """A secondary that reports an older image after an update does not lower the floor."""
    primary, _ = make_primary(tmp_path)
    primary.mark_installed("ecu-a", replace(IMAGE, release_counter=5))
    update = an_update(tmp_path, "ecu-a", counter=2)
    outcomes = primary.distribute(CycleResult(ok=True, updates={"ecu-a": update}))
    assert isinstance(outcomes["ecu-a"], EcuVersionReport)
    assert outcomes["ecu-a"].installed is not None
    assert outcomes["ecu-a"].installed.release_counter == 2  # what the ECU said
    assert primary.installed()["ecu-a"].release_counter == 5  # what the primary keeps


@pytest.mark.parametrize(
    "differs", ["nothing", "filename", "length", "no common hash", "a common hash"]
)
def test_an_ecu_runs_a_target_only_if_name_length_and_a_common_hash_agree(
    env: Env, differs: str
) -> None:
    """The update is skipped only for an ECU that reports the target's name, length and
    equal digests under at least one hash function the target has (5.4.4.2)."""
    target, _ = env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    assert "sha384" not in target.hashes
    installed = InstalledImage("app.wasm", target.length, dict(target.hashes), 1)
    if differs == "filename":
        installed = replace(installed, filename="other.wasm")
    elif differs == "length":
        installed = replace(installed, length=target.length + 1)
    elif differs == "no common hash":
        installed = replace(installed, hashes={"sha384": "00" * 48})
    elif differs == "a common hash":
        installed = replace(
            installed, hashes={a: "00" * (len(d) // 2) for a, d in target.hashes.items()}
        )
    env.secondaries["ecu-a"].installed = installed
    result = env.primary().run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    assert ("ecu-a" in result.updates) == (differs != "nothing")


# --- the CAN client's checks of what a secondary answers (DESIGN 4) -----------------------

Answer = Callable[[str, Any], tuple[str, Any]]
CAN_IMAGE = InstalledImage("a.wasm", 8, {"sha256": "00" * 32}, 1)


@contextmanager
def rogue(
    answer: Answer, *, max_response: int = 4096, **options: Any
) -> Iterator[CanSecondaryClient]:
    """A client whose secondary answers each request (kind, value) with ``answer``.

    ``max_response`` is the link's limit (the secondary may send more: it is lost).
    """

    def handler(request: bytes) -> bytes:
        return codec.encode_message(*answer(*codec.decode_message(request)))

    link, endpoint = memory_pair(
        handler, timeout=5.0, max_response=max_response, endpoint_max_response=1 << 20
    )
    endpoint.start()
    try:
        yield CanSecondaryClient(link, "ecu-a", **options)
    finally:
        endpoint.close()


def ack(code: str, text: str = "") -> tuple[str, Any]:
    return "ack", {"code": code, "text": text}


def test_can_client_settings_are_checked() -> None:
    link, _endpoint = memory_pair(lambda r: r, max_request=1000, timeout=0.5)  # nobody answers
    settings: list[dict[str, Any]] = [
        {"max_retries": -1},
        {"window": 0},
        {"chunk_size": 0},
        {"chunk_size": 969},
    ]
    for options in settings:
        with pytest.raises(ValueError):
            CanSecondaryClient(link, "ecu-a", **{"chunk_size": 968, **options})
    client = CanSecondaryClient(link, "ecu-a", chunk_size=968)
    with pytest.raises(ValueError, match="does not fit"):
        client.send_image(b"12345678", CAN_IMAGE, chunk_size=969)
    with pytest.raises(ValueError, match="its info says"):
        client.send_image(b"1234567", CAN_IMAGE)
    with pytest.raises(ValueError, match="timezone-aware"):
        client.send_time(datetime(2030, 1, 1))
    with pytest.raises(ValueError, match="signer"):
        client.send_time(datetime(2030, 1, 1, tzinfo=UTC))
    with pytest.raises(ValueError, match="root_versions"):
        client.push_metadata([b"root"], b"targets", root_versions=[1, 2], targets_version=1)


def test_can_client_refusals_are_typed() -> None:
    answers = {
        "timeNonceRequest": ("timeNonceResponse", {"nonce": b"n" * 16}),
        "timeMessage": ack("badRequest", "behind my floor"),
        "imageOffer": ("chunkAck", {"code": "noSpace", "nextOffset": 0}),
    }
    with rogue(lambda kind, _value: answers[kind], signer=SIGNER) as client:
        with pytest.raises(SecondaryRefusedError, match="behind my floor"):
            client.send_time(datetime(2030, 1, 1, tzinfo=UTC))
        with pytest.raises(ImageRefusedError) as e:
            client.offer(CAN_IMAGE)
        assert e.value.code == "noSpace"
    pushes: list[str] = []

    def metadata(refuse: str, code: str) -> Answer:
        def answer(kind: str, value: Any) -> tuple[str, Any]:
            pushes.append(value["role"])
            return ack(code, f"{refuse} refused") if value["role"] == refuse else ack("ok")

        return answer

    for refuse, code in (("root", "metadataRejected"), ("targets", "busy")):
        pushes.clear()
        with (
            rogue(metadata(refuse, code)) as client,
            pytest.raises(MetadataRejectedError) as rejected,
        ):
            client.push_metadata([b"root"], b"targets", root_versions=[1], targets_version=1)
        assert rejected.value.code == code and pushes[-1] == refuse
    with rogue(metadata("targets", "noUpdate")) as client:
        assert (
            client.push_metadata([b"r"], b"t", root_versions=[1], targets_version=1) == "noUpdate"
        )


@pytest.mark.parametrize(
    ("answer", "error", "match"),
    [
        (ack("imageMismatch", "no"), ImageRefusedError, "no"),
        (("chunkAck", {"code": "noSpace", "nextOffset": 4}), ImageRefusedError, "noSpace"),
        (("infoRequest", {"protocolVersion": 1}), CodecError, "expected chunkAck"),
        (("chunkAck", {"code": "ok", "nextOffset": 9}), CodecError, "offset 9"),
    ],
)
def test_can_client_refuses_a_bad_chunk_ack(
    answer: tuple[str, Any], error: type[Exception], match: str
) -> None:
    with rogue(lambda kind, value: answer) as client, pytest.raises(error, match=match):
        client.send_chunk(0, b"1234", CAN_IMAGE.length)


def test_can_client_answers_of_another_kind_are_codec_errors() -> None:
    with (
        rogue(lambda kind, value: ("chunkAck", {"code": "ok", "nextOffset": 0})) as client,
        pytest.raises(CodecError, match="expected infoResponse"),
    ):
        client.get_info()
    with rogue(lambda kind, value: ack("busy", "later")) as client:
        with pytest.raises(SecondaryRefusedError) as e:
            client.get_info()
        assert (e.value.code, e.value.text) == ("busy", "later")
    info = {
        "ecuSerial": "ecu-a",
        "hardwareId": "hw-a",
        "keyType": "ed25519",
        "scheme": "ed25519",
        "publicKey": b"\x01\x02",  # not an ed25519 key
        "protocolVersion": 1,
        "verificationMode": "partial",
        "freeSlotSize": 0,
    }
    with (
        rogue(lambda kind, value: ("infoResponse", info)) as client,
        pytest.raises(CodecError, match="unusable public key"),
    ):
        client.get_info()


def test_can_transfer_gives_up_after_max_retries_and_without_progress() -> None:
    """A secondary that never acknowledges a chunk, or never moves on: bounded, typed."""
    calls = [0]

    def lost(kind: str, value: Any) -> tuple[str, Any]:
        calls[0] += 1
        if calls[0] > 50:  # the client should have given up long ago
            return ack("internalError", "too many requests")
        if kind == "imageOffer":
            return "chunkAck", {"code": "ok", "nextOffset": 0}
        return "versionReportResponse", {"signedReport": b"x" * 2000}  # too large: lost

    with (
        rogue(lost, max_response=1000, chunk_size=4, max_retries=2) as client,
        pytest.raises(TransferFailedError, match="failed 3 times"),
    ):
        client.send_image(b"12345678", CAN_IMAGE)
    calls[0] = 0

    def stuck(kind: str, value: Any) -> tuple[str, Any]:
        calls[0] += 1
        if calls[0] > 50:
            return ack("internalError", "too many requests")
        code = "ok" if kind == "imageOffer" else "transferIncomplete"
        return "chunkAck", {"code": code, "nextOffset": 0}

    with (
        rogue(stuck, chunk_size=4, max_retries=2, window=1) as client,
        pytest.raises(TransferFailedError, match="no progress"),
    ):
        client.send_image(b"12345678", CAN_IMAGE)


def test_can_update_for_another_ecu_is_not_sent() -> None:
    sent: list[str] = []

    def record(kind: str, value: Any) -> tuple[str, Any]:
        sent.append(kind)
        return ack("ok")

    target = UptaneTarget(
        name="b.wasm",
        length=8,
        hashes={"sha256": "00" * 32},
        hardware_ids=("hw-b",),
        release_counter=1,
        ecu_serial="ecu-b",
    )
    update = EcuUpdate("ecu-b", "hw-b", target, Path("b.wasm"), (b"root",), (1,), b"t", 1)
    with rogue(record) as client, pytest.raises(ValueError, match="ecu-b"):
        client.send_update(update)
    assert sent == []


# --- install policy (issue 14): only an explicit yes installs ------------------------------

OFFER = UpdateOffer("VIN1", {"ecu-a": "a.wasm"}, {"ecu-a": 2})


def test_only_an_explicit_yes_installs(tmp_path: Path) -> None:
    """Truthy answers that are not ``True`` / ``"approve"`` hold the update back."""
    for answer in ("yes", 1, [True]):

        def prompt(offer: UpdateOffer, answer: Any = answer) -> Any:
            return answer

        assert Ask(prompt).decide(OFFER).verdict == DEFER

    def sensor() -> Any:
        return "yes"

    assert Conditions({"parked": sensor}).decide(OFFER).verdict == DEFER
    file = tmp_path / "approvals.json"
    for answers in ({"a.wasm": "yes"}, {"a.wasm": True}, ["a.wasm"]):
        file.write_text(json.dumps(answers))
        assert AskFile(file).decide(OFFER).verdict == DEFER
    file.write_text(json.dumps({"a.wasm": "approve"}))
    assert AskFile(file).decide(OFFER).verdict == INSTALL


def test_in_memory_secondary_takes_only_its_own_updates(tmp_path: Path) -> None:
    """The in-process stand-in refuses another ECU's update as a link would (a wrong route)."""
    _, ecus = make_primary(tmp_path)
    with pytest.raises(TransportError, match="ecu-b"):
        ecus["ecu-a"].send_update(an_update(tmp_path, "ecu-b"))
    assert ecus["ecu-a"].received == [] and ecus["ecu-a"].installed is None
