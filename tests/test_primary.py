"""The primary's update cycle against real Director and Image servers on loopback.

Each attack test checks three things: the typed error, the attack named in
the primary's next own version report, and that the trusted state on disk
is byte-for-byte unchanged (Uptane 2.1, 4.3 threat model; 5.4.4.2).
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from helpers.primary_fixtures import env_fixture, servers_fixture, template_fixture  # noqa: F401  (fixtures)
from helpers.servers import endless, trickle
from helpers.uptane_env import (
    PRIMARY,
    VIN,
    Env,
    Servers,
    shifted,
    tree_digest,
    wasm,
)
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Delegations, Metadata, TargetFile, Targets

from ecus.primary import CycleResult, Primary
from ecus.primary.config import DownloadPolicy, MetadataLimits
from ecus.primary.state import SEAL
from ecus.primary.verify import KEEP_ON_FAILURE
from uptane import errors
from uptane.manifest import EcuVersionReport, InstalledImage
from uptane.metadata import build_custom, set_vehicle_id
from uptane.repository import utc_now
from uptane.verification.matching import RepositoryMap


@pytest.fixture
def ready(env: Env) -> tuple[Env, Primary, TargetFile]:
    """An image assigned to ecu-a, one successful cycle done."""
    target, _ = env.add_image("app.wasm", 1, ("hw-a",), counter=1)
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    result = primary.run_cycle()
    assert result.ok, result.issues
    return env, primary, target


def next_report(primary: Primary) -> EcuVersionReport:
    """The primary's next own version report, as the Director will get it."""
    return primary.own_report().report


