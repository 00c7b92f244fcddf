"""The Director of the signing tests (issue 12): its server without the background
signer, a fleet of two-ECU vehicles, and what a vehicle's primary would accept.

Used by ``tests/test_metadata_signer.py`` and ``tests/test_signer_follow.py``: each
imports the fixtures ``env`` and ``small_batches`` (module-scoped Director per module).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Snapshot, Timestamp

from director.metadata_signer import SIGNER_ENV
from director.service import EcuSpec, VehicleRecord
from helpers.director_env import Env, ImageRepoSim, running_env
from uptane.metadata import UptaneTarget
from uptane.verification.der import verify_director_der
from uptane.verification.director_checks import check_director_targets
from uptane.verification.full import RepositoryBytes, VerifiedRepository, verify_repository


@pytest.fixture(scope="module", name="env")
def signer_env(
    db_url: str, image_repo: ImageRepoSim, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Env]:
    """``test_director``'s Director and server, without the server's background signer
    (these tests decide when stale vehicles are signed)."""
    tmp = tmp_path_factory.mktemp("director")
    with running_env(db_url, image_repo, tmp, app_env={SIGNER_ENV: "0"}) as running:
        yield running


def fleet(env: Env, prefix: str, n: int) -> list[VehicleRecord]:
    keys = [CryptoSigner.generate_ed25519().public_key for _ in range(2)]
    tag = f"{prefix}{env.db.engine.dialect.name[:2].upper()}{time.monotonic_ns() % 10**6:06d}"
    records = [
        VehicleRecord(
            f"{tag}{i:04d}",
            (
                EcuSpec(f"{tag}{i:04d}-P", "gateway", keys[0], primary=True),
                EcuSpec(f"{tag}{i:04d}-B", "brake-ecu", keys[1]),
            ),
        )
        for i in range(n)
    ]
    result = env.director.import_vehicles(records, batch=16)
    assert result.added == n
    return records


def verify_vehicle(env: Env, vin: str) -> tuple[VerifiedRepository, dict[str, UptaneTarget]]:
    """What ``vin``'s primary would accept from the Director now (5.4.4.2), or it raises."""
    base = f"/vehicles/{vin}/metadata"
    chain: list[bytes] = []
    ders: dict[int, bytes] = {}
    version = 1
    while (r := env.http.get(f"{base}/{version}.root.json")).status_code == 200:
        chain.append(r.content)
        ders[version] = env.http.get(f"{base}/{version}.root.der").content
        version += 1
    # as ngclient fetches (consistent snapshots): the versions the index names, so a
    # signing committed between two requests leaves a consistent older set
    timestamp = env.http.get(f"{base}/timestamp.json").content
    snapshot_version = Metadata[Timestamp].from_bytes(timestamp).signed.snapshot_meta.version
    snapshot = env.http.get(f"{base}/{snapshot_version}.snapshot.json").content
    targets_version = Metadata[Snapshot].from_bytes(snapshot).signed.meta["targets.json"].version
    targets = env.http.get(f"{base}/{targets_version}.targets.json").content
    repo = verify_repository(
        "director", RepositoryBytes(tuple(chain), timestamp, snapshot, targets), datetime.now(UTC)
    )
    der = env.http.get(f"{base}/{repo.targets.version}.targets.der").content
    verify_director_der(repo, ders, der)
    ecus = {f"{vin}-P": "gateway", f"{vin}-B": "brake-ecu"}
    checked = check_director_targets(repo.targets, vin=vin, ecu_hardware_ids=ecus)
    return repo, dict(checked.by_ecu)


@pytest.fixture(name="small_batches")
def small_batches_fixture(env: Env) -> Iterator[None]:
    env.director.assign_batch, env.director.sign_batch = 7, 4
    yield
    del env.director.assign_batch, env.director.sign_batch
