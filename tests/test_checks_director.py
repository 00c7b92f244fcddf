"""Director security checks no other test pinned down (a mutation review).

Each test here fails when one check of ``director.envelope``, ``director.intake``,
``director.tls`` or ``director.http_layer`` is removed: the refusals of Uptane 2.1
5.4.2 (the vehicle version manifest), and hostile input getting a typed refusal,
never a 500. Real Director over real HTTP, SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import test_director_tls
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers.director_env import Car, Env, _serve_asgi, dump, new_car, put_manifest, register
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from sqlalchemy import select
from test_director import _resigned
from test_director_tls import TOKEN, TlsDirector

from director.app import create_app
from director.db import Database, Vehicle
from director.revocation import RevocationList
from director.service import Director, EcuSpec
from director.store import DBMetadataStore
from director.tls import (
    EXPIRED_BODY,
    REFUSED_BODY,
    UNCHECKED_BODY,
    VEHICLE,
    ListenerGate,
    create_ca,
    issue_vehicle_certificate,
    running_vehicle_listener,
    server_certificate,
    tls_paths,
)
from uptane.errors import ConfigError, ManifestError
from uptane.manifest import VehicleVersionManifest

# the mutual-TLS Director of test_director_tls (module-scoped: one for this module)
tls_director = test_director_tls.tls_director


def _signatures(data: bytes, change: Callable[[list[dict[str, Any]]], None]) -> bytes:
    doc = json.loads(data)
    change(doc["signatures"])
    return json.dumps(doc).encode()


def _refused(env: Env, car: Car, body: bytes, status: int, reason: str) -> None:
    """``body`` is refused with ``status``/``reason`` and changes nothing."""
    before = dump(env.db)
    r = put_manifest(env, car, body)
    assert (r.status_code, r.json()["error"]) == (status, reason), r.text
    assert r.json()["detail"]
    assert dump(env.db) == before


# --- the manifest's ECU set (5.4.2: every ECU of the vehicle, no other) -----------------


def test_an_unknown_ecu_in_place_of_a_registered_one_is_refused(env: Env) -> None:
    """As many reports as the vehicle has ECUs, one from a serial it does not have:
    refused as ``unknown_ecu`` (the report count alone does not see it)."""
    car = register(env, new_car())
    s1 = f"{car.vin}-S1"
    stranger = CryptoSigner.generate_ed25519()
    reports = {s: car.report(s) for s in car.ecus if s != s1}
    reports[f"{car.vin}-S9"] = car.report(s1, ecu_serial=f"{car.vin}-S9", signer=stranger)
    body = VehicleVersionManifest(car.vin, car.primary.serial, reports).sign(car.primary.signer)
    _refused(env, car, body, 422, "unknown_ecu")
    assert put_manifest(env, car, car.manifest()).status_code == 200


# --- the manifest's shape: hostile input gets 400 malformed -----------------------------


def _malformed(car: Car) -> list[tuple[str, bytes, str]]:
    """(what, body, reason) of manifests the primary signed but no Director accepts."""
    p, s0 = car.primary.serial, f"{car.vin}-S0"
    sign = car.primary.signer

    def resigned(change: Callable[[dict[str, Any]], None]) -> bytes:
        return _resigned(car.manifest(), change, sign)

    def listed(signed: dict[str, Any]) -> None:
        signed["ecu_version_reports"] = list(signed["ecu_version_reports"])

    def nine(sigs: list[dict[str, Any]]) -> None:
        sigs.extend(
            {"keyid": f"{n:064x}", "sig": sigs[0]["sig"]} for n in range(1, 9)
        )  # the primary's own signature and eight others

    return [
        ("an extra signed field", resigned(lambda s: s.__setitem__("note", "x")), "malformed"),
        ("a missing signed field", resigned(lambda s: s.pop("primary_ecu_serial")), "malformed"),
        ("a VIN that is not a string", resigned(lambda s: s.__setitem__("vin", 7)), "malformed"),
        (
            "a VIN that is not an identifier",
            resigned(lambda s: s.__setitem__("vin", car.vin + "/x")),
            "malformed",
        ),
        (
            "a primary serial that is not a string",
            resigned(lambda s: s.__setitem__("primary_ecu_serial", [p])),
            "malformed",
        ),
        ("reports as a list of serials", resigned(listed), "malformed"),
        (
            "a report that is not a string",
            resigned(lambda s: s["ecu_version_reports"].__setitem__(s0, 12345)),
            "malformed",
        ),
        ("no signature", _signatures(car.manifest(), lambda sigs: sigs.clear()), "malformed"),
        ("nine signatures", _signatures(car.manifest(), nine), "malformed"),
    ]


def test_malformed_manifests_signed_by_the_primary_are_refused_as_malformed(env: Env) -> None:
    """The envelope's shape checks (``director.envelope``): each such manifest gets
    ``400 malformed``, never another refusal or a 500, and changes nothing."""
    car = register(env, new_car())
    assert put_manifest(env, car, car.manifest()).status_code == 200
    for what, body, reason in _malformed(car):
        before = dump(env.db)
        r = put_manifest(env, car, body)
        assert (r.status_code, r.json()["error"]) == (400, reason), (what, r.text)
        assert dump(env.db) == before, what
    assert put_manifest(env, car, car.manifest()).status_code == 200


# --- the primary's signature (5.4.2.2) ----------------------------------------------------


def test_the_primary_signature_is_found_by_its_keyid_among_others(env: Env) -> None:
    """A manifest carrying another key's signature before the primary's is checked with
    the primary's, found by key id; what is stored keeps only that signature."""
    car = register(env, new_car())
    stranger = CryptoSigner.generate_ed25519()
    signed = json.loads(car.manifest())["signed"]
    canonical = (encode_canonical(signed) or "").encode()
    foreign = stranger.sign(canonical).to_dict()
    body = _signatures(car.manifest(), lambda sigs: sigs.insert(0, foreign))
    r = put_manifest(env, car, body)
    assert r.status_code == 200, r.text
    with env.db.transaction() as s:
        last = s.scalar(select(Vehicle.last_manifest).where(Vehicle.vin == car.vin))
    assert last is not None
    stored = json.loads(last)
    assert [s["keyid"] for s in stored["signatures"]] == [car.primary.signer.public_key.keyid]


