"""Bulk vehicle import (``uptane director import``): CSV and JSON, batched, idempotent,
conflicts reported and left alone (issue 12). SQLite and PostgreSQL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers.director_env import (
    Env,
    dump,
)
from securesystemslib.signer import CryptoSigner

from director.bulk import CSV_COLUMNS, load_vehicles, parse_vehicles, records_to_json
from director.errors import InvalidRequestError
from director.service import EcuSpec, VehicleRecord
from uptane.cli import cli as uptane_cli


def _fleet(prefix: str, n: int) -> list[VehicleRecord]:
    records = []
    for i in range(n):
        vin = f"{prefix}{i:04d}"
        keys = [CryptoSigner.generate_ed25519().public_key for _ in range(2)]
        records.append(
            VehicleRecord(
                vin,
                (
                    EcuSpec(f"{vin}-P", "gateway", keys[0], primary=True),
                    EcuSpec(f"{vin}-B", "brake-ecu", keys[1]),
                ),
            )
        )
    return records


def _csv(records: list[VehicleRecord]) -> str:
    lines = [",".join(CSV_COLUMNS)]
    for r in records:
        for e in r.ecus:
            public = e.public_key.keyval["public"]
            lines.append(f"{r.vin},{e.serial},{e.hardware_id},{public},{int(e.primary)}")
    return "\n".join(lines) + "\n"


def test_import_in_batches_is_idempotent(env: Env) -> None:
    prefix = f"BULK{env.db.engine.dialect.name[:2].upper()}"
    records = _fleet(prefix, 23)
    result = env.director.import_vehicles(records, batch=5)
    assert (result.added, result.unchanged, result.conflicts) == (23, 0, [])
    before = dump(env.db)
    again = env.director.import_vehicles(records, batch=7)
    assert (again.added, again.unchanged, again.conflicts) == (0, 23, [])
    assert dump(env.db) == before
    # every imported vehicle has signed metadata and checks in
    vin = records[7].vin
    r = env.http.get(f"/vehicles/{vin}/metadata/timestamp.json")
    assert r.status_code == 200
    status = env.director.vehicle_status(vin)
    assert status.metadata_version == 1
    assert {e.serial for e in status.ecus} == {f"{vin}-P", f"{vin}-B"}


def test_conflicts_are_reported_and_left_alone(env: Env) -> None:
    prefix = f"CONF{env.db.engine.dialect.name[:2].upper()}"
    records = _fleet(prefix, 3)
    env.director.import_vehicles(records[:2])
    before = dump(env.db)
    changed = _fleet(prefix, 1)[0]  # same VIN and serials, other keys
    stolen = VehicleRecord(
        f"{prefix}X",
        (EcuSpec(records[1].ecus[0].serial, "gateway", changed.ecus[0].public_key, True),),
    )
    result = env.director.import_vehicles([changed, stolen, records[2]])
    assert result.added == 1 and result.unchanged == 0
    assert len(result.conflicts) == 2
    assert result.conflicts[0].startswith(f"{prefix}0000: registered with other ECUs")
    assert "ECU serials of other vehicles" in result.conflicts[1]
    after = dump(env.db)
    assert {r[1] for r in after["vehicles"]} - {r[1] for r in before["vehicles"]} == {
        records[2].vin
    }


def test_csv_and_json_files_and_the_cli(env: Env, tmp_path: Path) -> None:
    prefix = f"FILE{env.db.engine.dialect.name[:2].upper()}"
    records = _fleet(prefix, 6)
    csv_file = tmp_path / "fleet.csv"
    csv_file.write_text(_csv(records[:3]))
    json_file = tmp_path / "fleet.json"
    json_file.write_text(json.dumps(records_to_json(records[3:])))
    assert [r.vin for r in load_vehicles(csv_file)] == [r.vin for r in records[:3]]
    assert load_vehicles(json_file) == records[3:]
    for path, added in ((csv_file, 3), (json_file, 3), (csv_file, 0)):
        result = CliRunner().invoke(
            uptane_cli,
            [
                "director",
                "import",
                "--dir",
                str(env.config.directory),
                "--db",
                env.config.db_url,
                str(path),
            ],
        )
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"{added} vehicles registered"), result.output


@pytest.mark.parametrize(
    ("fmt", "data", "message"),
    [
        ("json", b"{}", "a list of vehicles"),
        ("json", b'[{"vin": "V1"}]', "missing or bad field"),
        ("csv", b"vin,serial\nV1,S1\n", "CSV header"),
        ("csv", b",".join(c.encode() for c in CSV_COLUMNS) + b"\nV1,S1,hw,zz,1\n", "public key"),
        ("xml", b"<fleet/>", "unknown import format"),
    ],
)
def test_bad_import_files_are_typed_errors(fmt: str, data: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        parse_vehicles(data, fmt)


def test_duplicates_in_one_file_are_refused() -> None:
    records = _fleet("DUP", 2)
    twice = [*records, records[0]]
    with pytest.raises(InvalidRequestError, match="listed twice"):
        parse_vehicles(json.dumps(records_to_json(twice)).encode(), "json")
