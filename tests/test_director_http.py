"""The Director's HTTP layer: conditional GETs (ETag/304), answers of the HTTP layer
itself (405 + Allow, JSON errors), path patterns, OpenAPI (issue 12).

Runs on SQLite and PostgreSQL with the fixtures of ``test_director``.
"""

from __future__ import annotations

import pytest
from helpers.director_env import (
    Env,
    new_car,
    put_manifest,
    register,
)

from director.http_layer import etag_of

FILES = ("timestamp.json", "1.snapshot.json", "1.targets.json", "targets.der", "1.root.der")


def test_metadata_carries_an_etag_and_honours_if_none_match(env: Env) -> None:
    car = register(env, new_car())
    for name in FILES:
        url = f"/vehicles/{car.vin}/metadata/{name}"
        r = env.http.get(url)
        assert r.status_code == 200, (name, r.text)
        etag = r.headers["etag"]
        assert etag == etag_of(r.content) and etag.startswith('"')
        assert "no-cache" in r.headers["cache-control"]
        again = env.http.get(url, headers={"If-None-Match": etag})
        assert (again.status_code, again.content) == (304, b""), name
        assert again.headers["etag"] == etag
        # a list naming it, a weak form of it, and "*" all match
        for header in (f'"x", {etag}', f"W/{etag}", "*"):
            assert env.http.get(url, headers={"If-None-Match": header}).status_code == 304
        # another tag: the whole file
        other = env.http.get(url, headers={"If-None-Match": '"0123"'})
        assert (other.status_code, other.content) == (200, r.content)
    r = env.http.get("/root/1.root.json")
    assert (
        env.http.get("/root/1.root.json", headers={"If-None-Match": r.headers["etag"]}).status_code
        == 304
    )


def test_etag_changes_when_the_metadata_changes(env: Env) -> None:
    car = register(env, new_car())
    url = f"/vehicles/{car.vin}/metadata/timestamp.json"
    first = env.http.get(url)
    brake = next(s for s, e in car.ecus.items() if e.hardware_id == "brake-ecu")
    r = env.op.post("/api/assignments", json={"image": "brake-1.wasm", "ecu_serials": [brake]})
    assert r.status_code == 201, r.text
    changed = env.http.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert changed.status_code == 200
    assert changed.content != first.content
    assert changed.headers["etag"] == etag_of(changed.content) != first.headers["etag"]
    # a poll with nothing new: 304, and no signing on the way
    with env.db.transaction() as s:
        from sqlalchemy import select

        from director.db import Vehicle

        version = s.scalars(select(Vehicle.targets_version).where(Vehicle.vin == car.vin)).one()
    for _ in range(3):
        assert (
            env.http.get(url, headers={"If-None-Match": changed.headers["etag"]}).status_code == 304
        )
    with env.db.transaction() as s:
        assert (
            s.scalars(select(Vehicle.targets_version).where(Vehicle.vin == car.vin)).one()
            == version
        )


@pytest.mark.parametrize(
    "name",
    [
        "2147483648.root.json",  # 2^31: over the 32-bit version column
        "9999999999.root.der",
        "2147483648.targets.json",
        "1.root.json\n",
        "timestamp.json\n",
    ],
)
def test_out_of_range_and_newline_names_are_404(env: Env, name: str) -> None:
    car = register(env, new_car(n_secondaries=1))
    quoted = name.replace("\n", "%0A")
    for url in (f"/vehicles/{car.vin}/metadata/{quoted}", f"/root/{quoted}"):
        r = env.http.get(url)
        assert (r.status_code, r.json()["error"]) == (404, "not_found"), (url, r.text)
    r = env.http.get(f"/vehicles/{car.vin}%0A/metadata/timestamp.json")
    assert (r.status_code, r.json()["error"]) == (404, "unknown_vehicle")
    r = env.http.put(f"/vehicles/{car.vin}%0A/manifest", content=car.manifest())
    assert r.status_code in (400, 404), r.text


def test_405_carries_allow_and_http_errors_are_json(env: Env) -> None:
    car = register(env, new_car(n_secondaries=1))
    r = env.http.post(f"/vehicles/{car.vin}/metadata/timestamp.json")
    assert r.status_code == 405
    assert r.headers["allow"] == "GET"
    assert r.json()["error"] == "method_not_allowed"
    r = env.http.delete(f"/vehicles/{car.vin}/manifest")
    assert (r.status_code, r.headers["allow"]) == (405, "PUT")
    r = env.http.get("/no/such/path")
    assert (r.status_code, r.json()["error"]) == (404, "not_found")


def test_openapi_documents_files_conditional_gets_and_manifest_answers(env: Env) -> None:
    schema = env.http.get("/openapi.json").json()
    get = schema["paths"]["/vehicles/{vin}/metadata/{filename}"]["get"]
    assert set(get["responses"]["200"]["content"]) == {
        "application/json",
        "application/octet-stream",
    }
    assert "ETag" in get["responses"]["200"]["headers"]
    assert "304" in get["responses"]
    assert any(p["name"] == "if-none-match" for p in get["parameters"])
    put = schema["paths"]["/vehicles/{vin}/manifest"]["put"]
    assert put["requestBody"]["required"] is True
    assert "/api/vehicles/{vin}/ecus/{serial}/reset-counter" in schema["paths"]
    assert "/api/audit" in schema["paths"]


def test_refused_manifests_are_logged_in_one_line(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    car = register(env, new_car(n_secondaries=1))
    caplog.set_level("WARNING", logger="director.app")
    r = put_manifest(env, car, b'{"signed": "\\n\\nforged line", "signatures": []}')
    assert r.status_code == 400
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "director.app"]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0]
    assert f"vin='{car.vin}'" in lines[0] and "reason=malformed" in lines[0]
    assert env.config.token not in lines[0]


def test_health_endpoint_for_load_balancers(env: Env) -> None:
    r = env.http.get("/health")
    assert (r.status_code, r.json()) == (200, {"ok": True})
