"""A fleet run through a Director campaign: ``uptane sim --campaign phases.json [--bad-payload]``.

Issue 14. The fleet first installs v1 everywhere (as a plain ``uptane sim``
run), then v2 is published and rolled out by a campaign made from the
phases file instead of a fleet-wide assignment. Each round cycles the
vehicles the campaign reached, runs their modules past the confirmation
window (ticks ``WATCH_TICKS``, as a car keeps driving after an update),
cycles them again so their health reaches the Director, then moves the
shared simulation clock to the end of the current phase and lets the
Director tick. With ``--bad-payload`` v2 is a module that passes its
self-test and trial but reports unhealthy afterwards: the canary catches
it, the campaign halts, and no vehicle beyond the canary is touched.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import wasmtime

from director.campaigns import ACTIVE, HALTED, CampaignInfo
from ecus.sim.runner import FleetConfig, FleetReport, FleetRun, Log, quiet_logs, quiet_power_cuts
from ecus.sim.world import APPS_DIR, SimVehicle, World, image_name
from uptane.errors import UptaneError
from uptane.metadata import Limits

BAD_PAYLOAD = APPS_DIR / "unhealthy_after_trial.wat"
BAD_CAPS = ("health", "log")
WATCH_TICKS = range(50, 53)
DEFAULT_HALT = {"health_failures": 0, "install_failures": "10%", "rollbacks": "10%"}
MAX_ROUNDS = 40


@functools.cache
def bad_payload() -> bytes:
    """The module that passes its trial, then reports unhealthy."""
    return bytes(wasmtime.wat2wasm(BAD_PAYLOAD.read_text(encoding="utf-8")))


@dataclass
class CampaignRunReport:
    """A fleet run's v1 rollout plus what the v2 campaign did."""

    fleet: FleetReport
    bad_payload: bool
    campaign: CampaignInfo | None = None
    rounds: int = 0
    seconds: float = 0.0
    # VINs of vehicles whose ECUs run v2, and those with a v2 assignment pending
    on_v2: list[str] = field(default_factory=list)
    pending_v2: list[str] = field(default_factory=list)
    reached: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def touched(self) -> list[str]:
        return sorted(set(self.on_v2) | set(self.pending_v2))

    @property
    def ok(self) -> bool:
        """Bad payload: halted with only the first phase's vehicles touched; else completed."""
        c = self.campaign
        if c is None:
            return False
        if self.bad_payload:
            return c.status == HALTED and c.phase == 0 and len(self.touched) <= c.progress[0].target
        return c.status == "completed" and len(self.on_v2) == c.totals()["assigned"]

    def to_dict(self) -> dict[str, Any]:
        c = self.campaign
        return {
            "fleet": self.fleet.to_dict(),
            "bad_payload": self.bad_payload,
            "ok": self.ok,
            "rounds": self.rounds,
            "seconds": round(self.seconds, 3),
            "campaign": None
            if c is None
            else {
                "name": c.name,
                "status": c.status,
                "phase": c.phase_name,
                "halt_reason": c.halt_reason,
                "group_size": c.group_size,
                "progress": [vars(p) for p in c.progress],
            },
            "vehicles_on_v2": self.on_v2,
            "vehicles_pending_v2": self.pending_v2,
            "vehicles_untouched": self.fleet.config.vehicles - len(self.touched),
        }


def campaign_document(
    phases_doc: Mapping[str, Any] | list[Any], hardware_ids: list[str]
) -> dict[str, Any]:
    """The campaign for v2: the file's phases (and halt rules), v2 for every hardware id."""
    doc: dict[str, Any] = (
        {"phases": phases_doc} if isinstance(phases_doc, list) else dict(phases_doc)
    )
    doc.setdefault("name", "sim-v2")
    doc.setdefault("images", {hw: image_name(hw, 2) for hw in hardware_ids})
    doc.setdefault("target", {"all": True})
    doc.setdefault("halt", dict(DEFAULT_HALT))
    return doc


class CampaignRun(FleetRun):
    """``FleetRun`` whose v2 goes out through a campaign."""

    def watch(self, vehicle: SimVehicle) -> None:
        """Run each secondary's module past its trial (errors are the module's health)."""
        for serial in vehicle.secondaries:
            for t in WATCH_TICKS:
                try:
                    vehicle.tick(serial, t)
                except UptaneError:
                    break

    def campaign(self, doc: dict[str, Any], bad: bool) -> CampaignRunReport:
        world = self.world
        assert isinstance(world, World)  # campaign runs are one process (not sharded)
        director = world.director
        start = time.monotonic()
        hws = sorted(set(self.hardware_ids))
        if bad:
            world.publish(
                2, hws, data=bad_payload(), capabilities=BAD_CAPS, limits=Limits(confirm_ticks=5)
            )
        else:
            world.publish(2, hws)
        info = director.create_campaign(doc, actor="uptane-sim")
        self.log(
            f"campaign {info.name}: {len(info.phases)} phases over {info.group_size} vehicles"
            + (" (v2 is a bad payload)" if bad else "")
        )
        report = CampaignRunReport(fleet=self.report, bad_payload=bad)
        by_vin = {v.vin: v for v in self.vehicles}
        with ThreadPoolExecutor(self.config.concurrency) as pool:
            for rnd in range(1, MAX_ROUNDS + 1):
                report.rounds = rnd
                reached = [by_vin[v] for v in director.campaign_vehicles(info.name)]
                list(pool.map(self._cycle, reached))  # install what is assigned
                list(pool.map(self.watch, reached))
                list(pool.map(self._cycle, reached))  # report installs and health
                info = director.campaign(info.name)
                minutes = float(info.phases[info.phase]["minutes"])
                if info.status == ACTIVE:
                    world.clock.advance(timedelta(minutes=minutes, seconds=1))
                    director.tick()
                    info = director.campaign(info.name)
                t = info.totals()
                self.log(
                    f"round {rnd}: {info.status}, phase {info.phase_name}: {t['assigned']} "
                    f"assigned, {t['installed']} installed, {t['health_failures']} health "
                    f"failures, {t['install_failures']} install failures, "
                    f"{t['rollbacks']} rollbacks"
                )
                if info.status == HALTED or (
                    info.status == "completed" and t["installed"] == t["assigned"]
                ):
                    break
        report.campaign = director.campaign(info.name)
        report.reached = director.campaign_vehicles(info.name)
        for vehicle in self.vehicles:
            status = director.vehicle_status(vehicle.vin)
            v2 = {image_name(hw, 2) for hw in hws}
            if any((e.installed or {}).get("filename") in v2 for e in status.ecus):
                report.on_v2.append(vehicle.vin)
            if any(a.image in v2 for a in status.pending):
                report.pending_v2.append(vehicle.vin)
        report.seconds = time.monotonic() - start
        return report


