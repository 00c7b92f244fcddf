"""Adversarial review of the vehicle listener (issue 12, ``director.tls``): real TLS
clients (``ssl`` on raw sockets) against the real listeners of ``test_director_tls``.

What a vehicle holding a valid certificate may try, what a client without one may try,
and the files that hold private keys.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import test_director_tls
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_director_tls import TOKEN, TlsDirector, _free_port, _serve, _wait_for

from director.setup import init_director
from director.tls import (
    CA_CERT,
    CA_KEY,
    EXPIRED_BODY,
    OPERATOR,
    REFUSED_BODY,
    VEHICLE,
    VIN_URI_PREFIX,
    IssuedCertificate,
    ListenerGate,
    issue_vehicle_certificate,
    listener_configs,
    tls_dir,
    tls_paths,
)
from uptane.errors import ConfigError

tls_director = test_director_tls.tls_director  # the same module-scoped fixture, run here


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _forge(
    directory: Path,
    names: Sequence[str],
    sans: Sequence[str],
    *,
    valid_days: tuple[int, int] = (-1, 30),
    not_after: dt.datetime | None = None,
    signer: tuple[Any, Any] | None = None,
    usage: x509.ObjectIdentifier = ExtendedKeyUsageOID.CLIENT_AUTH,
) -> tuple[list[x509.Certificate], ec.EllipticCurvePrivateKey]:
    """A client certificate signed with the Director CA's key (or ``signer``: a
    certificate and its key), subject CNs ``names``, VIN SANs ``sans``."""
    if signer is None:
        d = tls_dir(directory)
        signer = (
            x509.load_pem_x509_certificate((d / CA_CERT).read_bytes()),
            serialization.load_pem_private_key((d / CA_KEY).read_bytes(), None),
        )
    issuer, issuer_key = signer
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=valid_days[0]))
        .not_valid_after(not_after or now + dt.timedelta(days=valid_days[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        uris = [x509.UniformResourceIdentifier(VIN_URI_PREFIX + s) for s in sans]
        builder = builder.add_extension(x509.SubjectAlternativeName(uris), critical=False)
    return [builder.sign(issuer_key, hashes.SHA256())], key


def _context(td: TlsDirector, tmp: Path, chain: Sequence[x509.Certificate], key: Any) -> Any:
    tmp.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = tmp / "c.pem", tmp / "c-key.pem"
    cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))
    key_path.write_bytes(_pem_key(key))
    ctx = ssl.create_default_context(cafile=str(td.ca))
    ctx.load_cert_chain(cert_path, key_path)
    return ctx


def _issued_context(td: TlsDirector, tmp: Path, issued: IssuedCertificate) -> ssl.SSLContext:
    cert, key, _ = issued.write(tmp, "client")
    ctx = ssl.create_default_context(cafile=str(td.ca))
    ctx.load_cert_chain(cert, key)
    return ctx


def _exchange(td: TlsDirector, ctx: ssl.SSLContext, request: bytes) -> bytes:
    """Send ``request`` on a new TLS connection to the vehicle listener; every byte
    answered until the server closes (or 2 s of silence)."""
    port = int(td.vehicle_url.rsplit(":", 1)[1])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(request)
        s.settimeout(2)
        out = b""
        try:
            while data := s.recv(65536):
                out += data
        except TimeoutError:
            pass
        return out


def _get(path: str, extra: str = "Host: d\r\nConnection: close\r\n") -> bytes:
    return f"GET {path} HTTP/1.1\r\n{extra}\r\n".encode()


def _without_date(answer: bytes) -> bytes:
    return b"\r\n".join(line for line in answer.split(b"\r\n") if not line.startswith(b"date:"))


REFUSED = (
    b"HTTP/1.1 404 Not Found\r\nserver: uvicorn\r\ncontent-type: application/json\r\n"
    b"content-length: 52\r\nconnection: close\r\n\r\n" + REFUSED_BODY
)


def test_path_tricks_reach_no_other_vehicle_and_every_refusal_is_byte_identical(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """Another vehicle's VIN and an unknown VIN, in every request form tried, get the
    very same bytes (status line, headers but Date, body); the vehicle's own still works."""
    mine, theirs = tls_director.car(), tls_director.car()
    ctx = _issued_context(
        tls_director, tmp_path, issue_vehicle_certificate(tls_director.directory, mine.vin)
    )
    m = mine.vin
    ts = "metadata/timestamp.json"

    def forms(vin: str) -> list[bytes]:
        return [
            _get(f"/vehicles/{vin}/{ts}"),
            _get(f"/vehicles/{m}%2F..%2F{vin}/{ts}"),
            _get(f"/vehicles/{m}/..%2F{vin}/{ts}"),
            _get(f"/vehicles/{m}/../{vin}/{ts}"),
            _get(f"//vehicles/{vin}/{ts}"),
            _get(f"/vehicles/{vin}/{ts}/"),
            _get(f"/vehicles/{vin.lower()}/{ts}"),
            _get(f"/vehicles/{vin}/{ts}?vin={m}"),
            _get(f"/root/%2E%2E/vehicles/{vin}/{ts}"),
            _get(f"http://127.0.0.1/vehicles/{vin}/{ts}"),  # absolute form
            _get(f"http://d/vehicles/{m}@x/vehicles/{vin}/{ts}"),
            f"GET /vehicles/{vin}/{ts} HTTP/1.0\r\n\r\n".encode(),  # no Host
            f"OPTIONS /vehicles/{vin}/{ts} HTTP/1.1\r\nHost: d\r\nConnection: close\r\n\r\n".encode(),
            f"PUT /vehicles/{vin}/manifest HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n"
            "Connection: close\r\n\r\n{}".encode(),
            _get(  # a WebSocket upgrade is an HTTP request like any other
                f"/vehicles/{vin}/{ts}",
                "Host: d\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
            ),
        ]

    for vin in (theirs.vin, "UNKNOWN-VIN-0001"):
        for request in forms(vin):
            answer = _exchange(tls_director, ctx, request)
            assert _without_date(answer) == REFUSED, (request, answer)
    # paths of the operator listener are not on the vehicle listener either
    for path in ("/docs", "/openapi.json", "/redoc", "/metrics", "/api/vehicles", "/api"):
        answer = _exchange(tls_director, ctx, _get(path))
        assert _without_date(answer) == REFUSED, (path, answer)
    # two pipelined requests on one connection: own VIN, then another's
    answer = _exchange(
        tls_director,
        ctx,
        _get(f"/vehicles/{m}/{ts}", "Host: d\r\n") + _get(f"/vehicles/{theirs.vin}/{ts}"),
    )
    first, _, second = answer.partition(b"HTTP/1.1 404")
    assert first.startswith(b"HTTP/1.1 200 OK") and second.endswith(REFUSED_BODY), answer
    assert _exchange(tls_director, ctx, _get(f"/vehicles/{m}/{ts}")).startswith(b"HTTP/1.1 200 OK")
    assert tls_director.director.vehicle_status(theirs.vin).last_seen is None


