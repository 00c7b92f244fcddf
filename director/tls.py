"""Vehicles authenticated by mutual TLS: the Director CA, device certificates, listener gates.

Uptane 2.1 leaves transport security to the deployment; production back ends
authenticate each vehicle with a device certificate, and so does the
Director (issue 12):

- ``uptane director init`` creates a Director CA (an ECDSA P-256 key and a
  self-signed CA certificate, ``DIR/tls/``, key mode 0600);
- each vehicle gets a client certificate from that CA at registration
  (subject CN = VIN, SAN ``urn:uptane:vin:VIN``; the listener takes the VIN
  only from a certificate whose one CN and one VIN SAN agree, ``peer_vin``);
- ``serve --tls`` runs two listeners: the *vehicle* listener requires a
  client certificate from the Director CA at the TLS handshake and serves
  only ``/vehicles/{vin}/...`` of the certificate's own VIN, ``/root/...``
  and ``/health``; the *operator* listener (``--operator-port``) takes no
  client certificate and serves only ``/api/...`` (bearer token),
  ``/health``, ``/metrics`` and the OpenAPI pages. A request for another
  vehicle's resources and one for an unknown VIN get the same answer;
- a revoked client certificate is refused on every request of the vehicle
  listener (``director.revocation``: ``uptane director revoke-cert``);
- ``serve --tls --workers N`` runs both listeners in N processes
  (``director.tls_serve``).

Plain HTTP (no ``--tls``) stays for the demo and tests on loopback: there
any client can read any vehicle's metadata.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import ssl
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from uptane.errors import ConfigError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from director.revocation import RevocationList
    from director.service import Director

TLS_DIR = "tls"
CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server.pem"
SERVER_KEY = "server-key.pem"
VIN_URI_PREFIX = "urn:uptane:vin:"
CA_DAYS = 3650
CERT_DAYS = 825  # device and server certificates
SERVER_NAMES = ("127.0.0.1", "localhost")

# The one answer to every vehicle-resource request the client may not make:
# another vehicle's, an unknown VIN's, a path the listener does not serve.
REFUSED_STATUS = 404
REFUSED_BODY = json.dumps({"error": "not_found", "detail": "no such resource"}).encode()


@dataclass(frozen=True)
class IssuedCertificate:
    """A PEM certificate, its private key (PKCS#8, unencrypted) and the CA certificate."""

    certificate: bytes
    key: bytes
    ca: bytes

    def write(self, directory: Path, name: str) -> tuple[Path, Path, Path]:
        """Write ``name.pem``, ``name-key.pem`` (0600) and ``ca.pem`` into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key, ca = (
            directory / f"{name}.pem",
            directory / f"{name}-key.pem",
            directory / CA_CERT,
        )
        _write_private(key, self.key)
        cert.write_bytes(self.certificate)
        ca.write_bytes(self.ca)
        return cert, key, ca


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key to ``path``, mode 0600: into a new file (``mkstemp``: 0600,
    exclusive) renamed over ``path``, so the key is never in a file of wider modes (one
    that existed) nor written through a symlink planted at ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def tls_dir(directory: Path) -> Path:
    return Path(directory) / TLS_DIR


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(directory: Path) -> Path:
    """Create the Director CA in ``DIR/tls/`` unless it exists; returns the CA cert path.

    A CA certificate without its key is kept: a host that only serves needs no CA key
    (it cannot issue certificates); replacing the certificate would lock every vehicle
    out. A CA key without its certificate is an error."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    d = tls_dir(directory)
    if (d / CA_CERT).exists():
        return d / CA_CERT
    if (d / CA_KEY).exists():
        raise ConfigError(f"{d / CA_KEY} without {CA_CERT}: restore the CA certificate")
    d.mkdir(parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Uptane Director CA")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(
        d / CA_KEY,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    (d / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return d / CA_CERT


def _load_ca(directory: Path) -> tuple[Any, Any, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    d = tls_dir(directory)
    try:
        ca_pem = (d / CA_CERT).read_bytes()
        key_pem = (d / CA_KEY).read_bytes()
    except OSError as e:
        raise ConfigError(
            f"cannot read the Director CA ({e.filename}: {e.strerror or e}): `uptane director "
            "init` creates it (a host without the CA key issues no certificates: give "
            "serve --tls-cert/--tls-key)"
        ) from None
    mode = (d / CA_KEY).stat().st_mode & 0o777
    if mode & 0o077:  # as ssh refuses an unprotected private key
        raise ConfigError(f"{d / CA_KEY} is open to others (mode {mode:o}): chmod 600 it")
    return (
        x509.load_pem_x509_certificate(ca_pem),
        serialization.load_pem_private_key(key_pem, None),
        ca_pem,
    )


def _issue(
    directory: Path, common_name: str, sans: Iterable[Any], client: bool
) -> IssuedCertificate:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_cert, ca_key, ca_pem = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return IssuedCertificate(
        certificate=cert.public_bytes(serialization.Encoding.PEM),
        key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ca=ca_pem,
    )


def issue_vehicle_certificate(directory: Path, vin: str) -> IssuedCertificate:
    """A client certificate for ``vin`` (CN = VIN, SAN ``urn:uptane:vin:VIN``)."""
    from cryptography import x509

    return _issue(
        directory, vin, [x509.UniformResourceIdentifier(VIN_URI_PREFIX + vin)], client=True
    )


def server_certificate(directory: Path) -> tuple[Path, Path]:
    """``DIR/tls/server.pem`` and its key, issued by the Director CA for 127.0.0.1 and
    localhost if missing (give ``serve --tls-cert/--tls-key`` for other names)."""
    from cryptography import x509

    d = tls_dir(directory)
    cert, key = d / SERVER_CERT, d / SERVER_KEY
    if not (cert.exists() and key.exists()):
        issued = _issue(
            directory,
            "Uptane Director",
            [
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.DNSName("localhost"),
            ],
            client=False,
        )
        _write_private(key, issued.key)
        cert.write_bytes(issued.certificate)
    return cert, key


def ca_certificate(directory: Path) -> Path:
    path = tls_dir(directory) / CA_CERT
    if not path.exists():
        raise ConfigError(f"no Director CA at {path}: `uptane director init` creates it")
    return path


def peer_vin(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The VIN of a verified client certificate: its one subject CN, which must also be
    its one ``urn:uptane:vin:`` SAN (as ``issue_vehicle_certificate`` makes them). None
    without a certificate, or for one that names no VIN, several, or two different ones:
    the vehicle listener then serves it nothing."""
    if ssl_object is None:
        return None
    cert: Any = ssl_object.getpeercert()
    if not cert:
        return None
    names = [
        value for rdn in cert.get("subject", ()) for name, value in rdn if name == "commonName"
    ]
    sans = [
        value.removeprefix(VIN_URI_PREFIX)
        for kind, value in cert.get("subjectAltName", ())
        if kind == "URI" and isinstance(value, str) and value.startswith(VIN_URI_PREFIX)
    ]
    if len(names) == 1 and isinstance(names[0], str) and sans == names:
        return names[0]
    return None


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The serial of a verified client certificate, lowercase hex (as
    ``director.revocation`` stores it), None without one."""
    if ssl_object is None:
        return None
    cert: Any = ssl_object.getpeercert()
    serial = cert.get("serialNumber") if cert else None
    try:
        return format(int(serial, 16), "x") if isinstance(serial, str) else None
    except ValueError:
        return None


def peer_not_after(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """When a verified client certificate expires (POSIX seconds, as text), None without
    one: the handshake checked it, ``ListenerGate`` checks it again on every request of a
    connection kept alive past it."""
    cert: Any = None if ssl_object is None else ssl_object.getpeercert()
    try:
        return str(ssl.cert_time_to_seconds(cert["notAfter"])) if cert else None
    except (KeyError, ValueError):
        return None


# --- the two listeners ----------------------------------------------------------

VEHICLE = "vehicle"
OPERATOR = "operator"
_OPERATOR_EXACT = frozenset({"/health", "/metrics", "/docs", "/openapi.json", "/api"})


def _client(scope: Scope, field: str) -> str | None:
    tls = scope.get("extensions", {}).get("tls")
    value = tls.get(field) if isinstance(tls, dict) else None
    return value if isinstance(value, str) else None


def client_vin(scope: Scope) -> str | None:
    """The VIN the connection's client certificate names (``DirectorProtocol`` puts it)."""
    return _client(scope, "client_vin")


def client_serial(scope: Scope) -> str | None:
    """The serial of the connection's client certificate (lowercase hex)."""
    return _client(scope, "client_serial")


def allowed(listener: str, path: str, vin: str | None) -> bool:
    """Whether ``path`` is served on ``listener`` to a client with certificate ``vin``.

    A path with an empty, ``.`` or ``..`` segment is never served: nothing here
    routes one, and a proxy that normalises paths must not turn ``/vehicles/A/../B``
    into another vehicle's resource.
    """
    if any(seg in ("", ".", "..") for seg in path.split("/")[1:]):
        return False
    if listener == VEHICLE:
        if path == "/health" or path.startswith("/root/"):
            return vin is not None
        parts = path.split("/", 3)
        return len(parts) >= 3 and parts[1] == "vehicles" and vin is not None and parts[2] == vin
    return path in _OPERATOR_EXACT or path.startswith("/api/")


REVOKED_BODY = json.dumps(
    {"error": "certificate_revoked", "detail": "this client certificate is revoked"}
).encode()
EXPIRED_BODY = json.dumps(
    {"error": "certificate_expired", "detail": "this client certificate has expired"}
).encode()
UNCHECKED_BODY = json.dumps(
    {"error": "database_unavailable", "detail": "the certificate revocations cannot be read"}
).encode()


async def _answer(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class ListenerGate:
    """What one listener serves: see the module docstring. Every refusal is the same
    404 body, so that neither another vehicle's VIN nor an unknown one shows. On the
    vehicle listener with ``revocations``, a revoked client certificate gets 403 on
    every path (``director.revocation``), and so does a certificate that expired
    while its connection was kept alive. A WebSocket request is closed (neither
    listener routes one; ``listener_configs`` turns WebSocket support off anyway)."""

    def __init__(
        self, app: ASGIApp, listener: str, revocations: RevocationList | None = None
    ) -> None:
        if listener not in (VEHICLE, OPERATOR):
            raise ValueError(f"unknown listener {listener!r}")
        self.app = app
        self.listener = listener
        self.revocations = revocations if listener == VEHICLE else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # neither listener routes one: never ungated
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] == "http":
            if self.revocations is not None:
                revoked = await self.revocations.revoked(client_serial(scope))
                if revoked is None:
                    await _answer(send, 503, UNCHECKED_BODY)
                    return
                if revoked:
                    await _answer(send, 403, REVOKED_BODY)
                    return
            if self.listener == VEHICLE and client_vin(scope) is not None:
                not_after = _client(scope, "client_not_after")
                if not_after is None or time.time() > float(not_after):
                    await _answer(send, 403, EXPIRED_BODY)
                    return
            if not allowed(self.listener, scope.get("path", ""), client_vin(scope)):
                await _answer(send, REFUSED_STATUS, REFUSED_BODY)
                return
        await self.app(scope, receive, send)


def server_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """A TLS server context; with ``client_ca``, client certificates from it are required."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca is not None:
            ctx.load_verify_locations(cafile=client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS certificate or key: {e}") from None
    return ctx


def client_context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting ``ca``, presenting ``cert``/``key`` if given."""
    try:
        ctx = ssl.create_default_context(cafile=str(ca))
        if cert is not None:
            ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"TLS files {ca}, {cert}, {key}: {e}") from None
    return ctx


class CertificateOut(BaseModel):
    """A vehicle's client certificate, its private key and the Director CA, as PEM."""

    vin: str
    certificate: str
    key: str
    ca: str


class RevokedOut(BaseModel):
    """The serials (lowercase hex) of the certificates a request revoked."""

    vin: str
    serials: list[str]


def install_certificate_api(
    app: FastAPI, director: Director, directory: Path, operator: Any
) -> None:
    """``POST /api/vehicles/{vin}/certificate``: a new client certificate for a registered
    vehicle, as PEM (certificate, private key, CA certificate) in JSON. The key travels
    in the answer: over the operator listener's TLS, to the operator provisioning the car.
    ``DELETE`` revokes the vehicle's certificates. The app's ``state.revocations`` is the
    ``RevocationList`` its vehicle listener checks (``listener_configs``)."""
    from starlette.concurrency import run_in_threadpool

    from director.revocation import RevocationList, record_issued, revoke

    revocations = RevocationList(director.db)
    app.state.revocations = revocations

    @app.delete(
        "/api/vehicles/{vin}/certificate",
        response_model=RevokedOut,
        dependencies=[operator],
        tags=["operator"],
    )
    async def revoke_certificates(vin: str) -> RevokedOut:
        """Revoke every certificate issued to the vehicle (404 if none is valid)."""
        revoked = await run_in_threadpool(revoke, director.db, vin)
        revocations.invalidate()
        return RevokedOut(vin=vin, serials=[r.serial for r in revoked])

    @app.post(
        "/api/vehicles/{vin}/certificate",
        response_model=CertificateOut,
        status_code=201,
        dependencies=[operator],
        tags=["operator"],
    )
    async def issue_certificate(vin: str, response: Response) -> CertificateOut:
        """Issue a client certificate (mutual TLS) for a registered vehicle; the
        vehicle's earlier certificates are revoked. The answer holds the private key:
        ``Cache-Control: no-store``."""
        response.headers["Cache-Control"] = "no-store"
        status = await run_in_threadpool(director.vehicle_status, vin)  # 404 if unknown
        issued = await run_in_threadpool(issue_vehicle_certificate, directory, status.vin)
        await run_in_threadpool(record_issued, director.db, status.vin, issued.certificate)
        revocations.invalidate()
        return CertificateOut(
            vin=status.vin,
            certificate=issued.certificate.decode(),
            key=issued.key.decode(),
            ca=issued.ca.decode(),
        )


def listener_configs(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    operator_port: int,
    cert: Path,
    key: Path,
    ca: Path,
    revocations: RevocationList | Literal["app"] | None = "app",
    **options: Any,
) -> list[Any]:
    """uvicorn configs of the vehicle listener (client certificate from ``ca`` required at
    the handshake) and the operator listener (server certificate only), one app behind
    both; the app's lifespan (the campaign ticker) runs once, on the vehicle listener.
    The vehicle listener refuses revoked certificates: by default those of the app's
    ``state.revocations`` (``install_certificate_api``: every app with a CA directory),
    and an app without one is a ``ConfigError`` (fail closed); ``revocations=None``
    serves without the check, only where no certificate is recorded (the simulator)."""
    import uvicorn

    if revocations == "app":
        revocations = getattr(getattr(app, "state", None), "revocations", None)
        if revocations is None:
            raise ConfigError(
                "the vehicle listener's app has no certificate revocation list: build it "
                "with create_app(..., ca_directory=DIR)"
            )

    # ws="none": an Upgrade request stays an HTTP request, gated as any other
    common = {"ssl_certfile": str(cert), "ssl_keyfile": str(key), "ws": "none", **options}
    return [
        uvicorn.Config(
            ListenerGate(app, VEHICLE, revocations),
            host=host,
            port=port,
            ssl_ca_certs=str(ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED,
            **common,
        ),
        uvicorn.Config(
            ListenerGate(app, OPERATOR), host=host, port=operator_port, lifespan="off", **common
        ),
    ]


def tls_paths(
    directory: Path, cert: Path | None = None, key: Path | None = None
) -> tuple[Path, Path, Path]:
    """CA certificate, server certificate and key for ``serve --tls``: the given ones, or
    the Director CA's server certificate (made for 127.0.0.1/localhost if missing)."""
    directory = Path(directory)
    if (cert is None) != (key is None):
        raise ConfigError("give both --tls-cert and --tls-key, or neither")
    create_ca(directory)  # a directory from before the CA existed gets one
    if cert is None or key is None:
        cert, key = server_certificate(directory)
    return ca_certificate(directory), cert, key


def running_vehicle_listener(
    app: ASGIApp,
    directory: Path,
    host: str = "127.0.0.1",
    revocations: RevocationList | Literal["app"] | None = "app",
) -> contextlib.AbstractContextManager[str]:
    """The vehicle listener alone, in a thread (``director.tls_serve.vehicle_listener``;
    ``revocations`` as for ``listener_configs``)."""
    from director.tls_serve import vehicle_listener

    return vehicle_listener(app, directory, host, revocations)
