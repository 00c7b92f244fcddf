"""Signed delta targets in the Image repository (docs/deltas.md; Uptane 2.1, 5.3.3)."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path

import detools
import pytest
from click.testing import CliRunner, Result
from helpers.delta_images import release
from tuf.api.metadata import Metadata, Targets

from image_repo.delta import add_delta, add_delta_from, find_release, releases
from image_repo.repo import ImageRepository
from uptane.cli import cli as uptane_cli
from uptane.delta import DeltaInfo, delta_name
from uptane.errors import MetadataError, RepositoryEditError, UnsafeTargetPathError

NAME = "apps/blink.wasm"
HW = "brake-ecu"


@pytest.fixture
def repo(tmp_path: Path) -> ImageRepository:
    return ImageRepository.init(tmp_path / "repo", root_threshold=1, targets_threshold=1)


def publish(repo: ImageRepository, version: int) -> None:
    repo.add_target(release(version), name=NAME, hardware_ids=[HW], release_counter=version)


def test_delta_target_names_base_and_result_and_reproduces_the_image(
    repo: ImageRepository,
) -> None:
    publish(repo, 1)
    v1 = repo.targets()[NAME][1]
    publish(repo, 2)
    delta = add_delta_from(repo, NAME, None)
    assert delta is not None
    v2 = repo.targets()[NAME][1]
    assert delta.path == delta_name(NAME, v1.hashes["sha256"])
    info = DeltaInfo.from_target_file(delta)
    assert info is not None
    assert info.base.equals(NAME, v1.length, v1.hashes)
    assert info.result.equals(NAME, v2.length, v2.hashes)
    assert delta.length < v2.length // 5
    # signed like any target: it is in targets.json, its bytes are stored under its hashes
    published = Metadata[Targets].from_bytes((repo.metadata_dir / "targets.json").read_bytes())
    assert published.signed.targets[delta.path] == delta
    patch = repo.blob_path(delta).read_bytes()
    out = io.BytesIO()
    detools.apply_patch(io.BytesIO(release(1)), io.BytesIO(patch), out)
    assert out.getvalue() == release(2)
    assert repo.status().role("targets").signed


def test_delta_from_an_explicit_release(repo: ImageRepository) -> None:
    publish(repo, 1)
    publish(repo, 2)
    assert [t.custom["release_counter"] for t in releases(repo, NAME)] == [1, 2]
    base = find_release(repo, NAME, 1)
    delta = add_delta(repo, NAME, base)
    assert delta is not None
    with pytest.raises(RepositoryEditError, match="no published release 7"):
        find_release(repo, NAME, 7)


def test_refusals_leave_the_repository_unchanged(repo: ImageRepository) -> None:
    publish(repo, 1)
    before = (repo.metadata_dir / "targets.json").read_bytes()
    with pytest.raises(RepositoryEditError, match="no earlier release"):
        add_delta_from(repo, NAME, None)
    with pytest.raises(RepositoryEditError, match="the image itself"):
        add_delta(repo, NAME, find_release(repo, NAME, 1))
    with pytest.raises(RepositoryEditError, match="NAME@RELEASE_COUNTER"):
        add_delta_from(repo, NAME, "blink")
    assert (repo.metadata_dir / "targets.json").read_bytes() == before


def test_malformed_delta_metadata_is_refused() -> None:
    good = {
        "format": "detools-sequential-heatshrink",
        "base": {"name": NAME, "length": 3, "hashes": {"sha256": "ab" * 32}},
        "result": {"name": NAME, "length": 4, "hashes": {"sha256": "cd" * 32}},
    }
    assert DeltaInfo.from_dict(good).result.length == 4
    for bad in (
        {**good, "format": "bsdiff4"},
        {**good, "base": {**good["base"], "length": -1}},
        {**good, "result": {**good["result"], "hashes": {}}},
        {**good, "result": {**good["result"], "hashes": {"sha256": "zz"}}},
        {**good, "base": {**good["base"], "name": "../x"}},
    ):
        with pytest.raises((MetadataError, UnsafeTargetPathError)):
            DeltaInfo.from_dict(bad)


Run = Callable[..., Result]


def test_cli_publishes_a_delta(tmp_path: Path) -> None:
    runner = CliRunner()

    def run(*args: object) -> Result:
        return runner.invoke(uptane_cli, ["image-repo", *map(str, args)])

    d = tmp_path / "repo"
    assert run("init", d, "--root-threshold", 1, "--targets-threshold", 1).exit_code == 0
    for v in (1, 2):
        (tmp_path / f"v{v}.wasm").write_bytes(release(v))
    common = ("--hardware-id", HW, "--name", NAME)
    grants = ("--capability", "log", "--capability", "health", "--capability", "actuator.write")
    v1_args = (*common, *grants)
    v2_args = (*common, *grants, "--capability", "sensor.read")
    assert run("add", d, tmp_path / "v1.wasm", *v1_args, "--release-counter", 1).exit_code == 0
    r = run(
        "add",
        d,
        tmp_path / "v2.wasm",
        *v2_args,
        "--release-counter",
        2,
        "--delta-from",
        f"{NAME}@1",
    )
    assert r.exit_code == 0, r.output
    assert "added delta apps/blink.wasm.delta-" in r.output
    r = run("add", d, tmp_path / "v2.wasm", *v2_args, "--release-counter", 3, "--delta-from", "x")
    assert r.exit_code == 1
    assert r.output.startswith("Error: --delta-from")
    assert "Traceback" not in r.output
    # --delta: from the previous release of the same name (release 2's bytes)
    r = run("add", d, tmp_path / "v1.wasm", *v1_args, "--release-counter", 3, "--delta")
    assert r.exit_code == 0, r.output
    names = {t.name for t in ImageRepository(d).status().targets}
    v2_sha256 = hashlib.sha256(release(2)).hexdigest()
    assert delta_name(NAME, v2_sha256) in names
