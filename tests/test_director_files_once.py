"""Each vehicle metadata file stored once (issue 12, migration 0008).

The Director stores ``N.targets.json``, ``N.targets.der``, ``N.snapshot.json``
and ``timestamp.json``; ``targets.json``, ``targets.der`` and
``snapshot.json`` are served as the highest stored version, byte for byte
(and so with the same ETag) as the copies an older Director stored. The
migration turns an old database into this layout; downgrading puts the
copies back. SQLite and PostgreSQL (CI=true makes PostgreSQL mandatory).
"""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config
from helpers.director_env import Env
from helpers.signer_env import fleet, signer_env, verify_vehicle  # noqa: F401  (fixtures)
from sqlalchemy import delete, select, update

from director.db import MIGRATIONS_DIR, MetadataFile, Vehicle
from director.errors import NotFoundError
from director.read_cache import load_vehicle_file
from director.store import ALIASES, DBMetadataStore
from ecus.sim.compromise import director_resign

ALL_NAMES = ("timestamp.json", "snapshot.json", "targets.json", "targets.der")


def _names(env: Env, vin: str) -> set[str]:
    with env.db.transaction() as session:
        return set(
            session.scalars(
                select(MetadataFile.filename)
                .join(Vehicle, Vehicle.id == MetadataFile.vehicle_id)
                .where(Vehicle.vin == vin)
            )
        )


def _versioned(env: Env, vin: str) -> dict[str, str]:
    """The versioned name each alias stands for now (from the timestamp and snapshot)."""
    repo = verify_vehicle(env, vin)[0]
    return {
        "targets.json": f"{repo.targets.version}.targets.json",
        "targets.der": f"{repo.targets.version}.targets.der",
        "snapshot.json": f"{repo.snapshot.version}.snapshot.json",
    }


def _served(env: Env, vin: str) -> dict[str, bytes]:
    """Every file of ``vin`` the Director serves, read the three ways it can be."""
    out: dict[str, bytes] = {}
    names = [*ALL_NAMES, *_versioned(env, vin).values()]
    for name in names:
        data = env.director.metadata(vin, name)
        assert load_vehicle_file(env.director, vin, name).data == data
        out[name] = data
    return out


