"""Cost of fleet rollout control on manifest intake (issue 14) against intake without it.

In one process, two Directors over two fresh SQLite databases receive the
same kind of pre-signed vehicle version manifests (5 ECUs per vehicle, each
report carrying an ``EcuHealth``, every vehicle in an active campaign, or in
none with ``--idle``): the
baseline with ``observe_fleet`` switched off (what intake did before issue
14), the other with health, quarantine and campaign observation. Runs
alternate (baseline, fleet, baseline, fleet, ...) so both see the same
machine load; the last line is ``ratio=<fleet manifests/s / baseline
manifests/s>`` (median of the rounds).

    .venv/bin/python bench/fleet_intake.py --vehicles 50 --rounds 4 [--db-dir DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from securesystemslib.signer import CryptoSigner
from sqlalchemy import insert, select

from director.config import DirectorConfig
from director.db import Vehicle
from director.fleet_db import Campaign, CampaignVehicle
from director.intake import ManifestIntake
from director.service import Director, EcuSpec
from director.setup import init_director
from uptane.manifest import (
    EcuHealth,
    EcuVersionReport,
    SignedEcuVersionReport,
    VehicleVersionManifest,
)

ECUS = 5


class PlainDirector(Director):
    """The Director with the issue-14 call-out switched off (the baseline)."""

    observe_fleet = ManifestIntake.observe_fleet


def make(cls: type[Director], directory: Path) -> Director:
    config = init_director(directory, db_url=f"sqlite:///{directory / 'director.db'}")
    return cls.from_config(DirectorConfig.load(config.directory))


def fleet(
    director: Director, vehicles: int, manifests: int, *, idle: bool = False
) -> list[tuple[str, list[bytes]]]:
    """Register vehicles, put them in a campaign (unless ``idle``), sign their manifests."""
    out = []
    now = datetime.now(UTC).replace(microsecond=0)
    for v in range(vehicles):
        vin = f"BENCH{v:06d}"
        signers = {f"{vin}-{i}": CryptoSigner.generate_ed25519() for i in range(ECUS)}
        specs = [
            EcuSpec(s, "gw" if i == 0 else "hw", k.public_key, primary=i == 0)
            for i, (s, k) in enumerate(signers.items())
        ]
        director.register_vehicle(vin, specs)
        signed = []
        for counter in range(1, manifests + 1):
            reports = {
                s: SignedEcuVersionReport.sign(
                    EcuVersionReport(
                        s, spec.hardware_id, None, counter, now, health=EcuHealth("healthy")
                    ),
                    k,
                )
                for (s, k), spec in zip(signers.items(), specs, strict=True)
            }
            primary = specs[0].serial
            signed.append(VehicleVersionManifest(vin, primary, reports).sign(signers[primary]))
        out.append((vin, signed))
    if idle:
        return out
    with director.db.transaction(write=True) as session:
        c = Campaign(
            name="bench",
            bundle={"hw": {"image": "x.wasm", "length": 1, "hashes": {"sha256": "00"}}},
            target={"all": True},
            phases=[{"name": "all", "percent": 100, "minutes": 0, "halt": {}}],
            status="active",
            phase=0,
            phase_started_at=now,
            created_at=now,
            updated_at=now,
        )
        session.add(c)
        session.flush()
        rows: list[dict[str, Any]] = []
        for vid in session.execute(select(Vehicle.id)):
            rows.append(
                {
                    "campaign_id": c.id,
                    "vehicle_id": vid[0],
                    "phase": 0,
                    "status": "assigned",
                    "install_failed": False,
                    "rolled_back": False,
                    "health_failed": False,
                    "assigned_at": now,
                    "updated_at": now,
                }
            )
        session.execute(insert(CampaignVehicle), rows)
    return out


def run(director: Director, work: list[tuple[str, list[bytes]]], index: int) -> float:
    """Manifests per second for the ``index``-th manifest of every vehicle."""
    start = time.perf_counter()
    for vin, manifests in work:
        director.receive_manifest(vin, manifests[index])
    return len(work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vehicles", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--db-dir", type=Path, default=None)
    parser.add_argument(
        "--idle", action="store_true", help="vehicles in no campaign (the usual check-in)"
    )
    args = parser.parse_args()
    base = args.db_dir or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    plain = make(PlainDirector, base / "plain")
    full = make(Director, base / "fleet")
    try:
        plain_work = fleet(plain, args.vehicles, args.rounds, idle=args.idle)
        full_work = fleet(full, args.vehicles, args.rounds, idle=args.idle)
        ratios = []
        for r in range(args.rounds):
            a = run(plain, plain_work, r)
            b = run(full, full_work, r)
            ratios.append(b / a)
            print(f"round {r + 1}: baseline {a:.1f} manifests/s, with fleet control {b:.1f}/s")
        print(
            f"{args.vehicles} vehicles x {ECUS} ECUs{' (idle)' if args.idle else ''}, "
            f"{args.rounds} rounds, SQLite, in process: "
            f"ratio={statistics.median(ratios):.3f}"
        )
    finally:
        plain.close()
        full.close()


if __name__ == "__main__":
    main()
