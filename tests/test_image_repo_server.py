"""The Image repository over real HTTP on 127.0.0.1, read by a plain ngclient."""

from __future__ import annotations

import hashlib
import http.client
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import wasmtime
from click.testing import CliRunner, Result
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer
from tuf.ngclient import Updater

from image_repo.cli import serve_cmd
from image_repo.repo import ImageRepository
from image_repo.server import create_app, serve_in_thread
from uptane.cli import cli as uptane_cli
from uptane.keys import KeyRef

# apps that `image-repo add` accepts: they import exactly what their capability grants
_APP = """(module %s (memory (export "memory") 1)
  (func (export "self_test") (result i32) (i32.const 0))
  (func (export "tick") (param i64) (result i64) (local.get 0)))"""
WASM = bytes(wasmtime.wat2wasm(_APP % '(import "uptane" "log" (func (param i32 i32)))'))
SUPPLIER_WASM = bytes(
    wasmtime.wat2wasm(
        _APP % '(import "uptane" "actuator_write" (func (param i32 i64) (result i32)))'
    )
)


def words(text: str) -> list[str]:
    """Command-line arguments written as one string."""
    return text.split()


Server = Callable[[Any], str]


def run(*args: object) -> Result:
    result = CliRunner().invoke(uptane_cli, ["image-repo", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def updater(base: str, client: Path, bootstrap: bytes | None) -> Updater:
    (client / "metadata").mkdir(parents=True, exist_ok=True)
    (client / "targets").mkdir(exist_ok=True)
    return Updater(
        str(client / "metadata"),
        f"{base}/metadata/",
        str(client / "targets"),
        f"{base}/targets/",
        bootstrap=bootstrap,
    )


def trusted_root_version(client: Path) -> int:
    return int(Metadata.from_bytes((client / "metadata" / "root.json").read_bytes()).signed.version)


def get(base: str, raw_path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """A request with the path sent exactly as given (no client-side normalisation)."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=10)
    try:
        conn.request(method, raw_path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def retired_signer(repo: Path, role: str) -> Any:
    config = json.loads((repo / "image-repo.json").read_text())
    [ref] = [KeyRef.from_dict(r) for r in config["retired"]]
    root = Metadata[Root].from_bytes((repo / "metadata" / "root.json").read_bytes())
    assert ref.keyid not in root.signed.roles[role].keyids
    return ref.signer()


def current_signers(repo: Path, role: str) -> list[Any]:
    config = json.loads((repo / "image-repo.json").read_text())
    return [KeyRef.from_dict(r).signer() for r in config["roles"][role]]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    d = tmp_path / "repo"
    run("init", d)
    return d


def test_ngclient_downloads_images_including_a_delegated_one(
    repo: Path, tmp_path: Path, asgi_server: Server
) -> None:
    app = tmp_path / "app.wasm"
    app.write_bytes(WASM)
    brake = tmp_path / "brake.wasm"
    brake.write_bytes(SUPPLIER_WASM)
    args = "--name body/app.wasm --hardware-id door-ecu --release-counter 3 --capability log"
    run("add", repo, app, *words(args), "--fuel", 1234)
    run("delegate", repo, "acme", "--path", "acme/*", "--hardware-id", "brake-ecu")
    args = "--name acme/brake.wasm --hardware-id brake-ecu --release-counter 9 --role acme"
    run("add", repo, brake, *words(args), "--capability", "actuator.write")
    top = Metadata[Targets].from_bytes((repo / "metadata" / "targets.json").read_bytes())
    assert "acme/brake.wasm" not in top.signed.targets  # reachable only through the delegation

    base = asgi_server(create_app(repo))
    client = tmp_path / "client"
    up = updater(base, client, (repo / "metadata" / "1.root.json").read_bytes())
    up.refresh()

    info = up.get_targetinfo("body/app.wasm")
    assert info is not None
    assert info.custom["hardware_ids"] == ["door-ecu"]
    assert info.custom["release_counter"] == 3
    assert info.custom["capabilities"] == ["log"]
    assert info.custom["limits"]["fuel_per_call"] == 1234
    assert Path(up.download_target(info, str(tmp_path / "app.out"))).read_bytes() == WASM

    info = up.get_targetinfo("acme/brake.wasm")
    assert info is not None
    assert info.custom["hardware_ids"] == ["brake-ecu"]
    assert info.custom["release_counter"] == 9
    assert info.custom["capabilities"] == ["actuator.write"]
    data = Path(up.download_target(info, str(tmp_path / "brake.out"))).read_bytes()
    assert data == SUPPLIER_WASM
    assert up.get_targetinfo("acme/missing.wasm") is None


def test_root_rotation_is_followed_and_retired_key_is_refused(
    repo: Path, tmp_path: Path, asgi_server: Server
) -> None:
    base = asgi_server(create_app(repo))
    root_v1 = (repo / "metadata" / "1.root.json").read_bytes()
    old = Metadata.from_bytes(root_v1).signed.roles["root"].keyids[0]
    run("rotate-key", repo, "root", "--old", old)

    client = tmp_path / "client"
    updater(base, client, root_v1).refresh()  # a client that had v1
    assert trusted_root_version(client) == 2

    # a v3 root signed by the retired root key plus one current root key is
    # refused: root has threshold 2, so it would pass if the retired key counted
    forged = Metadata[Root].from_bytes((repo / "metadata" / "2.root.json").read_bytes())
    assert forged.signed.roles["root"].threshold == 2
    forged.signed.version = 3
    forged.signatures.clear()
    forged.sign(retired_signer(repo, "root"))
    forged.sign(current_signers(repo, "root")[0], append=True)
    forged_path = repo / "metadata" / "3.root.json"
    forged_path.write_bytes(forged.to_bytes(JSONSerializer()))
    with pytest.raises(UnsignedMetadataError):
        updater(base, client, None).refresh()
    assert trusted_root_version(client) == 2

    # the same v3 signed through the CLI with the current keys is accepted
    forged_path.unlink()
    run("resign", repo, "--role", "root")
    updater(base, client, None).refresh()
    assert trusted_root_version(client) == 3


def test_timestamp_signed_by_a_rotated_out_key_is_refused(
    repo: Path, tmp_path: Path, asgi_server: Server
) -> None:
    base = asgi_server(create_app(repo))
    root_v1 = (repo / "metadata" / "1.root.json").read_bytes()
    client = tmp_path / "client"
    updater(base, client, root_v1).refresh()
    old = Metadata.from_bytes(root_v1).signed.roles["timestamp"].keyids[0]
    run("rotate-key", repo, "timestamp", "--old", old)
    updater(base, client, None).refresh()
    assert trusted_root_version(client) == 2

    ts_path = repo / "metadata" / "timestamp.json"
    forged = Metadata[Timestamp].from_bytes(ts_path.read_bytes())
    forged.signed.version += 1
    forged.signatures.clear()
    forged.sign(retired_signer(repo, "timestamp"))
    ts_path.write_bytes(forged.to_bytes(JSONSerializer()))
    with pytest.raises(UnsignedMetadataError):
        updater(base, client, None).refresh()

    run("resign", repo)  # the current timestamp key signs a newer version
    updater(base, client, None).refresh()


def test_server_serves_only_repository_files(repo: Path, tmp_path: Path) -> None:
    app = tmp_path / "app.wasm"
    app.write_bytes(WASM)
    run(
        "add",
        repo,
        app,
        "--name",
        "dir/app.wasm",
        "--hardware-id",
        "hw",
        "--release-counter",
        1,
        "--capability",
        "log",
    )
    sha = hashlib.sha256(WASM).hexdigest()
    (repo / "metadata" / ".1.root.json.abc.tmp").write_bytes(b"partial")
    (repo / "targets" / "escape.pem").symlink_to(repo / "keys" / "root-1.pem")
    with serve_in_thread(repo) as base:
        assert urlsplit(base).hostname == "127.0.0.1"
        root_bytes = (repo / "metadata" / "1.root.json").read_bytes()
        status, headers, body = get(base, "/metadata/1.root.json")
        assert status == 200 and body == root_bytes
        assert int(headers["content-length"]) == len(root_bytes)
        status, headers, body = get(base, "/metadata/1.root.json", "HEAD")
        assert status == 200 and body == b"" and int(headers["content-length"]) == len(root_bytes)
        status, headers, body = get(base, f"/targets/dir/{sha}.app.wasm")
        assert status == 200 and body == WASM and int(headers["content-length"]) == len(WASM)

        for path in (
            "/image-repo.json",
            "/keys/root-1.pem",
            "/metadata/",
            "/metadata/nope.json",
            "/metadata/../image-repo.json",
            "/metadata/%2e%2e/image-repo.json",
            "/metadata/..%2fimage-repo.json",
            "/targets/../keys/root-1.pem",
            "/targets/%2e%2e/keys/root-1.pem",
            "/targets/dir/../../keys/root-1.pem",
            "/targets/dir",
            "/targets/dir/",
            "/targets/escape.pem",
            "/targets/%2Fetc%2Fpasswd",
            "/targets/dir/%00",
            "/targets/..%5c..%5cimage-repo.json",
            "/metadata/.1.root.json.abc.tmp",
            "/metadata/.image-repo.lock",
            f"/targets/dir/{sha}.app.wasm/extra",
        ):
            status, _, body = get(base, path)
            assert status == 404, path
            assert b"BEGIN" not in body and b"roles" not in body
        status, _, _ = get(base, "/metadata/1.root.json", "POST")
        assert status == 405


def test_serve_command_defaults_to_loopback() -> None:
    params = {p.name: p.default for p in serve_cmd.params}
    assert params["host"] == "127.0.0.1"
    assert params["port"] == 8001


def test_serve_refuses_a_directory_that_is_not_a_repository(tmp_path: Path) -> None:
    result = CliRunner().invoke(uptane_cli, ["image-repo", "serve", str(tmp_path)])
    assert result.exit_code != 0 and "not an image repository" in result.output


def test_repository_api_is_usable_from_python(repo: Path) -> None:
    r = ImageRepository(repo)
    target = r.add_target(WASM, name="x.wasm", hardware_ids=["hw"], release_counter=2)
    assert r.blob_path(target).read_bytes() == WASM
    assert r.targets()["x.wasm"] == ("targets", target)
    assert r.root_bytes(1) == (repo / "metadata" / "1.root.json").read_bytes()