# --- limits and times checked by the Director itself, not only by its HTTP layer -------------


def test_the_service_refuses_an_oversized_manifest_by_itself(env: Env) -> None:
    """``Director.receive_manifest`` caps the manifest size itself (``max_manifest``),
    whatever caps the HTTP body in front of it."""
    car = register(env, new_car())
    data = car.manifest()
    padded = data[:-1] + b" " * (env.director.max_manifest - len(data) + 1) + data[-1:]
    before = dump(env.db)
    with pytest.raises(ManifestError) as e:
        env.director.receive_manifest(car.vin, padded)
    assert e.value.reason == "too_large"
    assert dump(env.db) == before


def test_a_primary_report_exactly_at_the_time_tolerance_is_accepted(env: Env) -> None:
    """5.4.2.1: a report time up to ``report_time_tolerance`` ahead of the Director's
    clock is accepted, the primary's and a secondary's alike; one second more is not."""
    now = datetime.now(UTC).replace(microsecond=0)
    director = Director(
        Database(env.config.db_url),
        env.config.online_signers(),
        clock=lambda: now,
        report_time_tolerance=timedelta(minutes=10),
    )
    try:
        car = register(env, new_car())
        edge = now + timedelta(minutes=10)
        receipt = director.receive_manifest(
            car.vin, car.manifest(reports={s: car.report(s, latest_time=edge) for s in car.ecus})
        )
        assert dict(receipt.refused_reports) == {}
        with pytest.raises(ManifestError) as e:
            late = edge + timedelta(seconds=1)
            director.receive_manifest(
                car.vin,
                car.manifest(reports={s: car.report(s, latest_time=late) for s in car.ecus}),
            )
        assert e.value.reason == "report_time_in_future"
    finally:
        director.close()


# --- the operator token is checked before any body is read (GuardMiddleware) -------------


