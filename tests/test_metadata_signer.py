"""Assignments in batches and metadata re-signed off the request path (issue 12).

Every vehicle's metadata is checked the way a primary checks it (Uptane 2.1,
5.4.4.2): ``uptane.verification.full.verify_repository`` (root chain,
signatures, versions, expiry), the Director-only checks
(``check_director_targets``) and the DER targets (``verify_director_der``).
SQLite and PostgreSQL (``db_url``: CI=true turns an unreachable PostgreSQL
into a failure).
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
from helpers.director_env import (
    Env,
    _serve_asgi,
    http_client,
)
from helpers.signer_env import fleet, signer_env, small_batches_fixture, verify_vehicle  # noqa: F401  (fixtures)
from sqlalchemy import select, update
from tuf.api.metadata import Metadata, Targets

from director.app import create_app
from director.db import Vehicle
from director.metadata_build import RoleSigners, _sign_der, named_versions
from director.metadata_signer import SIGNER_ENV, sign_stale_in_processes
from director.service import Director
from uptane import der_metadata
from uptane.verification.full import VerifiedRepository


def test_assignment_in_batches_gives_every_vehicle_verifiable_metadata(
    env: Env, small_batches: None
) -> None:
    records = fleet(env, "BAT", 23)
    vins = [r.vin for r in records]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins}
    infos = env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins)
    assert sorted(a.vin for a in infos) == sorted(vins)  # 4 batches of at most 7
    assert env.director.stale_count() == 0
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        assert repo.targets.version == before[vin] + 1
        assert repo.snapshot.version == repo.timestamp.snapshot_meta.version
        assert list(by_ecu) == [f"{vin}-B"]
        assert by_ecu[f"{vin}-B"].name == "brake-1.wasm"
    # a second image replaces the first, one version up, still verifiable
    env.director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins)
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        assert repo.targets.version == before[vin] + 2
        assert [t.name for t in by_ecu.values()] == ["brake-2.wasm"]


def test_batched_assignment_rows_are_the_ids_it_returns(env: Env, small_batches: None) -> None:
    """Each returned assignment id is the stored row of that ECU (PostgreSQL: the batch's
    rows inserted from arrays in one statement, ids matched back by ECU)."""
    from director.db import Assignment, Ecu
    from director.records import PENDING, SUPERSEDED

    records = fleet(env, "IDS", 17)
    vins = [r.vin for r in records]
    first = env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    infos = env.director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    assert env.director.sign_stale() == len(vins)
    with env.db.transaction() as session:
        rows = {
            aid: (serial, image, custom, status, created)
            for aid, serial, image, custom, status, created in session.execute(
                select(
                    Assignment.id,
                    Ecu.serial,
                    Assignment.image,
                    Assignment.custom,
                    Assignment.status,
                    Assignment.created_at,
                )
                .join(Ecu, Assignment.ecu_id == Ecu.id)
                .where(Assignment.id.in_([a.id for a in first + infos]))
            )
        }
    assert len(rows) == 2 * len(vins)
    for a in first:
        assert rows[a.id][:2] == (a.ecu_serial, "brake-1.wasm")
        assert rows[a.id][3] == SUPERSEDED
    for a in infos:
        serial, image, custom, status, created = rows[a.id]
        assert (serial, image, status) == (a.ecu_serial, "brake-2.wasm", PENDING)
        assert custom == a.custom and custom["ecu_serial"] == a.ecu_serial
        assert created == a.created_at
    for vin in vins:
        assert [t.name for t in verify_vehicle(env, vin)[1].values()] == ["brake-2.wasm"]


def test_a_refused_vehicle_refuses_the_batched_assignment_before_any_write(
    env: Env, small_batches: None
) -> None:
    records = fleet(env, "REF", 15)
    vins = [r.vin for r in records]
    last = records[-1]  # in the last batch: the earlier batches must not be written
    with env.db.transaction(write=True) as session:
        from director.db import Ecu

        session.execute(
            update(Ecu)
            .where(Ecu.serial == f"{last.vin}-B")
            .values(installed={"filename": "x", "length": 1, "hashes": {}, "release_counter": 9})
        )
    from director.errors import ReleaseCounterError

    with pytest.raises(ReleaseCounterError):
        env.director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins)
    for vin in vins[:3]:
        assert env.director.vehicle_status(vin).pending == ()


def test_a_vehicle_polling_mid_assignment_gets_valid_old_or_new_metadata(
    env: Env, small_batches: None
) -> None:
    records = fleet(env, "MID", 12)
    vins = [r.vin for r in records]
    old = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins}
    # rows written, nothing signed yet: every vehicle still gets its previous metadata
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    assert env.director.stale_count() >= len(vins)
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        assert (repo.targets.version, by_ecu) == (old[vin], {})
    # polls while the signer runs: each answer verifies, old or new
    seen: list[tuple[str, int]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def poll() -> None:
        try:
            while not stop.is_set():
                for vin in vins:
                    seen.append((vin, verify_vehicle(env, vin)[0].targets.version))
        except BaseException as e:  # reported below
            errors.append(e)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert env.director.sign_stale(vins_ids(env, vins), batch=2) == len(vins)
    finally:
        stop.set()
        poller.join()
    assert not errors, errors
    assert seen and all(v in (old[vin], old[vin] + 1) for vin, v in seen)
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        assert repo.targets.version == old[vin] + 1
        assert by_ecu[f"{vin}-B"].name == "brake-1.wasm"


def vins_ids(env: Env, vins: list[str]) -> list[int]:
    with env.db.transaction() as session:
        return list(session.scalars(select(Vehicle.id).where(Vehicle.vin.in_(vins))))


def test_a_stale_vehicle_due_for_expiry_is_signed_when_it_polls(env: Env) -> None:
    """The expiry refresh still runs for a stale vehicle: it never gets expired metadata."""
    records = fleet(env, "EXP", 2)
    vin = records[0].vin
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=[vin], sign=False)
    old = verify_vehicle(env, vin)[0]
    env.clock.offset += env.director.metadata_expiry  # the old files have expired
    try:
        r = env.http.get(f"/vehicles/{vin}/metadata/timestamp.json")
        assert r.status_code == 200
        with env.db.transaction() as session:
            stale = session.scalar(select(Vehicle.metadata_stale).where(Vehicle.vin == vin))
        assert stale is False  # signed on the spot, with the new assignment
    finally:
        env.clock.offset -= env.director.metadata_expiry
    repo, by_ecu = verify_vehicle(env, vin)
    assert repo.targets.version == old.targets.version + 1
    assert by_ecu[f"{vin}-B"].name == "brake-1.wasm"


def test_server_assignment_above_the_limit_is_signed_by_the_background_signer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = fleet(env, "BGS", 5)
    vins = [r.vin for r in records]
    assert env.director.wake_signer is None  # env's server runs no signer
    monkeypatch.setenv(SIGNER_ENV, "30")  # a round every 30 s, or when woken
    url, stop = _serve_asgi(create_app(env.director, env.config.token))
    op = http_client(url, env.config.token)
    try:
        assert env.director.wake_signer is not None  # this server's StaleSigner runs
        env.director.defer_signing_above = 2
        r = op.post(
            "/api/assignments",
            json={"image": "door-1.wasm", "hardware_id": "brake-ecu", "vins": vins},
        )
        # door-1 is not for brake ECUs: refused before anything is written
        assert r.status_code == 409, r.text
        r = op.post(
            "/api/assignments",
            json={"image": "brake-1.wasm", "hardware_id": "brake-ecu", "vins": vins},
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 20  # woken: well before the 30 s round
        while env.director.stale_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert env.director.stale_count() == 0
    finally:
        op.close()
        stop()
    assert env.director.wake_signer is None and env.director.defer_signing_above is None
    for vin in vins:
        assert verify_vehicle(env, vin)[1][f"{vin}-B"].name == "brake-1.wasm"


def _resigned_one_up(env: Env, vin: str, first: VerifiedRepository) -> None:
    """Re-signed as due (its ``targets_version`` set to 0): every role one version up."""
    env.director.refresh_expiring()
    repo = verify_vehicle(env, vin)[0]
    assert repo.targets.version == first.targets.version + 1
    assert repo.snapshot.version == first.snapshot.version + 1
    assert repo.timestamp.version == first.timestamp.version + 1


def test_signing_goes_above_every_stored_version(env: Env) -> None:
    """Versions strictly increase even when the stored files are ahead of the vehicle row."""
    vin = fleet(env, "VER", 1)[0].vin
    first = verify_vehicle(env, vin)[0]
    with env.db.transaction(write=True) as session:
        session.execute(update(Vehicle).where(Vehicle.vin == vin).values(targets_version=0))
    _resigned_one_up(env, vin, first)


def test_named_versions_take_the_highest_versioned_copy_per_role() -> None:
    names = {
        "3.targets.json",
        "4.targets.json",
        "9.targets.der",  # DER copies mirror the JSON ones: not read
        "targets.json",  # an unversioned copy an older Director stored: not read
        "2.snapshot.json",
        "07.snapshot.json",  # not a version name
        "5.root.json",
        "timestamp.json",
    }
    assert named_versions(names) == {"targets": 4, "snapshot": 2}
    assert named_versions({"targets.json"}) == {}


def test_direct_der_is_what_to_der_metadata_gives(env: Env) -> None:
    vin = fleet(env, "DER", 1)[0].vin
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=[vin])
    targets = Metadata[Targets].from_bytes(
        env.http.get(f"/vehicles/{vin}/metadata/targets.json").content
    )
    with env.db.transaction() as session:
        signers: RoleSigners = env.director._role_signers(session)
    assert _sign_der(targets.signed, signers.targets) == der_metadata.to_der_metadata(
        targets, signers.targets
    )
    assert env.http.get(f"/vehicles/{vin}/metadata/targets.der").content == _sign_der(
        targets.signed, signers.targets
    )


def _sign_in_child(config_dir: str, db_url: str, results: mp.Queue[int]) -> None:
    from director.config import DirectorConfig

    config = DirectorConfig.load(config_dir)
    config.db_url = db_url
    director = Director.from_config(config, migrate=False)
    try:
        results.put(director.sign_stale(batch=5))
    finally:
        director.close()


def test_two_signer_processes_never_sign_a_vehicle_twice(env: Env) -> None:
    """Two processes claim batches at once: each stale vehicle is signed exactly once."""
    records = fleet(env, "TWO", 120)
    vins = [r.vin for r in records]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins[:10]}
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    with env.db.transaction() as session:
        stale = session.scalar(select(Vehicle.id).where(Vehicle.metadata_stale.is_(True)).limit(1))
    assert stale is not None
    total_stale = env.director.stale_count()
    ctx = mp.get_context("spawn")
    results: mp.Queue[int] = ctx.Queue()
    procs = [
        ctx.Process(target=_sign_in_child, args=(str(env.tmp / "dir"), env.config.db_url, results))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    counts = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sum(counts) == total_stale  # no vehicle signed by both, none left out
    assert env.director.stale_count() == 0
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        if vin in before:
            assert repo.targets.version == before[vin] + 1
        assert by_ecu[f"{vin}-B"].name == "brake-1.wasm"
    assert sign_stale_in_processes(env.config, 2) == 0  # nothing stale, nothing signed


def test_sign_stale_command_signs_what_an_assignment_left(env: Env) -> None:
    """``uptane director sign-stale --workers 2``: the CLI's process pool (one on SQLite)."""
    from click.testing import CliRunner

    from uptane.cli import cli as uptane_cli

    vins = [r.vin for r in fleet(env, "CLI", 9)]
    env.director.assign("brake-2.wasm", hardware_id="brake-ecu", vins=vins, sign=False)
    assert all(verify_vehicle(env, vin)[1] == {} for vin in vins)  # old metadata meanwhile
    stale = env.director.stale_count()
    result = CliRunner().invoke(
        uptane_cli,
        [
            "director",
            "sign-stale",
            "--dir",
            str(env.config.directory),
            "--db",
            env.config.db_url,
            "--workers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"re-signed {stale} vehicles"
    assert env.director.stale_count() == 0
    for vin in vins:
        assert verify_vehicle(env, vin)[1][f"{vin}-B"].name == "brake-2.wasm"


def test_assign_command_with_signer_processes(env: Env) -> None:
    """``uptane director assign --hardware-id HW --workers 2``: every vehicle signed once
    by the signer processes (in this process on SQLite), none left stale."""
    from click.testing import CliRunner

    from uptane.cli import cli as uptane_cli

    vins = [r.vin for r in fleet(env, "ACLI", 7)]
    before = {vin: verify_vehicle(env, vin)[0].targets.version for vin in vins}
    args = ["director", "assign", "--dir", str(env.config.directory), "--db", env.config.db_url]
    vin_args = [a for vin in vins for a in ("--vin", vin)]
    result = CliRunner().invoke(
        uptane_cli,
        [*args, "brake-1.wasm", "--hardware-id", "brake-ecu", *vin_args, "--workers", "2"],
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"re-signed {len(vins)} vehicles with 2 signer processes"
    )
    assert env.director.stale_count() == 0
    for vin in vins:
        repo, by_ecu = verify_vehicle(env, vin)
        assert repo.targets.version == before[vin] + 1  # signed exactly once
        assert by_ecu[f"{vin}-B"].name == "brake-1.wasm"
