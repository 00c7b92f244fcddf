"""Attacks on what the primary keeps between cycles (issue 10, items 6-8).

Tampered local state (Uptane 2.1, 5.4.4.2: the primary's trusted state and
rollback floors), a stale snapshot the primary holds (TUF 5.5: a repository
that changed a file without a version bump must not freeze the primary), and
a root rotation forgotten because the cycle that verified it failed later
(TUF 5.3.8, 5.4.5, 5.5.7, 5.6.6). Real Director and Image servers on
loopback, real keys; the attacker edits the primary's disk or answers its
requests through the server switchboards.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from helpers.primary_fixtures import env_fixture, servers_fixture, template_fixture  # noqa: F401  (fixtures)
from helpers.servers import fixed
from helpers.uptane_env import DIRECTOR_EXPIRY, PRIMARY, Env
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, MetaFile, Root, Snapshot, Targets, Timestamp

from director.metadata_build import RoleSigners, Versions, build_vehicle_files
from director.service import EcuSpec
from ecus.primary import Primary
from ecus.primary.state import INSTALLED, REPORTS
from ecus.sim.compromise import craft_director_targets
from image_repo.layout import CONFIG_FILE, RepoConfig
from uptane import errors
from uptane.manifest import InstalledImage


@pytest.fixture
def ready(env: Env) -> tuple[Env, Primary]:
    """An image assigned to ecu-a, one successful cycle done."""
    env.add_image("app.wasm", 1, ("hw-a",), counter=1)
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    result = primary.run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    return env, primary


# --- helpers ---------------------------------------------------------------------


def image_signer(env: Env, role: str, *, retired: bool = False) -> Signer:
    """A signer of Image repository ``role`` (its current key, or the one rotated out)."""
    config = RepoConfig.from_bytes((env.image_repo.path / CONFIG_FILE).read_bytes(), "image")
    refs = config.retired if retired else config.roles[role]
    return refs[0].signer()


def image_md(env: Env, filename: str) -> Metadata[Any]:
    return Metadata.from_bytes(env.image_file(filename))


def resign(md: Metadata[Any], signer: Signer) -> bytes:
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes()


def serve_image(env: Env, filename: str, data: bytes) -> None:
    env.servers.image.overrides[f"/metadata/{filename}"] = data


def timestamp_naming(env: Env, snapshot: bytes, *, bump: int = 1) -> bytes:
    """A newer Image timestamp naming ``snapshot`` by version, length and hashes."""
    ts = image_md(env, "timestamp.json")
    ts.signed.version += bump
    version = Metadata.from_bytes(snapshot).signed.version
    ts.signed.snapshot_meta = MetaFile(
        version=version,
        length=len(snapshot),
        hashes={"sha256": hashlib.sha256(snapshot).hexdigest()},
    )
    return resign(ts, image_signer(env, Timestamp.type))


def trusted(primary: Primary, repo: str, name: str) -> Metadata[Any]:
    return Metadata.from_bytes((primary.state.current() / repo / name).read_bytes())


# --- item 6: tampered primary state ----------------------------------------------------


def test_tampered_installed_state_fails_closed(ready: tuple[Env, Primary]) -> None:
    """Lowering the primary's own rollback floor in installed.json is caught, not obeyed."""
    env, primary = ready
    target, _ = env.add_image("gw.wasm", 2, ("gateway",), counter=1)
    primary.mark_installed(
        PRIMARY, InstalledImage("gw-old.wasm", 1, {"sha256": "00" * 32}, release_counter=5)
    )
    env.assign("gw.wasm", PRIMARY)
    refused = primary.run_cycle()  # counter 1 < installed 5: a rollback
    assert isinstance(refused.error, errors.ReleaseCounterRollbackError)

    path = primary.state.current() / INSTALLED
    raw = json.loads(path.read_bytes())
    raw[PRIMARY]["release_counter"] = 0  # the attacker lowers the floor
    path.write_text(json.dumps(raw))

    result = primary.run_cycle()  # must not raise
    assert not result.ok and result.updates == {}
    assert isinstance(result.error, errors.StateError), repr(result.error)
    report = primary.own_report().report
    assert report.last_result == "internalError"
    assert "changed outside the primary" in report.last_result_text
    assert report.installed is None  # fails closed: claims nothing it cannot vouch for
    assert target.path not in {u.target.name for u in result.updates.values()}


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"\xff\xfe", b"[]"])
def test_corrupt_installed_state_is_a_typed_error_not_a_crash(
    ready: tuple[Env, Primary], garbage: bytes
) -> None:
    _env, primary = ready
    (primary.state.current() / INSTALLED).write_bytes(garbage)
    result = primary.run_cycle()  # promised never to raise
    assert not result.ok
    assert isinstance(result.error, errors.StateError), repr(result.error)
    with pytest.raises(errors.StateError):
        primary.installed()