def run_campaign_fleet(
    config: FleetConfig,
    phases_doc: Mapping[str, Any] | list[Any],
    directory: Path,
    *,
    bad_payload: bool = False,
    log: Log | None = None,
) -> CampaignRunReport:
    """Build the fleet, roll out v1, then v2 through a campaign made from ``phases_doc``."""
    start = time.monotonic()
    run = CampaignRun(config, directory, log)
    with contextlib.ExitStack() as stack:
        stack.enter_context(quiet_power_cuts())
        stack.enter_context(quiet_logs())
        run.setup(stack)
        run.rollout(1)
        run.finish()  # the fleet report is the v1 rollout
        doc = campaign_document(phases_doc, sorted(set(run.hardware_ids)))
        report = run.campaign(doc, bad_payload)
    report.fleet.total_seconds = time.monotonic() - start
    return report


def print_campaign_summary(console: Any, report: CampaignRunReport) -> None:
    """The campaign part of ``uptane sim``'s summary (a rich table per phase)."""
    from rich.table import Table

    c = report.campaign
    if c is None:
        return
    table = Table(
        title=f"campaign {c.name}: {c.status}" + (" (bad payload)" if report.bad_payload else "")
    )
    for column in ("phase", "target", "assigned", "installed", "health fail", "install fail"):
        table.add_column(column, justify="right" if column != "phase" else "left")
    table.add_column("rollbacks", justify="right")
    for p in c.progress:
        table.add_row(
            ("> " if p.index == c.phase else "  ") + p.name,
            *(str(v) for v in (p.target, p.assigned, p.installed, p.health_failures)),
            str(p.install_failures),
            str(p.rollbacks),
        )
    console.print(table)
    if c.halt_reason:
        console.print(f"halted: {c.halt_reason}", markup=False)
    untouched = report.fleet.config.vehicles - len(report.touched)
    console.print(
        f"vehicles on v2: {len(report.on_v2)}, v2 pending: {len(report.pending_v2)}, "
        f"untouched (still v1, nothing pending): {untouched} of {report.fleet.config.vehicles}; "
        f"{report.rounds} round(s) in {report.seconds:.2f} s",
        markup=False,
    )


def run_from_cli(
    config: FleetConfig,
    campaign_file: Path | None,
    bad: bool,
    directory: Path,
    console: Any,
    log: Log,
    as_json: bool,
) -> None:
    """``uptane sim --campaign FILE [--bad-payload]``: run, print, exit 1 unless as expected."""
    import json

    import click

    from director.campaign_file import read_campaign_file

    if campaign_file is None:
        raise click.UsageError("--bad-payload needs --campaign PHASES_FILE")
    if config.fault is not None or config.update_to is not None:
        raise click.UsageError("--campaign does not combine with --fault or --update-to")
    doc = read_campaign_file(campaign_file)
    if not isinstance(doc, dict | list):
        raise click.ClickException(f"{campaign_file}: expected phases (a list) or a campaign")
    report = run_campaign_fleet(config, doc, directory, bad_payload=bad, log=log)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_campaign_summary(console, report)
    if not report.ok:
        c = report.campaign
        state = "no campaign" if c is None else f"campaign {c.status} in phase {c.phase_name}"
        raise click.ClickException(
            f"{state}; {len(report.touched)} vehicle(s) touched"
            + (": expected a halt at the first phase" if bad else ": expected it to complete")
        )


DEMO_PHASES = [
    {"name": "canary", "vehicles": 1, "minutes": 30},
    {"name": "half", "percent": 50, "minutes": 60},
    {"name": "all", "percent": 100},
]


def demo_campaign(console: Any, directory: Path, *, vehicles: int = 6) -> CampaignRunReport:
    """``uptane demo --campaign``: a small fleet, a bad payload, a canary that halts it."""
    console.print(
        f"[bold]Campaign demo[/bold]: {vehicles} vehicles on v1; v2 passes its trial but "
        "reports unhealthy afterwards; phases canary (1 vehicle, 30 min), 50 %, 100 %"
    )
    config = FleetConfig(vehicles=vehicles, secondaries=2)
    report = run_campaign_fleet(
        config,
        DEMO_PHASES,
        directory,
        bad_payload=True,
        log=lambda m: console.print(f"  {m}", markup=False, highlight=False),
    )
    print_campaign_summary(console, report)
    return report
