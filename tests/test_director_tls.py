"""Vehicles authenticated by mutual TLS (issue 12, ``director.tls``).

A real Director (SQLite) behind its two TLS listeners (uvicorn + uvloop, the
``serve --tls`` stack) on loopback: the vehicle listener requires a client
certificate from the Director CA and serves each vehicle only its own
resources; the operator listener takes the bearer token and no certificate.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import uvloop
from click.testing import CliRunner
from cryptography import x509
from helpers.director_env import (
    Car,
    new_car,
)
from tuf.api import exceptions as tuf_exc

from director.app import create_app
from director.cli import cli as director_cli
from director.config import DirectorConfig
from director.server import DirectorProtocol
from director.service import Director, EcuSpec
from director.setup import init_director
from director.tls import (
    CA_CERT,
    CA_KEY,
    OPERATOR,
    REFUSED_BODY,
    REVOKED_BODY,
    VEHICLE,
    IssuedCertificate,
    allowed,
    create_ca,
    issue_vehicle_certificate,
    listener_configs,
    tls_dir,
    tls_paths,
)
from ecus.primary.config import DownloadPolicy, TlsFiles
from ecus.primary.fetch import PolicyFetcher

TOKEN = "tls-test-operator-token-0123456789"


@dataclass
class TlsDirector:
    directory: Path
    director: Director
    vehicle_url: str
    operator_url: str
    ca: Path

    def car(self) -> Car:
        car = new_car(1)
        self.director.register_vehicle(
            car.vin,
            [
                EcuSpec(e.serial, e.hardware_id, e.signer.public_key, primary=e.primary)
                for e in car.ecus.values()
            ],
        )
        return car

    def client(self, issued: IssuedCertificate | None, tmp: Path) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if issued is not None:
            cert, key, _ = issued.write(tmp, "client")
            ctx.load_cert_chain(cert, key)
        return httpx.Client(base_url=self.vehicle_url, verify=ctx, timeout=10, trust_env=False)


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@pytest.fixture(scope="module")
def tls_director(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsDirector]:
    directory = tmp_path_factory.mktemp("tls-director")
    config = init_director(directory, token=TOKEN)
    config = DirectorConfig.load(directory)
    director = Director.from_config(config)
    app = create_app(director, TOKEN, ca_directory=directory)
    ca, cert, key = tls_paths(directory)
    socks = [_socket(), _socket()]
    configs = listener_configs(
        app,
        host="127.0.0.1",
        port=socks[0].getsockname()[1],
        operator_port=socks[1].getsockname()[1],
        cert=cert,
        key=key,
        ca=ca,
        http=DirectorProtocol,
        log_level="warning",
    )
    servers = [uvicorn.Server(c) for c in configs]

    async def main() -> None:
        await asyncio.gather(*(s.serve(sockets=[k]) for s, k in zip(servers, socks, strict=True)))

    thread = threading.Thread(target=uvloop.run, args=(main(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not all(s.started for s in servers):
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    ports = [k.getsockname()[1] for k in socks]
    try:
        yield TlsDirector(
            directory,
            director,
            f"https://127.0.0.1:{ports[0]}",
            f"https://127.0.0.1:{ports[1]}",
            ca,
        )
    finally:
        for s in servers:
            s.should_exit = True
        thread.join(timeout=10)
        for k in socks:
            k.close()
        director.close()


def _manifest_put(http: httpx.Client, vin: str, data: bytes) -> httpx.Response:
    return http.put(
        f"/vehicles/{vin}/manifest", content=data, headers={"Content-Type": "application/json"}
    )


def test_own_vehicle_reads_its_metadata_and_sends_its_manifest(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    car = tls_director.car()
    issued = issue_vehicle_certificate(tls_director.directory, car.vin)
    with tls_director.client(issued, tmp_path) as http:
        for name in ("timestamp.json", "1.targets.der"):
            r = http.get(f"/vehicles/{car.vin}/metadata/{name}")
            assert r.status_code == 200, (name, r.text)
            assert r.content == tls_director.director.metadata(car.vin, name)
        assert http.get("/root/1.root.json").status_code == 200
        r = _manifest_put(http, car.vin, car.manifest())
        assert r.status_code == 200 and r.json()["accepted"] is True, r.text


def test_other_vehicle_and_unknown_vin_get_the_same_answer(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    mine, theirs = tls_director.car(), tls_director.car()
    issued = issue_vehicle_certificate(tls_director.directory, mine.vin)
    answers = []
    with tls_director.client(issued, tmp_path) as http:
        for vin in (theirs.vin, "UNKNOWN-VIN-0001"):
            for r in (
                http.get(f"/vehicles/{vin}/metadata/timestamp.json"),
                http.get(f"/vehicles/{vin}/metadata/1.targets.der"),
                _manifest_put(http, vin, theirs.manifest()),
            ):
                answers.append((r.status_code, r.content))
        # and the operator API is not on the vehicle listener
        r = http.get("/api/vehicles", headers={"Authorization": f"Bearer {TOKEN}"})
        answers.append((r.status_code, r.content))
    assert set(answers) == {(404, REFUSED_BODY)}, answers
    # nothing of theirs was touched: their first manifest is still fresh
    assert tls_director.director.vehicle_status(theirs.vin).last_seen is None


def test_no_client_certificate_is_refused_at_the_handshake(tls_director: TlsDirector) -> None:
    port = int(tls_director.vehicle_url.rsplit(":", 1)[1])
    # TLS 1.2: the server's certificate request is part of the handshake, which fails
    ctx = ssl.create_default_context(cafile=str(tls_director.ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    # TLS 1.3: the client's side of the handshake ends first; the server's alert follows
    # and no HTTP answer ever comes
    ctx13 = ssl.create_default_context(cafile=str(tls_director.ca))
    ctx13.minimum_version = ssl.TLSVersion.TLSv1_3
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx13.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        received = b""
        with pytest.raises((ssl.SSLError, ConnectionError)):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: d\r\n\r\n")
            received = s.recv(1000)
            if not received:
                raise ConnectionError("closed")
        assert received == b""
    # httpx without a certificate: no answer either
    with (
        httpx.Client(verify=ssl.create_default_context(cafile=str(tls_director.ca))) as http,
        pytest.raises(httpx.TransportError),
    ):
        http.get(f"{tls_director.vehicle_url}/health")


def test_a_certificate_from_another_ca_is_refused(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    car = tls_director.car()
    other = tmp_path / "other-director"
    create_ca(other)  # another CA issuing a certificate with the right VIN
    forged = issue_vehicle_certificate(other, car.vin)
    with tls_director.client(forged, tmp_path) as http, pytest.raises(httpx.TransportError):
        http.get(f"/vehicles/{car.vin}/metadata/timestamp.json")


def test_operator_listener_needs_the_token_and_serves_no_vehicle_files(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    car = tls_director.car()
    ctx = ssl.create_default_context(cafile=str(tls_director.ca))
    with httpx.Client(
        base_url=tls_director.operator_url, verify=ctx, timeout=10, trust_env=False
    ) as op:
        assert op.get("/api/vehicles").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert op.get(f"/api/vehicles/{car.vin}", headers=auth).status_code == 200
        assert op.get("/health").status_code == 200
        r = op.get(f"/vehicles/{car.vin}/metadata/timestamp.json")
        assert (r.status_code, r.content) == (404, REFUSED_BODY)
        # a certificate for a registered vehicle, through the API ...
        r = op.post(f"/api/vehicles/{car.vin}/certificate", headers=auth)
        assert r.status_code == 201, r.text
        body = r.json()
        cert = x509.load_pem_x509_certificate(body["certificate"].encode())
        assert cert.subject.rfc4514_string() == f"CN={car.vin}"
        assert op.post("/api/vehicles/NO-SUCH-VIN/certificate", headers=auth).status_code == 404
        assert op.post(f"/api/vehicles/{car.vin}/certificate").status_code == 401
    issued = IssuedCertificate(
        body["certificate"].encode(), body["key"].encode(), body["ca"].encode()
    )
    with tls_director.client(issued, tmp_path) as http:  # ... works on the vehicle listener
        assert http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200


def test_primary_fetcher_uses_the_client_certificate_and_conditional_polls(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    car = tls_director.car()
    cert, key, ca = issue_vehicle_certificate(tls_director.directory, car.vin).write(
        tmp_path, car.vin
    )
    files = TlsFiles.from_dict({"ca": ca.name, "cert": cert.name, "key": key.name}, tmp_path)
    url = f"{tls_director.vehicle_url}/vehicles/{car.vin}/metadata/timestamp.json"
    fetcher = PolicyFetcher(
        DownloadPolicy(), tls=files.context(), tls_urls=[tls_director.vehicle_url]
    )
    first = fetcher.download_bytes(url, 100_000)
    assert first == tls_director.director.metadata(car.vin, "timestamp.json")
    assert fetcher.download_bytes(url, 100_000) == first and fetcher.not_modified[url] == 1
    # without the TLS settings the same fetch fails (the Director CA is not trusted,
    # and there is no client certificate)
    with pytest.raises(tuf_exc.DownloadError):
        PolicyFetcher(DownloadPolicy()).download_bytes(url, 100_000)


def test_init_creates_the_ca_private_and_register_issues_a_certificate(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    key_mode = stat.S_IMODE(os.stat(tls_dir(directory) / CA_KEY).st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(os.stat(tls_dir(directory)).st_mode) == 0o700
    ca = x509.load_pem_x509_certificate((tls_dir(directory) / CA_CERT).read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    pub = tmp_path / "p.pub.json"
    car = new_car(0)
    from uptane.keys import public_key_dict

    pub.write_text(json.dumps(public_key_dict(car.primary.signer.public_key)))
    out = tmp_path / "certs"
    result = CliRunner().invoke(
        director_cli,
        [
            "register",
            str(directory),
            "--vin",
            car.vin,
            "--ecu",
            f"{car.primary.serial},gateway,{pub}",
            "--primary",
            car.primary.serial,
            "--issue-cert",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    cert = x509.load_pem_x509_certificate((out / f"{car.vin}.pem").read_bytes())
    assert cert.subject.rfc4514_string() == f"CN={car.vin}"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:uptane:vin:{car.vin}"]
    assert cert.issuer == ca.subject
    assert stat.S_IMODE(os.stat(out / f"{car.vin}-key.pem").st_mode) == 0o600


def test_simulated_vehicle_updates_over_mutual_tls(tmp_path: Path) -> None:
    """``World(tls=True)``: the Director behind its vehicle listener, each primary with its
    client certificate; a whole update goes through, polls stay conditional."""
    from ecus.sim.world import World, image_name

    with World(tmp_path / "world", tls=True) as world:
        assert world.director_url.startswith("https://")
        vehicle = world.add_vehicle("TLSVIN0000000001", ["brake-ctl"])
        first = vehicle.cycle()
        assert first.ok, first.cycle.error
        world.publish(2, ["brake-ctl"])
        assert world.assign_version(2, ["brake-ctl"]) == 1
        update = vehicle.cycle()
        assert update.ok, (update.cycle.error, update.errors)
        (ecu,) = (e for s, e in update.ecus.items() if s != vehicle.primary_serial)
        assert ecu.installed == image_name("brake-ctl", 2)
        url = f"{world.director_url}/vehicles/{vehicle.vin}/metadata/timestamp.json"
        settled = vehicle.cycle()  # reports the install: the Director re-signs once
        assert settled.ok, settled.cycle.error
        before = vehicle.primary.fetcher.not_modified[url]
        quiet = vehicle.cycle()
        assert quiet.ok and vehicle.primary.fetcher.not_modified[url] == before + 1
        # the same URL without the vehicle's certificate: no answer
        ca = ssl.create_default_context(cafile=str(world.directory / "director/tls/ca.pem"))
        with httpx.Client(verify=ca) as http, pytest.raises(httpx.TransportError):
            http.get(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(directory: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    """``uptane director serve DIR ARGS`` in a process; returns it and its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uptane.cli", "director", "serve", str(directory), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def _wait_for(url: str, ctx: ssl.SSLContext | bool) -> httpx.Response:
    deadline = time.monotonic() + 30
    while True:
        try:
            return httpx.get(url, verify=ctx, timeout=5, trust_env=False)
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_serve_labels_plain_http_and_serves_two_tls_listeners(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    port = _free_port()
    proc, line = _serve(directory, "--port", str(port))
    try:
        assert "PLAIN HTTP" in line and "NOT authenticated" in line, line
        assert _wait_for(f"http://127.0.0.1:{port}/health", False).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    port, operator = _free_port(), _free_port()
    proc, line = _serve(directory, "--tls", "--port", str(port), "--operator-port", str(operator))
    try:
        assert "mutual TLS" in line and f"https://127.0.0.1:{operator}" in line, line
        ctx = ssl.create_default_context(cafile=str(tls_dir(directory) / CA_CERT))
        assert _wait_for(f"https://127.0.0.1:{operator}/health", ctx).status_code == 200
        with pytest.raises(httpx.TransportError):  # no client certificate
            httpx.get(f"https://127.0.0.1:{port}/health", verify=ctx, timeout=5)
        proc.terminate()  # both listeners stop on the first SIGTERM, exit code 0
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_dot_and_empty_segments_are_never_served() -> None:
    """Defence in depth: a proxy that normalises paths cannot reach another vehicle."""
    assert allowed(VEHICLE, "/vehicles/A/metadata/timestamp.json", "A")
    for path in (
        "/vehicles/A/../B/metadata/timestamp.json",
        "/vehicles/A/./metadata/timestamp.json",
        "/vehicles/A//metadata/timestamp.json",
        "/root/../vehicles/B/metadata/timestamp.json",
    ):
        assert not allowed(VEHICLE, path, "A"), path
    assert allowed(OPERATOR, "/api/vehicles", None)
    assert not allowed(OPERATOR, "/api/../vehicles/B/metadata/timestamp.json", None)


# --- revocation (director.revocation) ----------------------------------------------


def _issued_by_api(op: httpx.Client, vin: str) -> IssuedCertificate:
    r = op.post(f"/api/vehicles/{vin}/certificate", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201, r.text
    body = r.json()
    return IssuedCertificate(
        body["certificate"].encode(), body["key"].encode(), body["ca"].encode()
    )


def _serial(issued: IssuedCertificate) -> str:
    return format(x509.load_pem_x509_certificate(issued.certificate).serial_number, "x")


def _refused_as_revoked(http: httpx.Client, vin: str, car: Car) -> None:
    for r in (
        http.get(f"/vehicles/{vin}/metadata/timestamp.json"),
        http.get("/health"),
        http.get("/root/1.root.json"),
        _manifest_put(http, vin, car.manifest()),
    ):
        assert (r.status_code, r.content) == (403, REVOKED_BODY), r.text


def test_a_revoked_certificate_is_refused_on_every_request(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    car = tls_director.car()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    ctx = ssl.create_default_context(cafile=str(tls_director.ca))
    with httpx.Client(
        base_url=tls_director.operator_url, verify=ctx, timeout=10, trust_env=False
    ) as op:
        first = _issued_by_api(op, car.vin)
        with tls_director.client(first, tmp_path / "first") as http:
            assert http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200
            # revoked through the operator API: this kept-alive connection is refused too
            r = op.delete(f"/api/vehicles/{car.vin}/certificate", headers=auth)
            assert r.status_code == 200 and r.json()["serials"] == [_serial(first)], r.text
            _refused_as_revoked(http, car.vin, car)
        audit = [a for a in op.get("/api/audit", headers=auth).json() if a["vin"] == car.vin]
        (entry,) = [a for a in audit if a["action"] == "revoke_certificate"]
        assert entry["detail"]["serials"] == [_serial(first)]
        (issued,) = [a for a in audit if a["action"] == "issue_certificate"]
        assert issued["detail"] == {"serial": _serial(first), "superseded": []}
        with tls_director.client(first, tmp_path / "first-again") as http:  # new connection
            _refused_as_revoked(http, car.vin, car)
        assert tls_director.director.vehicle_status(car.vin).last_seen is None
        # nothing valid left to revoke
        assert op.delete(f"/api/vehicles/{car.vin}/certificate", headers=auth).status_code == 404
        # a new certificate works, and a newer one again revokes it
        second = _issued_by_api(op, car.vin)
        with tls_director.client(second, tmp_path / "second") as http:
            assert _manifest_put(http, car.vin, car.manifest()).status_code == 200
            third = _issued_by_api(op, car.vin)
            _refused_as_revoked(http, car.vin, car)
        # the superseding issue is in the audit log with the serial it revoked
        audit = op.get("/api/audit", headers=auth).json()
        superseded = [a["detail"] for a in audit if a["action"] == "issue_certificate"]
        assert {"serial": _serial(third), "superseded": [_serial(second)]} in superseded
    with tls_director.client(third, tmp_path / "third") as http:
        assert http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200


def test_revoke_cert_command_revokes_by_vin_and_by_serial(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """``uptane director revoke-cert`` in another Database: the server's process sees it
    at its next refresh (within ``REFRESH_SECONDS``)."""
    car = tls_director.car()
    # one issued outside the record (as before migration 0007): revoked by its serial
    unrecorded = issue_vehicle_certificate(tls_director.directory, car.vin)
    runner = CliRunner()
    revoke = ["revoke-cert", str(tls_director.directory), "--vin", car.vin]
    result = runner.invoke(director_cli, revoke)
    assert result.exit_code == 1 and "no valid certificate" in result.output, result.output
    with tls_director.client(unrecorded, tmp_path) as http:
        assert http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200
        serial = _serial(unrecorded).upper()  # as `openssl x509 -serial` prints it
        result = runner.invoke(director_cli, [*revoke, "--serial", f"serial={serial}"])
        assert result.exit_code == 0, result.output
        assert f"revoked certificate {serial.lower()} of {car.vin}" in result.output
        (entry,) = [a for a in tls_director.director.audit_log() if a.vin == car.vin]
        assert (entry.actor, entry.detail["serials"]) == ("cli", [serial.lower()])
        deadline = time.monotonic() + 30
        while http.get(f"/vehicles/{car.vin}/metadata/timestamp.json").status_code == 200:
            assert time.monotonic() < deadline, "the revocation was never seen"
            time.sleep(0.2)
        _refused_as_revoked(http, car.vin, car)
    result = runner.invoke(director_cli, [*revoke, "--serial", "zz"])
    assert result.exit_code != 0 and "hexadecimal" in result.output, result.output
    other = tls_director.car()
    recorded = issue_vehicle_certificate(tls_director.directory, other.vin)
    from director.revocation import record_issued

    record_issued(tls_director.director.db, other.vin, recorded.certificate)
    result = runner.invoke(director_cli, [*revoke, "--serial", _serial(recorded)])
    assert result.exit_code == 1 and "another vehicle" in result.output, result.output


def test_revocations_unreadable_fail_closed(tmp_path: Path) -> None:
    """A process that cannot read the revoked serials for ``stale_seconds`` refuses
    vehicles (503) rather than serving on an old list."""
    from director.db import Database
    from director.revocation import RevocationList

    now = [0.0]
    db = Database(f"sqlite:///{tmp_path / 'unmigrated.db'}")  # no vehicle_certificates table
    try:
        revocations = RevocationList(db, stale_seconds=30, clock=lambda: now[0])
        assert asyncio.run(revocations.revoked("ab")) is None
        db.migrate()
        now[0] = 5.0
        assert asyncio.run(revocations.revoked("ab")) is False
        db.engine.dispose()
        (tmp_path / "unmigrated.db").unlink()  # the database is gone
        now[0] = 10.0
        assert asyncio.run(revocations.revoked("ab")) is False  # still within 30 s
        now[0] = 40.0
        assert asyncio.run(revocations.revoked("ab")) is None
    finally:
        db.dispose()


def test_serve_refuses_a_key_not_of_the_certificate_in_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    _, cert, _ = tls_paths(directory)
    key = tls_dir(directory) / CA_KEY  # the CA's key, not the server certificate's
    args = ["serve", str(directory), "--port", str(_free_port())]
    for workers in ("1", "2"):
        result = CliRunner().invoke(
            director_cli,
            [*args, "--workers", workers, "--tls-cert", str(cert), "--tls-key", str(key)],
        )
        assert result.exit_code == 1, result.output
        assert result.output.startswith("Error: TLS certificate or key:"), result.output
        assert len(result.output.strip().splitlines()) == 1