def test_the_vin_is_the_certificates_cn_and_its_one_vin_san(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """A certificate whose CN and VIN SAN disagree, or that names two VINs, is served
    nothing: the VIN is not taken from one name while another says otherwise."""
    mine, theirs = tls_director.car(), tls_director.car()
    m, t = mine.vin, theirs.vin
    paths = [f"/vehicles/{v}/metadata/timestamp.json" for v in (m, t)] + ["/health"]
    for names, sans in (
        ([t], [m]),  # CN another vehicle's, SAN its own
        ([m], [t]),
        ([m], [m, t]),  # two VIN SANs
        ([m], [t, m]),
        ([m, t], [m]),  # two CNs
        ([t, m], [m]),
        ([m], []),  # no VIN SAN
    ):
        chain, key = _forge(tls_director.directory, names, sans)
        ctx = _context(tls_director, tmp_path / f"{len(names)}{len(sans)}", chain, key)
        for path in paths:
            answer = _exchange(tls_director, ctx, _get(path))
            assert _without_date(answer) == REFUSED, (names, sans, path, answer)
    chain, key = _forge(tls_director.directory, [m], [m])  # as the Director issues them
    ctx = _context(tls_director, tmp_path / "ok", chain, key)
    assert _exchange(tls_director, ctx, _get(paths[0])).startswith(b"HTTP/1.1 200 OK")


def _refused_at_handshake(td: TlsDirector, ctx: ssl.SSLContext) -> None:
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx.minimum_version = ctx.maximum_version = version
        try:
            answer = _exchange(td, ctx, _get("/health"))
        except (ssl.SSLError, ConnectionError):
            continue  # TLS 1.2: the handshake fails
        assert answer == b"", (version, answer)  # TLS 1.3: an alert, no HTTP answer


def test_certificates_the_handshake_refuses(tls_director: TlsDirector, tmp_path: Path) -> None:
    """Expired, not yet valid, a vehicle's certificate used as a CA, a certificate for
    servers, the CA certificate itself, another CA of the same name."""
    mine, theirs = tls_director.car(), tls_director.car()
    d = tls_director.directory
    issued = issue_vehicle_certificate(d, mine.vin)
    own = (
        x509.load_pem_x509_certificate(issued.certificate),
        serialization.load_pem_private_key(issued.key, None),
    )
    ca = x509.load_pem_x509_certificate((tls_dir(d) / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((tls_dir(d) / CA_KEY).read_bytes(), None)
    impostor_key = ec.generate_private_key(ec.SECP256R1())
    impostor = (  # same subject and serial as the Director CA, another key
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(impostor_key.public_key())
        .serial_number(ca.serial_number)
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(impostor_key, hashes.SHA256())
    )
    t = theirs.vin
    cases: dict[str, tuple[list[x509.Certificate], Any]] = {
        "expired": _forge(d, [t], [t], valid_days=(-30, -1)),
        "not yet valid": _forge(d, [t], [t], valid_days=(1, 30)),
        "server usage": _forge(d, [t], [t], usage=ExtendedKeyUsageOID.SERVER_AUTH),
        "CA itself": ([ca], ca_key),
    }
    chain, key = _forge(d, [t], [t], signer=own)
    cases["vehicle as CA"] = ([*chain, own[0]], key)
    chain, key = _forge(d, [t], [t], signer=(impostor, impostor_key))
    cases["impostor CA"] = ([*chain, impostor], key)
    for name, (chain, key) in cases.items():
        _refused_at_handshake(tls_director, _context(tls_director, tmp_path / name, chain, key))


async def _gate_answer(gate: ListenerGate, scope: dict[str, Any]) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    inbox = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Any) -> None:
        sent.append(message)

    await gate(scope, receive, send)
    return sent


def test_websocket_requests_never_pass_the_gate(tmp_path: Path) -> None:
    """With a WebSocket library installed (``uvicorn[standard]``) an Upgrade request is a
    ``websocket`` scope: the gate closes it on both listeners, for any path, instead of
    passing it on unchecked; the listeners also turn WebSocket support off."""
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    tls = {"tls": {"client_vin": "MINE", "client_serial": "ab"}}
    for listener, path in (
        (VEHICLE, "/vehicles/OTHER/metadata/timestamp.json"),
        (VEHICLE, "/vehicles/MINE/metadata/timestamp.json"),
        (OPERATOR, "/api/vehicles"),
    ):
        scope = {"type": "websocket", "path": path, "headers": [], "extensions": tls}
        sent = asyncio.run(_gate_answer(ListenerGate(app, listener), scope))
        assert sent == [{"type": "websocket.close", "code": 1008}], (listener, path, sent)
    assert reached == []
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    ca, cert, key = tls_paths(directory)
    configs = listener_configs(
        app, host="127.0.0.1", port=1, operator_port=2, cert=cert, key=key, ca=ca, revocations=None
    )
    assert [c.ws for c in configs] == ["none", "none"]
    # an app without a revocation list is not served unless asked for (fail closed)
    with pytest.raises(ConfigError, match="no certificate revocation list"):
        listener_configs(app, host="127.0.0.1", port=1, operator_port=2, cert=cert, key=key, ca=ca)


def test_a_stalled_tls_handshake_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    """A client without a certificate that connects and never finishes the handshake holds
    its socket ``header_timeout`` (here 1 s), not asyncio's default 60 s, on both listeners."""
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    config = directory / "director.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "header_timeout": 1.0}))
    port, operator = _free_port(), _free_port()
    proc, line = _serve(directory, "--tls", "--port", str(port), "--operator-port", str(operator))
    try:
        assert "mutual TLS" in line, line
        ctx = ssl.create_default_context(cafile=str(tls_dir(directory) / CA_CERT))
        assert _wait_for(f"https://127.0.0.1:{operator}/health", ctx).status_code == 200
        for p in (port, operator):
            with socket.create_connection(("127.0.0.1", p), timeout=30) as raw:
                raw.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
                assert raw.recv(100) == b""  # closed by the server well before 30 s
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_serving_host_without_the_ca_key_keeps_the_ca_certificate(tmp_path: Path) -> None:
    """``serve --tls`` on a host holding ``ca.pem`` but not ``ca-key.pem`` (the key is only
    needed where certificates are issued) must not make a new CA: that would replace the
    fleet's trust anchor there and refuse every vehicle."""
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    d = tls_dir(directory)
    _, cert, key = tls_paths(directory)
    ca_pem = (d / CA_CERT).read_bytes()
    (d / CA_KEY).unlink()
    assert tls_paths(directory, cert, key) == (d / CA_CERT, cert, key)
    assert (d / CA_CERT).read_bytes() == ca_pem and not (d / CA_KEY).exists()
    cert.unlink()  # no server certificate either: it cannot be issued here
    with pytest.raises(ConfigError, match="--tls-cert"):
        tls_paths(directory)
    assert (d / CA_CERT).read_bytes() == ca_pem
    (d / CA_KEY).write_bytes(b"a key")  # a key without its certificate: an error
    (d / CA_CERT).unlink()
    with pytest.raises(ConfigError, match="without"):
        tls_paths(directory)


def test_private_keys_are_never_written_through_a_symlink_or_with_wider_modes(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    issued = issue_vehicle_certificate(directory, "VIN-SYMLINK-1")
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("not a key")
    victim.chmod(0o644)
    (out / "client-key.pem").symlink_to(victim)  # planted where the key goes
    (out / "other-key.pem").write_text("old")
    (out / "other-key.pem").chmod(0o644)
    for name in ("client", "other"):
        _, key, _ = issued.write(out, name)
        assert not key.is_symlink() and key.read_bytes() == issued.key
        assert stat.S_IMODE(os.lstat(key).st_mode) == 0o600
    assert victim.read_text() == "not a key" and stat.S_IMODE(victim.stat().st_mode) == 0o644
    assert sorted(p.name for p in out.iterdir()) == [
        "ca.pem",
        "client-key.pem",
        "client.pem",
        "other-key.pem",
        "other.pem",
    ]


def test_an_unprotected_ca_key_is_refused(tmp_path: Path) -> None:
    """A CA key others can read (copied as 0644, say) issues nothing: one line says how
    to fix it, as ssh refuses an unprotected private key."""
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    key = directory / "tls" / "ca-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    issue_vehicle_certificate(directory, "VIN-MODE-1")  # fine as created
    for mode in (0o644, 0o640, 0o604):
        key.chmod(mode)
        with pytest.raises(ConfigError, match=f"mode {mode:o}.*chmod 600"):
            issue_vehicle_certificate(directory, "VIN-MODE-1")
    key.chmod(0o600)
    issue_vehicle_certificate(directory, "VIN-MODE-1")


def test_the_ca_key_is_served_on_no_path(tls_director: TlsDirector) -> None:
    """Neither listener answers with the CA key, whatever the path."""
    import httpx

    ca_key = (tls_dir(tls_director.directory) / CA_KEY).read_bytes()
    marker = ca_key.splitlines()[1][:40]
    ctx = ssl.create_default_context(cafile=str(tls_director.ca))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(
        base_url=tls_director.operator_url, verify=ctx, timeout=10, trust_env=False
    ) as op:
        for path in (
            "/openapi.json",
            "/docs",
            "/api/tls/ca-key.pem",
            "/tls/ca-key.pem",
            "/api/../tls/ca-key.pem",
            "/api/audit",
        ):
            r = op.get(path, headers=auth)
            assert marker not in r.content and b"PRIVATE KEY" not in r.content, path


def test_a_revocation_during_a_refresh_is_seen_on_the_next_request(tmp_path: Path) -> None:
    """The API's process sees its own revocation at once (``invalidate``), also when a
    refresh that read the list before the revocation committed ends after it."""
    from director.db import Database
    from director.revocation import RevocationList, record_issued, revoke

    issued = issue_vehicle_certificate(_director_dir(tmp_path), "VIN-RACE-1")
    serial = format(x509.load_pem_x509_certificate(issued.certificate).serial_number, "x")
    db = Database(f"sqlite:///{tmp_path / 'revocations.db'}")
    try:
        db.migrate()
        record_issued(db, "VIN-RACE-1", issued.certificate)
        calls = 0

        def clock() -> float:  # the revocation commits while the refresh is in flight
            nonlocal calls
            calls += 1
            if calls == 3:  # the refresh has read the list, its result is not kept yet
                revoke(db, "VIN-RACE-1")
                revocations.invalidate()  # as DELETE /api/vehicles/{vin}/certificate does
            return 100.0

        revocations = RevocationList(db, clock=clock)
        assert asyncio.run(revocations.revoked(serial)) is False  # read before the revoke
        assert calls > 3
        assert asyncio.run(revocations.revoked(serial)) is True  # same instant: refreshed
    finally:
        db.dispose()


def _director_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "d"
    init_director(directory, token=TOKEN)
    return directory


def test_an_issued_certificate_is_not_stored_by_caches(tls_director: TlsDirector) -> None:
    """``POST /api/vehicles/{vin}/certificate`` answers with a private key: no-store."""
    import httpx

    car = tls_director.car()
    ctx = ssl.create_default_context(cafile=str(tls_director.ca))
    with httpx.Client(
        base_url=tls_director.operator_url, verify=ctx, timeout=10, trust_env=False
    ) as op:
        r = op.post(
            f"/api/vehicles/{car.vin}/certificate", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert r.status_code == 201 and "PRIVATE KEY" in r.json()["key"], r.text
    assert r.headers["cache-control"] == "no-store"


def test_refused_requests_do_no_database_work_but_the_revocation_list(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """Another vehicle's and unknown VINs cost no database statement: the gate answers
    before the app. (The revocation list's refresh, at most every 2 s, is the only one.)"""
    from sqlalchemy import event

    mine, theirs = tls_director.car(), tls_director.car()
    ctx = _issued_context(
        tls_director, tmp_path, issue_vehicle_certificate(tls_director.directory, mine.vin)
    )
    statements: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # the background signer (signing the cars just registered) is no request's work
        if threading.current_thread().name != "metadata-signer":
            statements.append(statement)

    engine = tls_director.director.db.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for vin in (theirs.vin, "UNKNOWN-VIN-0001", "UNKNOWN-VIN-0002"):
            for request in (
                _get(f"/vehicles/{vin}/metadata/timestamp.json"),
                _get(f"/vehicles/{vin}/metadata/1.targets.der"),
                f"PUT /vehicles/{vin}/manifest HTTP/1.1\r\nHost: d\r\nContent-Length: 2\r\n"
                "Connection: close\r\n\r\n{}".encode(),
            ):
                assert _without_date(_exchange(tls_director, ctx, request)) == REFUSED
        assert all("vehicle_certificates" in s for s in statements), statements
        # the check counts statements: the vehicle's own request does touch the database
        own = _get(f"/vehicles/{mine.vin}/metadata/timestamp.json")  # its first read
        assert _exchange(tls_director, ctx, own).startswith(b"HTTP/1.1 200 OK")
        assert any("vehicle_certificates" not in s for s in statements), statements
    finally:
        event.remove(engine, "before_cursor_execute", seen)


def _answer_on(s: ssl.SSLSocket, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` on a kept-alive connection; its status line and body."""
    s.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or b"<closed>"
        assert not data.endswith(b"<closed>"), data
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = int(next(x for x in lines if x.startswith(b"content-length:")).split(b":")[1])
    while len(body) < length:
        body += s.recv(65536)
    return head.split(b"\r\n")[0], body


def test_a_certificate_expiring_on_a_kept_alive_connection_is_refused(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """The handshake checks the validity period once; a connection kept alive past the
    certificate's expiry gets 403 certificate_expired on its next request."""
    car = tls_director.car()
    expiry = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(seconds=4)
    chain, key = _forge(tls_director.directory, [car.vin], [car.vin], not_after=expiry)
    ctx = _context(tls_director, tmp_path, chain, key)
    port = int(tls_director.vehicle_url.rsplit(":", 1)[1])
    request = _get(f"/vehicles/{car.vin}/metadata/timestamp.json", "Host: d\r\n")
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        assert _answer_on(s, request)[0] == b"HTTP/1.1 200 OK"
        while dt.datetime.now(dt.UTC) <= expiry + dt.timedelta(seconds=0.3):
            time.sleep(0.1)  # within uvicorn's 5 s keep-alive
        assert _answer_on(s, request) == (b"HTTP/1.1 403 Forbidden", EXPIRED_BODY)


def test_concurrent_issues_leave_one_valid_certificate(db_url: str, tmp_path: Path) -> None:
    """Two certificates issued for one VIN at the same time (PostgreSQL, READ COMMITTED):
    the later revokes the earlier, as when they come one after the other."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite serializes the writers")
    import threading

    from sqlalchemy import select, text

    from director.db import Database
    from director.revocation import VehicleCertificate, record_issued

    directory = _director_dir(tmp_path)
    vin = "VIN-CONCURRENT-1"
    certs = [issue_vehicle_certificate(directory, vin).certificate for _ in range(3)]
    db = Database(db_url)
    try:
        db.migrate()
        record_issued(db, vin, certs[0])
        with db.engine.connect() as holder:  # holds the first certificate's row ...
            holder.execute(
                select(VehicleCertificate).where(VehicleCertificate.vin == vin).with_for_update()
            )
            errors: list[BaseException] = []

            def issue(pem: bytes) -> None:
                try:
                    record_issued(db, vin, pem)
                except BaseException as e:  # reported below
                    errors.append(e)

            threads = [threading.Thread(target=issue, args=(pem,)) for pem in certs[1:]]
            for t in threads:
                t.start()
            # ... until both issues wait on a lock (the row's, or the VIN's advisory lock)
            waiting = text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND (query LIKE '%vehicle_certificates%' OR query LIKE '%hashtext%')"
            )
            with db.engine.connect() as watch:
                deadline = time.monotonic() + 30
                while watch.execute(waiting).scalar_one() < 2:
                    assert time.monotonic() < deadline, "the issues never waited"
                    watch.rollback()  # pg_stat_activity is read once per transaction
                    time.sleep(0.05)
            holder.commit()
        for t in threads:
            t.join(timeout=30)
        assert errors == []
        valid = db.read_all(
            select(VehicleCertificate.serial).where(
                VehicleCertificate.vin == vin, VehicleCertificate.revoked_at.is_(None)
            )
        )
        assert len(valid) == 1, valid
    finally:
        db.dispose()
