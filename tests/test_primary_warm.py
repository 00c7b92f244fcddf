"""Warm cycles (issue 16; Uptane 2.1, 5.4.4.2): when neither timestamp changed, a cycle
costs two timestamp checks and reuses what the last committed cycle verified, expiry
included; and the snapshot of a real repository may list ``root.json`` (issue 10, 9).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from helpers.primary_fixtures import servers_fixture, template_fixture  # noqa: F401  (fixtures)
from helpers.servers import Switchboard
from helpers.uptane_env import PRIMARY, Env, Servers
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import MetaFile, Snapshot, Targets, Timestamp

from ecus.primary import Primary
from image_repo.layout import CONFIG_FILE, RepoConfig
from uptane.repository import DirectoryStore, ExpiryPolicy, SigningRepository, utc_now


@pytest.fixture
def env(tmp_path: Path, template: Path, servers: Servers) -> Iterator[Env]:
    e = Env(tmp_path, template, servers)
    e.add_image("app.wasm", 1, ("hw-a",))
    e.assign("app.wasm", "ecu-a")
    yield e
    e.close()


def metadata_requests(switchboard: Switchboard) -> list[str]:
    return [p.rsplit("/", 1)[-1] for _, p in switchboard.requests if "/metadata/" in p]


def resign_image(env: Env, expiry: ExpiryPolicy, edit: str = Targets.type) -> None:
    """Re-sign Image ``edit`` (then snapshot and timestamp) with the repository's keys."""
    config = RepoConfig.from_bytes((env.image_repo.path / CONFIG_FILE).read_bytes(), "image")
    repo = SigningRepository(
        store=DirectoryStore(env.image_repo.metadata_dir), expiry=expiry, clock=env.clock
    )
    roles = (Targets.type, Snapshot.type, Timestamp.type)
    repo.add_signers(ref.signer() for name in roles for ref in config.roles[name])
    with repo.edit(edit):
        pass
    repo.publish(force=True)


def test_warm_cycle_checks_only_the_timestamps(env: Env) -> None:
    primary = env.primary()
    first = primary.run_cycle()
    assert first.ok, first.issues
    env.servers.director.requests.clear()
    env.servers.image.requests.clear()
    second = primary.run_cycle()
    assert second.ok, second.issues
    assert second.updates.keys() == first.updates.keys() == {"ecu-a"}
    assert second.der == first.der  # the verified DER forms, not fetched again
    assert metadata_requests(env.servers.director) == ["2.root.json", "timestamp.json"]
    assert metadata_requests(env.servers.image) == ["2.root.json", "timestamp.json"]
    # a new Director assignment: a new timestamp, so a full cycle again
    env.add_image("app-b.wasm", 2, ("hw-b",))
    env.assign("app-b.wasm", "ecu-b")
    env.servers.director.requests.clear()
    third = primary.run_cycle()
    assert third.ok, third.issues
    assert set(third.updates) == {"ecu-a", "ecu-b"}
    assert any(name.endswith(".targets.json") for name in metadata_requests(env.servers.director))


def test_warm_cycle_still_refuses_expired_targets(env: Env) -> None:
    """Freeze (4.3.3): targets expiring before the timestamp, the clock moved past it."""
    short = ExpiryPolicy(
        timestamp=timedelta(days=2), snapshot=timedelta(days=2), targets=timedelta(hours=1)
    )
    resign_image(env, short)
    offset = [timedelta(0)]
    primary = Primary(
        env.primary_config(), env.secondaries.values(), clock=lambda: utc_now() + offset[0]
    )
    assert primary.run_cycle().ok
    offset[0] = timedelta(hours=2)
    env.servers.image.requests.clear()
    result = primary.run_cycle()
    assert isinstance(result.error, tuf_exc.ExpiredMetadataError), result.issues
    assert "targets" in str(result.error) and result.stage == "image"
    assert metadata_requests(env.servers.image) == ["2.root.json", "timestamp.json"]


def test_snapshot_listing_root_is_accepted(env: Env) -> None:
    """TUF lets snapshot list top-level roles (sigstore's does): not a delegated role."""
    config = RepoConfig.from_bytes((env.image_repo.path / CONFIG_FILE).read_bytes(), "image")
    repo = SigningRepository(
        store=DirectoryStore(env.image_repo.metadata_dir),
        expiry=ExpiryPolicy(timestamp=timedelta(days=1), snapshot=timedelta(days=7)),
        clock=env.clock,
    )
    repo.add_signers(
        ref.signer() for name in (Snapshot.type, Timestamp.type) for ref in config.roles[name]
    )
    with repo.edit_snapshot() as snapshot:
        snapshot.meta["root.json"] = MetaFile(version=1)
    repo.do_timestamp(force=True)
    result = env.primary().run_cycle()
    assert result.ok, result.issues
    assert set(result.updates) == {"ecu-a"} and PRIMARY not in result.updates
