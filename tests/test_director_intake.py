"""Director manifest intake: cheapest refusal first, stale secondary reports left out,
operator counter resets, what is stored (Uptane 2.1 5.4.2; issues 10 item 12, 12).

Runs on SQLite and PostgreSQL with the fixtures of ``test_director``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers.director_env import (
    Env,
    dump,
    new_car,
    put_manifest,
    register,
)
from securesystemslib.formats import encode_canonical
from securesystemslib.signer import CryptoSigner
from sqlalchemy import select

from director import intake
from director.db import VehicleManifestRecord
from uptane import codec
from uptane.errors import ManifestError

JAM = 2**63 - 1


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the DER types ``uptane.codec.decode`` is asked for, in order."""
    seen: list[str] = []
    real = codec.decode

    def counting(type_name: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(type_name)
        return real(type_name, *args, **kwargs)

    monkeypatch.setattr(codec, "decode", counting)
    yield seen


def _report_decodes(seen: list[str]) -> int:
    return sum(1 for name in seen if name in ("SignedEcuVersionReport", "EcuVersionReport"))


# --- cheapest refusal first --------------------------------------------------------


def test_bad_primary_signature_is_refused_before_any_report_is_decoded(
    env: Env, decodes: list[str]
) -> None:
    car = register(env, new_car(n_secondaries=2))
    stranger = CryptoSigner.generate_ed25519()
    before = dump(env.db)
    decodes.clear()
    r = put_manifest(env, car, car.manifest(signer=stranger))
    assert (r.status_code, r.json()["error"]) == (403, "bad_primary_signature")
    assert _report_decodes(decodes) == 0
    # a manifest signed right: each report is decoded once (its content)
    decodes.clear()
    r = put_manifest(env, car, car.manifest())
    assert r.status_code == 200, r.text
    assert decodes.count("SignedEcuVersionReport") == 0  # read by slicing (issue 12)
    assert decodes.count("EcuVersionReport") == 3
    assert dump(env.db) != before


def test_unknown_vehicle_and_report_flood_refused_before_any_decode(
    env: Env, decodes: list[str]
) -> None:
    """256 reports for a 3-ECU vehicle: refused by count, before signature or decode."""
    car = register(env, new_car(n_secondaries=2))
    s0 = f"{car.vin}-S0"
    one = base64.b64encode(car.report(s0).to_der()).decode()
    doc = json.loads(car.manifest())
    for i in range(253):
        doc["signed"]["ecu_version_reports"][f"{car.vin}-X{i}"] = one
    canonical = encode_canonical(doc["signed"])
    assert canonical is not None
    doc["signatures"] = [car.primary.signer.sign(canonical.encode()).to_dict()]
    flood = json.dumps(doc).encode()
    assert len(doc["signed"]["ecu_version_reports"]) == 256
    before = dump(env.db)
    decodes.clear()
    r = put_manifest(env, car, flood)
    assert (r.status_code, r.json()["error"]) == (422, "unknown_ecu")
    assert "256 reports for a vehicle of 3 ECUs" in r.json()["detail"]
    r = env.http.put(
        "/vehicles/NOSUCHVIN9/manifest", content=flood.replace(car.vin.encode(), b"NOSUCHVIN9")
    )
    assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle")
    assert decodes == []
    assert dump(env.db) == before


def test_stored_manifest_is_the_verified_signed_part_only(env: Env) -> None:
    car = register(env, new_car(n_secondaries=1))
    doc = json.loads(car.manifest())
    doc["unsigned_extra"] = "x" * 100
    doc["signatures"].append({"keyid": "00" * 32, "sig": "11" * 64})
    r = put_manifest(env, car, json.dumps(doc).encode())
    assert r.status_code == 200, r.text
    with env.db.transaction() as s:
        stored = s.scalars(
            select(VehicleManifestRecord.body).order_by(VehicleManifestRecord.id.desc())
        ).first()
    assert stored is not None
    kept = json.loads(stored)
    assert set(kept) == {"signed", "signatures"}
    assert kept["signed"] == doc["signed"]
    assert kept["signatures"] == [doc["signatures"][0]]
    assert stored == (encode_canonical(kept) or "").encode()


# --- one ECU cannot silence the vehicle (issue 10 item 12) -------------------------


def test_jammed_secondary_counter_is_left_out_and_recorded(env: Env) -> None:
    car = register(env, new_car(n_secondaries=2))
    s0, s1, p = f"{car.vin}-S0", f"{car.vin}-S1", car.primary.serial
    assert put_manifest(env, car, car.manifest()).status_code == 200
    # a compromised S0 signs one report with the largest counter: accepted once
    car.ecus[s0].counter = JAM - 1
    assert put_manifest(env, car, car.manifest()).status_code == 200
    # from now on its reports are never fresh; the vehicle still checks in
    car.ecus[s0].counter = 2
    r = put_manifest(env, car, car.manifest())
    assert r.status_code == 200, r.text
    assert r.json()["refused_reports"] == {s0: "replayed_report"}
    status = env.director.vehicle_status(car.vin)
    counters = {e.serial: e.report_counter for e in status.ecus}
    assert counters == {p: 3, s1: 3, s0: JAM}  # S0's state is not touched
    assert [(a.ecu_serial, a.attack, a.report_counter) for a in status.attacks] == [
        (s0, "replayed_report", 3)
    ]
    # the operator resets it (reflash): audited, and S0 is recorded again
    op = env.op.post(
        f"/api/vehicles/{car.vin}/ecus/{s0}/reset-counter", json={"reason": "reflashed"}
    )
    assert op.status_code == 200, op.text
    assert op.json()["detail"] == {"previous_counter": JAM, "reason": "reflashed"}
    audit = env.op.get("/api/audit").json()
    assert audit[0]["action"] == "reset_report_counter"
    assert (audit[0]["vin"], audit[0]["ecu_serial"]) == (car.vin, s0)
    r = put_manifest(env, car, car.manifest())
    assert r.status_code == 200 and "refused_reports" not in r.json(), r.text
    counters = {e.serial: e.report_counter for e in env.director.vehicle_status(car.vin).ecus}
    assert counters[s0] == 4


def test_stale_secondary_times_are_left_out_and_recorded(env: Env) -> None:
    car = register(env, new_car(n_secondaries=2))
    s0, s1 = f"{car.vin}-S0", f"{car.vin}-S1"
    assert put_manifest(env, car, car.manifest()).status_code == 200
    now = datetime.now(UTC).replace(microsecond=0)
    ahead = env.clock() + env.director.report_time_tolerance + timedelta(minutes=5)
    reports = {s: car.report(s) for s in car.ecus}
    reports[s0] = car.report(s0, latest_time=now - timedelta(hours=1))
    reports[s1] = car.report(s1, latest_time=ahead)
    r = put_manifest(env, car, car.manifest(reports=reports))
    assert r.status_code == 200, r.text
    assert r.json()["refused_reports"] == {
        s0: "report_time_in_past",
        s1: "report_time_in_future",
    }
    attacks = {(a.ecu_serial, a.attack) for a in env.director.vehicle_status(car.vin).attacks}
    assert attacks == {(s0, "report_time_in_past"), (s1, "report_time_in_future")}


def test_the_primary_report_still_decides_freshness(env: Env) -> None:
    """A replayed manifest (stale primary report) is refused whole and changes nothing."""
    car = register(env, new_car(n_secondaries=1))
    sent = car.manifest()
    assert put_manifest(env, car, sent).status_code == 200
    before = dump(env.db)
    r = put_manifest(env, car, sent)
    assert (r.status_code, r.json()["error"]) == (409, "replayed_report")
    car.ecus[car.primary.serial].counter = 0
    r = put_manifest(env, car, car.manifest())
    assert (r.status_code, r.json()["error"]) == (409, "replayed_report")
    assert dump(env.db) == before


def test_counter_reset_needs_a_known_ecu_a_reason_and_the_token(env: Env) -> None:
    car = register(env, new_car(n_secondaries=1))
    s0 = f"{car.vin}-S0"
    before = dump(env.db)
    path = f"/api/vehicles/{car.vin}/ecus/{s0}/reset-counter"
    assert env.http.post(path, json={"reason": "x"}).status_code == 401
    r = env.op.post(f"/api/vehicles/{car.vin}/ecus/NOSUCH/reset-counter", json={"reason": "x"})
    assert (r.status_code, r.json()["error"]) == (404, "unknown_ecu")
    r = env.op.post(f"/api/vehicles/NOSUCHVIN/ecus/{s0}/reset-counter", json={"reason": "x"})
    assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle")
    assert env.op.post(path, json={"reason": ""}).status_code == 422
    assert env.op.post(path, json={}).status_code == 422
    assert dump(env.db) == before
    with pytest.raises(Exception, match="reason"):
        env.director.reset_report_counter(car.vin, s0, reason="   ")


def test_key_cache_evicts_least_recently_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from uptane.keys import public_key_dict

    monkeypatch.setattr(intake, "_KEY_CACHE", type(intake._KEY_CACHE)())
    monkeypatch.setattr(intake, "_KEY_CACHE_MAX", 2)
    a, b, c = (public_key_dict(CryptoSigner.generate_ed25519().public_key) for _ in range(3))
    ka = intake._parsed_key(a)
    intake._parsed_key(b)
    assert intake._parsed_key(a) is ka  # a is now the most recently used
    intake._parsed_key(c)  # evicts b, not a
    assert intake._parsed_key(a) is ka
    assert len(intake._KEY_CACHE) == 2
    cached = {k[0] for k in intake._KEY_CACHE}
    assert cached == {a["keyid"], c["keyid"]}


def test_manifest_error_reasons_are_typed(env: Env) -> None:
    car = register(env, new_car(n_secondaries=1))
    with pytest.raises(ManifestError) as e:
        env.director.receive_manifest(car.vin, b"[]")
    assert e.value.reason == "malformed"


def test_reset_counter_cli(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from director.service import Director, EcuSpec
    from director.setup import init_director
    from uptane.cli import cli as uptane_cli

    config = init_director(tmp_path / "d")
    car = new_car(n_secondaries=1)
    director = Director.from_config(config)
    try:
        director.register_vehicle(
            car.vin,
            [
                EcuSpec(e.serial, e.hardware_id, e.signer.public_key, e.primary)
                for e in car.ecus.values()
            ],
        )
        director.receive_manifest(car.vin, car.manifest())
    finally:
        director.close()
    s0 = f"{car.vin}-S0"
    args = ["director", "reset-counter", "--dir", str(tmp_path / "d"), "--vin", car.vin, s0]
    result = CliRunner().invoke(uptane_cli, [*args, "--reason", "reflashed"])
    assert result.exit_code == 0, result.output
    assert f"{car.vin} {s0}: report counter reset (was 1); audit entry 1" in result.output
    result = CliRunner().invoke(uptane_cli, [*args[:-1], "NOSUCH", "--reason", "x"])
    # a typed error, printed as one line
    assert result.exit_code == 1 and result.output.startswith("Error: "), result.output
    director = Director.from_config(config)
    try:
        assert [(a.actor, a.ecu_serial) for a in director.audit_log()] == [("cli", s0)]
        counters = {e.serial: e.report_counter for e in director.vehicle_status(car.vin).ecus}
        assert counters[s0] is None
    finally:
        director.close()