def all_or_nothing_digest(primary: Primary) -> str:
    """Digest of the trusted state but what a failed cycle may keep (``KEEP_ON_FAILURE``)."""
    current = primary.state.current()
    kept = {SEAL} | {f"{repo}/{name}" for repo, names in KEEP_ON_FAILURE.items() for name in names}
    h = hashlib.sha256()
    for path in sorted(current.rglob("*")):
        rel = path.relative_to(current).as_posix()
        if path.is_dir() or any(rel == k or rel.startswith(f"{k}/") for k in kept):
            continue
        h.update(f"{rel} {hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def kept_versions(primary: Primary) -> dict[str, int]:
    """Version of every role file a failed cycle may keep."""
    current = primary.state.current()
    versions = {}
    for repo, names in KEEP_ON_FAILURE.items():
        for name in names:
            path = current / repo / name
            if path.is_file():
                versions[f"{repo}/{name}"] = Metadata.from_bytes(path.read_bytes()).signed.version
    return versions


def assert_refused(
    primary: Primary,
    error_type: type[BaseException],
    attack: str | None,
    run: Callable[[], CycleResult] | None = None,
) -> CycleResult:
    """The cycle failed with ``error_type``, naming ``attack``; nothing installable changed.

    A failed cycle may keep newer roots and top-level metadata it verified
    (TUF 5.3.8-5.6.6), never lower versions; everything else is as before.
    """
    before, versions = all_or_nothing_digest(primary), kept_versions(primary)
    result = (run or primary.run_cycle)()
    assert not result.ok
    assert isinstance(result.error, error_type), repr(result.error)
    assert all_or_nothing_digest(primary) == before, "a failed cycle changed trusted state"
    after = kept_versions(primary)
    assert all(after[k] >= v for k, v in versions.items()), (versions, after)
    assert not list((primary.config.state_dir / "work").glob("*")), "scratch state left behind"
    if attack is not None:
        assert attack in result.attacks
        report = next_report(primary)
        assert attack in report.attacks_detected
        assert report.last_result != "ok"
    return result


# --- success ------------------------------------------------------------------


def test_successful_cycle_downloads_verifies_and_forwards(env: Env) -> None:
    _target_a, data_a = env.add_image("app-a.wasm", 1, ("hw-a",), counter=3)
    _target_p, data_p = env.add_image("gw/main.wasm", 2, ("gateway",), counter=1)
    env.assign("app-a.wasm", "ecu-a")
    env.assign("gw/main.wasm", PRIMARY)
    primary = env.primary()
    before = tree_digest(primary.trusted_dir)

    result = primary.run_cycle()

    assert result.ok, [str(i) for i in result.issues]
    assert result.error is None and result.attacks == ()
    assert result.manifest is not None and result.manifest.accepted
    assert set(result.updates) == {"ecu-a", PRIMARY}
    update = result.updates["ecu-a"]
    assert update.target.name == "app-a.wasm" and update.target.release_counter == 3
    assert update.image_path.read_bytes() == data_a
    assert result.updates[PRIMARY].image_path.read_bytes() == data_p
    assert result.updates[PRIMARY].image_path.is_relative_to(primary.config.images_dir.resolve())
    # DER Director metadata to forward: verified, and the same for every ECU
    assert result.der is not None
    assert update.director_targets == result.der.targets
    assert update.director_root_versions == (1,)
    assert tree_digest(primary.trusted_dir) != before
    # the Director saw every ECU's report
    status = env.director.vehicle_status(VIN)
    assert all(e.report_counter is not None for e in status.ecus)

    # the secondary installs; the next cycle reports it and has nothing to send it
    outcomes = primary.distribute(result)
    assert isinstance(outcomes["ecu-a"], EcuVersionReport)
    assert env.secondaries["ecu-a"].installed is not None
    assert primary.installed()["ecu-a"].release_counter == 3
    primary.mark_installed(PRIMARY, result.updates[PRIMARY].installed_image)
    again = primary.run_cycle()
    assert again.ok, [str(i) for i in again.issues]
    assert again.updates == {}
    assert again.der is None  # nothing to forward, no DER fetched


def test_primary_clock_drives_ngclient_expiry(
    tmp_path: Path, template: Path, servers: Servers
) -> None:
    """Metadata signed a month ago and expired by wall time verifies at a primary
    whose clock says it is still that day: ngclient must use the primary's clock."""
    past = utc_now() - timedelta(days=30)
    env = Env(tmp_path, template, servers, clock=lambda: past)
    try:
        env.image_repo.resign()  # timestamp/snapshot signed "a month ago"
        result = env.primary(clock=lambda: past).run_cycle()
        assert result.ok, [str(i) for i in result.issues]
    finally:
        env.close()


# --- Director / Image repository disagreement (arbitrary software, 4.3.4) ------


def _replace_ecu_a(new: TargetFile) -> Callable[[Targets], None]:
    def mutate(t: Targets) -> None:
        t.targets = {p: tf for p, tf in t.targets.items() if tf.custom.get("ecu_serial") != "ecu-a"}
        t.targets[new.path] = new

    return mutate


def test_refuses_director_target_not_in_image_repo(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, target = ready
    env.craft_director(_replace_ecu_a(env.director_target(target, "ecu-a", path="ghost.wasm")))
    assert_refused(primary, errors.TargetMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE)


@pytest.mark.parametrize("what", ["length", "hash"])
def test_refuses_length_or_hash_mismatch(ready: tuple[Env, Primary, TargetFile], what: str) -> None:
    env, primary, target = ready
    bad = env.director_target(target, "ecu-a")
    if what == "length":
        bad.length += 1
    else:
        bad.hashes["sha256"] = "0" * 64
    env.craft_director(_replace_ecu_a(bad))
    result = assert_refused(primary, errors.TargetMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE)
    assert what in str(result.error) or "sha256" in str(result.error)


def test_refuses_director_compromised_alone(ready: tuple[Env, Primary, TargetFile]) -> None:
    """The Director's online keys sign another image under the same name."""
    env, primary, target = ready
    from helpers.uptane_env import wasm

    evil = TargetFile.from_data("app.wasm", wasm(666), ["sha256", "sha512"])
    evil.unrecognized_fields["custom"] = dict(target.custom) | {"ecu_serial": "ecu-a"}
    env.craft_director(_replace_ecu_a(evil))
    assert_refused(primary, errors.TargetMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE)


def test_refuses_image_repo_compromised_alone(env: Env) -> None:
    """The Image repository's keys sign new bytes the Director never assigned."""
    _target, _ = env.add_image("app.wasm", 1, ("hw-a",), counter=1)
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()
    assert primary.run_cycle().ok
    env.add_image("app.wasm", 99, ("hw-a",), counter=2)  # same name, other image
    assert_refused(primary, errors.TargetMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE)


def test_refuses_image_swapped_on_server(env: Env) -> None:
    target, data = env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    swapped = bytes([data[0]]) + bytes(len(data) - 1)
    env.servers.image.overrides[env.image_path(target)] = swapped
    primary = env.primary()
    assert_refused(primary, errors.ImageMismatchError, errors.ATTACK_ARBITRARY_SOFTWARE)
    assert not any(primary.config.images_dir.rglob("*.wasm"))


# --- Director-only checks (5.4.4.2) -------------------------------------------


def test_refuses_hardware_id_mismatch(env: Env) -> None:
    target, _ = env.add_image("app.wasm", 1, ("hw-a",))
    primary = env.primary()
    env.craft_director(
        lambda t: t.targets.update({"app.wasm": env.director_target(target, "ecu-b")})
    )
    assert_refused(primary, errors.HardwareIdMismatchError, errors.ATTACK_WRONG_ECU)


def test_refuses_release_counter_below_installed(env: Env) -> None:
    env.add_image("app.wasm", 1, ("hw-a",), counter=3)
    env.assign("app.wasm", "ecu-a")
    env.secondaries["ecu-a"].installed = InstalledImage(
        "app-new.wasm", 30, {"sha256": "ab" * 32}, 5
    )
    result = assert_refused(
        env.primary(), errors.ReleaseCounterRollbackError, errors.ATTACK_ROLLBACK
    )
    assert result.stage == "match"


def test_refuses_release_counter_below_previous_director_target(
    env: Env,
) -> None:
    env.add_image("app-v5.wasm", 1, ("hw-a",), counter=5)
    env.assign("app-v5.wasm", "ecu-a")
    primary = env.primary()
    assert primary.run_cycle().ok
    env.add_image("app-v3.wasm", 2, ("hw-a",), counter=3)
    env.assign("app-v3.wasm", "ecu-a")  # the ECU has not installed v5: the Director allows it
    assert_refused(primary, errors.ReleaseCounterRollbackError, errors.ATTACK_ROLLBACK)


def test_refuses_target_for_ecu_not_in_vehicle(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, target = ready
    other = env.director_target(target, "ecu-of-another-car", path="app.wasm")
    env.craft_director(lambda t: t.targets.update({"app.wasm": other}))
    assert_refused(primary, errors.UnknownEcuError, errors.ATTACK_WRONG_ECU)


def test_refuses_ecu_listed_twice(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    second, _ = env.add_image("app2.wasm", 2, ("hw-a",))
    env.craft_director(
        lambda t: t.targets.update({"app2.wasm": env.director_target(second, "ecu-a")})
    )
    assert_refused(primary, errors.DuplicateEcuError, errors.ATTACK_PARTIAL_BUNDLE)


def test_refuses_delegations_in_director_targets(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready

    def delegate(t: Targets) -> None:
        t.delegations = Delegations(keys={}, roles={})

    env.craft_director(delegate)
    assert_refused(primary, errors.DelegationNotAllowedError, errors.ATTACK_INVALID_METADATA)


@pytest.mark.parametrize("vin", ["VIN-OTHER-CAR", None])
def test_refuses_empty_targets_for_another_vehicle(
    ready: tuple[Env, Primary, TargetFile], vin: str | None
) -> None:
    env, primary, _ = ready

    def retarget(t: Targets) -> None:
        t.targets = {}
        t.unrecognized_fields.pop("custom", None)
        if vin is not None:
            set_vehicle_id(t, vin)

    env.craft_director(retarget)
    assert_refused(primary, errors.VehicleIdMismatchError, errors.ATTACK_WRONG_VEHICLE)


@pytest.mark.parametrize(
    "name",
    [
        "../evil.wasm",
        "/etc/evil.wasm",
        "a/../../evil.wasm",
        "a//evil.wasm",
        "./evil.wasm",
    ],
)
def test_refuses_target_name_escaping_download_dir(
    ready: tuple[Env, Primary, TargetFile], name: str
) -> None:
    env, primary, target = ready
    env.craft_director(_replace_ecu_a(env.director_target(target, "ecu-a", path=name)))
    assert_refused(primary, errors.UnsafeTargetPathError, errors.ATTACK_ARBITRARY_SOFTWARE)
    assert not (primary.config.images_dir.parent / "evil.wasm").exists()


@pytest.mark.parametrize("name", ["my app.wasm", "@v1/~x.wasm", "_lead.wasm", "..%2Fevil.wasm"])
def test_accepts_every_tuf_target_name_and_stores_it_safely(env: Env, name: str) -> None:
    """Issue 10 item 11: names TUF accepts (spaces, %, @, ~, leading _) install, safely stored.

    ``image_repo`` publishes plain names only, so the target is signed in as
    another TUF repository would publish it.
    """
    data = wasm(7)
    target = TargetFile.from_data(name, data, ["sha256"])
    target.unrecognized_fields["custom"] = build_custom(hardware_ids=["hw-a"], release_counter=1)
    env.craft_image_role("targets", lambda t: t.targets.__setitem__(name, target))
    dirname, sep, basename = name.rpartition("/")
    blob = env.image_repo.targets_dir / f"{dirname}{sep}{target.hashes['sha256']}.{basename}"
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    env.assign(name, "ecu-a")
    primary = env.primary()
    result = primary.run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    path = result.updates["ecu-a"].image_path
    assert path.read_bytes() == data
    assert path.is_relative_to(primary.config.images_dir.resolve())
    assert not (primary.config.images_dir.parent / "evil.wasm").exists()
    assert isinstance(primary.distribute(result)["ecu-a"], EcuVersionReport)
    assert env.secondaries["ecu-a"].installed is not None
    assert primary.installed()["ecu-a"].filename == name


@pytest.mark.parametrize("custom", [None, "not an object", [1, 2]])
def test_refuses_image_target_with_malformed_custom(env: Env, custom: object) -> None:
    """Issue 10 item 11: a typed refusal naming an attack, not an AttributeError."""
    env.add_image("app.wasm", 1, ("hw-a",), counter=1)
    env.assign("app.wasm", "ecu-a")
    primary = env.primary()

    def break_custom(targets: Targets) -> None:
        fields = targets.targets["app.wasm"].unrecognized_fields
        fields.pop("custom")
        if custom is not None:
            fields["custom"] = custom

    env.craft_image_role("targets", break_custom)
    result = assert_refused(primary, errors.MetadataError, errors.ATTACK_INVALID_METADATA)
    assert result.stage == "match"


# --- freeze, rollback, mix-and-match (4.3.3) -------------------------------------


def test_refuses_expired_director_metadata(ready: tuple[Env, Primary, TargetFile]) -> None:
    _env, primary, _ = ready
    primary.clock = shifted(timedelta(days=11))  # Director metadata lives 10 days
    result = assert_refused(primary, tuf_exc.ExpiredMetadataError, errors.ATTACK_FREEZE)
    assert result.stage == "director"


def test_refuses_expired_image_metadata(ready: tuple[Env, Primary, TargetFile]) -> None:
    _env, primary, _ = ready
    primary.clock = shifted(timedelta(days=2))  # Image timestamp lives 1 day
    result = assert_refused(primary, tuf_exc.ExpiredMetadataError, errors.ATTACK_FREEZE)
    assert result.stage == "image"


def test_refuses_replayed_older_timestamp(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    old = env.director_file("timestamp.json")
    env.craft_director(lambda t: None)
    assert primary.run_cycle().ok
    env.servers.director.overrides[env.director_path("timestamp.json")] = old
    assert_refused(primary, tuf_exc.BadVersionNumberError, errors.ATTACK_ROLLBACK)


@pytest.mark.parametrize("role", ["snapshot", "targets"])
def test_refuses_replayed_older_snapshot_or_targets(
    ready: tuple[Env, Primary, TargetFile], role: str
) -> None:
    env, primary, _ = ready
    version = env.director_version()
    old = env.director_file(f"{version}.{role}.json")
    new = env.craft_director(lambda t: None)
    env.servers.director.overrides[env.director_path(f"{new}.{role}.json")] = old
    result = assert_refused(primary, tuf_exc.BadVersionNumberError, errors.ATTACK_ROLLBACK)
    assert not isinstance(result.error, errors.MixAndMatchError)


def test_refuses_snapshot_targets_version_mismatch(ready: tuple[Env, Primary, TargetFile]) -> None:
    """Timestamp and snapshot of state N served with targets of state N+1."""
    env, primary, _ = ready
    n = env.craft_director(lambda t: None)
    timestamp, snapshot = (
        env.director_file("timestamp.json"),
        env.director_file(f"{n}.snapshot.json"),
    )
    later = env.craft_director(lambda t: None)
    newer_targets = env.director_file(f"{later}.targets.json")
    overrides = env.servers.director.overrides
    overrides[env.director_path("timestamp.json")] = timestamp
    overrides[env.director_path(f"{n}.snapshot.json")] = snapshot
    overrides[env.director_path(f"{n}.targets.json")] = newer_targets
    assert_refused(primary, errors.MixAndMatchError, errors.ATTACK_MIX_AND_MATCH)


# --- endless data and slow retrieval (4.3.1, 4.3.2) --------------------------------


@pytest.mark.parametrize("server", ["director", "image"])
def test_refuses_oversized_metadata(ready: tuple[Env, Primary, TargetFile], server: str) -> None:
    env, primary, _ = ready
    if server == "director":
        env.servers.director.overrides[env.director_path("timestamp.json")] = endless()
    else:
        env.servers.image.overrides["/metadata/timestamp.json"] = endless()
    result = assert_refused(primary, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA)
    assert result.stage == server


@pytest.mark.parametrize("how", ["endless", "longer"])
def test_refuses_oversized_image(env: Env, how: str) -> None:
    target, data = env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    env.servers.image.overrides[env.image_path(target)] = (
        endless() if how == "endless" else data + b"\0" * 1000
    )
    primary = env.primary()
    result = assert_refused(primary, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA)
    assert result.stage == "download"
    assert not any(primary.config.images_dir.rglob("*"))


def test_refuses_image_larger_than_policy(env: Env) -> None:
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    primary = env.primary(download=DownloadPolicy(max_image_bytes=8))
    assert_refused(primary, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA)


def test_refuses_metadata_over_configured_limit(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, _, _ = ready
    primary = env.primary(metadata_limits=MetadataLimits(timestamp=100))
    assert_refused(primary, errors.EndlessDataError, errors.ATTACK_ENDLESS_DATA)


def test_detects_slow_retrieval_of_an_image(env: Env) -> None:
    target, data = env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    env.servers.image.overrides[env.image_path(target)] = trickle(data, piece=1, delay=0.05)
    primary = env.primary(
        download=DownloadPolicy(min_bytes_per_second=10_000, grace_seconds=0.2, socket_timeout=5)
    )
    assert_refused(primary, errors.SlowRetrievalError, errors.ATTACK_SLOW_RETRIEVAL)


def test_detects_stalled_metadata_download(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, _, _ = ready
    ts = env.director_file("timestamp.json")
    env.servers.director.overrides[env.director_path("timestamp.json")] = trickle(
        ts, piece=len(ts) // 2, delay=1.0
    )
    primary = env.primary(download=DownloadPolicy(socket_timeout=0.3))
    assert_refused(primary, errors.SlowRetrievalError, errors.ATTACK_SLOW_RETRIEVAL)


# --- DER forms for the secondaries (DESIGN 3) ----------------------------------------


def test_refuses_der_targets_that_differ_from_json(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    old = env.director_version()
    old_der = env.director_file(f"{old}.targets.der")
    new = env.craft_director(lambda t: None)
    env.servers.director.overrides[env.director_path(f"{new}.targets.der")] = old_der
    result = assert_refused(primary, errors.MetadataError, errors.ATTACK_INVALID_METADATA)
    assert result.stage == "der"


def test_refuses_der_root_not_signed_by_root_keys(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    from securesystemslib.signer import CryptoSigner

    from uptane import der_metadata

    root = Metadata.from_bytes(env.director_file("1.root.json"))
    forged = der_metadata.to_der_metadata(root, [CryptoSigner.generate_ed25519()])
    env.servers.director.overrides[env.director_path("1.root.der")] = forged
    # ``primary`` verified DER root v1 last cycle and does not fetch it again for
    # the same JSON root (it forwards what it verified): a new process fetches it
    assert primary.run_cycle().der.root_chain != (forged,)  # type: ignore[union-attr]
    result = assert_refused(env.primary(), tuf_exc.UnsignedMetadataError, None)
    assert result.stage == "der"


# --- manifests (5.4.2) ---------------------------------------------------------------


def test_reports_secondary_with_bad_signature(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    from securesystemslib.signer import CryptoSigner

    env.secondaries["ecu-b"].signer = CryptoSigner.generate_ed25519()
    result = primary.run_cycle()
    assert errors.ATTACK_SPOOFED_MESSAGE in result.attacks
    # the bad report stays out of the manifest; the Director records the rest of the
    # vehicle and names ecu-b "unreported"
    assert "ecu-b" not in result.reports
    assert result.manifest is not None and result.manifest.accepted
    assert result.ok  # verification itself was fine
    assert errors.ATTACK_SPOOFED_MESSAGE in next_report(primary).attacks_detected


def test_reports_replayed_secondary_report(ready: tuple[Env, Primary, TargetFile]) -> None:
    env, primary, _ = ready
    captured = env.secondaries["ecu-b"].version_report(b"old-nonce")
    env.secondaries["ecu-b"].tamper = lambda data: captured
    result = primary.run_cycle()
    assert errors.ATTACK_REPLAYED_REPORT in result.attacks
    assert errors.ATTACK_REPLAYED_REPORT in next_report(primary).attacks_detected


def test_attacks_reach_the_director_in_the_next_manifest(
    ready: tuple[Env, Primary, TargetFile],
) -> None:
    env, primary, _ = ready
    primary.clock = shifted(timedelta(days=11))
    assert not primary.run_cycle().ok
    primary.clock = utc_now
    assert primary.run_cycle().ok
    attacks = {(a.ecu_serial, a.attack) for a in env.director.vehicle_status(VIN).attacks}
    assert (PRIMARY, errors.ATTACK_FREEZE) in attacks
    assert primary.report_state().attacks == []  # delivered, then cleared


def test_partly_installed_bundle_reaches_the_director(env: Env) -> None:
    """One ECU of a two-ECU bundle installs, the other's link fails (4.3.3)."""
    env.add_image("a.wasm", 1, ("hw-a",), counter=1)
    env.add_image("b.wasm", 2, ("hw-b",), counter=1)
    env.assign("a.wasm", "ecu-a")
    env.assign("b.wasm", "ecu-b")
    primary = env.primary()
    result = primary.run_cycle()
    assert result.ok and set(result.updates) == {"ecu-a", "ecu-b"}
    env.secondaries["ecu-b"].fail_with = errors.TransportError("bus off")
    outcomes = primary.distribute(result)
    assert isinstance(outcomes["ecu-a"], EcuVersionReport)
    assert isinstance(outcomes["ecu-b"], errors.TransportError)
    env.secondaries["ecu-b"].fail_with = None
    again = primary.run_cycle()
    assert again.ok and again.manifest is not None and again.manifest.accepted
    attacks = {(a.ecu_serial, a.attack) for a in env.director.vehicle_status(VIN).attacks}
    assert (PRIMARY, errors.ATTACK_PARTIAL_BUNDLE) in attacks
    assert set(again.updates) == {"ecu-b"}  # the rest of the bundle is sent again


def test_refuses_target_outside_repository_map(env: Env) -> None:
    """Only targets the TAP 4 map sends to Director + Image may be installed."""
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    config = env.primary_config()
    narrow = RepositoryMap.from_dict(
        {
            "repositories": {
                "director": list(config.repository_map.director_urls),
                "image": list(config.repository_map.image_urls),
            },
            "mapping": [
                {"paths": ["apps/*"], "repositories": ["director", "image"], "threshold": 2}
            ],
        }
    )
    assert_refused(
        env.primary(repository_map=narrow),
        errors.TargetMismatchError,
        errors.ATTACK_ARBITRARY_SOFTWARE,
    )


def test_image_found_through_a_supplier_delegation(env: Env) -> None:
    """Director targets match Image targets that a supplier role signed (5.3.3)."""
    env.image_repo.delegate("supplier-a", paths=["apps/*"], hardware_ids=["hw-a"])
    target = env.image_repo.add_target(
        b"\0asm\x01\0\0\0",
        name="apps/a.wasm",
        hardware_ids=["hw-a"],
        release_counter=1,
        role="supplier-a",
    )
    env.assign("apps/a.wasm", "ecu-a")
    primary = env.primary()
    result = primary.run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    assert result.updates["ecu-a"].image_path.read_bytes() == b"\0asm\x01\0\0\0"
    assert (primary.state.current() / "image" / "supplier-a.json").is_file()
    assert target.path == "apps/a.wasm"


def test_refuses_supplier_image_for_hardware_outside_its_delegation(env: Env) -> None:
    """A compromised supplier key signs an image for hardware its delegation does not
    cover ("How to resolve delegations" step 4.1; 5.4.4.2 step 7). ngclient finds it
    by path alone; the primary must refuse it."""
    from helpers.uptane_env import wasm

    from uptane.metadata import build_custom

    env.image_repo.delegate("acme", paths=["acme/*"], hardware_ids=["hw-a"])
    env.image_repo.add_target(
        wasm(1), name="acme/ok.wasm", hardware_ids=["hw-a"], release_counter=1, role="acme"
    )
    env.assign("acme/ok.wasm", "ecu-a")
    primary = env.primary()
    assert primary.run_cycle().ok  # the supplier's own hardware: fine

    evil = wasm(666)
    with pytest.raises(errors.DelegationViolationError):  # the repository tool refuses it
        env.image_repo.add_target(
            evil, name="acme/x.wasm", hardware_ids=["hw-b"], release_counter=1, role="acme"
        )
    target = TargetFile.from_data("acme/x.wasm", evil, ["sha256", "sha512"])
    target.unrecognized_fields["custom"] = build_custom(hardware_ids=["hw-b"], release_counter=1)
    env.craft_image_role(
        "acme", lambda t: t.targets.update({target.path: target}), {target.path: evil}
    )
    # the Director (or anyone holding its online keys) sends it to the hw-b ECU
    env.craft_director(
        lambda t: t.targets.update({target.path: env.director_target(target, "ecu-b")})
    )

    result = assert_refused(
        primary, errors.DelegationViolationError, errors.ATTACK_ARBITRARY_SOFTWARE
    )
    assert result.stage == "match"
    assert "acme" in str(result.error) and "hw-b" in str(result.error)
    assert not list(primary.config.images_dir.rglob("x.wasm"))


def test_uses_the_next_mirror_when_one_cannot_be_reached(env: Env) -> None:
    env.add_image("app.wasm", 1, ("hw-a",))
    env.assign("app.wasm", "ecu-a")
    config = env.primary_config()
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{closed.getsockname()[1]}"
    mirrors = RepositoryMap.from_dict(
        {
            "repositories": {
                "director": [dead, *config.repository_map.director_urls],
                "image": [dead, *config.repository_map.image_urls],
            },
            "mapping": [{"paths": ["*"], "repositories": ["director", "image"], "threshold": 2}],
        }
    )
    result = env.primary(repository_map=mirrors).run_cycle()
    assert result.ok, [str(i) for i in result.issues]
    assert result.manifest is not None and result.manifest.accepted
    assert "ecu-a" in result.updates