def test_tampered_report_state_is_replaced_and_reported(ready: tuple[Env, Primary]) -> None:
    """An edited reports.json (attacks wiped, counter rewound) is not believed."""
    _env, primary = ready
    counter = primary.report_state().report_counter
    path = primary.config.state_dir / REPORTS
    raw = json.loads(path.read_bytes())
    raw["signed"]["report_counter"] = 0
    path.write_text(json.dumps(raw))

    result = primary.run_cycle()  # must not raise
    assert result.manifest is not None and result.manifest.accepted  # counter went up, not back
    assert result.reports[PRIMARY].report_counter > counter
    assert result.reports[PRIMARY].last_result == "internalError"
    assert REPORTS in result.reports[PRIMARY].last_result_text
    path.write_bytes(b"garbage")
    assert primary.run_cycle().manifest is not None


# --- item 7: stuck on a stale snapshot ----------------------------------------------


def stale_snapshot(env: Env, hours: int = 1) -> tuple[int, bytes]:
    """The Image snapshot re-signed with other content under the same version."""
    version = image_md(env, "timestamp.json").signed.snapshot_meta.version
    snap = image_md(env, f"{version}.snapshot.json")
    snap.signed.expires += timedelta(hours=hours)  # content changes, version does not
    return version, resign(snap, image_signer(env, Snapshot.type))


def test_stale_snapshot_is_refetched_once(ready: tuple[Env, Primary]) -> None:
    """Timestamp names the snapshot version the primary holds, with other hashes."""
    env, primary = ready
    version, changed = stale_snapshot(env)
    serve_image(env, f"{version}.snapshot.json", changed)
    serve_image(env, "timestamp.json", timestamp_naming(env, changed))

    result = primary.run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    assert (primary.state.current() / "image" / "snapshot.json").read_bytes() == changed
    again = primary.run_cycle()  # not stuck either
    assert again.ok, [str(i) for i in again.issues]
    assert errors.ATTACK_MIX_AND_MATCH not in primary.own_report().report.attacks_detected


def test_stale_snapshot_whose_fresh_copy_fails_too_is_mix_and_match(
    ready: tuple[Env, Primary],
) -> None:
    env, primary = ready
    version, changed = stale_snapshot(env)
    _, served = stale_snapshot(env, hours=2)  # same length, other bytes
    assert len(served) == len(changed)
    held = (primary.state.current() / "image" / "snapshot.json").read_bytes()
    serve_image(env, f"{version}.snapshot.json", served)
    serve_image(env, "timestamp.json", timestamp_naming(env, changed))  # names other bytes

    result = primary.run_cycle()
    assert not result.ok
    assert isinstance(result.error, errors.MixAndMatchError), repr(result.error)
    assert errors.ATTACK_MIX_AND_MATCH in result.attacks
    assert (primary.state.current() / "image" / "snapshot.json").read_bytes() == held
    assert not list(primary.state.work_dir.glob("**/*.aside"))


