"""The Director over real HTTP on loopback, on SQLite and on PostgreSQL (DESIGN 6).

Each backend gets one Director (uvicorn in a thread, free port) with its own
database (a SQLite file, or a fresh PostgreSQL schema dropped afterwards);
each test registers its own vehicles. The Image repository is a
``SigningRepository`` over a directory served by a static HTTP server.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.director_env import (
    Car,
    Env,
    _serve_asgi,
    director_targets,
    dump,
    http_client,
    installed_image,
    new_car,
    put_manifest,
    refresh,
    register,
)
from securesystemslib.signer import CryptoSigner, Signer
from sqlalchemy import select
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Targets

from director.app import create_app
from director.db import Base, Database
from director.service import Director
from uptane import der_metadata
from uptane.manifest import (
    EcuVersionReport,
    InstalledImage,
    SignedEcuVersionReport,
    VehicleVersionManifest,
)
from uptane.metadata import UptaneTarget, get_vehicle_id

# --- the tests --------------------------------------------------------------------


def test_openapi_schema_is_published(env: Env) -> None:
    r = env.http.get("/openapi.json")
    assert r.status_code == 200
    schema = r.json()
    for path in (
        "/vehicles/{vin}/metadata/{filename}",
        "/vehicles/{vin}/manifest",
        "/root/{filename}",
        "/api/vehicles",
        "/api/vehicles/{vin}",
        "/api/assignments",
    ):
        assert path in schema["paths"], path
    assert "requestBody" in schema["paths"]["/vehicles/{vin}/manifest"]["put"]
    assert any(
        s.get("scheme") == "bearer" for s in schema["components"]["securitySchemes"].values()
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/vehicles"),
        ("GET", "/api/vehicles/VIN1"),
        ("POST", "/api/vehicles"),
        ("POST", "/api/assignments"),
        ("GET", "/api"),
    ],
)
@pytest.mark.parametrize(
    "auth", [None, "Bearer wrong-token-wrong-token", "Basic dXNlcjpwYXNz", "Bearer"]
)
def test_operator_api_refused_without_token(
    env: Env, method: str, path: str, auth: str | None
) -> None:
    car = new_car()
    headers = {} if auth is None else {"Authorization": auth}
    before = dump(env.db)
    r = env.http.request(method, path, json=car.body(), headers=headers)
    assert r.status_code == 401
    assert r.json()["error"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert dump(env.db) == before


def test_register_and_list(env: Env) -> None:
    car = register(env, new_car())
    r = env.op.get(f"/api/vehicles/{car.vin}")
    assert r.status_code == 200
    v = r.json()
    assert v["vin"] == car.vin
    assert v["last_seen"] is None
    assert v["pending"] == [] and v["attacks"] == []
    assert v["metadata_version"] == 1
    assert {e["serial"]: e["hardware_id"] for e in v["ecus"]} == {
        e.serial: e.hardware_id for e in car.ecus.values()
    }
    assert [e["serial"] for e in v["ecus"] if e["primary"]] == [car.primary.serial]
    assert car.vin in [x["vin"] for x in env.op.get("/api/vehicles").json()]
    assert env.op.get("/api/vehicles/NOSUCHVIN").json()["error"] == "unknown_vehicle"


def _bad_registrations(env: Env) -> Iterator[tuple[str, dict[str, Any], int, str]]:
    existing = register(env, new_car())
    car = new_car()
    body = car.body()
    yield "duplicate vin", existing.body(), 409, "already_registered"
    b = car.body()
    b["ecus"][1] = existing.body()["ecus"][1]
    yield "serial of another vehicle", b, 409, "already_registered"
    b = car.body()
    for e in b["ecus"]:
        e["primary"] = False
    yield "no primary", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][1]["primary"] = True
    yield "two primaries", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][2]["serial"] = b["ecus"][1]["serial"]
    yield "serial twice", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][2]["public_key"] = b["ecus"][1]["public_key"]
    yield "shared key", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][1]["public_key"]["keyid"] = "ab" * 32
    yield "keyid does not match key", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][1]["public_key"]["keyval"]["public"] = "zz" * 32
    yield "key is not hex", b, 422, "invalid_request"
    b = car.body()
    b["ecus"][1]["public_key"]["keytype"] = "rsa"
    yield "not ed25519", b, 422, "invalid_request"
    b = dict(body, vin="../etc")
    yield "unsafe vin", b, 422, "malformed"
    yield "no ECUs", dict(body, ecus=[]), 422, "malformed"
    yield "extra field", dict(body, color="red"), 422, "malformed"


def test_register_refusals_change_nothing(env: Env) -> None:
    for what, body, status, reason in _bad_registrations(env):
        before = dump(env.db)
        r = env.op.post("/api/vehicles", json=body)
        assert (r.status_code, r.json()["error"]) == (status, reason), what
        assert dump(env.db) == before, what


def test_new_vehicle_gets_empty_targets_bound_to_its_vin(env: Env, tmp_path: Path) -> None:
    car = register(env, new_car())
    updater = refresh(env, car, tmp_path)
    targets = director_targets(updater)
    assert targets.targets == {}
    assert targets.delegations is None
    assert get_vehicle_id(targets) == car.vin
    # per-vehicle root URLs serve the shared root chain
    shared = env.http.get("/root/1.root.json").content
    assert env.http.get(f"/vehicles/{car.vin}/metadata/1.root.json").content == shared
    assert env.http.get(f"/vehicles/{car.vin}/metadata/root.json").content == shared


def _verify_der(env: Env, car: Car, json_targets: Targets) -> None:
    root_der = env.http.get(f"/vehicles/{car.vin}/metadata/1.root.der")
    assert root_der.status_code == 200
    assert env.http.get("/root/1.root.der").content == root_der.content
    root_md = Metadata.from_bytes(root_der.content, der_metadata.DERMetadataDeserializer())
    root = root_md.signed
    assert isinstance(root, Root)
    root.verify_delegate("root", der_metadata.der_signed_bytes(root), root_md.signatures)
    json_root = Metadata[Root].from_bytes(env.http.get("/root/1.root.json").content).signed
    assert root.to_dict() == json_root.to_dict()
    for name in (f"{json_targets.version}.targets.der", "targets.der"):
        r = env.http.get(f"/vehicles/{car.vin}/metadata/{name}")
        assert r.status_code == 200, name
        md = Metadata.from_bytes(r.content, der_metadata.DERMetadataDeserializer())
        assert md.signed.to_dict() == json_targets.to_dict()
        root.verify_delegate("targets", der_metadata.der_signed_bytes(md.signed), md.signatures)
        # and the signatures really are over DER, not JSON
        with pytest.raises(UnsignedMetadataError):
            root.verify_delegate("targets", md.signed_bytes, md.signatures)


def test_assignment_reaches_a_plain_tuf_client(env: Env, tmp_path: Path) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    r = env.op.post(
        "/api/assignments", json={"image": "brake-2.wasm", "ecu_serials": [brake.serial]}
    )
    assert r.status_code == 201, r.text
    [a] = r.json()
    assert (a["vin"], a["ecu_serial"], a["status"]) == (car.vin, brake.serial, "pending")

    updater = refresh(env, car, tmp_path)
    info = updater.get_targetinfo("brake-2.wasm")
    assert info is not None
    image_info = env.image.repo.targets().targets["brake-2.wasm"]
    assert info.length == image_info.length
    assert info.hashes == image_info.hashes
    assert info.custom["ecu_serial"] == brake.serial
    assert info.custom["hardware_ids"] == ["brake-ecu"]
    assert info.custom["release_counter"] == 2
    assert info.custom["capabilities"] == ["log", "sensor.read"]
    assert {k: v for k, v in info.custom.items() if k != "ecu_serial"} == image_info.custom
    target = UptaneTarget.from_target_file(info, director=True)
    assert target.ecu_serial == brake.serial
    targets = director_targets(updater)
    assert list(targets.targets) == ["brake-2.wasm"]
    assert get_vehicle_id(targets) == car.vin

    status = env.op.get(f"/api/vehicles/{car.vin}").json()
    assert [p["image"] for p in status["pending"]] == ["brake-2.wasm"]
    assert status["metadata_version"] == targets.version == 2
    _verify_der(env, car, targets)


def test_reassignment_replaces_the_pending_one(env: Env, tmp_path: Path) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    for image in ("brake-1.wasm", "brake-2.wasm"):
        r = env.op.post("/api/assignments", json={"image": image, "ecu_serials": [brake.serial]})
        assert r.status_code == 201
    targets = director_targets(refresh(env, car, tmp_path))
    assert list(targets.targets) == ["brake-2.wasm"]  # one entry per ECU at most
    pending = env.op.get(f"/api/vehicles/{car.vin}").json()["pending"]
    assert [p["image"] for p in pending] == ["brake-2.wasm"]


def test_assignment_refusals_change_nothing(env: Env) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (
            "unknown image",
            {"image": "nope.wasm", "ecu_serials": [brake.serial]},
            409,
            "unknown_image",
        ),
        (
            "hardware mismatch",
            {"image": "door-1.wasm", "ecu_serials": [brake.serial]},
            409,
            "hardware_id_mismatch",
        ),
        (
            "one of two ECUs does not fit",
            {"image": "brake-1.wasm", "ecu_serials": [brake.serial, car.primary.serial]},
            409,
            "hardware_id_mismatch",
        ),
        (
            "unknown serial",
            {"image": "brake-1.wasm", "ecu_serials": ["NOSUCH-ECU"]},
            404,
            "unknown_ecu",
        ),
        (
            "unknown hardware",
            {"image": "brake-1.wasm", "hardware_id": "no-such-hw"},
            404,
            "no_matching_ecu",
        ),
        (
            "unknown vin",
            {"image": "brake-1.wasm", "hardware_id": "brake-ecu", "vins": ["NOSUCHVIN"]},
            404,
            "unknown_vehicle",
        ),
        (
            "unsafe name",
            {"image": "../brake-1.wasm", "ecu_serials": [brake.serial]},
            422,
            "invalid_request",
        ),
        (
            "both selectors",
            {"image": "brake-1.wasm", "ecu_serials": [brake.serial], "hardware_id": "brake-ecu"},
            422,
            "malformed",
        ),
        ("no selector", {"image": "brake-1.wasm"}, 422, "malformed"),
        (
            "vins without hardware id",
            {"image": "brake-1.wasm", "ecu_serials": [brake.serial], "vins": [car.vin]},
            422,
            "malformed",
        ),
    ]
    for what, body, status, reason in cases:
        before = dump(env.db)
        r = env.op.post("/api/assignments", json=body)
        assert (r.status_code, r.json()["error"]) == (status, reason), (what, r.text)
        assert dump(env.db) == before, what


def test_assignment_refused_when_image_repo_is_down(env: Env) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    reader = env.director.image_repo
    url = reader.url  # type: ignore[attr-defined]
    reader.url = "http://127.0.0.1:9"  # type: ignore[attr-defined]  # discard port: refused
    try:
        before = dump(env.db)
        r = env.op.post(
            "/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [brake.serial]}
        )
        assert (r.status_code, r.json()["error"]) == (502, "image_repo_unavailable")
        assert dump(env.db) == before
    finally:
        reader.url = url  # type: ignore[attr-defined]


def test_assign_by_hardware_id_across_vehicles(env: Env) -> None:
    hw = f"seat-{uuid.uuid4().hex[:6]}"
    env.image.add(f"{hw}-1.wasm", [hw], 1)
    cars = [register(env, new_car(2, (hw, "door-ecu"))) for _ in range(3)]
    r = env.op.post(
        "/api/assignments",
        json={"image": f"{hw}-1.wasm", "hardware_id": hw, "vins": [cars[0].vin, cars[1].vin]},
    )
    assert r.status_code == 201, r.text
    assert sorted(a["vin"] for a in r.json()) == sorted([cars[0].vin, cars[1].vin])
    assert env.op.get(f"/api/vehicles/{cars[2].vin}").json()["pending"] == []
    r = env.op.post("/api/assignments", json={"image": f"{hw}-1.wasm", "hardware_id": hw})
    assert r.status_code == 201
    assert sorted(a["vin"] for a in r.json()) == sorted(c.vin for c in cars)
    for car in cars:
        [p] = env.op.get(f"/api/vehicles/{car.vin}").json()["pending"]
        assert p["ecu_serial"] == f"{car.vin}-S0" and p["custom"]["ecu_serial"] == p["ecu_serial"]


def test_same_image_for_two_ecus_of_one_vehicle_refused(env: Env) -> None:
    car = register(env, new_car(2, ("brake-ecu",)))
    s0, s1 = f"{car.vin}-S0", f"{car.vin}-S1"
    before = dump(env.db)
    r = env.op.post("/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [s0, s1]})
    assert (r.status_code, r.json()["error"]) == (409, "duplicate_target")
    assert dump(env.db) == before
    assert (
        env.op.post(
            "/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [s0]}
        ).status_code
        == 201
    )
    before = dump(env.db)
    r = env.op.post("/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [s1]})
    assert (r.status_code, r.json()["error"]) == (409, "duplicate_target")
    assert dump(env.db) == before


def test_manifest_accepted_and_recorded(env: Env) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    brake.installed = installed_image(env, "brake-1.wasm")
    sent = car.manifest()
    r = put_manifest(env, car, sent)
    assert r.status_code == 200, r.text
    assert r.json() == {"accepted": True, "metadata_version": 1}
    v = env.op.get(f"/api/vehicles/{car.vin}").json()
    assert v["last_seen"] is not None
    ecus = {e["serial"]: e for e in v["ecus"]}
    assert ecus[brake.serial]["installed"]["filename"] == "brake-1.wasm"
    assert ecus[brake.serial]["installed"]["release_counter"] == 1
    assert all(e["report_counter"] == 1 for e in ecus.values())
    with env.db.transaction() as s:
        from director.db import VehicleManifestRecord

        bodies = s.scalars(select(VehicleManifestRecord.body)).all()
    # stored as verified: the signed part and the primary's signature, canonical JSON
    from securesystemslib.formats import encode_canonical

    doc = json.loads(sent)
    assert (encode_canonical(doc) or "").encode() in bodies
    # a second, fresh manifest is accepted too
    assert put_manifest(env, car, car.manifest()).status_code == 200


def _tamper_signed(data: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(data)
    change(doc["signed"])
    return json.dumps(doc).encode()


def _resigned(data: bytes, change: Callable[[dict[str, Any]], None], signer: Signer) -> bytes:
    """``data`` with its signed part changed and signed again (by the primary)."""
    from securesystemslib.formats import encode_canonical

    doc = json.loads(data)
    change(doc["signed"])
    canonical = encode_canonical(doc["signed"])
    assert canonical is not None
    doc["signatures"] = [signer.sign(canonical.encode()).to_dict()]
    return json.dumps(doc).encode()


def _bad_manifests(env: Env, car: Car, other: Car) -> Iterator[tuple[str, str, bytes, int, str]]:
    """(what, vin in URL, body, status, reason) for every refused manifest."""
    s0, s1 = f"{car.vin}-S0", f"{car.vin}-S1"
    p = car.primary.serial
    vin = car.vin

    def fresh(**over: SignedEcuVersionReport) -> dict[str, SignedEcuVersionReport]:
        reports = {s: car.report(s) for s in car.ecus}
        reports.update(over)
        return reports

    # tampered after signing
    good = car.manifest()
    other_report = base64.b64encode(car.report(s0).to_der()).decode()
    yield (
        "tampered report",
        vin,
        _tamper_signed(good, lambda s: s["ecu_version_reports"].__setitem__(s0, other_report)),
        403,
        "bad_primary_signature",
    )
    yield (
        "tampered primary serial",
        vin,
        _tamper_signed(car.manifest(), lambda s: s.__setitem__("primary_ecu_serial", s1)),
        403,
        "bad_primary_signature",
    )
    doc = json.loads(car.manifest())
    sig = doc["signatures"][0]["sig"]
    doc["signatures"][0]["sig"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    yield "flipped signature bit", vin, json.dumps(doc).encode(), 403, "bad_primary_signature"
    # an ECU report changed after the ECU signed it (the primary re-signs)
    r = car.report(s0)
    forged = SignedEcuVersionReport(
        report_der=EcuVersionReport.from_der(r.report_der)
        .__class__(**{**EcuVersionReport.from_der(r.report_der).__dict__, "report_counter": 10**6})
        .to_der(),
        signatures=r.signatures,
    )
    yield (
        "tampered ECU report",
        vin,
        car.manifest(reports=fresh(**{s0: forged})),
        403,
        "bad_ecu_signature",
    )
    # replayed
    replay = car.manifest()
    assert put_manifest(env, car, replay).status_code == 200
    yield "replayed manifest", vin, replay, 409, "replayed_report"
    car.ecus[p].counter -= 1  # the primary repeats its last counter, the others move on
    yield "replayed primary report", vin, car.manifest(), 409, "replayed_report"
    car.ecus[p].counter += 1
    # the primary's clock going backwards (replay or tampering), or far ahead of the
    # Director's (a secondary's stale report is left out instead: test_director_intake)
    last = datetime.now(UTC).replace(microsecond=0)  # not before the replay's report times
    yield (
        "primary report time before the last report's",
        vin,
        car.manifest(reports=fresh(**{p: car.report(p, latest_time=last - timedelta(seconds=5))})),
        409,
        "report_time_in_past",
    )
    ahead = env.clock() + env.director.report_time_tolerance + timedelta(minutes=5)
    yield (
        "report time too far ahead",
        vin,
        car.manifest(reports=fresh(**{p: car.report(p, latest_time=ahead)})),
        422,
        "report_time_in_future",
    )
    # mis-signed
    stranger = CryptoSigner.generate_ed25519()
    yield (
        "primary key not registered",
        vin,
        car.manifest(signer=stranger),
        403,
        "bad_primary_signature",
    )
    yield (
        "signed by a secondary's key",
        vin,
        car.manifest(signer=car.ecus[s0].signer),
        403,
        "bad_primary_signature",
    )
    yield (
        "ECU report signed by another key",
        vin,
        car.manifest(reports=fresh(**{s1: car.report(s1, signer=stranger)})),
        403,
        "bad_ecu_signature",
    )
    yield (
        "ECU report signed by the primary",
        vin,
        car.manifest(reports=fresh(**{s1: car.report(s1, signer=car.primary.signer)})),
        403,
        "bad_ecu_signature",
    )
    # foreign vehicle
    yield "other vehicle's manifest", vin, other.manifest(), 400, "vin_mismatch"
    yield (
        "our VIN, other vehicle's primary key",
        vin,
        car.manifest(signer=other.primary.signer),
        403,
        "bad_primary_signature",
    )
    yield (
        "other vehicle's ECU report",
        vin,
        car.manifest(reports=fresh(**{s0: other.report(f"{other.vin}-S0")})),
        403,
        "bad_ecu_signature",
    )
    yield "unknown vehicle", "NOSUCHVIN1", car.manifest(vin="NOSUCHVIN1"), 404, "unknown_vehicle"
    # missing primary report (a missing secondary's is accepted: test_unreachable_...) / unknown ECU
    reports = fresh()
    del reports[p]
    yield "missing primary report", vin, car.manifest(reports=reports), 422, "missing_ecu"
    named_other_primary = VehicleVersionManifest(vin, s1, fresh()).sign(car.primary.signer)
    yield "names another ECU as primary", vin, named_other_primary, 422, "unknown_ecu"
    yield (
        "extra ECU",
        vin,
        car.manifest(reports=fresh(**{f"{vin}-S9": car.report(s0)})),
        422,
        "unknown_ecu",
    )
    yield (
        "report of another serial",
        vin,
        car.manifest(reports=fresh(**{s0: car.report(s0, ecu_serial=s1)})),
        422,
        "unknown_ecu",
    )
    yield (
        "report with other hardware id",
        vin,
        car.manifest(reports=fresh(**{s0: car.report(s0, hardware_id="other-hw")})),
        422,
        "unknown_ecu",
    )
    # malformed / too large
    yield "not JSON", vin, b"\x00garbage{", 400, "malformed"
    yield (
        "wrong type",
        vin,
        _tamper_signed(car.manifest(), lambda s: s.__setitem__("_type", "targets")),
        400,
        "malformed",
    )
    yield (
        "report not base64",
        vin,
        _resigned(
            car.manifest(),
            lambda s: s["ecu_version_reports"].__setitem__(s0, "***"),
            car.primary.signer,
        ),
        400,
        "malformed",
    )
    yield "too large", vin, b" " * (env.config.max_body + 1), 413, "too_large"


def test_manifest_refusals_change_nothing(env: Env) -> None:
    car = register(env, new_car())
    other = register(env, new_car())
    assert put_manifest(env, car, car.manifest()).status_code == 200
    assert put_manifest(env, other, other.manifest()).status_code == 200
    seen = set()
    for what, vin, body, status, reason in _bad_manifests(env, car, other):
        before = dump(env.db)
        r = env.http.put(f"/vehicles/{vin}/manifest", content=body)
        assert r.status_code == status, (what, r.text)
        assert r.json()["error"] == reason, (what, r.text)
        assert r.json()["detail"], what
        assert dump(env.db) == before, what
        seen.add(reason)
    assert seen == {
        "bad_primary_signature",
        "bad_ecu_signature",
        "replayed_report",
        "report_time_in_past",
        "report_time_in_future",
        "vin_mismatch",
        "unknown_vehicle",
        "missing_ecu",
        "unknown_ecu",
        "malformed",
        "too_large",
    }
    # and the vehicle still checks in normally afterwards
    assert put_manifest(env, car, car.manifest()).status_code == 200


def test_an_unreachable_secondary_does_not_silence_its_vehicle(env: Env) -> None:
    """A manifest without a secondary's report (the primary could not reach it) is
    accepted: the others' reports are recorded, the missing ECU's state is kept and the
    answer names it. Without the primary's own report the manifest is refused."""
    car = register(env, new_car())
    s0, s1 = f"{car.vin}-S0", f"{car.vin}-S1"
    assert put_manifest(env, car, car.manifest()).status_code == 200
    before = {e.serial: e for e in env.director.vehicle_status(car.vin).ecus}
    reports = {s: car.report(s) for s in car.ecus if s != s1}
    r = put_manifest(env, car, car.manifest(reports=reports))
    assert r.status_code == 200, r.text
    assert r.json()["unreported"] == [s1]
    after = {e.serial: e for e in env.director.vehicle_status(car.vin).ecus}
    assert after[s1] == before[s1]  # counter, times, installed image: untouched
    assert after[s0].report_counter == car.ecus[s0].counter != before[s0].report_counter
    # the secondary is back: its next report (counter above its last accepted) is recorded
    r = put_manifest(env, car, car.manifest())
    assert r.status_code == 200 and "unreported" not in r.json(), r.text
    status = {e.serial: e for e in env.director.vehicle_status(car.vin).ecus}
    assert status[s1].report_counter == car.ecus[s1].counter