def _migrate(env: Env, revision: str, *, down: bool = False) -> None:
    """Alembic to ``revision``, as ``Database.migrate`` runs it (its connection)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    with env.db.engine.connect() as conn:
        conn = conn.execution_options(director_write=True)
        with conn.begin():
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, revision)


def test_each_file_is_stored_once_and_aliases_serve_the_latest(env: Env) -> None:
    """No unversioned copies are stored; ``targets.json`` & co. are the highest version,
    over HTTP with the same bytes and ETag as the versioned name."""
    vin = fleet(env, "ONCE", 1)[0].vin
    for image in ("brake-1.wasm", "brake-2.wasm"):
        env.director.assign(image, hardware_id="brake-ecu", vins=[vin])
    names = _names(env, vin)
    assert not names & ALIASES
    versioned = _versioned(env, vin)
    assert set(versioned.values()) <= names
    # the previous targets and snapshot are kept, nothing older
    assert len(names) == 7, names
    for alias, name in versioned.items():
        plain = env.http.get(f"/vehicles/{vin}/metadata/{alias}")
        by_version = env.http.get(f"/vehicles/{vin}/metadata/{name}")
        assert plain.status_code == by_version.status_code == 200
        assert plain.content == by_version.content
        assert plain.headers["etag"] == by_version.headers["etag"]
        again = env.http.get(
            f"/vehicles/{vin}/metadata/{alias}", headers={"If-None-Match": plain.headers["etag"]}
        )
        assert again.status_code == 304


def test_alias_takes_the_highest_version_not_the_last_name(env: Env) -> None:
    """Versions 9 and 10 stored together: ``targets.json`` is 10 (not "9" > "10")."""
    vin = fleet(env, "TEN", 1)[0].vin
    while (version := director_resign(env.director, vin)) < 10:
        pass
    assert version == 10
    names = _names(env, vin)
    assert {"9.targets.json", "10.targets.json", "9.targets.der", "10.targets.der"} <= names
    assert env.director.metadata(vin, "targets.json") == env.director.metadata(
        vin, "10.targets.json"
    )
    assert env.director.metadata(vin, "targets.der") == env.director.metadata(vin, "10.targets.der")
    assert env.http.get(f"/vehicles/{vin}/metadata/targets.json").content == (
        env.http.get(f"/vehicles/{vin}/metadata/10.targets.json").content
    )
    with env.db.transaction() as session:
        vid = session.scalars(select(Vehicle.id).where(Vehicle.vin == vin)).one()
        store = DBMetadataStore(session, vid, env.clock())
        assert store.read("snapshot.json") == store.read("10.snapshot.json")
        # writing an alias stores nothing, and only the copy of the latest is accepted
        store.write("targets.json", store.read("10.targets.json") or b"")
        with pytest.raises(RuntimeError, match="not a copy"):
            store.write("targets.json", store.read("9.targets.json") or b"")


def test_a_vehicle_without_files_has_no_aliases(env: Env) -> None:
    vin = fleet(env, "NONE", 1)[0].vin
    with env.db.transaction(write=True) as session:
        vid = session.scalars(select(Vehicle.id).where(Vehicle.vin == vin)).one()
        session.execute(
            delete(MetadataFile).where(
                MetadataFile.vehicle_id == vid, MetadataFile.filename != "timestamp.json"
            )
        )
    for alias in sorted(ALIASES):
        with pytest.raises(NotFoundError):
            env.director.metadata(vin, alias)
        assert env.http.get(f"/vehicles/{vin}/metadata/{alias}").status_code == 404


def test_migration_turns_an_old_layout_into_files_once_and_back(env: Env) -> None:
    """0008 down then up: the copies come back (the old layout) and go again; every
    name serves the same bytes throughout. A vehicle stored before versioned copies
    were kept gets them from its files' content; one whose file cannot be read is
    marked to be signed again."""
    vins = [r.vin for r in fleet(env, "MIG", 4)]
    env.director.assign("brake-1.wasm", hardware_id="brake-ecu", vins=vins)
    served = {vin: _served(env, vin) for vin in vins}
    _migrate(env, "0007", down=True)
    for vin in vins:  # the old layout: each alias a copy of its versioned file
        names = _names(env, vin)
        assert names >= ALIASES
        assert set(_versioned(env, vin).values()) <= names
    legacy, unreadable = vins[0], vins[1]
    legacy_first = verify_vehicle(env, legacy)[0]
    with env.db.transaction(write=True) as session:
        ids = {
            v: i
            for v, i in session.execute(
                select(Vehicle.vin, Vehicle.id).where(Vehicle.vin.in_(vins))
            )
        }
        # as stored before versioned copies were kept: only the unversioned files
        session.execute(
            delete(MetadataFile).where(
                MetadataFile.vehicle_id == ids[legacy],
                MetadataFile.filename.like("%.targets.%")
                | MetadataFile.filename.like("%.snapshot.json"),
            )
        )
        session.execute(
            update(MetadataFile)
            .where(
                MetadataFile.vehicle_id == ids[unreadable],
                MetadataFile.filename == "targets.json",
            )
            .values(data=b"not metadata")
        )
    _migrate(env, "head")
    for vin in vins:
        assert not _names(env, vin) & ALIASES
    for vin in vins[2:]:
        assert _served(env, vin) == served[vin]
    # the legacy vehicle: its files under their versions, served as before
    assert _served(env, legacy) == served[legacy]
    assert legacy_first.targets.version == verify_vehicle(env, legacy)[0].targets.version
    # the unreadable one: due for signing, and signed one version up when asked
    with env.db.transaction() as session:
        assert session.scalar(select(Vehicle.targets_version).where(Vehicle.vin == unreadable)) == 0
    before = verify_vehicle(env, vins[2])[0].targets.version
    env.director.metadata(unreadable, "timestamp.json")  # signs (and evicts what is cached)
    repo = verify_vehicle(env, unreadable)[0]
    assert repo.targets.version == before + 1
