"""Files the Director writes: modes whatever the umask, and the operator token
is not printed by ``init`` unless asked (issue 12, smaller findings)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from director.db import Database
from director.setup import init_director
from uptane.cli import cli as uptane_cli


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _writable_by_others(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def test_modes_whatever_the_umask(tmp_path: Path, open_umask: None) -> None:
    config = init_director(tmp_path / "d")
    db = Database(config.db_url)
    try:
        db.migrate()
    finally:
        db.dispose()
    database = tmp_path / "d" / "director.db"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.keys_dir.stat().st_mode) == 0o700
    for path in (config.directory, config.root_dir, *config.root_dir.iterdir()):
        assert not _writable_by_others(path), path
    for path in config.keys_dir.glob("*.pem"):
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    for extra in tmp_path.glob("d/director.db-*"):  # WAL and shared memory: as the database
        assert not _writable_by_others(extra), extra


def test_existing_database_loses_group_and_world_write(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "director.db"
    path.touch(0o666)
    os.chmod(path, 0o666)
    Database(f"sqlite:///{path}").dispose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_init_prints_the_token_only_when_asked(tmp_path: Path) -> None:
    result = CliRunner().invoke(uptane_cli, ["director", "init", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    token = json.loads((tmp_path / "a" / "director.json").read_text())["token"]
    assert token not in result.output
    assert "--show-token" in result.output
    result = CliRunner().invoke(
        uptane_cli, ["director", "init", str(tmp_path / "b"), "--show-token"]
    )
    assert result.exit_code == 0, result.output
    token = json.loads((tmp_path / "b" / "director.json").read_text())["token"]
    assert f"operator token: {token}" in result.output