def test_stale_snapshot_refetch_keeps_stored_versions_as_rollback_floor(env: Env) -> None:
    """The fresh copy may not list an older targets version than the one set aside."""
    env.add_image("app.wasm", 1, ("hw-a",), counter=1)
    env.add_image("other.wasm", 2, ("hw-b",), counter=1)
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    assert primary.run_cycle().ok
    held_targets = trusted(primary, "image", "targets.json").signed.version
    assert held_targets >= 3
    version = image_md(env, "timestamp.json").signed.snapshot_meta.version
    snap = image_md(env, f"{version}.snapshot.json")
    snap.signed.meta["targets.json"] = MetaFile(version=held_targets - 1)  # still has app.wasm
    changed = resign(snap, image_signer(env, Snapshot.type))
    serve_image(env, f"{version}.snapshot.json", changed)
    serve_image(env, "timestamp.json", timestamp_naming(env, changed))

    result = primary.run_cycle()
    assert not result.ok
    assert isinstance(result.error, tuf_exc.BadVersionNumberError), repr(result.error)
    assert errors.ATTACK_ROLLBACK in result.attacks
    assert trusted(primary, "image", "targets.json").signed.version == held_targets
    assert trusted(primary, "image", "snapshot.json").signed.meta["targets.json"].version == (
        held_targets
    )


def test_root_file_with_another_version_is_a_root_rotation_error(
    ready: tuple[Env, Primary],
) -> None:
    """2.root.json carrying root v3 is a broken rotation, not a mix-and-match."""
    env, primary = ready
    for _ in range(2):  # root v2 and v3, both signed by the (unchanged) root key
        old = image_signer(env, Timestamp.type).public_key.keyid
        env.image_repo.rotate_key(Timestamp.type, old)
    serve_image(env, "2.root.json", env.image_repo.root_bytes(3))

    result = primary.run_cycle()
    assert not result.ok
    assert isinstance(result.error, errors.RootRotationError), repr(result.error)
    assert errors.ATTACK_MIX_AND_MATCH not in result.attacks
    assert errors.ATTACK_INVALID_METADATA in result.attacks


# --- item 8: a root rotation forgotten by a failed cycle ----------------------------------


def test_failed_cycle_keeps_a_verified_root_rotation(ready: tuple[Env, Primary]) -> None:
    """Conformance-style (TUF 5.3.8): root v2 revokes the timestamp key; the cycle then
    fails at the snapshot. v2 is kept, so an attacker answering 404 for the next root
    cannot keep the primary on v1 and feed it a timestamp signed with the revoked key."""
    env, primary = ready
    old_timestamp = image_md(env, "timestamp.json")
    revoked = image_signer(env, Timestamp.type)
    env.image_repo.rotate_key(Timestamp.type, revoked.public_key.keyid)
    assert Metadata.from_bytes(env.image_repo.root_bytes()).signed.version == 2
    new_snapshot = image_md(env, "timestamp.json").signed.snapshot_meta.version
    serve_image(env, f"{new_snapshot}.snapshot.json", b"{}")  # the cycle fails after root

    failed = primary.run_cycle()
    assert not failed.ok and failed.stage == "image"
    assert trusted(primary, "image", "root.json").signed.version == 2  # kept
    assert (primary.state.current() / "image" / "root_history" / "2.root.json").is_file()
    assert primary.installed() == {}  # nothing installable changed

    # the attacker: no newer root, and a timestamp signed with the revoked key
    env.servers.image.overrides.clear()
    env.servers.image.overrides["/metadata/2.root.json"] = fixed(b"", status=404)
    old_timestamp.signed.version += 100
    serve_image(env, "timestamp.json", resign(old_timestamp, revoked))

    result = primary.run_cycle()
    assert not result.ok
    assert isinstance(result.error, tuf_exc.UnsignedMetadataError), repr(result.error)
    assert trusted(primary, "image", "root.json").signed.version == 2
    assert Root.type == "root"


def test_failed_cycle_keeps_newer_top_level_versions_but_installs_nothing(
    ready: tuple[Env, Primary],
) -> None:
    """TUF 5.4.5/5.5.7: a verified newer timestamp and snapshot survive a cycle that fails
    at the targets; installed state and the Director's instructions do not change."""
    env, primary = ready
    before_ts = trusted(primary, "image", "timestamp.json").signed.version
    director_targets = (primary.state.current() / "director" / "targets.json").read_bytes()
    target, _ = env.add_image("next.wasm", 3, ("hw-a",), counter=2)
    env.assign("next.wasm", "ecu-a")
    version = image_md(
        env, f"{image_md(env, 'timestamp.json').signed.snapshot_meta.version}.snapshot.json"
    )
    targets_version = version.signed.meta["targets.json"].version
    serve_image(env, f"{targets_version}.targets.json", b"{}")

    result = primary.run_cycle()
    assert not result.ok and result.updates == {}
    assert trusted(primary, "image", "timestamp.json").signed.version > before_ts
    assert trusted(primary, "image", "snapshot.json").signed.meta["targets.json"].version == (
        targets_version
    )
    assert (primary.state.current() / "director" / "targets.json").read_bytes() == (
        director_targets
    )
    assert "ecu-a" not in primary.installed() or primary.installed()["ecu-a"].filename != (
        target.path
    )
    env.servers.image.overrides.clear()
    assert primary.run_cycle().ok