def test_report_times_checked_against_the_last_report_and_the_director_clock(
    env: Env,
) -> None:
    """5.4.2.1: equal times pass (shared clock, whole seconds); a fast ECU clock within the
    tolerance is stored as the Director's time, so correcting it is not refused."""
    from uptane.errors import ManifestError

    t = datetime.now(UTC).replace(microsecond=0)
    now = [t + timedelta(microseconds=500_000)]
    director = Director(
        Database(env.config.db_url),
        env.config.online_signers(),
        clock=lambda: now[0],
        report_time_tolerance=timedelta(hours=1),
    )
    try:
        car = register(env, new_car())
        s0, p = f"{car.vin}-S0", car.primary.serial

        def send(**times: datetime) -> None:
            reports = {s: car.report(s, latest_time=times.get(s, t)) for s in car.ecus}
            director.receive_manifest(car.vin, car.manifest(reports=reports))

        def stored() -> dict[str, datetime | None]:
            return {e.serial: e.last_report_time for e in director.vehicle_status(car.vin).ecus}

        send()
        assert set(stored().values()) == {t}
        send()  # the same second again: accepted
        send(**{s0: t + timedelta(minutes=59)})  # fast, within the tolerance
        assert stored()[s0] == t  # capped at the Director's clock (whole seconds)
        send()  # the ECU's clock corrected back: accepted
        now[0] = t
        before = dump(env.db)
        for times, reason in (
            ({p: t - timedelta(seconds=1)}, "report_time_in_past"),
            ({p: t + timedelta(hours=1, seconds=1)}, "report_time_in_future"),
        ):
            with pytest.raises(ManifestError) as e:
                send(**times)
            assert e.value.reason == reason
            assert dump(env.db) == before
        send(**{s0: t + timedelta(hours=1)})  # exactly at the tolerance: accepted
        assert set(stored().values()) == {t}
    finally:
        director.close()


