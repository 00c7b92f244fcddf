"""``uptane sim``: a fleet of simulated vehicles against one Director and one Image repository."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import click
from rich.console import Console
from rich.table import Table

from ecus.sim.fleet_faults import FAULTS
from ecus.sim.runner import FleetConfig, FleetReport, percentile, run_fleet
from ecus.sim.world import APPS_DIR


class SimFailed(click.ClickException):
    """Some ECU did not reach the target version (exit status 1)."""

    exit_code = 1


@contextlib.contextmanager
def _exit_on_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so the temporary directory is removed.

    (SIGKILL cannot be caught: then the worker processes remove it.)
    """

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise click.Abort(f"killed by signal {signum}")

    saved = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner)
            saved[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def _app_versions() -> list[int]:
    return sorted(int(p.stem.removeprefix("blink_v")) for p in APPS_DIR.glob("blink_v*.wat"))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def print_summary(console: Console, report: FleetReport) -> None:
    cycles = report.cycle_seconds()
    cfg = report.config
    timings = Table(title="uptane sim", show_header=False)
    timings.add_column("what")
    timings.add_column("value", justify="right")
    timings.add_row("vehicles x secondaries", f"{cfg.vehicles} x {cfg.secondaries}")
    timings.add_row("bus", "CAN FD" if cfg.fd else "classic CAN")
    timings.add_row("worker processes", str(cfg.workers))
    timings.add_row("world setup", f"{report.setup_seconds:.2f} s")
    timings.add_row("vehicles setup", f"{report.vehicles_seconds:.2f} s")
    for phase in report.phases:
        timings.add_row(
            f"v{phase.version} rollout",
            f"{phase.seconds:.2f} s, {phase.rounds} round(s), {phase.updated}/{phase.total} ECUs",
        )
    timings.add_row("vehicle cycles", str(len(cycles)))
    timings.add_row(
        "cycle p50 / p95 / max",
        f"{_ms(percentile(cycles, 50))} / {_ms(percentile(cycles, 95))} / "
        f"{_ms(max(cycles, default=0.0))}",
    )
    timings.add_row("total", f"{report.total_seconds:.2f} s")
    updated = len(report.ecus) - len(report.not_updated)
    timings.add_row(f"ECUs on v{report.target_version}", f"{updated} / {len(report.ecus)}")
    timings.add_row(
        "failed cycles / with issues",
        f"{sum(p.failed_cycles for p in report.phases)} / "
        f"{sum(p.troubled_cycles for p in report.phases)}",
    )
    attacks = ", ".join(f"{k} x{v}" for k, v in report.attacks.items()) or "none"
    timings.add_row("attacks detected", attacks)
    if report.faults:
        fault = report.faults[0].fault
        timings.add_row(
            "faults injected",
            f"{fault} x{len(report.faults)}"
            if fault == "server-restart"
            else f"{fault} on {len(report.faults)} vehicle(s)",
        )
    console.print(timings)
    if report.failures:
        console.print("[bold]Cycles with failures or issues (the fleet recovers):[/bold]")
        for line in report.failures[:20]:
            console.print(f"  {line}", markup=False, highlight=False)
        if len(report.failures) > 20:
            console.print(f"  ... and {len(report.failures) - 20} more")


@click.command("sim")
@click.option("--vehicles", type=click.IntRange(min=1), default=20, show_default=True)
@click.option(
    "--secondaries",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Secondaries per vehicle (each vehicle also has a primary).",
)
@click.option("--fd/--classic", default=False, help="CAN FD or classic CAN (default classic).")
@click.option("--paced", is_flag=True, help="Paced bus: sleep to the wire time of every frame.")
@click.option(
    "--cycles",
    "max_cycles",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Most update cycles per vehicle and version.",
)
@click.option(
    "--update-to",
    type=int,
    default=None,
    help="After v1, publish, assign and roll out this version too.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Worker processes the vehicles are sharded across, all against one Director and "
    "Image repository [default: one per CPU core].",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Vehicles each worker process cycles at once.",
)
@click.option(
    "--fault",
    type=click.Choice(FAULTS),
    default=None,
    help="Inject a fault on the first secondary of --fault-fraction of the vehicles: "
    "drop-frame / corrupt-frame / delay-frame (one CAN frame it sends; delayed by "
    "1.5 s), bus-off (its controller, first round), power-cut (at a slot write point; "
    "it reboots), slow-http / truncated-http (the Director trickles the vehicle's "
    "timestamp.json once / breaks it off halfway once); or server-restart (the "
    "Director and Image repository restart after each release is published and "
    "assigned, before its rollout; --fault-fraction does not apply).",
)
@click.option(
    "--fault-fraction",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=0.25,
    show_default=True,
    help="Share of the vehicles that get --fault (at least one).",
)
@click.option("--seed", type=int, default=1, show_default=True, help="Seed for fault placement.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the repositories, databases and ECU state here.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.option(
    "--tls",
    is_flag=True,
    help="The Director over mutual TLS: each vehicle gets a client certificate from its CA.",
)
@click.option(
    "--campaign",
    "campaign_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="After v1, roll out v2 through a Director campaign with these phases (JSON/YAML).",
)
@click.option(
    "--bad-payload",
    is_flag=True,
    help="With --campaign: v2 passes its trial, then reports unhealthy (the canary halts it).",
)
def cli(
    vehicles: int,
    secondaries: int,
    fd: bool,
    paced: bool,
    max_cycles: int,
    update_to: int | None,
    workers: int | None,
    concurrency: int,
    fault: str | None,
    fault_fraction: float,
    seed: int,
    directory: Path | None,
    as_json: bool,
    tls: bool,
    campaign_file: Path | None,
    bad_payload: bool,
) -> None:
    """Run a fleet of simulated vehicles through v1 (and --update-to) updates.

    Builds --vehicles vehicles, each a primary and --secondaries secondaries
    on its own virtual CAN bus, against one Director and one Image repository
    on loopback; publishes v1 of the demo app for every hardware id, assigns
    it by hardware id and runs update cycles until every ECU reports it (at
    most --cycles). Exits 1 if any ECU did not update.
    """
    versions = _app_versions()
    if update_to is not None and (update_to < 2 or update_to not in versions):
        raise click.BadParameter(
            f"no demo app version {update_to} above 1 (have {versions})", param_hint="--update-to"
        )
    config = FleetConfig(
        vehicles=vehicles,
        secondaries=secondaries,
        fd=fd,
        paced=paced,
        max_cycles=max_cycles,
        update_to=update_to,
        workers=workers or os.cpu_count() or 1,
        concurrency=concurrency,
        fault=fault,
        fault_fraction=fault_fraction,
        seed=seed,
        tls=tls,
    )
    console = Console(stderr=as_json, highlight=False)
    if not console.is_terminal:
        console = Console(stderr=as_json, highlight=False, width=120)

    def log(message: str) -> None:
        if not as_json:
            console.print(message, markup=False)

    if directory is not None and directory.exists() and any(directory.iterdir()):
        raise click.BadParameter(f"{directory} is not empty", param_hint="--dir")
    keep = directory is not None
    base = directory if directory is not None else Path(tempfile.mkdtemp(prefix="uptane-sim-"))
    base.mkdir(parents=True, exist_ok=True)
    try:
        if campaign_file is not None or bad_payload:  # issue 14: ecus.sim.campaign_run
            from ecus.sim.campaign_run import run_from_cli

            run_from_cli(config, campaign_file, bad_payload, base, console, log, as_json)
            return
        with _exit_on_signals():
            report = run_fleet(config, base, log, cleanup=None if keep else base)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_summary(console, report)
    if not report.ok:
        missing = report.not_updated
        names = ", ".join(e.serial for e in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise SimFailed(
            f"{len(missing)} of {len(report.ecus)} ECUs are not on v{report.target_version}: {names}"
        )