def test_another_vehicles_timestamp_and_snapshot_over_this_vehicles_targets_do_not_freeze(
    ready: tuple[Env, Primary],
) -> None:
    """Another vehicle's timestamp and snapshot, signed by the Director's own code with
    versions that lead to this vehicle's current targets: with versions alone they would
    verify (the targets name this vehicle) and be kept as its rollback floor, so its own
    metadata would look like a rollback until its versions overtook the other's (a
    freeze). The Director lists each file's length and hashes: the snapshot does not lead
    to these targets and nothing but the Director root is kept."""
    env, primary = ready
    other = "VIN-TEST-OTHER"
    signer = CryptoSigner.generate_ed25519()
    env.director.register_vehicle(
        other, [EcuSpec("other-primary", "gateway", signer.public_key, primary=True)]
    )
    mine = Metadata[Targets].from_bytes(env.director_file("targets.json")).signed.version
    root = Metadata[Root].from_bytes(env.director_file("root.json")).signed
    pool = {s.public_key.keyid: s for s in env.director_config.online_signers()}
    files = build_vehicle_files(
        other,
        [],
        Versions(targets=mine - 1, snapshot=mine + 40, timestamp=mine + 40),
        RoleSigners.of(root.version, root, pool),
        datetime.now(UTC),
        DIRECTOR_EXPIRY,
    )
    assert files.targets_version == mine
    other_snapshot = files.files[f"{files.snapshot_version}.snapshot.json"]
    snapshot = Metadata[Snapshot].from_bytes(other_snapshot).signed
    assert snapshot.meta["targets.json"].version == mine  # leads to this vehicle's targets
    board = env.servers.director.overrides
    board[env.director_path("timestamp.json")] = files.files["timestamp.json"]
    board[env.director_path(f"{files.snapshot_version}.snapshot.json")] = other_snapshot
    before = trusted(primary, "director", "timestamp.json").signed.version

    result = primary.run_cycle()
    assert not result.ok
    assert trusted(primary, "director", "timestamp.json").signed.version == before
    board.clear()
    again = primary.run_cycle()
    assert again.ok, [str(i) for i in again.issues]


def test_failed_cycle_keeps_no_director_metadata_of_another_vehicle(
    ready: tuple[Env, Primary],
) -> None:
    """One set of Director keys signs every vehicle: another vehicle's newer timestamp and
    snapshot verify, and only its targets show whose they are. Kept, they would make this
    vehicle's own metadata a rollback for good; only a Director root is kept before then."""
    env, primary = ready
    other = "VIN-TEST-OTHER"
    signer = CryptoSigner.generate_ed25519()
    env.director.register_vehicle(
        other, [EcuSpec("other-primary", "gateway", signer.public_key, primary=True)]
    )
    mine = env.director_version()
    for _ in range(mine + 2):  # the other vehicle's versions overtake this one's
        version = craft_director_targets(
            env.director,
            env.director_config.online_signers(),
            other,
            lambda t: None,
            expiry=DIRECTOR_EXPIRY,
        )
    board = env.servers.director.overrides
    for name in ("timestamp.json", f"{version}.snapshot.json", f"{version}.targets.json"):
        r = httpx.get(f"{env.servers.director_url}/vehicles/{other}/metadata/{name}")
        board[env.director_path(name)] = r.content
    before = trusted(primary, "director", "timestamp.json").signed.version

    result = primary.run_cycle()
    assert isinstance(result.error, errors.VehicleIdMismatchError), repr(result.error)
    assert trusted(primary, "director", "timestamp.json").signed.version == before
    board.clear()
    again = primary.run_cycle()
    assert again.ok, [str(i) for i in again.issues]