def test_streamed_oversized_body_refused(env: Env) -> None:
    car = register(env, new_car())
    chunk = b"x" * 65536

    def body() -> Iterator[bytes]:  # chunked: no Content-Length to refuse up front
        for _ in range(env.config.max_body // len(chunk) + 2):
            yield chunk

    before = dump(env.db)
    r = env.http.put(f"/vehicles/{car.vin}/manifest", content=body())
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    r = env.op.post("/api/vehicles", content=body())
    assert (r.status_code, r.json()["error"]) == (413, "too_large")
    assert dump(env.db) == before


def test_installed_assignment_is_completed(env: Env, tmp_path: Path) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    r = env.op.post(
        "/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [brake.serial]}
    )
    assert r.status_code == 201
    # same name, wrong hash: not done
    wrong = installed_image(env, "brake-1.wasm")
    brake.installed = InstalledImage(
        wrong.filename, wrong.length, {**wrong.hashes, "sha256": "00" * 32}, 1
    )
    r = put_manifest(env, car, car.manifest())
    assert r.json() == {"accepted": True, "metadata_version": 2}
    assert len(env.op.get(f"/api/vehicles/{car.vin}").json()["pending"]) == 1
    # no hash function in common: not done either
    brake.installed = InstalledImage(wrong.filename, wrong.length, {"md5": "00" * 16}, 1)
    assert put_manifest(env, car, car.manifest()).json()["metadata_version"] == 2
    # right name and hashes, other length: not done
    brake.installed = installed_image(env, "brake-1.wasm", length=1)
    assert put_manifest(env, car, car.manifest()).json()["metadata_version"] == 2
    # other name, right hashes: not done
    brake.installed = installed_image(env, "brake-1.wasm", filename="brake-2.wasm")
    assert put_manifest(env, car, car.manifest()).json()["metadata_version"] == 2
    assert len(env.op.get(f"/api/vehicles/{car.vin}").json()["pending"]) == 1
    # right bytes installed (sha256 only reported): done, new targets without it
    right = installed_image(env, "brake-1.wasm")
    brake.installed = InstalledImage(
        right.filename, right.length, {"sha256": right.hashes["sha256"]}, 1
    )
    r = put_manifest(env, car, car.manifest())
    assert r.json() == {"accepted": True, "metadata_version": 3}
    v = env.op.get(f"/api/vehicles/{car.vin}").json()
    assert v["pending"] == []
    assert [(x["ecu_serial"], x["result"], x["image"]) for x in v["results"]] == [
        (brake.serial, "ok", "brake-1.wasm")
    ]
    targets = director_targets(refresh(env, car, tmp_path))
    assert targets.version == 3 and targets.targets == {}
    assert get_vehicle_id(targets) == car.vin
    # the next check-in changes nothing in the metadata
    assert put_manifest(env, car, car.manifest()).json()["metadata_version"] == 3


def test_release_counter_rollback_refused(env: Env) -> None:
    car = register(env, new_car())
    brake = next(e for e in car.ecus.values() if e.hardware_id == "brake-ecu")
    brake.installed = installed_image(env, "brake-2.wasm")
    assert put_manifest(env, car, car.manifest()).status_code == 200
    before = dump(env.db)
    r = env.op.post(
        "/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [brake.serial]}
    )
    assert (r.status_code, r.json()["error"]) == (409, "release_counter_rollback")
    assert dump(env.db) == before


def test_reported_attacks_and_failures_recorded(env: Env) -> None:
    car = register(env, new_car())
    s0 = f"{car.vin}-S0"
    reports = {s: car.report(s) for s in car.ecus}
    reports[s0] = car.report(
        s0,
        attacks_detected=("freeze", "rollback"),
        last_result="rolledBack",
        last_result_text="self test trapped",
    )
    r = put_manifest(env, car, car.manifest(reports=reports))
    assert r.status_code == 200
    v = env.op.get(f"/api/vehicles/{car.vin}").json()
    assert sorted((a["ecu_serial"], a["attack"]) for a in v["attacks"]) == [
        (s0, "freeze"),
        (s0, "rollback"),
    ]
    assert [(x["ecu_serial"], x["result"], x["text"]) for x in v["results"]] == [
        (s0, "rolledBack", "self test trapped")
    ]
    listed = {x["vin"]: x for x in env.op.get("/api/vehicles").json()}
    assert len(listed[car.vin]["attacks"]) == 2


def test_metadata_signed_on_change_or_near_expiry_only(env: Env) -> None:
    car = register(env, new_car())
    base = f"/vehicles/{car.vin}/metadata"
    first = env.http.get(f"{base}/timestamp.json").content
    assert env.http.get(f"{base}/timestamp.json").content == first  # not per request
    assert env.http.get(f"{base}/1.targets.json").status_code == 200
    assert env.http.get(f"{base}/2.targets.json").status_code == 404
    ts = Metadata.from_bytes(first).signed
    margin = env.config.metadata_expiry - env.config.refresh_margin
    try:
        env.clock.offset = margin - timedelta(minutes=5)  # not yet within the margin
        assert env.http.get(f"{base}/timestamp.json").content == first
        env.clock.offset = margin + timedelta(minutes=5)
        renewed = env.http.get(f"{base}/timestamp.json").content
        assert renewed != first
        new_ts = Metadata.from_bytes(renewed).signed
        assert new_ts.version == ts.version + 1
        assert new_ts.expires > ts.expires
        assert env.http.get(f"{base}/2.targets.json").status_code == 200
        assert env.http.get(f"{base}/timestamp.json").content == renewed
    finally:
        env.clock.offset = timedelta()


def test_metadata_file_names_are_checked(env: Env) -> None:
    car = register(env, new_car())
    for name in (
        "../director.json",
        "root.json.bak",
        "0.root.json",
        "1.timestamp.der",
        "x.json",
        "snapshot.der",
    ):
        r = env.http.get(f"/vehicles/{car.vin}/metadata/{name}")
        assert r.status_code == 404, name
    assert (
        env.http.get("/vehicles/NOSUCHVIN/metadata/timestamp.json").json()["error"]
        == "unknown_vehicle"
    )
    assert env.http.get("/root/2.root.json").status_code == 404


GARBAGE_BODIES: list[bytes] = [
    b"",
    b"\xff\xfe\x00garbage",
    b"{",
    b"null",
    b"[]",
    b'"text"',
    b"[" * 100_000,
    b'{"signed": {"_type": "vehicle_manifest"}, "signatures": 7}',
    b'{"vin": "V", "ecus": [{"serial": "S", "hardware_id": "H", "public_key": {"keytype": []}, "primary": true}]}',
    b'{"vin": "V", "ecus": [{"serial": "S", "hardware_id": "H", "public_key": {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": 5}}, "primary": true}]}',
    b'{"image": "a\\u0000b", "ecu_serials": ["x"]}',
    b'{"image": "x.wasm", "hardware_id": "h", "vins": ["V\\u0000"]}',
    json.dumps(
        {
            "signed": {
                "_type": "vehicle_manifest",
                "vin": "V",
                "primary_ecu_serial": "P",
                "ecu_version_reports": {"P": base64.b64encode(b"\x30\x03\x02\x01\x01").decode()},
            },
            "signatures": [{"keyid": "k", "sig": "zz"}],
        }
    ).encode(),
]
GARBAGE_SEGMENTS = ["x", "%00", "..%2F..", "A" * 300, "%E2%98%83", "1.root.json", "-1", "%FF"]


def test_garbage_to_every_endpoint_is_never_a_5xx(env: Env) -> None:
    schema = env.http.get("/openapi.json").json()
    targets = set()
    for template, methods in schema["paths"].items():
        for method in methods:
            for segment in GARBAGE_SEGMENTS:
                path = template.replace("{vin}", segment).replace("{filename}", segment)
                targets.add((method.upper(), path))
    assert len(targets) > 30
    for method, path in sorted(targets):
        for body in GARBAGE_BODIES:
            for client in (env.http, env.op):
                r = client.request(method, path, content=body)
                assert r.status_code < 500, (method, path, body[:60], r.text)
                if r.status_code >= 400:
                    assert r.json()["error"], (method, path, body[:60])


def test_several_processes_share_one_database(env: Env, tmp_path: Path) -> None:
    """A second Director (as another process would build it) sees and serves the same state."""
    second = Director.from_config(env.config, clock=env.clock)
    url2, stop = _serve_asgi(create_app(second, env.config.token))
    try:
        op2 = http_client(url2, env.config.token)
        car = new_car()
        assert op2.post("/api/vehicles", json=car.body()).status_code == 201
        assert put_manifest(env, car, car.manifest()).status_code == 200  # via the first
        # replay through the other server is refused: the counter is in the DB
        replay = car.manifest()
        assert op2.put(f"/vehicles/{car.vin}/manifest", content=replay).status_code == 200
        r = env.http.put(f"/vehicles/{car.vin}/manifest", content=replay)
        assert r.json()["error"] == "replayed_report"
        for name in ("timestamp.json", "1.snapshot.json", "1.targets.json", "targets.der"):
            a = env.http.get(f"/vehicles/{car.vin}/metadata/{name}").content
            assert op2.get(f"/vehicles/{car.vin}/metadata/{name}").content == a
        assert op2.get(f"/api/vehicles/{car.vin}").json()["last_seen"] is not None
        op2.close()
    finally:
        stop()
        second.close()


def test_migrations_match_the_models(env: Env) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    with env.db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        head = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    from alembic.script import ScriptDirectory

    from director.db import MIGRATIONS_DIR

    assert head == ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head() == "0008"


def test_root_import_checks_the_chain(env: Env) -> None:
    from uptane.errors import ConfigError

    root1 = env.http.get("/root/1.root.json").content
    assert env.director.import_root(root1) is False  # already there
    md = Metadata[Root].from_bytes(root1)
    md.signed.version = 2
    with pytest.raises(ConfigError, match="not properly signed"):
        env.director.import_root(md.to_bytes())
    md.signed.version = 3
    with pytest.raises(ConfigError, match="3 given, 2 expected"):
        env.director.import_root(md.to_bytes())
    assert env.director.root_version() == 1


def test_report_text_is_stored_whatever_the_ecu_wrote(env: Env) -> None:
    """ECU-chosen strings (NUL, any Unicode) never break the database (PostgreSQL refuses NUL)."""
    car = register(env, new_car())
    s0 = f"{car.vin}-S0"
    car.ecus[s0].installed = installed_image(
        env, "brake-1.wasm", filename="odd\x00name-\u2603.wasm"
    )
    reports = {s: car.report(s) for s in car.ecus}
    reports[s0] = car.report(s0, last_result="trialFailed", last_result_text="bad\x00text \u2603")
    r = put_manifest(env, car, car.manifest(reports=reports))
    assert r.status_code == 200, r.text
    v = env.op.get(f"/api/vehicles/{car.vin}").json()
    [result] = v["results"]
    assert result["result"] == "trialFailed"
    assert result["text"] == "bad\ufffdtext \u2603"
    ecu = next(e for e in v["ecus"] if e["serial"] == s0)
    assert ecu["installed"]["filename"] == "odd\ufffdname-\u2603.wasm"


def test_root_import_refuses_a_der_root_that_says_something_else(env: Env) -> None:
    from uptane.errors import ConfigError

    root1 = env.http.get("/root/1.root.json").content
    car = register(env, new_car())
    targets_der = env.http.get(f"/vehicles/{car.vin}/metadata/targets.der").content
    with pytest.raises(ConfigError, match="something else"):
        env.director.import_root(root1, targets_der)
    with pytest.raises(ConfigError, match="does not parse"):
        env.director.import_root(root1, b"\x30\x00")


def test_oversized_content_length_refused_before_the_body_is_sent(env: Env) -> None:
    port = int(env.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            b"PUT /vehicles/X/manifest HTTP/1.1\r\nHost: x\r\n"
            + f"Content-Length: {env.config.max_body + 1}\r\n\r\n".encode()
        )
        response = b""  # no body is sent: only a refusal by header can answer
        while b"}" not in response:
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b'"too_large"' in response