def test_operator_requests_without_the_token_are_refused_before_their_body(env: Env) -> None:
    """``/api/...`` without the bearer token (none, another scheme, a wrong token) is
    refused at once, before the body it announces is read: an unauthenticated client
    cannot make the Director wait for, or hold, a body. The body never comes here, so
    a guard that read it first would answer ``408`` at the body timeout instead."""
    token = env.config.token
    url, stop = _serve_asgi(create_app(env.director, token, body_timeout=3.0))
    port = int(url.rsplit(":", 1)[1])
    try:
        for auth in (b"", f"Basic {token}".encode(), b"Bearer not-the-token"):
            head = b"POST /api/vehicles HTTP/1.1\r\nHost: d\r\nContent-Length: 1000\r\n"
            if auth:
                head += b"Authorization: " + auth + b"\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(head + b"\r\n")
                answer = b""
                while b"\r\n\r\n" not in answer:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 401 "), (auth, answer[:200])
    finally:
        stop()


# --- the vehicle listener serves a vehicle only /vehicles/{its VIN}/... (director.tls) -------


def test_the_vehicle_listener_serves_no_other_route_named_by_the_vin(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """A vehicle whose VIN is also a path segment of another route (``vehicles``) reaches,
    on the vehicle listener, only ``/vehicles/vehicles/...``: not the operator API's
    ``/api/vehicles/vehicles``, even with the operator's token."""
    car = new_car(1)
    car.vin = "vehicles"
    tls_director.director.register_vehicle(
        car.vin,
        [
            EcuSpec(e.serial, e.hardware_id, e.signer.public_key, primary=e.primary)
            for e in car.ecus.values()
        ],
    )
    issued = issue_vehicle_certificate(tls_director.directory, car.vin)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with tls_director.client(issued, tmp_path) as http:
        assert http.get("/vehicles/vehicles/metadata/timestamp.json").status_code == 200
        for path in ("/api/vehicles/vehicles", "/api/vehicles/vehicles/certificate"):
            r = http.get(path, headers=auth)
            assert (r.status_code, r.content) == (404, REFUSED_BODY), (path, r.text)
        r = http.post("/api/vehicles/vehicles/certificate", headers=auth)
        assert (r.status_code, r.content) == (404, REFUSED_BODY), r.text


def test_the_vehicle_listener_fails_closed_when_revocations_cannot_be_read(
    tls_director: TlsDirector, tmp_path: Path
) -> None:
    """A vehicle listener whose revocation list cannot be read (here: a database without
    the table) serves no vehicle request, a valid certificate's neither: ``503``."""
    unreadable = Database(f"sqlite:///{tmp_path / 'unmigrated.db'}")
    try:
        app = create_app(tls_director.director, TOKEN)
        revocations = RevocationList(unreadable)
        with running_vehicle_listener(app, tls_director.directory, revocations=revocations) as url:
            car = tls_director.car()
            cert, key, _ = issue_vehicle_certificate(tls_director.directory, car.vin).write(
                tmp_path, "client"
            )
            ctx = ssl.create_default_context(cafile=str(tls_director.ca))
            ctx.load_cert_chain(cert, key)
            with httpx.Client(base_url=url, verify=ctx, timeout=10, trust_env=False) as http:
                for path in (f"/vehicles/{car.vin}/metadata/timestamp.json", "/health"):
                    r = http.get(path)
                    assert (r.status_code, r.content) == (503, UNCHECKED_BODY), (path, r.text)
                r = http.put(f"/vehicles/{car.vin}/manifest", content=car.manifest())
                assert (r.status_code, r.content) == (503, UNCHECKED_BODY), r.text
        assert tls_director.director.vehicle_status(car.vin).last_seen is None
    finally:
        unreadable.dispose()


# --- metadata paths (director.http_layer.MetadataFastPath) -----------------------------------


def test_a_metadata_path_with_more_after_the_file_name_serves_no_file(env: Env) -> None:
    """``/vehicles/{vin}/metadata/{name}`` names one file: a path going on past the name
    is answered 404 as the app's routes answer it, not with the file it begins with."""
    car = register(env, new_car())
    base = f"/vehicles/{car.vin}/metadata/timestamp.json"
    assert env.http.get(base).status_code == 200
    for path in (f"{base}/x", f"{base}/x/y", "/root/1.root.json/x"):
        r = env.http.get(path)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"], path


# --- what the Director stores and serves (director.store, director.tls) ------------------------


def test_the_online_director_never_writes_root_metadata(env: Env) -> None:
    """Root is signed offline (Uptane 2.1 5.1): a vehicle's metadata store refuses to
    write any root file, versioned or not, JSON or DER, and nothing is stored."""
    car = register(env, new_car())
    before = dump(env.db)
    with env.db.transaction(write=True) as session:
        vehicle_id = session.scalar(select(Vehicle.id).where(Vehicle.vin == car.vin))
        assert vehicle_id is not None
        store = DBMetadataStore(session, vehicle_id, env.clock())
        for name in ("root.json", "2.root.json", "2.root.der", "1.root.json"):
            with pytest.raises(RuntimeError, match="never writes root"):
                store.write(name, b"{}")
    assert dump(env.db) == before


def test_serve_tls_takes_both_a_certificate_and_its_key_or_neither(tmp_path: Path) -> None:
    """``--tls-cert`` without ``--tls-key`` (or the reverse) is a configuration error,
    not a server quietly presenting the Director CA's own server certificate."""
    directory = tmp_path / "d"
    create_ca(directory)
    cert, key = server_certificate(directory)
    for given in ((cert, None), (None, key)):
        with pytest.raises(ConfigError, match="both --tls-cert and --tls-key"):
            tls_paths(directory, *given)
    assert tls_paths(directory, cert, key)[1:] == (cert, key)


def test_a_vehicle_certificate_can_sign_nothing_the_director_ca_trusts(tmp_path: Path) -> None:
    """Two locks, each enough alone, that no vehicle issues certificates for another VIN:
    a vehicle's certificate is no CA, and the Director CA allows no intermediate CA (the
    handshake refusing such a chain: ``test_certificates_the_handshake_refuses``)."""
    directory = tmp_path / "d"
    ca_pem = create_ca(directory).read_bytes()
    ca = x509.load_pem_x509_certificate(ca_pem).extensions.get_extension_for_class(
        x509.BasicConstraints
    )
    assert (ca.critical, ca.value.ca, ca.value.path_length) == (True, True, 0)
    issued = issue_vehicle_certificate(directory, "VIN-CA-CHECK-1")
    vehicle = x509.load_pem_x509_certificate(issued.certificate).extensions
    constraints = vehicle.get_extension_for_class(x509.BasicConstraints)
    assert (constraints.critical, constraints.value.ca) == (True, False)
    usage = vehicle.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_a_vehicle_request_without_its_certificate_expiry_is_refused() -> None:
    """``ListenerGate`` fails closed: a vehicle connection whose certificate expiry its
    protocol did not record (``client_not_after``) is refused like an expired one."""
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"served"})

    async def answer(tls: dict[str, str]) -> tuple[int, bytes]:
        sent: list[Any] = []

        async def receive() -> Any:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        path = "/vehicles/VIN-GATE-1/metadata/timestamp.json"
        scope = {"type": "http", "path": path, "extensions": {"tls": tls}}
        await ListenerGate(app, VEHICLE)(scope, receive, send)
        return sent[0]["status"], sent[1]["body"]

    later = str(time.time() + 3600)
    assert asyncio.run(answer({"client_vin": "VIN-GATE-1", "client_not_after": later})) == (
        200,
        b"served",
    )
    assert asyncio.run(answer({"client_vin": "VIN-GATE-1"})) == (403, EXPIRED_BODY)
    assert len(reached) == 1


def test_stored_report_times_never_go_back_when_the_director_clock_does(env: Env) -> None:
    """5.4.2.1: an ECU's stored last report time never goes backwards, even when the
    Director's clock steps back (the time stored is capped at the clock): a report older
    than one accepted earlier stays refused."""
    t = datetime.now(UTC).replace(microsecond=0)
    now = [t]
    director = Director(
        Database(env.config.db_url), env.config.online_signers(), clock=lambda: now[0]
    )
    try:
        car = register(env, new_car())
        p = car.primary.serial

        def send(at: datetime) -> None:
            reports = {s: car.report(s, latest_time=at) for s in car.ecus}
            director.receive_manifest(car.vin, car.manifest(reports=reports))

        send(t)
        now[0] = t - timedelta(minutes=10)  # the Director's clock steps back
        send(t)  # the same ECU time: accepted, stored as it was
        stored = {e.serial: e.last_report_time for e in director.vehicle_status(car.vin).ecus}
        assert stored[p] == t
        before = dump(env.db)
        with pytest.raises(ManifestError) as e:
            send(t - timedelta(minutes=5))  # before the report accepted at t
        assert e.value.reason == "report_time_in_past"
        assert dump(env.db) == before
    finally:
        director.close()
