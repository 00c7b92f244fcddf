"""``uptane director`` CLI: init, register, assign, list, rotate, serve (SQLite)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from helpers.director_env import (
    ImageRepoSim,
    _serve_asgi,
    _serve_static,
    http_client,
    new_car,
)
from tuf.api.metadata import Metadata, Root
from tuf.ngclient import Updater

from director.app import create_app
from director.cli_common import is_loopback
from director.config import DirectorConfig
from director.service import Director, EcuSpec
from uptane.cli import cli as uptane_cli
from uptane.keys import public_key_dict


@pytest.fixture(scope="module")
def image_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageRepoSim]:
    sim = ImageRepoSim(tmp_path_factory.mktemp("image"))
    sim.add("brake-1.wasm", ["brake-ecu"], 1)
    sim.url, stop = _serve_static(sim.directory)
    yield sim
    stop()


def run(*args: str) -> str:
    result = CliRunner().invoke(uptane_cli, ["director", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def init(tmp_path: Path, image_repo: ImageRepoSim) -> Path:
    root = tmp_path / "image-root.json"
    root.write_bytes(image_repo.root_bytes)
    d = tmp_path / "director"
    run("init", str(d), "--image-repo-url", image_repo.url, "--image-repo-root", str(root))
    return d


def test_init_writes_keys_root_and_a_private_config(
    tmp_path: Path, image_repo: ImageRepoSim
) -> None:
    d = init(tmp_path, image_repo)
    config = DirectorConfig.load(d)
    assert (d / "director.json").stat().st_mode & 0o077 == 0  # holds the operator token
    assert len(config.token) >= 32
    assert config.db_url.startswith("sqlite:///") and config.host == "127.0.0.1"
    for role in ("root-1", "targets-1", "snapshot-1", "timestamp-1"):
        assert (d / "keys" / f"{role}.pem").stat().st_mode & 0o077 == 0
    root = Metadata[Root].from_bytes((d / "root" / "1.root.json").read_bytes())
    root.signed.verify_delegate("root", root.signed_bytes, root.signatures)
    for role in ("targets", "snapshot", "timestamp"):
        assert root.signed.roles[role].keyids == [config.online_keys[role][0].keyid]
    assert (d / "root" / "1.root.der").exists()
    assert (d / "image_root.json").read_bytes() == image_repo.root_bytes
    result = CliRunner().invoke(uptane_cli, ["director", "init", str(d)])
    assert result.exit_code == 1 and "refusing to overwrite" in result.output


def test_register_assign_list(tmp_path: Path, image_repo: ImageRepoSim) -> None:
    d = init(tmp_path, image_repo)
    car = new_car()
    ecu_args = []
    for ecu in car.ecus.values():
        keyfile = tmp_path / f"{ecu.serial}.pub.json"
        keyfile.write_text(json.dumps(public_key_dict(ecu.signer.public_key)))
        ecu_args += ["--ecu", f"{ecu.serial},{ecu.hardware_id},{keyfile}"]
    out = run(
        "register", "--dir", str(d), "--vin", car.vin, *ecu_args, "--primary", car.primary.serial
    )
    assert f"registered {car.vin} with 3 ECUs" in out
    brake = f"{car.vin}-S0"
    out = run("assign", str(d), "brake-1.wasm", "--ecu", brake)  # DIR first, like image-repo
    assert f"{car.vin} {brake}: brake-1.wasm" in out
    [v] = json.loads(run("list", "--dir", str(d), "--json"))
    assert v["vin"] == car.vin
    assert [(p["ecu_serial"], p["image"]) for p in v["pending"]] == [(brake, "brake-1.wasm")]
    assert v["metadata_version"] == 2
    table = run("list", str(d))
    assert car.vin in table and "brake-1.wasm" in table
    result = CliRunner().invoke(
        uptane_cli, ["director", "assign", "--dir", str(d), "nope.wasm", "--ecu", brake]
    )
    assert result.exit_code == 1 and "does not list" in result.output


def test_rotating_an_online_key(tmp_path: Path, image_repo: ImageRepoSim) -> None:
    d = init(tmp_path, image_repo)
    config = DirectorConfig.load(d)
    old = Director.from_config(config)
    url, stop = _serve_asgi(create_app(old, config.token))
    try:
        op = http_client(url, config.token)
        car = new_car()
        assert op.post("/api/vehicles", json=car.body()).status_code == 201
        old_targets_key = config.online_keys["targets"][0].keyid

        out = run("rotate", "--dir", str(d), "targets")
        assert "root v2" in out and "re-signed 1 vehicles" in out
        new_config = DirectorConfig.load(d)
        assert new_config.online_keys["targets"][0].keyid != old_targets_key

        # a process still holding the old key refuses to sign instead of signing wrongly
        r = op.post("/api/vehicles", json=new_car().body())
        assert (r.status_code, r.json()["error"]) == (503, "not_initialised")

        # a vehicle that trusts root v1 follows the chain and sees the new key's targets
        md_dir = tmp_path / "client"
        md_dir.mkdir()
        updater = Updater(
            str(md_dir),
            f"{url}/vehicles/{car.vin}/metadata/",
            bootstrap=(d / "root" / "1.root.json").read_bytes(),
        )
        updater.refresh()
        trusted = updater._trusted_set
        assert trusted.root.version == 2
        assert trusted.root.roles["targets"].keyids == [new_config.online_keys["targets"][0].keyid]
        assert trusted.targets.version == 2
        op.close()
    finally:
        stop()
        old.close()
    fresh = Director.from_config(DirectorConfig.load(d))
    try:
        assert fresh.root_version() == 2
        car2 = new_car()  # a process started with the new keys signs again
        fresh.register_vehicle(
            car2.vin,
            [
                EcuSpec(e.serial, e.hardware_id, e.signer.public_key, e.primary)
                for e in car2.ecus.values()
            ],
        )
    finally:
        fresh.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("bind", [[], ["--host", "0.0.0.0", "--insecure-plain-http"]])
def test_serve_creates_and_migrates_its_database(
    tmp_path: Path, image_repo: ImageRepoSim, bind: list[str]
) -> None:
    d = init(tmp_path, image_repo)
    assert not (d / "director.db").exists()
    port = _free_port()
    uptane = Path(sys.executable).parent / "uptane"
    proc = subprocess.Popen(
        [str(uptane), "director", "serve", "--dir", str(d), "--port", str(port), *bind],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["info"]["title"]
        assert (d / "director.db").exists()
        assert httpx.get(f"http://127.0.0.1:{port}/root/1.root.json").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/api/vehicles").status_code == 401
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rotating_the_root_key(tmp_path: Path, image_repo: ImageRepoSim) -> None:
    d = init(tmp_path, image_repo)
    old_root = DirectorConfig.load(d).root_keys[0].keyid
    assert "root v2" in run("rotate", "--dir", str(d), "root")
    config = DirectorConfig.load(d)
    assert config.root_keys[0].keyid != old_root
    v1 = Metadata[Root].from_bytes((d / "root" / "1.root.json").read_bytes()).signed
    v2 = Metadata[Root].from_bytes((d / "root" / "2.root.json").read_bytes())
    v1.verify_delegate("root", v2.signed_bytes, v2.signatures)  # old keys vouch for the new
    v2.signed.verify_delegate("root", v2.signed_bytes, v2.signatures)
    director = Director.from_config(config)  # imports v2 after checking both signatures
    try:
        assert director.root_version() == 2
        assert director.root_file("2.root.der")
    finally:
        director.close()


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1"])
def test_plain_http_on_the_network_is_refused_without_asking(
    tmp_path: Path, image_repo: ImageRepoSim, host: str
) -> None:
    """Plain HTTP serves any vehicle's metadata to anyone: loopback only unless asked."""
    d = init(tmp_path, image_repo)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as taken:
        # held: without the refusal the command fails to listen instead of serving forever
        if host != "192.0.2.1":
            taken.bind((host, 0))
        port = taken.getsockname()[1] if host != "192.0.2.1" else 8080
        result = CliRunner().invoke(
            uptane_cli, ["director", "serve", "--dir", str(d), "--host", host, "--port", str(port)]
        )
    assert result.exit_code == 1
    assert "--insecure-plain-http" in result.output and "--tls" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (d / "director.db").exists()  # refused before anything was opened


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("no-such-host.invalid", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
